"""A run too large for the machine's memory is refused before its model is built.

Only sizes that are refused BEFORE any allocation are used here: without the check, a
--params 1e12 run on a CPU is ended by the OOM killer (exit 137) and endangers the
machine. The CLI cases also run under an address-space limit, so that a broken check
fails fast in the child instead of allocating terabytes.
"""
import resource
import subprocess
import sys
import time

import pytest
import torch

from steplaw.errors import UserError
from steplaw.models import ModelConfig, param_counts
from steplaw.train import RunConfig, memory, run_stack, stacked
from steplaw.train.runner import prepare

SMALL = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=96, max_seq_len=64)
# ~1.7e12 parameters: a ModelConfig is only numbers, nothing is allocated.
HUGE = ModelConfig(d_model=32768, n_layers=100, n_heads=256, d_ff=131072, max_seq_len=64)


def _config(model, **changes) -> RunConfig:
    fields = dict(model=model, tokens=4 * 256, lr=3e-3, batch_tokens=256, seq_len=64, device="cpu")
    return RunConfig(**{**fields, **changes})


def test_estimate_counts_weights_grads_adamw_state_and_activations():
    from steplaw.train.batching import activation_bytes_per_token

    params = param_counts(SMALL).total
    assert memory.needed_bytes(SMALL, 256) == 16 * params + 256 * activation_bytes_per_token(SMALL)
    assert memory.needed_bytes(SMALL, 256, members=3) == 3 * memory.needed_bytes(SMALL, 256)


def test_available_memory_of_the_cpu(monkeypatch, tmp_path):
    assert memory.available_bytes(torch.device("cpu")) > 0
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       1000 kB\nMemAvailable:    500 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(fake))
    assert memory.available_bytes(torch.device("cpu")) == 500 * 1024
    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "missing"))  # no /proc: os.sysconf
    assert memory.available_bytes(torch.device("cpu")) > 0


def test_prepare_refuses_a_model_larger_than_memory():
    with pytest.raises(UserError, match=r"^the run needs about [\d,.]+ GB of memory \(1.72e\+12 parameters") as info:
        prepare(_config(HUGE))
    assert "cpu has" in str(info.value) and "\n" not in str(info.value)


def test_prepare_counts_memory_as_it_is_available(monkeypatch):
    need = memory.needed_bytes(SMALL, 256)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    with pytest.raises(UserError, match="available: expected a smaller model or micro-batch"):
        prepare(_config(SMALL))
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    prepare(_config(SMALL))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of this machine share its RAM
    with pytest.raises(UserError, match="available"):
        prepare(_config(SMALL))


def test_a_stack_estimated_not_to_fit_is_split_before_allocating(monkeypatch):
    one = memory.needed_bytes(SMALL, 256)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * one)
    monkeypatch.setattr(stacked, "_warned", set())  # said once per process: say it again here
    sizes = []
    real_train = stacked._train

    def spy(configs, progress):
        sizes.append(len(configs))
        return real_train(configs, progress)

    monkeypatch.setattr(stacked, "_train", spy)
    configs = [_config(SMALL, lr=lr, tokens=2 * 256) for lr in (0.001, 0.002, 0.004)]
    with pytest.warns(UserWarning, match="out of memory"):
        results = run_stack(configs)
    assert sizes == [3, 1, 2] and [r.status for r in results] == ["ok"] * 3


def _limit_address_space():
    # 6 GB of address space: enough to import torch and refuse, far too little to
    # allocate the model if the check were gone (the child then fails, not the machine).
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))


@pytest.mark.parametrize("params", ["1e12", "1e30"])
def test_cli_refuses_huge_params_quickly(params):
    argv = [sys.executable, "-m", "steplaw", "train", "--params", params, "--tokens", "16384", "--lr", "3e-3",
            "--batch-tokens", "2048", "--device", "cpu", "--quiet"]
    started = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=_limit_address_space)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert time.perf_counter() - started < 60
    lines = completed.stderr.strip().split("\n")
    assert len(lines) == 1 and "Traceback" not in completed.stderr
    assert lines[0].startswith("steplaw train: error: the run needs about ") and "cpu has" in lines[0]
    assert completed.stdout == ""
