"""The driver with the local pool, on stand-in run functions (tests/sweep/sweep_fakes.py)."""
import json
import sqlite3

import pytest
import sweep_fakes

from steplaw.models.config import ModelConfig
from steplaw.sweep.driver import run_sweep
from steplaw.sweep.execution import describe_exit
from steplaw.sweep.executors import LocalExecutor
from steplaw.sweep.store import EXPORT_COLUMNS, ResultStore, export_rows, rows_to_csv
from steplaw.train.config import RunConfig
from steplaw.trainers.steplaw import SteplawTrainer

MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)


def configs(seeds, lrs=(0.005, 0.01, 0.02), batches=(512, 1024)):
    return [RunConfig(model=MODEL, tokens=2**16, lr=lr, batch_tokens=bs, seq_len=64, seed=seed)
            for seed in seeds for lr in lrs for bs in batches]


def pool(workers=2):
    return lambda: LocalExecutor(sweep_fakes.fake_run, workers=workers, threads_per_worker=1, gpus=0)


def test_sweep_stores_every_run_and_reuses_them(tmp_path, monkeypatch):
    log = tmp_path / "log"
    monkeypatch.setenv("SWEEP_FAKE_LOG", str(log))
    runs = configs([0])
    summary = run_sweep(runs, tmp_path / "s", pool(), progress=False, trainer=SteplawTrainer())
    assert summary.counts == {"ok": 6} and summary.ran == 6
    rows = export_rows(tmp_path / "s")
    assert [r["run_id"] for r in rows] == sorted(r.run_id() for r in runs)
    for row in rows:
        assert set(row) == set(EXPORT_COLUMNS)
        assert row["loss"] == pytest.approx(sweep_fakes.bowl_loss(row["lr"], row["batch_tokens"]))
        assert row["N"] > 0 and row["N_active"] == row["N"] and row["N_total"] > row["N"]
        assert row["n_experts"] is None and row["seq_len"] == 64 and row["D"] == 2**16
    # the same command again runs nothing
    again = run_sweep(runs, tmp_path / "s", lambda: pytest.fail("no executor needed"), progress=False, trainer=SteplawTrainer())
    assert again.ran == 0 and again.reused == 6
    assert len(log.read_text().splitlines()) == 6


def test_failures_retries_and_divergence(tmp_path, monkeypatch):
    runs = configs([1, 2, 3, 4], lrs=(0.01,), batches=(1024,))
    summary = run_sweep(runs, tmp_path, pool(), max_attempts=2, progress=False, trainer=SteplawTrainer())
    by_seed = {}
    with ResultStore(tmp_path, readonly=True) as store:
        for row in store.rows():
            by_seed[json.loads(row["config"])["seed"]] = row
    assert by_seed[1]["status"] == "failed" and by_seed[1]["attempts"] == 2
    assert "RuntimeError: scripted crash" in by_seed[1]["reason"]
    assert by_seed[2]["status"] == "ok" and by_seed[2]["attempts"] == 1  # killed once, retried
    assert by_seed[3]["status"] == "failed" and by_seed[3]["attempts"] == 2
    assert "killed by SIGKILL" in by_seed[3]["reason"]
    assert by_seed[4]["status"] == "diverged" and by_seed[4]["attempts"] == 0  # a result, not retried
    assert by_seed[4]["loss"] is None  # NaN is stored as missing
    assert summary.ran == 2 + 2 + 2 + 1
    # out of attempts: the next invocation leaves them; --retry-failed tries again
    assert run_sweep(runs, tmp_path, pool(), max_attempts=2, progress=False, trainer=SteplawTrainer()).ran == 0
    assert run_sweep(runs, tmp_path, pool(), max_attempts=1, progress=False, trainer=SteplawTrainer(), retry_failed=True).ran == 2


def test_csv_export_round_trips_floats(tmp_path):
    run_sweep(configs([0], lrs=(0.0123456789,)), tmp_path, pool(1), progress=False, trainer=SteplawTrainer())
    rows = export_rows(tmp_path)
    lines = rows_to_csv(rows).splitlines()
    assert lines[0].split(",") == EXPORT_COLUMNS
    first = dict(zip(EXPORT_COLUMNS, lines[1].split(",")))
    assert float(first["loss"]) == rows[0]["loss"] and first["n_experts"] == ""


def test_interrupted_rows_are_pending_and_rerun(tmp_path):
    runs = configs([0], lrs=(0.01,))
    run_sweep(runs, tmp_path, pool(1), progress=False, trainer=SteplawTrainer())
    db = sqlite3.connect(tmp_path / "runs.sqlite")
    with db:  # as if a driver had died mid-run
        db.execute("UPDATE runs SET status='running', loss=NULL WHERE run_id=?", (runs[0].run_id(),))
    db.close()
    assert {r["status"] for r in export_rows(tmp_path)} == {"pending", "ok"}
    summary = run_sweep(runs, tmp_path, pool(1), progress=False, trainer=SteplawTrainer())
    assert summary.ran == 1 and summary.counts == {"ok": 2}


@pytest.mark.parametrize("exitcode, text", [(-9, "SIGKILL"), (-11, "SIGSEGV"), (3, "code 3")])
def test_describe_exit(exitcode, text):
    assert text in describe_exit(exitcode)


def test_second_driver_is_refused(tmp_path):
    from steplaw.errors import UserError
    from steplaw.sweep.store import DriverLock

    with DriverLock(tmp_path):
        with pytest.raises(UserError, match="another"):
            run_sweep(configs([0]), tmp_path, pool(), progress=False, trainer=SteplawTrainer())


def test_retry_is_not_answered_by_a_stale_failed_result(tmp_path):
    """steplaw.train.run returns the result its run directory holds: a failed one must be
    dropped before a retry, a finished one reused."""
    import json as _json

    from steplaw.sweep.execution import execute
    from steplaw.train import run

    config = RunConfig(model=MODEL, tokens=2048, lr=0.01, batch_tokens=256, seq_len=64, device="cpu", eval_tokens=256)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "result.json").write_text(_json.dumps({"status": "failed", "reason": "earlier crash", "run_id": config.run_id()}))
    first, _ = execute(run, config, str(run_dir))
    assert first.status == "ok" and first.final_train_loss > 0
    again, _ = execute(run, config, str(run_dir))
    assert again == first  # the finished result is reused, not retrained
