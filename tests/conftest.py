import os

import pytest

# Torch (and the OpenMP kernels) use two threads unless a test says otherwise: the CI
# machine has two cores, and on a bigger machine one thread per core for every test
# process (and its subprocesses) oversubscribes the cores and makes timings erratic.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Every Ray instance the tests start (local ones and the two-node test cluster) runs in one
# auth mode: Ray keeps the mode per process, and a token that `ray start` left in ~/.ray
# must not lock a later test's cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    have_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        have_cuda = torch.cuda.is_available()
    if have_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
