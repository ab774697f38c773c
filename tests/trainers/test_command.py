"""--trainer-cmd: every way a command trainer can go wrong is a failed run with a clear
reason; a kill -9 of the driver leaves no trainer process, and the rerun finishes every
run without training a finished one again."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steplaw.cli import main

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
FAKE = f"{sys.executable} -S {HERE / 'fake_trainer.py'}"


def _spec(path: Path, names, tokens=(4096,)) -> Path:
    lines = [f"tokens = {list(tokens)}", "lrs = [0.01]", "batch_sizes = [512]", "[fixed]", "seq_len = 64"]
    for i, name in enumerate(names):
        lines += ["[[models]]", f'name = "{name}"', f"params = {1000 * (i + 1)}", f'args = {{ mode = "{name}" }}']
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(out) -> dict:
    db = sqlite3.connect(f"file:{out / 'runs.sqlite'}?mode=ro", uri=True)
    try:
        return {json.loads(c)["model"]: (s, r, a) for c, s, r, a in db.execute("SELECT config, status, reason, attempts FROM runs")}
    finally:
        db.close()


def test_bad_trainers_fail_with_their_reason(tmp_path, capsys):
    modes = ["ok", "crash", "hang", "silent", "garbage", "nan", "negative", "noloss"]
    out = tmp_path / "out"
    code = main(["sweep", str(_spec(tmp_path / "s.toml", modes)), "--out", str(out), "--quiet", "--workers", "2",
                 "--threads-per-worker", "1", "--max-attempts", "1", "--run-timeout", "2",
                 "--trainer-cmd", FAKE + " {model} {trial_json}"])
    err = capsys.readouterr().err
    assert code == 1  # runs failed: the distinct reasons are listed
    rows = _rows(out)
    assert rows["ok"][0] == "ok"
    expected = {"crash": "exited with code 3: Traceback: something broke | ValueError: bad things",
                "hang": "ran past --run-timeout 2 s", "silent": "wrote no result.json (it exited 0)",
                "garbage": "result.json is not JSON", "nan": "loss=nan: expected a finite number",
                "negative": "loss=-1.0: expected a loss >= 0", "noloss": "status 'ok' with no 'loss'"}
    for mode, reason in expected.items():
        status, why, attempts = rows[mode]
        assert status == "failed" and reason in why and attempts == 1, (mode, why)
    assert "expected a finite number" in err
    # every trainer process is gone (the hung one was killed with its group)
    assert not _processes_naming(tmp_path)


def test_template_naming_an_unknown_field_is_refused(tmp_path, capsys):
    code = main(["sweep", str(_spec(tmp_path / "s.toml", ["ok"])), "--out", str(tmp_path / "o"),
                 "--trainer-cmd", "train --lr {learning_rate}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "{learning_rate}" in err and "{lr}" not in err.split(":")[0]
    assert not (tmp_path / "o" / "runs.sqlite").exists()


@pytest.mark.parametrize("argv,match", [
    (["--stack", "4"], "--stack 4 is a setting of steplaw's own trainer"),
    (["--trainer", "nosuchmodule:train"], "cannot import 'nosuchmodule'"),
    (["--trainer", "json:nosuchfunction"], "json has no function 'nosuchfunction'"),
])
def test_trainer_flags_refused(tmp_path, capsys, argv, match):
    base = ["sweep", str(_spec(tmp_path / "s.toml", ["ok"])), "--out", str(tmp_path / "o")]
    extra = [] if "--trainer" in argv else ["--trainer-cmd", "true"]
    assert main(base + extra + argv) == 2
    assert match in capsys.readouterr().err


def test_user_models_need_params_and_unique_names(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('tokens = [4096]\n[[models]]\nname = "a"\nargs = {}\n')
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--trainer-cmd", "true"]) == 2
    assert "model 'a' has no params" in capsys.readouterr().err
    spec.write_text('tokens = [4096]\n[[models]]\nname = "a"\nparams = 1e3\n[[models]]\nname = "a"\nparams = 2e3\n')
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--trainer-cmd", "true"]) == 2
    assert "model name 'a' is given 2 times" in capsys.readouterr().err


def _processes_naming(tmp_path) -> list[int]:
    """Live processes whose command line names tmp_path (the trainers of this test)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(tmp_path).encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


def test_kill_9_of_the_driver_leaves_no_trainer_and_loses_nothing(tmp_path):
    names = ["fast1", "fast2", "slow1", "slow2"]
    spec, out, log = _spec(tmp_path / "s.toml", names), tmp_path / "out", tmp_path / "log"
    mode = "$(echo {model} | sed 's/[0-9]*$//; s/fast/ok/')"  # fast1 -> ok, slow2 -> slow
    command = [sys.executable, "-m", "steplaw", "sweep", str(spec), "--out", str(out), "--quiet", "--workers", "4",
               "--threads-per-worker", "1", "--trainer-cmd", f"{FAKE} {mode} {{trial_json}} {log}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().split()) < 4):
        time.sleep(0.1)
    time.sleep(0.5)  # the fast runs write their results
    assert len(log.read_text().split()) == 4, "every run started"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while _processes_naming(tmp_path) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_naming(tmp_path) == [], "a trainer outlived the killed driver"

    rerun = subprocess.run(command, env={**env, "FAKE_FAST": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    rows = _rows(out)
    assert sorted(rows) == sorted(names) and all(status == "ok" for status, _, _ in rows.values())  # 0 lost, 0 duplicated
    ids = {json.loads(c)["model"]: run_id for run_id, c in sqlite3.connect(out / "runs.sqlite").execute(
        "SELECT run_id, config FROM runs")}
    started = log.read_text().split()
    assert [started.count(ids[name]) for name in names] == [1, 1, 2, 2]  # finished runs were not trained again
