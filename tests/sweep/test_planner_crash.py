"""kill -9 of an adaptive `steplaw sweep`, then the same command again: the same final set of
runs and the same fit as a sweep that was never interrupted (a subprocess, for real)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steplaw.laws.fit import fit_hparams
from steplaw.laws.table import read_runs
from steplaw.sweep.store import ResultStore, export_rows

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def command(out):
    return [sys.executable, "-m", "steplaw", "sweep", "--out", str(out), "--planner", "adaptive",
            "--params", "20K", "60K", "180K", "--tokens", "65536", "262144", "1048576", "--seq-len", "64",
            "--lr-scale", "0.1", "--batch-scale", "0.5", "--run-fn", "planner_fakes:landscape_run",
            "--workers", "2", "--threads-per-worker", "1", "--quiet"]


def environment(tmp_path, generation, sleep):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(LANDSCAPE_LOG=str(tmp_path / f"log{generation}"), LANDSCAPE_GENERATION=str(generation),
               LANDSCAPE_SLEEP=str(sleep))
    return env


def finished(out):
    try:
        with ResultStore(out, readonly=True) as store:
            return sum(row["status"] in ("ok", "diverged") for row in store.rows())
    except Exception:  # noqa: BLE001  (not created yet, or mid-write)
        return 0


def outcome(out):
    rows = export_rows(out)
    runs = sorted((r["run_id"], r["status"], r["loss"]) for r in rows)
    fit = fit_hparams(read_runs(rows), n_boot=100).to_dict()
    with ResultStore(out, readonly=True) as store:
        cells = store.meta("planner_cells")
    return runs, {law: fit[law] for law in ("lr_law", "bs_law")}, cells


@pytest.mark.slow
def test_kill_adaptive_sweep_then_rerun_gives_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(command(reference), env=environment(tmp_path, 0, 0), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    for generation, kill_after in ((1, 12), (2, 40)):  # killed twice, at different points
        driver = subprocess.Popen(command(out), env=environment(tmp_path, generation, 0.05), cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while finished(out) < kill_after and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the sweep ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    again = subprocess.run(command(out), env=environment(tmp_path, 3, 0), cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr

    assert outcome(out) == outcome(reference)
    # no finished run was run again after a kill
    ran = [line.split()[0] for g in (1, 2, 3) if (tmp_path / f"log{g}").exists()
           for line in (tmp_path / f"log{g}").read_text().splitlines()]
    with ResultStore(out, readonly=True) as store:
        assert len(ran) - len(set(ran)) <= 4  # at most the runs in flight at the two kills
        assert sum(1 for _ in store.rows()) == len(outcome(reference)[0])
