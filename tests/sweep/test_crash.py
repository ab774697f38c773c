"""Crash safety for real: `steplaw sweep` in a subprocess, killed with SIGKILL mid-sweep."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def sweep_command(out):
    return [sys.executable, "-m", "steplaw", "sweep", "--out", str(out), "--params", "20K", "--tokens", "65536",
            "--lrs", "0.002", "0.005", "0.01", "0.02", "--batch-sizes", "256", "512", "1024", "--seq-len", "64",
            "--run-fn", "sweep_fakes:fake_run", "--workers", "2", "--threads-per-worker", "1"]


def environment(tmp_path, generation, sleep):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(SWEEP_FAKE_LOG=str(tmp_path / "log"), SWEEP_FAKE_GENERATION=str(generation), SWEEP_FAKE_SLEEP=str(sleep))
    return env


def store_rows(out):
    try:
        db = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            return {r[0]: r[1:] for r in db.execute("SELECT run_id, status, attempts, finished_at, loss FROM runs")}
        finally:
            db.close()
    except sqlite3.OperationalError:
        return {}


def wait_for(predicate, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def workers_of(pid):
    return [c for c in children(pid) if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def finished(rows):
    return {run_id: row for run_id, row in rows.items() if row[0] == "ok"}


def test_kill_driver_mid_sweep_then_rerun(tmp_path):
    out = tmp_path / "sweep"
    driver = subprocess.Popen(sweep_command(out), env=environment(tmp_path, 1, 0.3), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(finished(store_rows(out))) >= 3)
        workers = workers_of(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = finished(store_rows(out))
    assert 3 <= len(before) < 12
    # the workers die with their driver: nothing trains on in the background
    wait_for(lambda: not any(alive(w) for w in workers), timeout=10)
    db = sqlite3.connect(out / "runs.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()

    rerun = subprocess.run(sweep_command(out), env=environment(tmp_path, 2, 0.0), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    after = store_rows(out)
    assert len(after) == 12 and all(row[0] == "ok" for row in after.values())
    for run_id, row in before.items():
        assert after[run_id] == row  # finished runs untouched
    executions = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    rerun_ids = [run_id for run_id, generation in executions if generation == "2"]
    assert not set(rerun_ids) & set(before)  # no finished run was run again
    assert len(rerun_ids) == len(set(rerun_ids)) == 12 - len(before)
    assert "reused " + str(len(before)) in rerun.stderr


def test_killed_worker_fails_its_run_and_the_retry_finishes_it(tmp_path):
    out, victim = tmp_path / "sweep", tmp_path / "victim"
    env = environment(tmp_path, 1, 0.2)
    env["SWEEP_FAKE_VICTIM"] = str(victim)  # the first run hangs in its worker until killed
    proc = subprocess.Popen(sweep_command(out), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pid = int(wait_for(lambda: victim.exists() and victim.read_text()))
        assert pid in workers_of(proc.pid)
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    rows = store_rows(out)
    assert len(rows) == 12 and all(row[0] == "ok" for row in rows.values())
    assert sorted(row[1] for row in rows.values()).count(1) == 1  # exactly one run needed a second attempt
