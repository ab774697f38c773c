import os

import pytest

# Torch (and the OpenMP kernels) use two threads unless a test says otherwise: the CI
# machine has two cores, and on a bigger machine one thread per core for every test
# process (and its subprocesses) oversubscribes the cores and makes timings erratic.
# Under pytest-xdist (`make test` runs one worker per core) each worker takes one core.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
# Every Ray instance the tests start (local ones and the two-node test cluster) runs in one
# auth mode: Ray keeps the mode per process, and a token that `ray start` left in ~/.ray
# must not lock a later test's cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    # Ray tests start Ray instances (and a two-node cluster) that must not overlap: under
    # pytest-xdist's loadgroup scheduling they all run in one worker, one after another.
    for item in items:
        if "ray" in item.keywords or "ray" in item.path.name:
            item.add_marker(pytest.mark.xdist_group("ray"))
    # The tests marked slow first (a stable sort keeps the rest in collection order): the
    # workers then finish together instead of one running a 60 s test at the end while the
    # other idles, which is most of the difference between CPU time / workers and wall time.
    items.sort(key=lambda item: "slow" not in item.keywords)
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
