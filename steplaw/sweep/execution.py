"""What every executor shares: running one config or one group through a trainer,
and what comes back (steplaw.sweep.executors and steplaw.sweep.ray_executor use it).

A run reports exactly once, as a `Completion` holding a `RunResult`: a run that raises is
`failed` with the error as its reason (`execute`), a group that raises fails every member
(`execute_group`). Every finished result (ok or diverged) is also kept in its run
directory as result.json (written atomically), so a lost store can be rebuilt from the
run directories.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import platform
import signal
import sys
import time
import traceback as tb
from dataclasses import dataclass

from steplaw import __version__
from steplaw.fileio import write_atomic
from steplaw.result import RunResult

PROGRESS_INTERVAL_S = 0.5
RESULT_NAME = "result.json"
_RESULT_FIELDS = {f.name for f in dataclasses.fields(RunResult)}


@dataclass
class Completion:
    run_id: str
    result: RunResult  # status ok / diverged / failed (with its reason), losses, curve, ...
    host: str | None = None
    versions: dict | None = None
    traceback: str | None = None  # last lines of the traceback of a run that raised


@dataclass
class Progress:
    run_id: str
    info: dict  # whatever the run function reports (e.g. step, tokens, loss)


def versions() -> dict:
    out = {"python": platform.python_version(), "steplaw": __version__}
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def failed(reason: str, wall_s: float | None = None) -> RunResult:
    """The RunResult of an attempt that did not finish."""
    return RunResult(status="failed", reason=reason, wall_s=wall_s)


def as_result(value) -> RunResult:
    """A run function's return value as a RunResult: a RunResult as is, a dict of
    RunResult fields (others are dropped), anything else a failure saying what it was."""
    if isinstance(value, RunResult):
        result = value
    elif isinstance(value, dict):
        data = {k: v for k, v in value.items() if k in _RESULT_FIELDS}
        data["curve"] = [tuple(p) for p in data.get("curve") or []]
        result = RunResult(**data)
    else:
        return failed(f"run function returned {type(value).__name__}: expected a RunResult")
    if result.status not in ("ok", "diverged", "failed"):  # e.g. "pending" from a preempted run
        return dataclasses.replace(result, status="failed",
                                   reason=f"run function returned status {result.status!r}: expected ok, diverged or failed")
    return result


def execute(run_fn, config, run_dir: str | None, progress=None) -> tuple[RunResult, str | None]:
    """Run one config through `run_fn`: (its RunResult, the traceback tail if it raised)."""
    started = time.time()
    trace = None
    try:
        if run_dir is not None:
            try:
                os.makedirs(run_dir, exist_ok=True)
                _drop_failed_result(run_dir)
            except OSError:
                run_dir = None  # e.g. a Ray node without the driver's file system
        kwargs = {"run_dir": run_dir}
        if progress is not None and "progress" in _parameters(run_fn):
            kwargs["progress"] = progress
        result = as_result(run_fn(config, **kwargs))
    except MemoryError:
        result = failed("out of memory (MemoryError in the run)")
    except Exception as exc:  # noqa: BLE001  (a crashing run is a result of the sweep, not of the driver)
        trace = "\n".join(tb.format_exc().strip().splitlines()[-6:])
        result = failed(f"{type(exc).__name__}: {exc}")
    if result.wall_s is None:
        result.wall_s = time.time() - started
    if run_dir is not None and result.status in ("ok", "diverged"):
        _keep_result(run_dir, result, config)
    return result, trace


def execute_group(group_fn, members: list[tuple], progress=None) -> list[tuple[RunResult, str | None]]:
    """Run the (run_id, config, run_dir) `members` together through `group_fn`: each
    member's (RunResult, traceback tail), in order. A group that raises fails every member."""
    started = time.time()
    configs = [config for _, config, _ in members]
    run_dirs = []
    for _, _, run_dir in members:
        if run_dir is not None:
            try:
                os.makedirs(run_dir, exist_ok=True)
                _drop_failed_result(run_dir)  # a stored failure must not answer its retry
            except OSError:
                run_dir = None
        run_dirs.append(run_dir)
    trace = None
    try:
        values = group_fn(configs, run_dirs=run_dirs, progress=progress)
        if len(values) != len(members):
            raise RuntimeError(f"group function returned {len(values)} results for {len(members)} runs")
        results = [as_result(value) for value in values]
    except MemoryError:
        results = [failed("out of memory (MemoryError in the stack)") for _ in members]
    except Exception as exc:  # noqa: BLE001  (as in execute: a crash is a result)
        trace = "\n".join(tb.format_exc().strip().splitlines()[-6:])
        results = [failed(f"{type(exc).__name__}: {exc}") for _ in members]
    share = (time.time() - started) / len(members)
    out = []
    for result, config, run_dir in zip(results, configs, run_dirs):
        if result.wall_s is None:
            result.wall_s = share
        if run_dir is not None and result.status in ("ok", "diverged"):
            _keep_result(run_dir, result, config)
        out.append((result, trace if result.status == "failed" else None))
    return out


