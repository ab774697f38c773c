"""Stacked runs in the sweep: the driver hands runs that differ only in lr to one worker
slot as a group (steplaw.train.stacked.run_group), records each member as its own run,
and a killed stack's members run again."""
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steplaw.models import ModelConfig
from steplaw.sweep.driver import run_sweep
from steplaw.sweep.executors import InlineExecutor, LocalExecutor
from steplaw.sweep.store import export_rows
from steplaw.train import RunConfig, RunResult, run
from steplaw.train.stacked import run_group, stack_id
from steplaw.trainers.steplaw import SteplawTrainer

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(d_model=16, n_layers=1, n_heads=1, d_ff=32, max_seq_len=8)
LRS = (0.001, 0.003, 0.01, 0.03)


def configs(batch_sizes=(32, 64), lrs=LRS, tokens=512) -> list[RunConfig]:
    """LRs x batch sizes of a ~3K-parameter model, 512 tokens each (8-16 steps)."""
    return [RunConfig(model=TINY, tokens=tokens, lr=lr, batch_tokens=b, seq_len=8, device="cpu", eval_tokens=64,
                      warmup_tokens=64) for b in batch_sizes for lr in lrs]


def inline(group_fn=run_group):
    return lambda: InlineExecutor(run, capacity=2, group_fn=group_fn)


def instant_run(config, run_dir=None):
    return RunResult(status="ok", final_train_loss=2.0 + config.lr, tokens=config.tokens)


def instant_group(configs, run_dirs=None, progress=None):
    """Stands for run_group where only the grouping matters (no training)."""
    return [dataclasses.replace(instant_run(c), stack=stack_id(configs)) for c in configs]


def test_stacked_sweep_matches_one_at_a_time(tmp_path):
    runs = configs(lrs=(0.003, 0.03, 0.01))  # 3 LRs x 2 batch sizes
    summary = run_sweep(runs, tmp_path / "stacked", inline(), progress=False, trainer=SteplawTrainer(), stack=4)
    assert summary.stacked == (6, 2) and "; 6 runs trained in 2 stacks; planner grid" in summary.line()
    summary = run_sweep(runs, tmp_path / "alone", inline(), progress=False, trainer=SteplawTrainer(), stack="off")
    assert summary.stacked == (0, 0) and "stacks" not in summary.line()
    stacked = {r["run_id"]: r for r in export_rows(tmp_path / "stacked")}
    alone = {r["run_id"]: r for r in export_rows(tmp_path / "alone")}
    assert set(stacked) == set(alone) == {c.run_id() for c in runs}
    for run_id, row in stacked.items():
        assert row["status"] == alone[run_id]["status"] == "ok", (row["reason"], alone[run_id]["reason"])
        assert row["loss"] == alone[run_id]["loss"] and row["val_loss"] == alone[run_id]["val_loss"]  # to the last bit
        assert alone[run_id]["stack"] is None
    # the rows say which stack trained them: a small dense model's batch sizes share
    # stacks, at most 4 runs each, the longest runs (batch 32: 16 steps) first
    by_stack = {}
    for row in stacked.values():
        by_stack.setdefault(row["stack"], []).append(row["batch_tokens"])
    assert all(len(s) == 16 for s in by_stack)
    assert sorted(sorted(b) for b in by_stack.values()) == [[32, 32, 32, 64], [64, 64]]


def test_groups_fill_idle_workers_and_respect_k(tmp_path):
    """Stacks of at most K; a stack is halved rather than leave a worker slot idle."""
    submitted = []

    class Recording(InlineExecutor):
        def submit_group(self, members):
            submitted.append(len(members))
            super().submit_group(members)  # (submit of one run comes here too)

    runs = configs(batch_sizes=(32,))
    run_sweep(runs, tmp_path / "a", lambda: Recording(instant_run, capacity=2, group_fn=instant_group), progress=False,
              trainer=SteplawTrainer(),
              stack=3)
    assert sorted(submitted) == [1, 3]  # 4 runs, K=3: one stack of 3 and one run alone, at once
    submitted.clear()
    run_sweep(runs, tmp_path / "b", lambda: Recording(instant_run, capacity=2, group_fn=instant_group), progress=False,
              trainer=SteplawTrainer(),
              stack=8)
    assert submitted == [2, 2]  # 4 runs fit one stack, but two slots are idle: two stacks of 2
    submitted.clear()
    run_sweep(runs, tmp_path / "c", lambda: Recording(instant_run, capacity=2), progress=False, trainer=SteplawTrainer(), stack=8)
    assert submitted == [1, 1, 1, 1]  # no group_fn: every run alone


