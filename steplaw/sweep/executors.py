"""Where runs execute: a local pool of worker processes, Ray tasks on a cluster, or inline.

All take the run function as a parameter (`run_fn(config: RunConfig, run_dir=...,
[progress=...]) -> RunResult`, importable by name so that it pickles), so the driver and
the tests can swap it. All report every submitted run exactly once, as a `Completion`
holding a `RunResult`: a run that raises is `failed` with the error as its reason, a
worker that dies (out of memory, killed) is `failed` with how it died.

The interface the driver uses: `capacity`, `idle()`, `running()`, `submit(run_id,
config: RunConfig, run_dir)`, `submit_group([(run_id, config, run_dir), ...])`,
`poll(timeout) -> (completions, progress updates)` and `close(force=False)`.

Stacked runs: an executor given a `group_fn` (`group_fn(configs, run_dirs=...,
progress=...) -> [RunResult]`, e.g. steplaw.train.stacked.run_group) takes a group of
runs as one unit: one worker slot (one Ray task) trains them together and reports one
completion per member. A worker that dies fails every member of its group. A group of
one takes the single-run path (`run_fn`).

Local pool: long-lived `spawn`ed processes (no fork of a process that may hold CUDA or
OpenMP state), one run at a time each, talking to the driver over a pipe. A dead worker
is noticed through its process sentinel and replaced. Workers die with the driver
(PR_SET_PDEATHSIG on Linux), so a killed driver leaves no orphans training on.

Every finished result (ok or diverged) is also kept in its run directory as result.json
(written atomically), so a lost store can be rebuilt from the run directories.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import sys
import time
import traceback as tb
import warnings
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for

from steplaw import __version__
from steplaw.errors import UserError
from steplaw.fileio import write_atomic
from steplaw.train.config import RunConfig, RunResult

PROGRESS_INTERVAL_S = 0.5
RESULT_NAME = "result.json"
_RESULT_FIELDS = {f.name for f in dataclasses.fields(RunResult)}
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # steplaw/


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


def execute(run_fn, config: RunConfig, run_dir: str | None, progress=None) -> tuple[RunResult, str | None]:
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


def run_members(run_fn, group_fn, members: list[tuple], progress=None) -> list[tuple[RunResult, str | None]]:
    """A group of one through `run_fn` (checkpoints and resume as usual), more through `group_fn`."""
    if len(members) == 1 or group_fn is None:
        return [execute(run_fn, config, run_dir, progress) for _, config, run_dir in members]
    return execute_group(group_fn, members, progress)


def _keep_result(run_dir: str, result: RunResult, config: RunConfig):
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


# -- local pool ------------------------------------------------------------------------------

def _die_with_parent():
    """Ask Linux to SIGKILL this process when its parent (the driver) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn, run_fn, threads: int, parent_pid: int, group_fn=None):
    _die_with_parent()
    if os.getppid() != parent_pid:  # the driver died before we could ask
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    host = socket.gethostname()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        members = message  # [(run_id, config, run_dir), ...]: one run, or a group to stack
        last = [0.0]

        def progress(info, run_id=members[0][0], last=last):
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                with contextlib.suppress(Exception):
                    conn.send(("progress", run_id, dict(info)))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            outcomes = run_members(run_fn, group_fn, members, progress)
        try:
            for warning in caught:
                if warning.filename.startswith(_PACKAGE_DIR):  # steplaw's own: the driver shows it once
                    conn.send(("progress", members[0][0], {"warning": str(warning.message)}))
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
            for (run_id, _, _), (result, trace) in zip(members, outcomes):
                conn.send(("done", run_id, result, host, versions(), trace))
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Slot:
    index: int
    env: dict
    process: mp.process.BaseProcess | None = None
    conn: object | None = None
    run_ids: list = field(default_factory=list)  # the runs it trains now (a group: several)
    started: float = 0.0


