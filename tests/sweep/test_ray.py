"""The Ray executor against a local Ray instance (needs the optional ray extra)."""
import json

import pytest

ray = pytest.importorskip("ray")
import sweep_fakes  # noqa: E402

from steplaw.cli import main  # noqa: E402
from steplaw.models.config import ModelConfig  # noqa: E402
from steplaw.sweep.driver import run_sweep  # noqa: E402
from steplaw.sweep.ray_executor import RayExecutor  # noqa: E402
from steplaw.sweep.store import ResultStore, export_rows  # noqa: E402
from steplaw.train.config import RunConfig  # noqa: E402
from steplaw.trainers.steplaw import SteplawTrainer  # noqa: E402

MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # One local instance for the module (the executor reuses a running Ray and leaves it
    # up). Ray's workers do not see pytest's sys.path: send the stand-in module by value.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.cloudpickle.register_pickle_by_value(sweep_fakes)
    yield
    ray.cloudpickle.unregister_pickle_by_value(sweep_fakes)
    ray.shutdown()


def test_ray_sweep_with_crashes_and_retries(tmp_path):
    # seed 0: ok; seed 1: the run raises; seed 2: its worker is SIGKILLed once, the retry
    # succeeds; seed 3: killed every time, failed after 2 attempts
    runs = [RunConfig(model=MODEL, tokens=2**16, lr=0.01, batch_tokens=bs, seq_len=64, seed=seed)
            for seed in (0, 1, 2, 3) for bs in (512, 1024)]
    summary = run_sweep(runs, tmp_path, lambda: RayExecutor(sweep_fakes.fake_run, cpus_per_run=1),
                        max_attempts=2, progress=False, trainer=SteplawTrainer())
    assert summary.counts == {"ok": 4, "failed": 4}
    with ResultStore(tmp_path, readonly=True) as store:
        by_seed = {}
        for row in store.rows():
            by_seed.setdefault(json.loads(row["config"])["seed"], []).append(row)
    assert all(r["status"] == "ok" and r["attempts"] == 0 and r["host"] for r in by_seed[0])
    assert all(r["status"] == "failed" and "scripted crash" in r["reason"] for r in by_seed[1])
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in by_seed[2])
    assert all(r["status"] == "failed" and r["attempts"] == 2 and r["reason"].startswith("ray: ") for r in by_seed[3])
    ok = [r for r in export_rows(tmp_path) if r["status"] == "ok"]
    assert sorted(r["loss"] for r in ok) == pytest.approx(sorted(sweep_fakes.bowl_loss(r["lr"], r["batch_tokens"]) for r in ok))


def test_cli_executor_ray(tmp_path):
    argv = ["--params", "20K", "--tokens", "65536", "--lrs", "0.005", "0.01",
            "--batch-sizes", "512", "--seq-len", "64", "--run-fn", "sweep_fakes:fake_run",
            "--executor", "ray", "--cpus-per-run", "1", "--quiet"]
    assert main(["sweep", "--out", str(tmp_path / "a")] + argv) == 0
    assert [r["status"] for r in export_rows(tmp_path / "a")] == ["ok", "ok"]
    # no GPU in this Ray instance: a user error, before any run is started
    assert main(["sweep", "--out", str(tmp_path / "b"), "--gpus-per-run", "0.25"] + argv) == 2
    assert {r["status"] for r in export_rows(tmp_path / "b")} == {"pending"}
