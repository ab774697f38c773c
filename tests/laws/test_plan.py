"""`steplaw plan` and the published loss laws."""
import json

import pytest

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.laws.plan import make_plan
from steplaw.laws.published import step_law
from steplaw.laws.published_loss import LOSS_LAWS


def test_published_loss_law_constants():
    hoffmann, besiroglu = LOSS_LAWS["hoffmann"].law, LOSS_LAWS["besiroglu"].law
    assert (hoffmann.E, hoffmann.A, hoffmann.B, hoffmann.alpha, hoffmann.beta) == (1.69, 406.4, 410.7, 0.34, 0.28)
    assert (besiroglu.E, besiroglu.A, besiroglu.B, besiroglu.alpha, besiroglu.beta) == (
        1.8172, 482.01, 2085.43, 0.3478, 0.3658)
    # Besiroglu et al. quote N_opt ~ C^0.5126; at Chinchilla's budget (5.76e23 FLOPs) the
    # replication's split is close to Chinchilla's own 70B parameters and 1.4T tokens.
    assert besiroglu.n_exponent == pytest.approx(0.5126, abs=1e-4)
    n, d = besiroglu.compute_optimal(5.76e23)
    assert 6e10 < n < 8.5e10 and 1.1e12 < d < 1.6e12
    assert hoffmann.predict(1e9, 2e10) == pytest.approx(1.69 + 406.4 / 1e9**0.34 + 410.7 / 2e10**0.28)


def test_plan_from_compute_is_the_loss_optimum_then_the_step_law():
    plan = make_plan(compute=1e21, seq_len=4096)
    n, d = LOSS_LAWS["besiroglu"].law.compute_optimal(1e21)
    assert plan["N"] == pytest.approx(n) and plan["D"] == pytest.approx(d)
    assert 6 * plan["N"] * plan["D"] == pytest.approx(1e21, rel=1e-9)
    lr, bs = step_law(n, d)
    assert plan["lr"] == pytest.approx(lr) and plan["batch_tokens"] == pytest.approx(bs)
    assert plan["batch_seqs"] == pytest.approx(bs / 4096)
    assert "1e-5" in plan["schedule"] and plan["N_interval"] is None
    assert any("no interval" in note for note in plan["notes"])


def test_plan_warns_when_a_law_is_extrapolated():
    plan = make_plan(compute=1e25)  # N ~ 4e11: beyond both the Chinchilla and the Step Law grids
    joined = " ".join(plan["warnings"])
    assert "loss law besiroglu" in joined and "step_law" in joined and "extrapolation" in joined
    assert make_plan(params=3e8, tokens=2e10)["warnings"] == []  # inside every fitted range


def test_plan_with_own_laws(tmp_path):
    from steplaw.laws.fit import fit_hparams
    from steplaw.laws.loss import fit_loss
    from steplaw.laws.saved import hparam_law_record, loss_law_record, write_json
    from steplaw.laws.synthetic import synthetic_runs

    table = synthetic_runs(seed=1, n_values=(6e7, 2.4e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10))
    hfit, lfit = fit_hparams(table, n_boot=50), fit_loss(table, n_boot=50)
    write_json(tmp_path / "h.json", hparam_law_record(hfit, "synthetic"))
    write_json(tmp_path / "l.json", loss_law_record(lfit, "synthetic"))
    plan = make_plan(compute=1e20, loss_law=str(tmp_path / "l.json"), hparam_law=str(tmp_path / "h.json"))
    n, d = lfit.compute_optimal(1e20)
    assert plan["N"] == pytest.approx(n) and plan["lr"] == pytest.approx(float(hfit.lr_law(n, d)))
    low, high = plan["N_interval"]
    assert low < plan["N"] < high
    with pytest.raises(UserError, match="holds a hyperparameter law"):
        make_plan(compute=1e20, loss_law=str(tmp_path / "h.json"))


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs --compute"),
    ({"compute": 1e21, "params": 1e9}, "not both"),
    ({"params": 1e9}, "needs --compute"),
    ({"compute": 1e21, "loss_law": "kaplan"}, "unknown loss law"),
    ({"compute": 1e21, "hparam_law": "nope"}, "unknown hyperparameter law"),
    ({"compute": 1e21, "loss_law": "missing.json"}, "no law file"),
])
def test_plan_refuses_bad_input(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_plan(**kwargs)


def test_plan_cli_json(capsys):
    assert main(["plan", "--compute", "1e21", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"N", "D", "lr", "batch_tokens", "batch_seqs", "schedule", "warnings", "loss_law", "hparam_law"} <= set(out)
    assert main(["plan", "--params", "1B", "--tokens", "20B"]) == 0
    text = capsys.readouterr().out
    assert "peak LR" in text and "sequences of 2048" in text
    assert main(["plan", "--compute", "-1"]) == 2