def test_a_failing_stack_fails_its_members_and_they_are_retried(tmp_path):
    calls = []

    def flaky_group(configs, run_dirs=None, progress=None):
        calls.append(len(configs))
        if len(calls) == 1:
            raise RuntimeError("scripted stack crash")
        return instant_group(configs, run_dirs=run_dirs, progress=progress)

    runs = configs(batch_sizes=(32,))
    summary = run_sweep(runs, tmp_path, lambda: InlineExecutor(instant_run, capacity=1, group_fn=flaky_group), progress=False,
              trainer=SteplawTrainer(),
                        stack=4)
    assert calls == [4, 4] and summary.counts == {"ok": 4}
    rows = export_rows(tmp_path)
    assert len({r["stack"] for r in rows}) == 1 and rows[0]["stack"] is not None


def test_local_workers_train_a_stack(tmp_path):
    runs = configs(batch_sizes=(32,))
    summary = run_sweep(runs, tmp_path, lambda: LocalExecutor(run, group_fn=run_group, workers=1, threads_per_worker=1),
                        progress=False, trainer=SteplawTrainer(), stack="auto")
    assert summary.counts == {"ok": 4}
    assert len({r["stack"] for r in export_rows(tmp_path)}) == 1
    for config in runs:  # each member's result.json, as for a run alone
        assert (tmp_path / "runs" / config.run_id() / "result.json").exists()


def cli(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "steplaw", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          **kwargs)


@pytest.mark.parametrize("value", ["0", "x", "-2", "2.5"])
@pytest.mark.parametrize("command", ["sweep", "demo"])
def test_bad_stack_values_are_one_line(tmp_path, capsys, value, command):
    from steplaw.cli import main

    args = ["--params", "20K", "--tokens", "4096"] if command == "sweep" else ["--no-report"]
    code = main([command, "--out", str(tmp_path / "s"), *args, "--stack", value])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--stack" in lines[0] and repr(value) in lines[0], err
    assert not (tmp_path / "s").exists()


def test_a_stack_too_big_for_memory_is_said_once(tmp_path, monkeypatch, capsys):
    from steplaw.train import stacked

    runs = configs(batch_sizes=(32,)) * 1 + [dataclasses.replace(c, lr=c.lr * 2) for c in configs(batch_sizes=(32,))]
    monkeypatch.setattr(stacked, "memory_budget", lambda device: 2 * stacked.member_bytes(runs[0], "cpu"))
    monkeypatch.setattr(stacked, "_warned", set())  # what this process was told before
    summary = run_sweep(runs, tmp_path, lambda: InlineExecutor(instant_run, capacity=1, group_fn=instant_group),
                        progress=False, trainer=SteplawTrainer(), stack=4)
    assert summary.counts == {"ok": 8}
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "warning" in line] == [
        "steplaw sweep: warning: stacks of 4 runs do not fit the memory budget; using stacks of 2"]
    sizes = {}
    for row in export_rows(tmp_path):
        sizes[row["stack"]] = sizes.get(row["stack"], 0) + 1
    assert sorted(sizes.values()) == [2, 2, 2, 2]


def _rows(out):
    try:
        db = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            return {r[0]: r[1:] for r in db.execute("SELECT run_id, status, finished_at, stack FROM runs")}
        finally:
            db.close()
    except sqlite3.OperationalError:
        return {}


