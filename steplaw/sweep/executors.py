"""Where runs execute: a local pool of worker processes, or inline (Ray tasks on a
cluster: steplaw.sweep.ray_executor; what they share: steplaw.sweep.execution).

All take the run function as a parameter (`run_fn(config, run_dir=...,
[progress=...]) -> RunResult`, importable by name so that it pickles), so the driver and
the tests can swap it. All report every submitted run exactly once, as a `Completion`
holding a `RunResult`: a run that raises is `failed` with the error as its reason, a
worker that dies (out of memory, killed) is `failed` with how it died.

The interface the driver uses: `capacity`, `idle()`, `running()`, `submit(run_id,
config, run_dir)`, `submit_group([(run_id, config, run_dir), ...])`,
`poll(timeout) -> (completions, progress updates)` and `close(force=False)`.

Stacked runs: an executor given a `group_fn` (`group_fn(configs, run_dirs=...,
progress=...) -> [RunResult]`; by default the `run_group` of a trainer that declares the
"stack" capability, e.g. steplaw's own) takes a group of
runs as one unit: one worker slot (one Ray task) trains them together and reports one
completion per member. A worker that dies fails every member of its group. A group of
one takes the single-run path (`run_fn`).

Local pool: long-lived `spawn`ed processes (no fork of a process that may hold CUDA or
OpenMP state), one run at a time each, talking to the driver over a pipe. A dead worker
is noticed through its process sentinel and replaced. Workers die with the driver
(PR_SET_PDEATHSIG on Linux), so a killed driver leaves no orphans training on.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for

from steplaw.errors import UserError
from steplaw.sweep.execution import (
    PROGRESS_INTERVAL_S,
    Completion,
    Progress,
    cpu_count,
    describe_exit,
    execute_trunk,
    failed,
    group_function,
    run_members,
    versions,
)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # steplaw/


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
        trunk = None
        if isinstance(message, tuple) and message and message[0] == "trunk":  # ("trunk", members, dir, done)
            _, members, trunk_dir, done = message
            trunk = (trunk_dir, done)
        else:
            members = message  # [(run_id, config, run_dir), ...]: one run, or a group to stack
        last = [0.0]

        first = members[0][0]

        def progress(info, run_id=first, last=last):
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                with contextlib.suppress(Exception):
                    conn.send(("progress", run_id, dict(info)))

        if trunk is not None:  # each branch's result goes back as it finishes
            def send(run_id, result, trace):
                with contextlib.suppress(BrokenPipeError, OSError):
                    conn.send(("done", run_id, result, host, versions(), trace))

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                execute_trunk(run_fn, members, trunk[0], trunk[1], send, progress)
            outcomes = []
            members = []
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                outcomes = run_members(run_fn, group_fn, members, progress)
        try:
            for warning in caught:
                if warning.filename.startswith(_PACKAGE_DIR):  # steplaw's own: the driver shows it once
                    conn.send(("progress", first, {"warning": str(warning.message)}))
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
        self.group_fn = group_function(self.run_fn, self.group_fn)
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

    def submit(self, run_id: str, config, run_dir: str | None):
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

    def submit_trunk(self, members: list[tuple], trunk_dir: str, done: set[str]):
        """Hand one trunk (every member, `done` ones too: they fix the trunk) to an idle
        worker; a completion comes back for each member not in `done`, as it finishes."""
        slot = next((s for s in self.slots if not s.run_ids), None)
        if slot is None:
            raise RuntimeError("submit_trunk() with no idle worker")
        message = ("trunk", [tuple(m) for m in members], str(trunk_dir), set(done))
        if slot.process is None or not slot.process.is_alive():
            self._start(slot)
        try:
            slot.conn.send(message)
        except (BrokenPipeError, OSError):
            self._start(slot)
            slot.conn.send(message)
        slot.run_ids, slot.started = [m[0] for m in members if m[0] not in done], time.time()

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



class InlineExecutor:
    """Runs each run in the driver's own process, one after another, when polled: for run
    functions that answer at once (a replay of a recorded table, tests, benchmarks of the
    driver and store). `capacity` runs are handed out at a time so that the driver batches
    its store writes; `run_dirs=False` skips run directories and result.json files."""

    def __init__(self, run_fn, capacity: int = 64, run_dirs: bool = True, group_fn=None):
        if capacity < 1:
            raise UserError(f"capacity={capacity}: expected at least 1 run at a time")
        self.run_fn = run_fn
        self.group_fn = group_function(run_fn, group_fn)
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
        return {member[0]: unit[1] for unit in self.queue for member in unit[0]}

    def submit(self, run_id: str, config, run_dir: str | None):
        self.submit_group([(run_id, config, run_dir)])

    def submit_group(self, members: list[tuple]):
        members = [(run_id, config, run_dir if self.run_dirs else None) for run_id, config, run_dir in members]
        self.queue.append((members, time.time()))

    def submit_trunk(self, members: list[tuple], trunk_dir: str, done: set[str]):
        members = [(run_id, config, run_dir if self.run_dirs else None) for run_id, config, run_dir in members]
        self.queue.append(([m for m in members if m[0] not in done], time.time(), (members, str(trunk_dir), set(done))))

    def poll(self, timeout: float) -> tuple[list[Completion], list[Progress]]:
        done = []
        while self.queue:
            members, _, *trunk = self.queue.popleft()
            if trunk:
                every, trunk_dir, finished = trunk[0]
                execute_trunk(self.run_fn, every, trunk_dir, finished,
                              lambda run_id, result, trace: done.append(Completion(run_id, result, self.host, None, trace)))
                continue
            for (run_id, _, _), (result, trace) in zip(members, run_members(self.run_fn, self.group_fn, members)):
                done.append(Completion(run_id, result, self.host, None, trace))
        return done, []

    def close(self, force: bool = False):
        self.queue.clear()
