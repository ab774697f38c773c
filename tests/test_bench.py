"""The benchmark scripts and the GPU check, on a machine without a GPU.

Every benchmark runs in --quick mode and prints one JSON object of the shared shape (a
smoke test that the scripts do not rot; it asserts nothing about speed). The GPU check's
logic runs without a device: it still writes valid JSON with every step accounted for,
and its op smoke run compares the C++ kernels with the references on CPU, so that an
API change breaks here, in CI, rather than in a rare GPU window.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(script: str):
    """A bench script as a module, without putting bench/ (train.py, sweep.py, ...) on sys.path."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
ops_smoke = _load("ops_smoke")
sweep = _load("sweep")
demo = _load("demo")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["adamw.py", "moe.py", "train.py", "fit.py", "sweep.py", "trainer_cmd.py", "branch.py"])
def test_quick_benchmark_prints_json(script):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["bench"] == script.removesuffix(".py")
    assert result["device"] and result["torch"]
    assert result["cases"]
    for case in result["cases"]:
        assert case["case"]
        assert case["median_s"] and all(t > 0 for t in case["median_s"].values())
        # speedup = contender time / our time, for every contender but ours
        assert len(case["speedup"]) == len(case["median_s"]) - 1


def test_sweep_rounding_twin_splits_the_micro_batch():
    """The rounding floor's twin run: the same run with a smaller micro-batch that divides
    the batch (so the same sequences per step), or None when nothing smaller exists."""
    from steplaw.models import ModelConfig
    from steplaw.train import RunConfig

    model = ModelConfig(d_model=16, n_layers=1, n_heads=1, d_ff=48, max_seq_len=8)

    def twin(batch_tokens, micro=None):
        config = RunConfig(model=model, tokens=1024, lr=1e-3, batch_tokens=batch_tokens, seq_len=8, device="cpu",
                           micro_batch_tokens=micro)
        found = sweep.rounding_twin(config)
        if found is not None:
            assert found.to_dict() | {"micro_batch_tokens": None} == config.to_dict() | {"micro_batch_tokens": None}
        return None if found is None else found.micro_batch_tokens

    assert twin(64) == 32  # 8 sequences -> micro-batches of 4
    assert twin(48) == 24  # 6 -> 3
    assert twin(40) == 8  # 5 (prime) -> 1
    assert twin(64, micro=16) == 8  # already micro-batches of 2 -> 1
    assert twin(8) is None and twin(64, micro=8) is None


def test_sweep_demo_lrs_span_the_demo_grid():
    assert sweep.demo_lrs(0.01, 1) == [0.01]
    for members in (4, 8):
        lrs = sweep.demo_lrs(0.01, members)
        assert len(lrs) == members and lrs[0] == pytest.approx(0.0025) and lrs[-1] == pytest.approx(0.04)
        ratios = [b / a for a, b in zip(lrs, lrs[1:])]
        assert ratios == pytest.approx([ratios[0]] * (members - 1))
    cases = sweep.demo_cases()
    assert {c["model"].d_model for c in cases} == {16, 32, 64} and {c["members"] for c in cases} == {4, 8}
    assert all(c["seq_len"] == 8 and 32 <= c["batch_tokens"] <= 128 for c in cases)


