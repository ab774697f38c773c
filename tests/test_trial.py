"""steplaw.trial: the contract's trial and result, and the Python-function trainer."""
import json
import math

import pytest

from steplaw.trainers.command import render, template_fields
from steplaw.trainers.python import PythonTrainer
from steplaw.trial import CONTRACT_VERSION, Trial, diverging, parse_result, read_result

TRIAL = Trial(model="d512", N=3_400_000, D=2**20, lr=3e-3, batch_tokens=4096, seq_len=128, args={"n_layer": 8})


def test_trial_carries_the_run_table_names_and_hashes_itself():
    data = TRIAL.placed("/runs/x")
    assert data["contract"] == CONTRACT_VERSION and data["batch_seqs"] == 32 and data["run_dir"] == "/runs/x"
    assert data["run_id"] == TRIAL.run_id() and len(TRIAL.run_id()) == 16
    assert Trial.from_dict(json.loads(json.dumps(data))) == TRIAL  # run_id, run_dir, batch_seqs are derived
    other = Trial.from_dict({**TRIAL.to_dict(), "args": {"n_layer": 9}})
    assert other.run_id() != TRIAL.run_id()
    assert TRIAL.counts() == {"non_embedding": 3_400_000, "active": 3_400_000, "total": None}
    assert Trial.from_dict({**TRIAL.to_dict(), "batch_tokens": 100}).problems() == [
        "batch_tokens=100 is not a multiple of seq_len=128"]


@pytest.mark.parametrize("data,reason", [
    ({"loss": float("nan")}, "loss=nan: expected a finite number"),
    ({"loss": -0.5}, "expected a loss >= 0"),
    ({"status": "ok"}, "status 'ok' with no 'loss'"),
    ({"loss": "2.1"}, "loss='2.1': expected a finite number"),
    ({"loss": 2.0, "status": "pending"}, "status 'pending'"),
    ([2.0], "returned list"),
])
def test_results_that_break_the_contract_are_failed_with_a_reason(data, reason):
    result = parse_result(data)
    assert result["status"] == "failed" and reason in result["reason"]


def test_a_good_result_maps_to_the_stored_fields(tmp_path):
    result = parse_result({"loss": 2.5, "val_loss": 2.6, "tokens": 100, "steps": 3, "curve": [[10, 3.0], [100, 2.5]]})
    assert result["status"] == "ok" and result["final_train_loss"] == 2.5 and result["final_val_loss"] == 2.6
    assert result["curve"] == [(10, 3.0), (100, 2.5)] and result["steps"] == 3
    assert parse_result({"status": "diverged"})["reason"]  # not ok: no loss needed, a reason is given
    (tmp_path / "result.json").write_text("{oops")
    assert "not JSON" in read_result(tmp_path / "result.json")["reason"]
    assert "wrote no result.json" in read_result(tmp_path / "nope.json")["reason"]


def test_divergence_rule():
    assert diverging(None, 5.0) is None and diverging(2.0, 2.9) is None
    assert "rose above" in diverging(2.0, 3.1) and "not a finite" in diverging(2.0, math.inf)


def test_template_fields_are_shell_quoted():
    command = render("train --lr {lr} --args {args} --dir {run_dir}", TRIAL.placed("/a b/$x"), "/t.json")
    assert command == "train --lr 0.003 --args '{\"n_layer\": 8}' --dir '/a b/$x'"
    assert template_fields("x {trial_json} {N_active}") == ["trial_json", "N_active"]


def trains(trial, report):
    for tokens in (1, 2, 3):
        if report(tokens=tokens, loss=3.0 - tokens * trial["lr"]):
            break
    return {"loss": 2.0, "tokens": trial["D"]}


def blows_up(trial, report):
    report(tokens=1, loss=2.0)
    report(tokens=2, loss=9.0)  # the rule says stop; the function may ignore it
    return {"loss": 9.0}


def test_python_trainer_reports_progress_and_stops_a_divergence():
    seen = []
    result = PythonTrainer(f"{__name__}:trains")(TRIAL, run_dir=None, progress=seen.append)
    assert result["status"] == "ok" and result["final_train_loss"] == 2.0 and [s["tokens"] for s in seen] == [1, 2, 3]
    diverged = PythonTrainer(f"{__name__}:blows_up")(TRIAL)
    assert diverged["status"] == "diverged" and "rose above 1.5 x the first reported loss 2" in diverged["reason"]


def test_sweep_with_a_python_trainer(tmp_path, capsys):
    from steplaw.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text('tokens = [4096, 8192]\nlrs = [0.01]\nbatch_sizes = [512]\n[fixed]\nseq_len = 64\n'
                    '[[models]]\nname = "mine"\nparams = 5e5\nargs = { depth = 2 }\n')
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--quiet", "--workers", "1", "--trainer", f"{__name__}:trains"]) == 0
    capsys.readouterr()
    assert main(["runs", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["status"], r["loss"], r["N"], r["trainer"]) for r in rows] == [("ok", 2.0, 500000, f"{__name__}:trains")] * 2
