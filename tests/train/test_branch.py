"""WSD trunks (steplaw.train.branch): each branch ends as its run alone, to the last bit.

== is legitimate here: the branch and the run alone execute the same ops, in the same
order, on the same machine (the trunk's LRs are the runs' own floats, its batches the
runs' own, and a checkpoint restores exactly)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple

import pytest
import torch

from steplaw.errors import UserError
from steplaw.models import ModelConfig, MoEConfig
from steplaw.train import RunConfig, run
from steplaw.train import branch as branch_module
from steplaw.train.branch import branch_points, checkpoint_bytes, plan_trunks, train_trunk, trunk_id

TINY = ModelConfig(d_model=16, n_layers=2, n_heads=1, d_ff=48, max_seq_len=8)
TINY_MOE = ModelConfig(d_model=16, n_layers=2, n_heads=1, d_ff=48, max_seq_len=8,
                       moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, bias_update_rate=1e-3))
STEPS = (30, 60, 120)  # budgets x2 apart, 32-token batches


def wsd(steps: int, model=TINY, **overrides) -> RunConfig:
    fields = dict(model=model, tokens=steps * 32, lr=0.01, batch_tokens=32, seq_len=8, device="cpu", eval_tokens=256,
                  schedule="wsd", warmup_tokens=4 * 32, decay_fraction=0.25, min_lr_ratio=0.0)
    return RunConfig(**(fields | overrides))


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


def assert_same_as_alone(branch, alone):
    assert branch.status == alone.status == "ok", (branch.reason, alone.reason)
    assert branch.run_id == alone.run_id and branch.config == alone.config
    assert (branch.steps, branch.tokens) == (alone.steps, alone.tokens)
    assert branch.final_train_loss == alone.final_train_loss
    assert branch.final_val_loss == alone.final_val_loss
    assert branch.curve == alone.curve
    assert branch.moe_max_mean_load == alone.moe_max_mean_load
    assert branch.compute_flops == alone.compute_flops


@pytest.mark.parametrize("model,shape", [(TINY, "sqrt"), (TINY_MOE, "linear")], ids=["dense-sqrt", "moe-linear"])
def test_branches_end_as_their_runs_alone_to_the_last_bit(tmp_path, model, shape, dtype):
    configs = [wsd(s, model, decay_shape=shape) for s in (60, 30, 120)]  # in any order
    heard = []
    results = train_trunk(configs, tmp_path, on_result=lambda c, r: heard.append(c.tokens))
    assert heard == [30 * 32, 60 * 32, 120 * 32]  # shortest first, as the trunk passes each branch point
    for result, config in zip(results, configs):
        alone = run(config)
        assert alone.trunk is None and alone.tokens_trained == alone.tokens
        assert_same_as_alone(result, alone)
        assert result.trunk == trunk_id(configs)
    # The longest run is charged the stable phase; the others their cooldowns only.
    points = branch_points(configs)
    assert [r.tokens_trained for r in results] == [(60 - points[0]) * 32, (30 - points[1]) * 32, 120 * 32]
    assert sum(r.tokens_trained for r in results) == (120 + 8 + 15) * 32  # points: 52, 22, 90
    info = json.loads((tmp_path / "trunk.json").read_text())
    assert 0 < info["peak_disk_bytes"] <= 2 * checkpoint_bytes(configs[2])
    assert not list(tmp_path.glob("trunk-*.pt"))  # every branch finished: no checkpoint left


def test_a_finished_trunk_trains_nothing_and_done_runs_are_skipped(tmp_path, monkeypatch):
    configs = [wsd(s) for s in STEPS[:2]]
    first = train_trunk(configs, tmp_path)
    monkeypatch.setattr(branch_module, "train_loop", lambda *a, **k: pytest.fail("trained again"))
    again = train_trunk(configs, tmp_path, on_result=lambda c, r: pytest.fail("reported again"))
    assert [r.to_dict() for r in again] == [r.to_dict() for r in first]
    assert train_trunk(configs, tmp_path / "other", done={c.run_id() for c in configs}) == [None, None]


def test_a_stable_phase_that_diverges_ends_each_unbranched_run_as_alone(tmp_path):
    configs = [wsd(s, lr=30.0, warmup_tokens=32) for s in (20, 40)]
    results = train_trunk(configs, tmp_path)
    for result, config in zip(results, configs):
        alone = run(config)
        assert result.status == alone.status == "diverged" and result.reason == alone.reason
        assert result.steps == alone.steps and result.curve == alone.curve
    assert [r.tokens_trained for r in results] == [0, results[1].tokens]


Bad = namedtuple("Bad", "configs match")
BAD = {
    "lr differs": Bad([wsd(30), wsd(60, lr=0.02)], "differs from run .* in lr: the runs of a trunk may differ only in tokens"),
    "same budget twice": Bad([wsd(30), wsd(30)], "tokens=960 appears twice"),
    "warmup a fraction": Bad([wsd(30, warmup_tokens=None)], "warmup_tokens is not set"),
    "decay fraction 1": Bad([wsd(30, decay_fraction=1.0)], r"decay_fraction=1.0: .* in \(0, 1\)"),
    "branch in warmup": Bad([wsd(30, warmup_tokens=25 * 32)], "inside its warmup of 25 steps"),
    "cosine": Bad([wsd(30, schedule="cosine")], "only 'wsd' runs branch"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_trunks_are_refused_in_one_sentence_before_training(tmp_path, case):
    with pytest.raises(UserError, match=case.match):
        train_trunk(case.configs, tmp_path)
    assert not list(tmp_path.glob("trunk-*.pt"))


def test_a_trunk_that_would_not_fit_the_disk_is_refused(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(branch_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UserError, match=r"the trunk's checkpoints need about .* MiB \(2 of .* MiB\) but .* has 0.0 MiB free"):
        train_trunk([wsd(30), wsd(60)], tmp_path)


def test_plan_trunks_groups_runs_that_differ_only_in_tokens():
    a, b, c = wsd(30), wsd(60), wsd(60, lr=0.02)
    alone = wsd(60, warmup_tokens=None)
    assert plan_trunks([a, c, b, alone]) == [[a, b], [c], [alone]]
