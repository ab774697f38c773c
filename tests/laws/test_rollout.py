"""fit-loss --holdout RULE and --rollout N|D (issue 24, item 2): fit on part of a ladder,
score the law on the rest; bad rules refused in one sentence. The test names carry the
fitted-on and predicted ranges."""
import json

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.laws.rollout import parse_holdout

# A Chinchilla-shaped ladder (Besiroglu et al. 2024's constants), 9 sizes 2e7..3.2e9 at 5 to 80
# tokens per parameter, with 0.2% run-to-run noise.
N_LADDER = np.geomspace(2e7, 3.2e9, 9)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = []
    for n in N_LADDER:
        for tpp in (5, 10, 20, 40, 80):
            d = n * tpp
            rows.append((n, d, (1.82 + 482 / n**0.35 + 2085 / d**0.37) * (1 + 0.002 * rng.standard_normal())))
    path = tmp_path_factory.mktemp("ladder") / "ladder.csv"
    path.write_text("N,D,loss\n" + "\n".join(",".join(repr(float(v)) for v in r) for r in rows) + "\n")
    return path


def _json(capsys, argv) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_holdout_fit_on_N_2e7_to_9e8_predicts_N_1_7e9_to_3_2e9_within_half_a_percent(capsys, ladder):
    out = _json(capsys, ["fit-loss", str(ladder), "--holdout", "N>=1e9", "--n-boot", "20"])
    hold = out["holdout"]
    assert hold["rule"] == "N>=1e9" and out["fitted_range"]["N"][1] < 1e9  # the law saved / shown: fitted on the rest
    assert hold["fitted_on"]["N"] == pytest.approx([2e7, N_LADDER[6]])
    assert hold["predicted_range"]["N"] == pytest.approx([N_LADDER[7], 3.2e9])
    assert len(hold["rows"]) == 10 and {"N", "D", "loss", "predicted", "rel_error"} <= set(hold["rows"][0])
    for row in hold["rows"]:
        assert row["rel_error"] == pytest.approx(row["predicted"] / row["loss"] - 1)
    mean = np.mean([abs(r["rel_error"]) for r in hold["rows"]])
    assert hold["mean_abs_rel_error"] == pytest.approx(mean) and mean < 0.005
    assert main(["fit-loss", str(ladder), "--holdout", "N>=1e9", "--n-boot", "0"]) == 0
    text = capsys.readouterr().out
    assert "holdout N>=1e9: fitted on N 2e+07 to 9e+08" in text and "mean |rel_error|" in text


def test_holdout_largest_and_D_fits_on_the_rest_predicts_N_3_2e9_at_D_6_4e10_and_up(capsys, ladder):
    hold = _json(capsys, ["fit-loss", str(ladder), "--holdout", "largest,D>=6e10", "--n-boot", "0"])["holdout"]
    assert {(r["N"], r["D"]) for r in hold["rows"]} == {(3.2e9, 3.2e9 * t) for t in (20, 40, 80)}


def test_rollout_by_N_fit_on_the_k_smallest_predicts_the_next_up_to_N_3_2e9(capsys, ladder):
    roll = _json(capsys, ["fit-loss", str(ladder), "--rollout", "N", "--n-boot", "0"])["rollout"]
    steps = roll["steps"]
    assert len(steps) == 6 and [s["predicted"]["N"] for s in steps] == pytest.approx(N_LADDER[3:])
    for k, step in enumerate(steps, start=3):
        assert step["fitted_on"]["N"] == pytest.approx([2e7, N_LADDER[k - 1]])
        assert len(step["rows"]) == 5 and step["mean_abs_rel_error"] < 0.01
    assert roll["mean_abs_rel_error"] == pytest.approx(np.mean([s["mean_abs_rel_error"] for s in steps]))


@pytest.mark.parametrize("rule, message", [
    ("N>1e9", "--holdout term 'N>1e9' is not a rule"),
    ("X>=1", "--holdout term 'X>=1' is not a rule"),
    ("N>=abc", "--holdout term 'N>=abc' has no positive number"),
    ("N>=-5", "--holdout term 'N>=-5' has no positive number"),
    ("", "--holdout '' is empty"),
    ("N>=1e12", "holds out no finished run"),
    ("N>=4e7", "leaves too little to fit on: the loss law's N term A/N^alpha is not fitted"),
    ("D>=1e8", "leaves too little to fit on"),
])
def test_bad_holdout_rules_are_refused_in_one_sentence(capsys, ladder, rule, message):
    assert main(["fit-loss", str(ladder), "--holdout", rule, "--n-boot", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_rollout_needs_four_values_and_parse_keeps_the_terms(capsys, tmp_path):
    rule = parse_holdout(" N>=1e9 , C>=3e20,largest")
    assert rule.bounds == (("N", 1e9), ("C", 3e20)) and rule.largest
    with pytest.raises(UserError, match="expected terms N>=X"):
        parse_holdout("N>=1e9,,")
    path = tmp_path / "t.csv"
    rows = [(n, d, 2 + 400 / n**0.34 + 400 / d**0.28) for n in (1e8, 2e8, 4e8) for d in (1e9, 3e9, 1e10, 3e10)]
    path.write_text("N,D,loss\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    assert main(["fit-loss", str(path), "--rollout", "N", "--n-boot", "0"]) == 2
    assert "--rollout N needs at least 4 distinct values of N" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sweep_csv(tmp_path_factory):
    from steplaw.laws.synthetic import synthetic_runs

    table = synthetic_runs(seed=2, n_values=(6e7, 1.2e8, 2.4e8, 4.8e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10),
                           lr_steps=9, bs_steps=6)
    rows = [(table.N[i], table.D[i], table.lr[i], table.batch_tokens[i], table.status[i],
             "" if not np.isfinite(table.loss[i]) else repr(float(table.loss[i]))) for i in range(len(table))]
    path = tmp_path_factory.mktemp("sweep") / "runs.csv"
    path.write_text("N,D,lr,batch_tokens,status,loss\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def test_fit_holdout_on_N_6e7_to_4_8e8_predicts_lr_and_batch_at_N_9_6e8(capsys, sweep_csv):
    out = _json(capsys, ["fit", str(sweep_csv), "--holdout", "N>=9e8", "--n-boot", "20"])
    hold = out["holdout"]
    assert out["fitted_range"]["N"] == pytest.approx([6e7, 4.8e8]) and hold["predicted_range"]["N"] == [9.6e8, 9.6e8]
    assert len(hold["rows"]) == 3
    for row in hold["rows"]:  # the synthetic truth is a power law: the extrapolation lands near it
        assert row["lr_factor"] == pytest.approx(np.exp(abs(np.log(row["predicted_lr"] / row["lr"]))))
        assert row["lr_factor"] < 1.25 and row["bs_factor"] < 1.4 and row["loss_gap"] < 0.005
    assert hold["lr_factor"]["max"] == max(r["lr_factor"] for r in hold["rows"])
    assert main(["fit", str(sweep_csv), "--holdout", "N>=9e8", "--n-boot", "0", "--no-plots",
                 "--out", str(sweep_csv.parent / "fit")]) == 0
    assert "holdout N>=9e8: fitted on N 6e+07 to 4.8e+08" in capsys.readouterr().out
    assert main(["fit", str(sweep_csv), "--holdout", "N>=1e12", "--json"]) == 2
    assert "holds out no finished run" in capsys.readouterr().err