@dataclass
class LocalExecutor:
    """`workers` processes on this machine, one run (or one group) each at a time.

    Defaults: with GPUs, `workers_per_gpu` workers per GPU (each sees only its GPU through
    CUDA_VISIBLE_DEVICES); without, as many single-threaded workers as there are cores
    (`threads_per_worker` threads each: workers x threads never exceeds the cores).
    """

    run_fn: object
    group_fn: object = None  # trains a group of stackable runs together; None: runs go one by one
    workers: int | None = None
    threads_per_worker: int | None = None
    workers_per_gpu: int = 1
    gpus: int | None = None  # None: torch.cuda.device_count()
    slots: list = field(default_factory=list, init=False)

    def __post_init__(self):
        gpus = self.gpus
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cores = cpu_count()
        if gpus:
            default_workers = gpus * max(1, self.workers_per_gpu)
        else:
            default_workers = max(1, cores // max(1, self.threads_per_worker or 1))
        workers = self.workers or default_workers
        if workers < 1:
            raise UserError(f"workers={workers}: expected at least 1 worker process")
        threads = self.threads_per_worker or max(1, cores // workers)
        self.threads = threads
        self.context = mp.get_context("spawn")
        for i in range(workers):
            env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = _visible_gpu(i % gpus)
            self.slots.append(_Slot(index=i, env=env))

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def idle(self) -> int:
        return sum(not slot.run_ids for slot in self.slots)

    def running(self) -> dict[str, float]:
        return {run_id: s.started for s in self.slots for run_id in s.run_ids}

    def _start(self, slot: _Slot):
        parent_conn, child_conn = self.context.Pipe()
        with _environment(slot.env):
            process = self.context.Process(
                target=_worker_main, args=(child_conn, self.run_fn, self.threads, os.getpid(), self.group_fn),
                # not a daemon: a run may start processes of its own (torch.compile's
                # compile workers); PR_SET_PDEATHSIG ends workers whose driver died
                name=f"steplaw-worker-{slot.index}",
            )
            process.start()
        child_conn.close()
        slot.process, slot.conn, slot.run_ids = process, parent_conn, []

    def submit(self, run_id: str, config: RunConfig, run_dir: str | None):
        self.submit_group([(run_id, config, run_dir)])

    def submit_group(self, members: list[tuple]):
        """Hand (run_id, config, run_dir) `members` to one idle worker, to train together."""
        slot = next((s for s in self.slots if not s.run_ids), None)
        if slot is None:
            raise RuntimeError("submit() with no idle worker")
        members = [tuple(m) for m in members]
        if slot.process is None or not slot.process.is_alive():
            self._start(slot)
        try:
            slot.conn.send(members)
        except (BrokenPipeError, OSError):
            self._start(slot)
            slot.conn.send(members)
        slot.run_ids, slot.started = [run_id for run_id, _, _ in members], time.time()

    def poll(self, timeout: float) -> tuple[list[Completion], list[Progress]]:
        busy = [s for s in self.slots if s.run_ids]
        if not busy:
            time.sleep(min(timeout, 0.05))
            return [], []
        waitables = {}
        for slot in busy:
            waitables[slot.conn] = slot
            waitables[slot.process.sentinel] = slot
        ready = wait_for(list(waitables), timeout)
        done, progress = [], []
        for slot in {id(waitables[r]): waitables[r] for r in ready}.values():
            died = False
            while True:  # drain the pipe before believing a sentinel
                try:
                    if not slot.conn.poll():
                        break
                    message = slot.conn.recv()
                except (EOFError, OSError):
                    died = True
                    break
                if message[0] == "progress":
                    progress.append(Progress(message[1], message[2]))
                elif message[0] == "done":
                    _, run_id, result, host, vers, trace = message
                    done.append(Completion(run_id, result, host, vers, trace))
                    slot.run_ids.remove(run_id)
                    if not slot.run_ids:
                        break
            if slot.run_ids and (died or not slot.process.is_alive()):
                slot.process.join(timeout=5)
                reason = describe_exit(slot.process.exitcode)
                for run_id in slot.run_ids:  # a dead worker fails its whole group
                    done.append(Completion(run_id, failed(reason, time.time() - slot.started),
                                           socket.gethostname(), versions()))
                slot.run_ids, slot.process = [], None
                slot.conn.close()
        return done, progress

    def close(self, force: bool = False):
        for slot in self.slots:
            if slot.process is None:
                continue
            if force or slot.run_ids:
                slot.process.kill()
            else:
                with contextlib.suppress(BrokenPipeError, OSError):
                    slot.conn.send(None)
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(timeout=10)
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join()
                slot.conn.close()
                slot.process = None


def _visible_gpu(index: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v for v in visible.split(",") if v.strip()]
        return ids[index % len(ids)]
    return str(index)


@contextlib.contextmanager
def _environment(env: dict):
    """Set variables for a child about to be spawned (the driver is single-threaded)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- Ray -------------------------------------------------------------------------------------

def _ray_task(run_fn, group_fn, members: list[tuple], threads: int):
    import torch

    torch.set_num_threads(max(1, threads))
    outcomes = run_members(run_fn, group_fn, members)
    return outcomes, socket.gethostname(), versions()


def _check_ray_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable cluster: ray.init retries a dead `host:port` for
    minutes before it gives up. 'auto', None and ray:// addresses are left to Ray."""
    if not address or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"Ray address {address!r}: expected HOST:PORT, 'auto' or ray://HOST:PORT")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach Ray at {address!r} ({exc.strerror or exc}); is `ray start --head` running "
                        f"there?") from None


