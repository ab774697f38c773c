"""kill -9 of the driver at random moments of a 50,000-run sweep loses and duplicates
nothing: every finished run stays finished and is never run again, and the last rerun
completes the sweep with every result right. (STEPLAW_SCALE_RUNS sets the size.)"""
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import scale_sweep

HERE = Path(__file__).parent
RUNS = int(os.environ.get("STEPLAW_SCALE_RUNS", "50000"))

pytestmark = pytest.mark.slow


def finished(out: Path) -> dict:
    db = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {r[0]: r[1:] for r in db.execute("SELECT run_id, loss, finished_at FROM runs WHERE status='ok'")}
    except sqlite3.OperationalError:  # killed before the schema was committed
        return {}
    finally:
        db.close()


def done_count(out: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute("SELECT count(*) FROM runs WHERE status='ok'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


def launch(out, log, generation):
    return subprocess.Popen([sys.executable, str(HERE / "scale_sweep.py"), str(out), str(RUNS), str(log), str(generation)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_at_random_moments_of_a_large_sweep(tmp_path):
    rng = random.Random(12)
    out, log = tmp_path / "sweep", tmp_path / "log"
    snapshots = []  # runs finished when each killed generation died
    # random moments: one while the runs are registered, then at random points of progress
    thresholds = [None] + sorted(rng.uniform(0.05, 0.95) * RUNS for _ in range(3))
    for generation, threshold in enumerate(thresholds, start=1):
        proc = launch(out, log, generation)
        if threshold is None:
            time.sleep(rng.uniform(0.3, 2.0))
        else:
            deadline = time.time() + 300
            while done_count(out) < threshold and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.2))
        assert proc.poll() is None, "the sweep finished before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        snapshots.append(finished(out) if (out / "runs.sqlite").exists() else {})
        for earlier in snapshots[:-1]:
            later = snapshots[-1]
            assert all(later[run_id] == row for run_id, row in earlier.items())  # finished rows untouched
    proc = launch(out, log, 9)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    final = finished(out)
    assert len(final) == len(scale_sweep.grid(RUNS)) == RUNS
    for earlier in snapshots:
        assert all(final[run_id] == row for run_id, row in earlier.items())
    expected = {c.run_id(): scale_sweep.expected_loss(c) for c in scale_sweep.grid(RUNS)}
    assert {run_id: row[0] for run_id, row in final.items()} == pytest.approx(expected)
    # executions: every run at least once; a run finished before a kill never again after it
    runs_by_key = {f"{c.model.d_model} {c.tokens} {c.lr!r} {c.batch_tokens}": c.run_id() for c in scale_sweep.grid(RUNS)}
    executions = [line.rsplit(" ", 1) for line in log.read_text().splitlines()]
    assert {runs_by_key[key] for key, _ in executions} == set(expected)
    for generation, snapshot in enumerate(snapshots, start=1):
        again = [runs_by_key[key] for key, g in executions if int(g) > generation and runs_by_key[key] in snapshot]
        assert again == []
    counts = Counter(runs_by_key[key] for key, _ in executions)
    assert max(counts.values()) <= 1 + len(snapshots)  # only runs in flight at a kill run twice
