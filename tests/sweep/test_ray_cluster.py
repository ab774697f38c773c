"""The Ray executor on a two-node cluster made on this machine: a head node and a worker
node, each its own `ray start` process group with its own resources, all on 127.0.0.1.
The worker node is killed mid-sweep: its runs fail, the driver retries them, they finish
on the head; nothing is lost or recorded twice."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
import sweep_fakes  # noqa: E402

from steplaw.models.config import ModelConfig  # noqa: E402
from steplaw.sweep.driver import run_sweep  # noqa: E402
from steplaw.sweep.ray_executor import RayExecutor  # noqa: E402
from steplaw.sweep.store import ResultStore  # noqa: E402
from steplaw.train.config import RunConfig  # noqa: E402
from steplaw.trainers.steplaw import SteplawTrainer  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
RAY = str(Path(sys.executable).with_name("ray"))
MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
SLEEP_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_node(args, env, log):
    # its own process group: killing the group kills that node's raylet and workers only
    return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
                            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[int]:
    """pid's children, their children, ... (from /proc)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def stop(proc, sig=signal.SIGKILL):
    """Signal a node's whole process tree: its group, and its workers (Ray starts them in
    sessions of their own, so the group alone would leave them running)."""
    if proc.poll() is None:
        tree = descendants(proc.pid)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a token in ~/.ray must not lock this test cluster
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "SWEEP_FAKE_SLEEP": str(SLEEP_S),
           "SWEEP_FAKE_NODE_LOG": str(tmp_path / "nodes.log"),
           # the nodes' workers import this checkout's steplaw and the stand-in run functions
           "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    logs = open(tmp_path / "ray.log", "w")
    temp_dir = tempfile.mkdtemp(prefix="steplaw-ray-")  # short: Ray's socket paths must fit 107 bytes
    head = start_node(["--head", f"--port={port}", "--num-cpus=1", '--resources={"head_node": 1}',
                       "--include-dashboard=false", f"--temp-dir={temp_dir}"], env, logs)
    nodes = [head]
    try:
        wait_for(lambda: _listening(port) or head.poll() is not None, 120, "the head node")
        assert head.poll() is None, (tmp_path / "ray.log").read_text()[-3000:]
        worker = start_node([f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"worker_node": 1}'], env, logs)
        nodes.append(worker)
        ray.init(address=f"127.0.0.1:{port}", _node_ip_address="127.0.0.1", log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 180, "two live nodes")
        ids = {name: next(n["NodeID"] for n in ray.nodes() if n["Alive"] and name in n["Resources"])
               for name in ("head_node", "worker_node")}
        yield {"head": head, "worker": worker, "ids": ids, "log": tmp_path / "nodes.log"}
    finally:
        ray.shutdown()
        for proc in reversed(nodes):
            stop(proc)
        logs.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def log_lines(path):
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_worker_node_killed_mid_sweep_its_runs_finish_on_the_head(cluster, tmp_path):
    runs = [RunConfig(model=MODEL, tokens=2**16, lr=lr, batch_tokens=bs, seq_len=64)
            for lr in (0.005, 0.01, 0.02) for bs in (512, 1024)]
    worker_id, head_id = cluster["ids"]["worker_node"], cluster["ids"]["head_node"]
    killed = {}

    def kill_worker_mid_run():
        started = wait_for(lambda: [r for e, r, n in log_lines(cluster["log"]) if e == "start" and n == worker_id], 120,
                           "a run on the worker node")
        time.sleep(SLEEP_S / 3)  # inside those runs
        killed["in_flight"] = {r for e, r, n in log_lines(cluster["log"]) if e == "start" and n == worker_id} - {
            r for e, r, n in log_lines(cluster["log"]) if e == "end" and n == worker_id}
        killed["first"] = started
        stop(cluster["worker"])

    killer = threading.Thread(target=kill_worker_mid_run, daemon=True)
    killer.start()
    summary = run_sweep(runs, tmp_path / "sweep", lambda: RayExecutor(sweep_fakes.node_run, cpus_per_run=1),
                        max_attempts=2, progress=False, trainer=SteplawTrainer())
    killer.join(timeout=60)
    assert killed.get("in_flight"), "the worker node ran nothing before it was killed"
    assert summary.counts == {"ok": len(runs)}
    with ResultStore(tmp_path / "sweep", readonly=True) as store:
        rows = {r["run_id"]: r for r in store.rows()}
    assert sorted(rows) == sorted(r.run_id() for r in runs)  # none lost, none extra
    ends = [(r, n) for e, r, n in log_lines(cluster["log"]) if e == "end"]
    assert sorted(r for r, _ in ends) == sorted(rows)  # each run finished exactly once
    retried = {run_id for run_id, row in rows.items() if row["attempts"] == 1}
    assert killed["in_flight"] <= retried  # their attempt on the dead node failed ...
    assert all((run_id, head_id) in ends for run_id in retried)  # ... and the retry finished on the head
    # (runs handed to the worker node but not yet started there fail and are retried too)
    assert all(row["attempts"] <= 1 for row in rows.values())