class RayExecutor:
    """Runs as Ray tasks, each asking for `cpus_per_run` CPUs and `gpus_per_run` GPUs
    (fractions allowed: 0.25 packs four small runs on a GPU). `address`: a running
    cluster ("auto", "ray://host:10001"); None starts a local Ray instance. Ray's own task
    retries are off: the driver retries failed runs itself, against the store. The run
    function travels by reference: steplaw (and its module) must be installed on every
    node; the store stays with the driver, so nodes need no shared file system."""

    def __init__(self, run_fn, address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
                 max_in_flight: int | None = None, num_cpus: int | None = None, group_fn=None):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs the ray package: pip install 'steplaw[ray]'") from None
        self.ray = ray
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            _check_ray_reachable(address)
            kwargs = {"address": address, "include_dashboard": False, "log_to_driver": False,
                      "configure_logging": False}
            if address is None:
                kwargs["num_cpus"] = num_cpus or cpu_count()
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"cannot start or reach Ray at address {address!r}: {first}") from None
        resources = ray.cluster_resources()
        by_cpu = resources.get("CPU", 1) / cpus_per_run if cpus_per_run else float("inf")
        by_gpu = resources.get("GPU", 0) / gpus_per_run if gpus_per_run else float("inf")
        if gpus_per_run and not resources.get("GPU"):
            raise UserError(f"gpus_per_run={gpus_per_run} but the Ray cluster has no GPU: expected 0 GPUs per run here")
        self._capacity = max_in_flight or max(1, int(min(by_cpu, by_gpu)))
        self.task = ray.remote(_ray_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        self.run_fn_ref = ray.put(run_fn)
        self.group_fn = group_fn
        self.group_fn_ref = ray.put(group_fn)
        self.threads = max(1, int(cpus_per_run))
        self.refs: dict = {}  # ObjectRef -> (run ids of its group, started); a task's resources hold one group

    @property
    def capacity(self) -> int:
        return self._capacity

    def idle(self) -> int:
        return self._capacity - len(self.refs)

    def running(self) -> dict[str, float]:
        return {run_id: started for run_ids, started in self.refs.values() for run_id in run_ids}

    def submit(self, run_id: str, config: RunConfig, run_dir: str | None):
        self.submit_group([(run_id, config, run_dir)])

    def submit_group(self, members: list[tuple]):
        members = [tuple(m) for m in members]
        ref = self.task.remote(self.run_fn_ref, self.group_fn_ref, members, self.threads)
        self.refs[ref] = ([run_id for run_id, _, _ in members], time.time())

    def poll(self, timeout: float) -> tuple[list[Completion], list[Progress]]:
        if not self.refs:
            time.sleep(min(timeout, 0.05))
            return [], []
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        done = []
        for ref in ready:
            run_ids, started = self.refs.pop(ref)
            try:
                outcomes, host, vers = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:  # worker crashed, OOM-killed, node lost: the whole group
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                reason = f"ray: {type(exc).__name__}: {first}"
                outcomes = [(failed(reason, time.time() - started), None) for _ in run_ids]
                host, vers = None, None
            for run_id, (result, trace) in zip(run_ids, outcomes):
                done.append(Completion(run_id, result, host, vers, trace))
        return done, []

    def close(self, force: bool = False):
        for ref in list(self.refs):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        self.refs.clear()
        if self.started_ray:
            self.ray.shutdown()


# -- inline ----------------------------------------------------------------------------------

class InlineExecutor:
    """Runs each run in the driver's own process, one after another, when polled: for run
    functions that answer at once (a replay of a recorded table, tests, benchmarks of the
    driver and store). `capacity` runs are handed out at a time so that the driver batches
    its store writes; `run_dirs=False` skips run directories and result.json files."""

    def __init__(self, run_fn, capacity: int = 64, run_dirs: bool = True, group_fn=None):
        if capacity < 1:
            raise UserError(f"capacity={capacity}: expected at least 1 run at a time")
        self.run_fn = run_fn
        self.group_fn = group_fn
        self._capacity = capacity
        self.run_dirs = run_dirs
        self.queue: deque = deque()  # ([(run_id, config, run_dir), ...], submitted at): one unit each
        self.host = socket.gethostname()

    @property
    def capacity(self) -> int:
        return self._capacity

    def idle(self) -> int:
        return self._capacity - len(self.queue)

    def running(self) -> dict[str, float]:
        return {member[0]: started for members, started in self.queue for member in members}

    def submit(self, run_id: str, config: RunConfig, run_dir: str | None):
        self.submit_group([(run_id, config, run_dir)])

    def submit_group(self, members: list[tuple]):
        members = [(run_id, config, run_dir if self.run_dirs else None) for run_id, config, run_dir in members]
        self.queue.append((members, time.time()))

    def poll(self, timeout: float) -> tuple[list[Completion], list[Progress]]:
        done = []
        while self.queue:
            members, _ = self.queue.popleft()
            for (run_id, _, _), (result, trace) in zip(members, run_members(self.run_fn, self.group_fn, members)):
                done.append(Completion(run_id, result, self.host, None, trace))
        return done, []

    def close(self, force: bool = False):
        self.queue.clear()
