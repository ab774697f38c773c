"""--trainer-cmd 'TEMPLATE': any program as a trainer, one process per run.

The template names trial fields in braces ({lr}, {batch_tokens}, {run_dir}, {args}, ...;
steplaw.trial), each shell-quoted on substitution, and {trial_json}: the path of the
whole trial as JSON (run_dir/trial.json). Each run is one process group (`sh -c` as its
leader), killed whole when the run ends, and, when its worker dies (a kill -9 of the
driver included), by the worker's guard process (steplaw/trainers/_reaper.py, one per
worker), with the directory the sweep was started from as its working directory. The
command starts only once the guard knows its group (a start gate, see `_run`), so a
worker killed at any moment leaves no command running. Its stdout and stderr go to run_dir/stdout.log and stderr.log.

The process writes run_dir/result.json (the contract's result) and may append
{"tokens": ..., "loss": ...} lines to run_dir/progress.jsonl: they feed the progress
line, and a loss that is not finite or rises above the divergence rule stops the run as
diverged. A non-zero exit, or no result, is failed with the last lines of stderr as the
reason; a run past `timeout` seconds is killed and failed. A result.json already in the
run directory that holds a finished result is that run's result (a driver killed after
the run finished does not train it again); any other leftover is cleared before the run
unless the trainer resumes (`resumes=True`: the directory is left to it).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from dataclasses import dataclass

from steplaw.errors import UserError
from steplaw.fileio import write_atomic
from steplaw.trial import PROGRESS_NAME, RESULT_NAME, TRIAL_NAME, Trial, diverging, failed, read_result

REAPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_reaper.py")
POLL_S = 0.25  # progress.jsonl is read this often while a run trains
STDERR_LINES = 5  # lines of stderr a failure's reason quotes
_TRIAL_FIELDS = tuple(Trial(model="m", N=1, D=1, lr=1.0, batch_tokens=1, seq_len=1).placed(None)) + ("trial_json",)


def template_fields(template: str) -> list[str]:
    """The fields a template names; UserError for a malformed one or an unknown field."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserError(f"--trainer-cmd {template!r} is not a valid template ({exc}): expected fields in braces, "
                        "e.g. {lr}, and {{ }} for a literal brace") from None
    for name in names:
        if name not in _TRIAL_FIELDS:
            raise UserError(f"--trainer-cmd names the field {{{name}}}, which a trial does not have: expected one of "
                            f"{', '.join(sorted(_TRIAL_FIELDS))}")
    if not template.strip():
        raise UserError("--trainer-cmd is empty: expected a command, e.g. 'python train.py --lr {lr}'")
    return names


def render(template: str, trial: dict, trial_json: str) -> str:
    """The command line of one run: every field shell-quoted (tables as JSON)."""
    values = {**trial, "trial_json": trial_json}

    def text(value) -> str:
        if isinstance(value, (dict, list)):
            return json.dumps(value, sort_keys=True)
        return "" if value is None else repr(value) if isinstance(value, float) else str(value)

    fields = {name: shlex.quote(text(values[name])) for name in template_fields(template)}
    return template.format(**fields)


