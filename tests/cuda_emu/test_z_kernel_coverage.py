"""Every __global__ kernel of csrc/ was launched by the emulated-CUDA tests (this file sorts
after the op test files, and pytest runs files in order)."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.cuda_emu
CSRC = Path(__file__).resolve().parents[2] / "csrc"
OP_TEST_FILES = {"test_adamw_emu.py", "test_moe_emu.py"}


def global_kernels():
    kernels = set()
    for path in CSRC.rglob("*.cu"):
        kernels |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", path.read_text()))
    return kernels


def test_every_global_kernel_of_csrc_was_launched(emu_ops, request):
    kernels = global_kernels()
    assert len(kernels) >= 10, kernels
    collected = {Path(str(item.fspath)).name for item in request.session.items}
    if not OP_TEST_FILES <= collected or request.config.option.keyword:
        pytest.skip("the coverage check needs the whole cuda_emu suite")
    launched = dict(line.split("=") for line in emu_ops._launch_counts().split())
    assert sorted(kernels - set(launched)) == []