@pytest.mark.slow
def test_kill_driver_during_a_stacked_sweep_then_rerun(tmp_path):
    """kill -9 of the driver while one stack trains: the finished stack's runs are kept
    (not run again), the killed stack's members are all run again by the rerun."""
    out = tmp_path / "sweep"
    command = ["sweep", "--out", str(out), "--params", "4K", "--tokens", "16384", "--lrs", "0.001", "0.003", "0.01",
               "0.03", "--batch-sizes", "64", "128", "--seq-len", "8", "--set", "device=cpu", "--set", "eval_tokens=64",
               "--workers", "1", "--threads-per-worker", "1", "--stack", "4", "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen([sys.executable, "-m", "steplaw", *command], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and driver.poll() is None:
        rows = _rows(out)
        if sum(r[0] == "ok" for r in rows.values()) == 4 and sum(r[0] == "running" for r in rows.values()) == 4:
            break
        time.sleep(0.02)
    assert driver.poll() is None, driver.stderr.read()
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    before = _rows(out)
    finished = {run_id: row for run_id, row in before.items() if row[0] == "ok"}
    assert len(finished) == 4 and len({row[2] for row in finished.values()}) == 1  # one stack finished
    done = cli(*command, timeout=300)
    assert done.returncode == 0, done.stderr
    after = _rows(out)
    assert all(after[run_id] == row for run_id, row in finished.items())  # kept, not re-run
    rerun = {run_id: row for run_id, row in after.items() if run_id not in finished}
    assert len(rerun) == 4 and all(row[0] == "ok" for row in rerun.values())
    assert len({row[2] for row in rerun.values()}) == 1  # the killed stack's members ran again, as a stack
    assert {row[2] for row in rerun.values()} != {row[2] for row in finished.values()}
    assert all(before[run_id][0] == "running" for run_id in rerun)  # they were the killed stack


@pytest.mark.slow
@pytest.mark.ray
def test_ray_runs_a_group_as_one_task(tmp_path):
    ray = pytest.importorskip("ray")
    from steplaw.sweep.ray_executor import RayExecutor

    module = sys.modules[__name__]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.cloudpickle.register_pickle_by_value(module)  # Ray's workers do not see pytest's sys.path
    try:
        executors = []

        def make():
            executors.append(RayExecutor(instant_run, cpus_per_run=1, group_fn=instant_group))
            return executors[-1]

        summary = run_sweep(configs(), tmp_path, make, progress=False, trainer=SteplawTrainer(), stack=4)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)
        ray.shutdown()
    assert executors[0].capacity == 2 and summary.counts == {"ok": 8}
    sizes = {}
    for row in export_rows(tmp_path):
        sizes[row["stack"]] = sizes.get(row["stack"], 0) + 1
    assert sorted(sizes.values()) == [4, 4]  # one task per batch size's stack


def warning_group(configs, run_dirs=None, progress=None):
    """A group function that warns as run_stack does when a stack runs out of memory."""
    from steplaw.train import stacked

    stacked._warn_once("a stack of 4 runs ran out of memory; running it as smaller stacks")
    return instant_group(configs)


def test_a_warning_from_every_worker_is_shown_once(tmp_path, capsys):
    make = lambda: LocalExecutor(instant_run, group_fn=warning_group, workers=2, threads_per_worker=1)  # noqa: E731
    summary = run_sweep(configs(), tmp_path, make, progress=False, trainer=SteplawTrainer(), stack=4)
    assert summary.counts == {"ok": 8}
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert lines == ["steplaw sweep: warning: a stack of 4 runs ran out of memory; running it as smaller stacks"]


def dying_group(configs, run_dirs=None, progress=None):
    """The first call SIGKILLs its own worker (as the out-of-memory killer would)."""
    marker = Path(os.environ["STACK_TEST_MARKER"])
    if not marker.exists():
        marker.write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)
    return instant_group(configs)


@pytest.mark.slow
def test_a_killed_worker_fails_its_whole_stack_and_the_retry_finishes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STACK_TEST_MARKER", str(tmp_path / "marker"))
    make = lambda: LocalExecutor(instant_run, group_fn=dying_group, workers=1, threads_per_worker=1)  # noqa: E731
    runs = configs(batch_sizes=(32,))
    summary = run_sweep(runs, tmp_path / "sweep", make, progress=False, trainer=SteplawTrainer(), stack=4)
    assert summary.counts == {"ok": 4} and summary.ran == 8  # 4 failed attempts (one killed stack), 4 retried
    with sqlite3.connect(tmp_path / "sweep" / "runs.sqlite") as db:
        assert [row[0] for row in db.execute("SELECT attempts FROM runs")] == [1, 1, 1, 1]
    assert len({r["stack"] for r in export_rows(tmp_path / "sweep")}) == 1
