"""The exactness claims on the narrower instruction sets that other users' CPUs run.

CI's machine may have AVX-512; users run AVX2-only AMD and Intel CPUs, or older ones. The
claims that a stacked member ends with its run alone's losses to the last bit (dense and
MoE, tests/train/test_stacked.py) must hold on each, and so must the fused AdamW kernels'
(tests/ops/test_adamw_op.py forces its own narrower paths). Here the stack tests run
again in a fresh process with every ISA-dependent choice forced narrower: ATen's
vectorised kernels (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA), MKL's GEMMs
(MKL_ENABLE_INSTRUCTIONS) and steplaw's AdamW kernel (STEPLAW_CPU_ISA). On a CPU that
lacks a forced set, each library takes the widest it has below it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # two fresh pytest processes of the stack tests: 30-50 s each

# The environment of each narrower path, and the stack tests run there: every
# stacked-vs-alone test on AVX2 (what most users without AVX-512 run), the bit-for-bit
# dense and MoE cases in float32 and float64 on the pre-AVX2 path.
NARROWER = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "STEPLAW_CPU_ISA": "avx2"},
    "sse4": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
             "STEPLAW_CPU_ISA": "portable"},
}
SUBSET = {"avx2": "alone", "sse4": "last_bit"}


@pytest.mark.parametrize("isa", sorted(NARROWER))
def test_stacked_members_equal_their_runs_alone_on_narrower_isa(isa):
    env = dict(os.environ, **NARROWER[isa])
    check = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    probe = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == {"avx2": "AVX2", "sse4": "DEFAULT"}[isa], probe.stdout  # the switch took
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/train/test_stacked.py", "-k", SUBSET[isa]],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout.splitlines()[-1]
