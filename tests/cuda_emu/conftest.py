"""Fixtures of the emulated-CUDA tests: the module built from the working tree (build.py,
cached in build/cuda_emu), the block/thread orders every comparison runs in, and the
existing op test modules whose cases these tests reuse."""
import importlib.util
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
# Block and thread orders of the emulation (tests/cuda_emu/emu/cuda_emu.h): each comparison
# runs in all of them; a kernel relying on an order the GPU does not promise differs.
ORDERS = [("forward", 0), ("reverse", 0), ("shuffle", 1)]


def load_test_module(relpath):
    """An existing test module (for its cases and helpers), loaded by path."""
    name = "_cuda_emu_" + relpath.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(TESTS, relpath))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def emu_ops():
    sys.path.insert(0, HERE)
    try:
        import build
    finally:
        sys.path.remove(HERE)
    build.build()
    return torch.ops.steplaw_cuda_emu


@pytest.fixture(params=ORDERS, ids=[f"{o}{s}" if o == "shuffle" else o for o, s in ORDERS])
def emu(request, emu_ops):
    """The emulated CUDA ops, in one block/thread order."""
    emu_ops._set_order(*request.param)
    yield emu_ops
    emu_ops._set_order("forward", 0)
