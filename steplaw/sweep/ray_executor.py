"""Runs as Ray tasks on a cluster (`--executor ray`): the executor interface of
steplaw.sweep.executors, one task per run or per stacked group.

Ray is optional (`pip install 'steplaw[ray]'`). A task runs its members through the same
`run_members` as a local worker; a task that dies (its node lost, killed) fails every
member, and the driver retries them on the machines still there.
"""
from __future__ import annotations

import contextlib
import socket
import time

from steplaw.errors import UserError
from steplaw.sweep.execution import (
    Completion,
    Progress,
    cpu_count,
    execute_trunk,
    failed,
    group_function,
    run_members,
    versions,
)


def _ray_task(run_fn, group_fn, members: list[tuple], threads: int):
    import torch

    torch.set_num_threads(max(1, threads))
    outcomes = run_members(run_fn, group_fn, members)
    return outcomes, socket.gethostname(), versions()


def _ray_trunk_task(run_fn, members: list[tuple], trunk_dir: str, done: set, threads: int):
    """One trunk as one task; its results come back together when it ends (each branch is
    also kept durably in the trunk directory, which must be on storage the driver's node
    shares, so that a lost task's rerun resumes from its checkpoints)."""
    import torch

    torch.set_num_threads(max(1, threads))
    by_id = {}
    execute_trunk(run_fn, members, trunk_dir, done, lambda run_id, result, trace: by_id.__setitem__(run_id, (result, trace)))
    outcomes = [by_id[run_id] for run_id, _, _ in members if run_id not in done]
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
        self.trunk_task = ray.remote(_ray_trunk_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        self.run_fn_ref = ray.put(run_fn)
        self.group_fn = group_function(run_fn, group_fn)
        self.group_fn_ref = ray.put(self.group_fn)
        self.threads = max(1, int(cpus_per_run))
        self.refs: dict = {}  # ObjectRef -> (run ids of its group, started); a task's resources hold one group

    @property
    def capacity(self) -> int:
        return self._capacity

    def idle(self) -> int:
        return self._capacity - len(self.refs)

    def running(self) -> dict[str, float]:
        return {run_id: started for run_ids, started in self.refs.values() for run_id in run_ids}

    def submit(self, run_id: str, config, run_dir: str | None):
        self.submit_group([(run_id, config, run_dir)])

    def submit_group(self, members: list[tuple]):
        members = [tuple(m) for m in members]
        ref = self.task.remote(self.run_fn_ref, self.group_fn_ref, members, self.threads)
        self.refs[ref] = ([run_id for run_id, _, _ in members], time.time())

    def submit_trunk(self, members: list[tuple], trunk_dir: str, done: set[str]):
        members = [tuple(m) for m in members]
        ref = self.trunk_task.remote(self.run_fn_ref, members, str(trunk_dir), set(done), self.threads)
        self.refs[ref] = ([run_id for run_id, _, _ in members if run_id not in done], time.time())

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
