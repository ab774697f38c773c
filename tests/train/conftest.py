import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Training tests use tiny models, which gain nothing from more threads and lose a lot
    to oversubscription when the 2 cores are shared: run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    """Models, optimizer state and losses in this dtype (torch's default dtype) for the test."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)
