"""fit-loss --method isoflop|both (issue 24, item 3): Chinchilla's Approach 2 on IsoFLOP
budgets, and its refusals (fewer than 3 budgets, a budget with fewer than 3 sizes, a budget
with no interior minimum). The synthetic budgets follow Besiroglu et al. 2024's fitted law
(alpha 0.35, beta 0.37, so N_opt ~ C^(0.37/0.72) = C^0.514)."""
import json

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.laws.isoflop import isoflop_fit
from steplaw.laws.table import table_from_arrays

E, A, B, ALPHA, BETA = 1.82, 482.0, 2085.0, 0.35, 0.37
TRUE_N_EXPONENT = BETA / (ALPHA + BETA)


FACTORS = tuple(np.geomspace(1 / 6, 6, 9))  # sizes per budget, around its optimum


def _rows(budgets=(1e18, 3e18, 1e19, 3e19, 1e20), factors=FACTORS, noise=0.002, seed=1):
    rng = np.random.default_rng(seed)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    rows = []
    for c in budgets:
        n_opt = g * (c / 6) ** TRUE_N_EXPONENT
        for f in factors:
            n = n_opt * f
            d = c / (6 * n)
            rows.append((n, d, (E + A / n**ALPHA + B / d**BETA) * (1 + noise * rng.standard_normal())))
    return rows


def _table(rows):
    n, d, loss = (np.array(v, float) for v in zip(*rows))
    return table_from_arrays(N=n, D=d, loss=loss, lr=np.full(n.size, 1e-3), batch_tokens=np.full(n.size, 1e5))


@pytest.fixture(scope="module")
def iso_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("iso") / "iso.csv"
    path.write_text("N,D,loss\n" + "\n".join(",".join(repr(float(v)) for v in r) for r in _rows()) + "\n")
    return path


def test_isoflop_recovers_the_exponent_within_its_interval(capsys, iso_csv):
    assert main(["fit-loss", str(iso_csv), "--method", "isoflop", "--n-boot", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    co = out["compute_optimal"]
    low, high = co["exponent_intervals"]["N_exponent"]
    assert low < TRUE_N_EXPONENT < high and high - low < 0.05 and co["N_exponent"] == pytest.approx(0.514, abs=0.01)
    assert co["N_exponent"] + co["D_exponent"] == pytest.approx(1.0)  # C = 6 N D on every budget
    assert len(out["budgets"]) == 5 and all(len(b["sizes"]) == 9 for b in out["budgets"])
    assert main(["fit-loss", str(iso_csv), "--method", "both", "--n-boot", "20"]) == 0
    text = capsys.readouterr().out
    assert "IsoFLOP (Approach 2" in text and "compute-optimal with C = 6 * N * D" in text


def test_budgets_from_a_compute_column_and_bucketed_6ND_agree():
    rows = _rows(noise=0.0)
    bucketed = isoflop_fit(_table(rows), n_boot=0)
    n, d, loss = (np.array(v, float) for v in zip(*rows))
    # a compute column that is 6ND up to rounding of the model shapes (3%): the same budgets
    jitter = 6 * n * d * (1 + 0.03 * np.sin(np.arange(n.size)))
    with_c = isoflop_fit(table_from_arrays(N=n, D=d, loss=loss, lr=np.full(n.size, 1e-3),
                                           batch_tokens=np.full(n.size, 1e5), compute=jitter), n_boot=0)
    assert len(bucketed.budgets) == len(with_c.budgets) == 5
    assert with_c.N_exponent == pytest.approx(bucketed.N_exponent, abs=0.01)


@pytest.mark.parametrize("rows, message", [
    (_rows(budgets=(1e18, 1e19)), "needs at least 3 compute budgets; the table has 2"),
    (_rows(factors=(0.5, 2.0)), "has 2 model size(s); the IsoFLOP method needs at least 3 per budget"),
    (_rows(factors=np.geomspace(2, 12, 5)), "has no interior minimum of loss in N"),
])
def test_isoflop_refusals_name_the_budget(rows, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        isoflop_fit(_table(rows), n_boot=0)


def test_isoflop_cli_refusals_are_one_sentence(capsys, tmp_path, iso_csv):
    path = tmp_path / "edge.csv"
    path.write_text("N,D,loss\n" + "\n".join(",".join(repr(float(v)) for v in r)
                                             for r in _rows(factors=np.geomspace(2, 12, 5))) + "\n")
    assert main(["fit-loss", str(path), "--method", "isoflop"]) == 2
    err = capsys.readouterr().err
    assert "budget C = 1e+18 FLOPs has no interior minimum" in err and len(err.strip().splitlines()) == 1
    assert main(["fit-loss", str(iso_csv), "--method", "isoflop", "--save", str(tmp_path / "x.json")]) == 2
    assert "need the parametric loss law" in capsys.readouterr().err
