"""The start gate of command trainers (steplaw/trainers/command.py, issue 21 item 6): a
worker killed after it started a command but before its guard knew the command's process
group leaves nothing running, because the command waits on the gate and never starts."""
import os
import subprocess
import sys
import textwrap
import time

from steplaw.trainers.command import GATE

WORKER = textwrap.dedent("""
    import os, signal, sys
    import steplaw.trainers.command as command
    from steplaw.trial import Trial

    def die_before_registering(guard, line):  # the worker is killed in the window
        if line.startswith("+"):
            open(sys.argv[2], "w").write(line[1:])
            os.kill(os.getpid(), signal.SIGKILL)

    command._tell = die_before_registering
    trainer = command.CommandTrainer("touch {run_dir}/started; sleep 30", cwd=sys.argv[1])
    trainer(Trial(model="m", N=1, D=1, lr=1.0, batch_tokens=1, seq_len=1), run_dir=sys.argv[1])
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_killed_before_registration_leaves_no_command(tmp_path):
    pid_file = tmp_path / "leader.pid"
    worker = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path), str(pid_file)], env={**os.environ},
                            capture_output=True, timeout=60)
    assert worker.returncode == -9, worker.stderr.decode()
    leader = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(leader) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(leader)  # it read end-of-file on the gate and exited
    assert not (tmp_path / "started").exists()  # the command itself never ran


def test_gate_runs_the_command_only_after_go(tmp_path):
    for message, code, ran in ((b"go\n", 0, True), (b"", 125, False), (b"no\n", 125, False)):
        marker = tmp_path / "ran"
        marker.unlink(missing_ok=True)
        read, write = os.pipe()
        process = subprocess.Popen(["/bin/sh", "-c", GATE, "sh", f"touch '{marker}'; read x; echo \"[$x]\""],
                                   stdin=read, stdout=subprocess.PIPE)
        os.close(read)
        os.write(write, message)
        os.close(write)
        out, _ = process.communicate(timeout=10)
        assert (process.returncode, marker.exists()) == (code, ran)
        if ran:
            assert out == b"[]\n"  # the command's stdin is /dev/null again, not the gate