def _gpu_check(tmp_path, *args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a GPU machine
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    files = list(tmp_path.glob("gpu-check_*.json"))
    assert len(files) == 1, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(files[0])
    return proc, json.loads(files[0].read_text())


@pytest.mark.parametrize("dry_run", [False, True])
def test_gpu_check_without_a_device_records_every_step_as_skipped(tmp_path, dry_run):
    proc, doc = _gpu_check(tmp_path, *(["--dry-run"] if dry_run else []), "--budget-s", "300")
    assert proc.returncode == (0 if dry_run else 2), proc.stderr[-2000:]
    assert list(doc["steps"]) == ["build", "ops_smoke", "doctor", "gpu_tests", "benchmarks"]
    assert doc["running"] is None and doc["budget_s"] == 300
    for name, step in doc["steps"].items():
        assert step["status"] == "skipped" and step["reason"] == "no CUDA device", name
    assert 0 < doc["steps"]["build"]["plan"]["timeout_s"] < 300
    planned = [b["script"] for b in doc["steps"]["benchmarks"]["plan"]]
    assert planned == [s for s in gpu_check.BENCHMARKS if (BENCH / s).exists()]
    assert "adamw.py" in planned and "moe.py" in planned


def test_gpu_check_plan_splits_what_is_left():
    plan = gpu_check.benchmark_plan(200.0, ["a.py", "b.py"])
    assert plan == [("a.py", 100.0, True), ("b.py", 100.0, True)]
    assert gpu_check.benchmark_plan(1000.0, ["a.py"]) == [("a.py", 1000.0, False)]
    assert gpu_check.tests_timeout(100.0, 3) < 100.0 and gpu_check.tests_timeout(100.0, 0) == 100.0


def test_gpu_check_run_kills_a_step_and_what_it_started_at_its_limit():
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(120)\n")
    result = gpu_check.run([sys.executable, "-c", code], dict(os.environ), timeout=8)
    assert result["timed_out"] and result["rc"] == 124
    assert result["seconds"] < 60
    stat = Path(f"/proc/{int(result['stdout'].split()[0])}/stat")
    for _ in range(100):  # gone, or a zombie waiting for whoever adopted it to reap it
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's own child process outlived the step's time limit")


def test_ops_smoke_compare_tells_a_difference():
    import torch

    same = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([3, 4])}
    assert ops_smoke.compare(same, {k: v.clone() for k, v in same.items()}) == (True, 0.0, None)
    ok, worst, problem = ops_smoke.compare(same, {"w": torch.tensor([1.0, 2.001]), "ids": same["ids"]})
    assert not ok and worst == pytest.approx(1e-3, rel=1e-3) and problem.startswith("w:")
    ok, _, problem = ops_smoke.compare(same, {"w": same["w"], "ids": torch.tensor([3, 5])})
    assert not ok and problem.startswith("ids:")
    assert not ops_smoke.compare(same, {"w": same["w"]})[0]
    nan = {"w": torch.tensor([float("nan"), 1.0])}
    assert ops_smoke.compare(nan, {"w": torch.tensor([float("nan"), 1.0])})[0]


@pytest.mark.slow
def test_ops_smoke_on_cpu_matches_the_references():
    proc = subprocess.run([sys.executable, str(BENCH / "ops_smoke.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    from steplaw import ops

    assert set(result["ops"]) == set(ops.OP_NAMES)
    for name, op in result["ops"].items():
        assert op["pass"] and op["compiled_kernel"] and op["cases"], name
        assert op["max_abs_error"] is not None and op["max_abs_error"] < 1e-3, name


def test_demo_law_difference_and_summary():
    law = {"coef": 2.0, "exp_N": -0.5, "exp_D": 0.25, "ci": {"exp_N": [-0.6, -0.4], "exp_D": [0.1, 0.4]}}
    cells = [{"N": 1e4, "D": 1e5, "lr_edge": None, "bs_edge": None}, {"N": 1e5, "D": 1e6, "lr_edge": "low", "bs_edge": None}]
    scores = [{"law": "step_law", "gap_mean": 0.05}, {"law": "fit_loco", "gap_mean": 0.004, "bowl_gap_mean": 0.002}]
    a = {"lr_law": law, "bs_law": {"coef": 1.0, "exp_D": 0.5, "ci": {}}, "cells": cells, "law_scores": scores}
    b = {**a, "lr_law": {**law, "coef": 2.0 * 1.01}}  # every predicted lr 1% higher, the batch law the same
    assert demo.law_difference(a, b) == pytest.approx({"lr": 1 - 1 / 1.01, "batch_tokens": 0.0})
    summary = demo.law_summary(a)
    assert summary["interior_cells"] == 1 and summary["cells"] == 2
    assert summary["lr_law"]["exp_N"]["ci_width"] == pytest.approx(0.2)
    assert summary["loco_gap_mean"] == {"nearest_run": 0.004, "bowl": 0.002}
