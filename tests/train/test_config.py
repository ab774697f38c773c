"""RunConfig: validate() accepts every valid config and stored configs always load."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from steplaw.errors import UserError
from steplaw.models.config import ModelConfig, MoEConfig
from steplaw.train.config import RunConfig

MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=128)


def config(**changes) -> RunConfig:
    return RunConfig(**{**dict(model=MODEL, tokens=16384, lr=3e-3, batch_tokens=2048, seq_len=128), **changes})


@pytest.mark.parametrize("changes", [
    {},
    dict(micro_batch_tokens=512),
    dict(micro_batch_tokens=4096),  # larger than the batch: the whole batch at once
    dict(warmup_tokens=0),
    dict(warmup_tokens=16384),
    dict(grad_clip=None),
    dict(weight_decay=0.0, min_lr_ratio=0.0, beta1=0.0, beta2=0.0),
    dict(min_lr_ratio=1.0, decay_fraction=1.0),
    dict(seed=2**63 - 1),
    dict(lr=1e6),  # absurd but valid: such a run ends as diverged
    dict(tokens=2048),
    dict(eval_tokens=0),
    dict(device="cuda:3", precision="bf16"),  # the form only: no GPU needed to validate
    dict(schedule="wsd", optimizer="torch", compile=True, data="some/dir"),
    dict(model=dataclasses.replace(MODEL, moe=MoEConfig(n_experts=4, top_k=4, d_expert=16))),
])
def test_valid_configs_pass(changes):
    run = config(**changes)
    run.validate()
    assert run.problems() == []


def test_on_this_machine_checks_gpu_and_data(tmp_path):
    import torch

    config(device="cpu", data=str(tmp_path)).validate(on_this_machine=True)
    with pytest.raises(UserError, match="no such directory here"):
        config(data=str(tmp_path / "missing")).validate(on_this_machine=True)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is available on this machine"):
            config(device="cuda").validate(on_this_machine=True)


def test_from_dict_loads_stored_configs_without_validating():
    """A stored config loads even if it would not validate today (e.g. a rule tightened
    after it ran), and a config stored before a field existed takes its default."""
    stored = config(weight_decay=-1.0, seed=-5).to_dict()
    loaded = RunConfig.from_dict(stored)
    assert loaded.to_dict() == stored and loaded.run_id() == config(weight_decay=-1.0, seed=-5).run_id()
    del stored["compile"], stored["eval_tokens"]
    assert RunConfig.from_dict(stored).compile is False
    with pytest.raises(UserError):
        loaded.validate()


def test_every_problem_is_one_sentence_without_newlines():
    bad = config(lr=float("nan"), seed=-1, grad_clip=-1, device="tpu", batch_tokens=100, seq_len=64)
    problems = bad.problems()
    assert len(problems) == 5 and all("\n" not in p and ";" not in p for p in problems)
    with pytest.raises(UserError) as info:
        bad.validate()
    assert str(info.value) == "; ".join(problems)


def test_validate_imports_no_torch():
    code = (
        "import sys; from steplaw.train.config import RunConfig; from steplaw.models.config import ModelConfig; "
        "RunConfig(model=ModelConfig(), tokens=4096, lr=1e-3, batch_tokens=1024).validate(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