def group_function(trainer, group_fn=None):
    """What trains a stacked group: `group_fn` when given, else the `run_group` of a
    trainer that declares the "stack" capability (steplaw.trainers), else None."""
    if group_fn is not None:
        return group_fn
    if "stack" in getattr(trainer, "capabilities", ()):
        return trainer.run_group
    return None


def run_members(run_fn, group_fn, members: list[tuple], progress=None) -> list[tuple[RunResult, str | None]]:
    """A group of one through `run_fn` (checkpoints and resume as usual), more through `group_fn`."""
    if len(members) == 1 or group_fn is None:
        return [execute(run_fn, config, run_dir, progress) for _, config, run_dir in members]
    return execute_group(group_fn, members, progress)


def execute_trunk(trainer, members: list[tuple], trunk_dir: str, done: set[str], on_done, progress=None) -> None:
    """Train the (run_id, config, run_dir) `members` of one trunk through the trainer's
    `run_trunk` (capability "branch"): `on_done(run_id, result, traceback tail)` once for
    every member not in `done`, as each branch finishes (so that the driver stores it at
    once); members the trainer did not report (it raised, or returned early) are failed."""
    open_ids = [run_id for run_id, _, _ in members if run_id not in done]
    run_dirs = {}
    for run_id, config, run_dir in members:
        if run_id in done or run_dir is None:
            continue
        try:
            os.makedirs(run_dir, exist_ok=True)
            _drop_failed_result(run_dir)
            run_dirs[run_id] = (run_dir, config)
        except OSError:
            pass
    started, reported = time.time(), set()

    def on_result(run_id, value):
        if run_id not in open_ids or run_id in reported:
            return
        reported.add(run_id)
        result = as_result(value)
        if result.wall_s is None:
            result.wall_s = time.time() - started
        if run_id in run_dirs and result.status in ("ok", "diverged"):
            _keep_result(run_dirs[run_id][0], result, run_dirs[run_id][1])
        on_done(run_id, result, None)

    reason, trace = "the trainer's run_trunk returned without a result for this run", None
    try:
        os.makedirs(trunk_dir, exist_ok=True)
        kwargs = {"progress": progress} if progress is not None and "progress" in _parameters(trainer.run_trunk) else {}
        trainer.run_trunk([config for _, config, _ in members], trunk_dir, set(done), on_result, **kwargs)
    except MemoryError:
        reason = "out of memory (MemoryError in the trunk)"
    except Exception as exc:  # noqa: BLE001  (as in execute: a crash is a result)
        trace = "\n".join(tb.format_exc().strip().splitlines()[-6:])
        reason = f"{type(exc).__name__}: {exc}"
    for run_id in open_ids:
        if run_id not in reported:
            reported.add(run_id)
            on_done(run_id, failed(reason, time.time() - started), trace)


def _keep_result(run_dir: str, result: RunResult, config):
    """result.json in the run directory, unless the run function wrote it (train.run does)."""
    path = os.path.join(run_dir, RESULT_NAME)
    if os.path.exists(path):
        return
    data = result.to_dict()
    data["run_id"] = data.get("run_id") or config.run_id()
    data["config"] = data.get("config") or config.to_dict()
    with contextlib.suppress(OSError, TypeError, ValueError):
        write_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def _drop_failed_result(run_dir: str):
    """steplaw.train.run returns the result a run directory already holds; a failed one
    must not answer the retry of that run."""
    path = os.path.join(run_dir, RESULT_NAME)
    try:
        with open(path) as f:
            status = json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return
    if status == "failed":
        os.unlink(path)


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "worker process vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the out-of-memory killer, or killed by hand)" if -exitcode == signal.SIGKILL else ""
        return f"worker process was killed by {name}{hint}"
    return f"worker process exited with code {exitcode} while running"