@dataclass(frozen=True)
class CommandTrainer:
    template: str
    cwd: str  # the directory the sweep was started from
    timeout: float | None = None  # --run-timeout seconds
    resumes: bool = False  # the command resumes from what it left in run_dir

    name = "command"

    @property
    def capabilities(self) -> tuple[str, ...]:
        return ("resume",) if self.resumes else ()

    def __call__(self, config: Trial, run_dir: str | None = None, progress=None) -> dict:
        if run_dir is None:
            return failed("a command trainer needs a run directory on this machine's file system")
        finished = read_result(os.path.join(run_dir, RESULT_NAME))
        if finished["status"] in ("ok", "diverged"):
            return finished  # trained before the driver could store it: not trained again
        if not self.resumes:
            _clear(run_dir)
        trial = config.placed(run_dir)
        trial_json = os.path.join(run_dir, TRIAL_NAME)
        write_atomic(trial_json, json.dumps(trial, indent=1, sort_keys=True) + "\n")
        try:
            command = render(self.template, trial, trial_json)
        except UserError as exc:
            return failed(str(exc))
        return self._run(command, run_dir, progress)

    def _run(self, command: str, run_dir: str, progress) -> dict:
        started = time.monotonic()
        guard = _guard()
        # The start gate: the group's leader waits for "go" on a pipe (its stdin) before it runs the
        # command, and the worker writes it only once the guard knows the group. A worker
        # killed in between closes the pipe's write end (it is the only holder), the leader
        # reads end-of-file and exits without running anything: no command can outlive its
        # worker unregistered.
        gate_read, gate_write = os.pipe()
        try:
            with open(os.path.join(run_dir, "stdout.log"), "wb") as out, \
                    open(os.path.join(run_dir, "stderr.log"), "wb") as err:
                process = subprocess.Popen(["/bin/sh", "-c", GATE, "sh", command], cwd=self.cwd, stdin=gate_read,
                                           stdout=out, stderr=err, start_new_session=True)
        except BaseException:
            os.close(gate_write)
            raise
        finally:
            os.close(gate_read)
        _tell(guard, f"+{process.pid}")
        try:
            _open_gate(gate_write)
            return self._wait(process, run_dir, progress, started)
        finally:
            _kill_group(process.pid)  # what the command left running in its group
            _tell(guard, f"-{process.pid}")

    def _wait(self, process, run_dir: str, progress, started: float) -> dict:
        watch = _ProgressWatch(os.path.join(run_dir, PROGRESS_NAME), progress)
        stopped = None
        while True:
            try:
                code = process.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            stopped = watch.read()
            if stopped is None and self.timeout is not None and time.monotonic() - started > self.timeout:
                stopped = failed(f"the command ran past --run-timeout {self.timeout:g} s and was killed")
            if stopped is not None:
                _kill_group(process.pid)
                process.wait()
                break
        wall = time.monotonic() - started
        if stopped is not None:
            return {**stopped, "wall_s": wall}
        watch.read()
        if code != 0:
            return {**failed(f"the command exited with code {code}{_stderr_tail(run_dir)}"), "wall_s": wall}
        result = read_result(os.path.join(run_dir, RESULT_NAME), "the command")
        if result["status"] == "failed" and "wrote no" in result["reason"]:
            result["reason"] += f" (it exited 0){_stderr_tail(run_dir)}"
        result.setdefault("wall_s", wall)
        return result


# The group leader's script: wait for "go" on its stdin (the gate), put /dev/null there as
# before, then become the command's own `sh -c` (exec: the same pid, so the same process
# group the guard knows). Exit 125 without running it when the gate closes unopened.
GATE = 'IFS= read -r gate && [ "$gate" = go ] || exit 125; exec </dev/null; exec /bin/sh -c "$1"'
_GUARD = {}  # this worker's guard process (pid of the worker -> Popen)


def _open_gate(fd: int) -> None:
    try:
        os.write(fd, b"go\n")
    except OSError:  # the leader is already gone: _wait sees its exit
        pass
    finally:
        os.close(fd)


def _guard():
    """The guard of this worker process, started on its first run (see _reaper.py)."""
    guard = _GUARD.get(os.getpid())
    if guard is None or guard.poll() is not None:
        guard = subprocess.Popen([sys.executable, "-I", "-S", REAPER, str(os.getpid())], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, text=True, bufsize=1)
        _GUARD[os.getpid()] = guard
    return guard


def _tell(guard, line: str) -> None:
    try:
        guard.stdin.write(line + "\n")
        guard.stdin.flush()
    except OSError:  # the guard died: the group still ends with the run
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


class _ProgressWatch:
    """New lines of progress.jsonl: each {"tokens", "loss"} to the progress callback and the
    divergence rule; a diverged result to stop the run with, or None."""

    def __init__(self, path: str, progress):
        self.path, self.progress, self.offset, self.first = path, progress, 0, None

    def read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return None
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        for line in data[:end].splitlines():
            try:
                info = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(info, dict) or "loss" not in info:
                continue
            loss = info["loss"]
            why = diverging(self.first, loss)
            if why:
                return {"status": "diverged", "reason": f"{why} (stopped early)"}
            if self.first is None and isinstance(loss, (int, float)) and math.isfinite(loss):
                self.first = float(loss)
            if self.progress is not None:
                self.progress({k: info[k] for k in ("tokens", "loss", "step") if k in info})
        return None


def _clear(run_dir: str) -> None:
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def _stderr_tail(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, "stderr.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()[-STDERR_LINES:]
    except OSError:
        return ""
    return ": " + " | ".join(line.strip() for line in lines) if lines else " (nothing on stderr)"
