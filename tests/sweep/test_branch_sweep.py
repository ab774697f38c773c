"""WSD trunks through `steplaw sweep --branch auto`: the same runs and losses as every D
alone, branch results stored as they finish, bad branching settings refused in one
sentence, and a driver killed with SIGKILL mid-trunk resumed without retraining a branch."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steplaw.cli import main

ROOT = Path(__file__).parent.parent.parent
GRID = ["--params", "20K", "--tokens", "8192", "16384", "32768", "65536", "--lrs", "0.003", "0.01", "--batch-sizes",
        "512", "--seq-len", "64", "--set", "schedule=wsd", "--set", "warmup_tokens=1024", "--workers", "1",
        "--threads-per-worker", "1", "-q"]


def command(out, branch):
    return [sys.executable, "-m", "steplaw", "sweep", "--out", str(out), *GRID, "--branch", branch]


def environment():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def rows(out):
    try:
        db = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            return {r[0]: r[1:] for r in db.execute("SELECT run_id, status, attempts, finished_at, loss, val_loss FROM runs")}
        finally:
            db.close()
    except sqlite3.OperationalError:
        return {}


def alive(pid):
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The reference: every D trained alone (--branch off)."""
    out = tmp_path_factory.mktemp("alone") / "sweep"
    done = subprocess.run(command(out, "off"), env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return rows(out)


def test_kill_mid_trunk_then_rerun_matches_every_d_alone(tmp_path, alone):
    out = tmp_path / "sweep"
    driver = subprocess.Popen(command(out, "auto"), env=environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not any(r[0] == "ok" for r in rows(out).values()):  # the first branches are stored
            assert time.time() < deadline and driver.poll() is None
            time.sleep(0.02)
        workers = children(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = {run_id: row for run_id, row in rows(out).items() if row[0] == "ok"}
    assert 1 <= len(before) < 8
    deadline = time.time() + 10
    while any(alive(w) for w in workers):  # the worker training the trunk died with its driver
        assert time.time() < deadline, "a worker outlived its killed driver"
        time.sleep(0.05)
    rerun = subprocess.run(command(out, "auto"), env=environment(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    after = rows(out)
    assert set(after) == set(alone) and all(row[0] == "ok" for row in after.values())
    for run_id, row in before.items():
        assert after[run_id] == row  # a finished branch is never trained (or recorded) again
    for run_id, row in after.items():
        assert row[3:] == alone[run_id][3:]  # loss and val_loss: bit-identical to the run alone (CPU)
    trunk_dirs = list((out / "trunks").iterdir())
    assert len(trunk_dirs) == 1 and not list(trunk_dirs[0].glob("trunk-*.pt"))  # no checkpoint left behind


@pytest.mark.parametrize("flags, match", [
    (["--set", "schedule=cosine", "--branch", "auto"], "branch 'auto' with schedule 'cosine'"),
    (["--branch", "off"], "branch 'off' with schedule 'cosine'"),
    (["--set", "schedule=wsd", "--branch", "auto"], "warmup_tokens is not set"),
    (["--set", "schedule=wsd", "--set", "warmup_tokens=60000", "--branch", "auto"], "warmup"),
])
def test_bad_branching_is_one_sentence(tmp_path, capsys, flags, match):
    code = main(["sweep", "--out", str(tmp_path / "s"), "--params", "20K", "--tokens", "8192", "65536", "--lrs", "0.003",
                 "--batch-sizes", "512", "--seq-len", "64", *flags])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
