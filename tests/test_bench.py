"""Every benchmark script runs in --quick mode and prints one JSON object of the shared shape.

This is a smoke test that the scripts do not rot; it asserts nothing about speed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["adamw.py", "moe.py", "train.py", "fit.py"])
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
