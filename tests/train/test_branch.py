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
from collections import namedtuple

import pytest

from steplaw.errors import UserError
from steplaw.models import ModelConfig, MoEConfig
from steplaw.train import RunConfig, run
from steplaw.train import branch as branch_module
from steplaw.train import trunk as trunk_module
from steplaw.train.branch import branch_points, checkpoint_bytes, plan_trunks, train_trunk, trunk_id

TINY = ModelConfig(d_model=16, n_layers=2, n_heads=1, d_ff=48, max_seq_len=8)
TINY_MOE = ModelConfig(d_model=16, n_layers=2, n_heads=1, d_ff=48, max_seq_len=8,
                       moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, bias_update_rate=1e-3))
STEPS = (20, 40, 80)  # budgets x2 apart, 32-token batches


def wsd(steps: int, model=TINY, **overrides) -> RunConfig:
    fields = dict(model=model, tokens=steps * 32, lr=0.01, batch_tokens=32, seq_len=8, device="cpu", eval_tokens=256,
                  schedule="wsd", warmup_tokens=4 * 32, decay_fraction=0.25, min_lr_ratio=0.0)
    return RunConfig(**(fields | overrides))


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
    configs = [wsd(s, model, decay_shape=shape) for s in (40, 20, 80)]  # in any order
    heard = []
    results = train_trunk(configs, tmp_path, on_result=lambda c, r: heard.append(c.tokens))
    assert heard == [20 * 32, 40 * 32, 80 * 32]  # shortest first, as the trunk passes each branch point
    for result, config in zip(results, configs):
        alone = run(config)
        assert alone.trunk is None and alone.tokens_trained == alone.tokens
        assert_same_as_alone(result, alone)
        assert result.trunk == trunk_id(configs)
    # The longest run is charged the stable phase; the others their cooldowns only.
    points = branch_points(configs)
    assert [r.tokens_trained for r in results] == [(40 - points[0]) * 32, (20 - points[1]) * 32, 80 * 32]
    assert sum(r.tokens_trained for r in results) == (80 + 10 + 5) * 32  # points: 30, 15, 60
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
    "seed differs": Bad([wsd(30), wsd(60, seed=1)], "differs from run .* in seed: the runs of a trunk may differ only in tokens"),
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
    monkeypatch.setattr(trunk_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UserError, match=r"the trunk's checkpoints need about .* MiB \(2 of .* MiB\) but .* has 0.0 MiB free"):
        train_trunk([wsd(30), wsd(60)], tmp_path)


def test_plan_trunks_groups_runs_that_differ_only_in_tokens():
    a, b, c = wsd(30), wsd(60), wsd(60, lr=0.02)
    alone = wsd(60, warmup_tokens=None)
    assert plan_trunks([a, c, b, alone]) == [[a, b], [c], [alone]]


CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from steplaw.train import tracking
    tracking.PROGRESS_INTERVAL_S = 0.0  # a report every step
    from steplaw.train.branch import train_trunk
    from steplaw.train.config import RunConfig
    configs = [RunConfig.from_dict(c) for c in json.loads(sys.argv[2])]
    def progress(info):
        print(json.dumps({"step": info["step"], "steps": info["steps"]}), flush=True)
        time.sleep(0.01)  # slow enough for the parent to kill it mid-trunk
    train_trunk(configs, sys.argv[1], progress=progress, checkpoint_every=7,
                on_result=lambda c, r: print(json.dumps({"done": c.run_id()}), flush=True))
""")


def test_a_trunk_killed_mid_stable_phase_resumes_without_retraining_a_branch(tmp_path):
    """A real kill -9 of the process training the trunk, in the stable phase after its
    first branch; the rerun ends every run as alone and trains no finished branch again."""
    configs = [wsd(s) for s in STEPS]
    points = branch_points(configs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), json.dumps([c.to_dict() for c in configs])],
                             stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    finished = []
    try:
        for line in child.stdout:
            event = json.loads(line)
            finished += [event["done"]] if "done" in event else []
            if finished and event.get("steps") == STEPS[-1] and event.get("step", 0) >= points[0] + 10:
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert finished == [configs[0].run_id()]
    assert not (tmp_path / f"branch-{configs[2].run_id()}.json").exists()
    kept = sorted(int(p.stem.removeprefix("trunk-")) for p in tmp_path.glob("trunk-*.pt"))
    assert 1 <= len(kept) <= 2 and kept[-1] > points[0]  # the rerun resumes from a stable-phase checkpoint
    stored = (tmp_path / f"branch-{configs[0].run_id()}.json").read_bytes()
    heard = []
    results = train_trunk(configs, tmp_path, on_result=lambda c, r: heard.append(c.run_id()))
    assert heard == [c.run_id() for c in configs[1:]]  # the finished branch is not trained again
    assert (tmp_path / f"branch-{configs[0].run_id()}.json").read_bytes() == stored
    for result, config in zip(results, configs):
        assert_same_as_alone(result, run(config))
    assert not list(tmp_path.glob("trunk-*.pt"))


@pytest.mark.parametrize("model", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_a_stack_of_lrs_branches_as_one_and_each_member_ends_as_alone(tmp_path, model, dtype):
    """K lrs x M budgets as one stacked trunk (steplaw.train.branch_stack): every run ends
    as alone to the last bit, as stack members do (tests/train/test_stacked.py); the
    lr that diverges in the stable phase leaves, its runs diverged as alone."""
    configs = [wsd(s, model, lr=lr) for s in STEPS[:2] for lr in (0.004, 0.015, 30.0)]
    assert plan_trunks(configs, stack=True) == [configs]
    heard = []
    results = train_trunk(configs, tmp_path, on_result=lambda c, r: heard.append((c.lr, c.tokens)))
    assert heard[:2] == [(30.0, 640), (30.0, 1280)]  # the diverged lr first, at its divergence
    for result, config in zip(results, configs):
        alone = run(config)
        assert result.status == alone.status and result.reason == alone.reason
        assert result.final_train_loss == alone.final_train_loss and result.final_val_loss == alone.final_val_loss
        assert result.curve == alone.curve and result.steps == alone.steps
        assert result.moe_max_mean_load == alone.moe_max_mean_load
        assert result.trunk == trunk_id(configs)
    point = branch_points(configs[:1])[0]
    assert [r.tokens_trained for r in results[:2]] == [(20 - point) * 32] * 2  # cooldowns only
    assert [r.tokens_trained for r in results[3:5]] == [40 * 32] * 2  # each lr's longest: its stable phase
    assert not list(tmp_path.glob("trunk-*.pt"))
    assert train_trunk(configs, tmp_path, done={configs[0].run_id()})[0] is None


def test_a_stacked_trunk_needs_a_full_grid(tmp_path):
    configs = [wsd(30, lr=0.004), wsd(60, lr=0.004), wsd(30, lr=0.015)]
    with pytest.raises(UserError, match=r"a stacked trunk needs every lr at every budget \(2 lrs x 2 budgets\), got 3 runs"):
        train_trunk(configs, tmp_path)
    assert plan_trunks(configs, stack=True) == [configs[:2], configs[2:]]


def test_an_interrupted_stacked_trunk_resumes_from_its_checkpoint(tmp_path):
    """A stacked trunk stopped after its first budget's branches (the caller's on_result
    raising, as a crash would stop it): the rerun trains only the rest, from the
    checkpoint, and every run ends as alone."""
    configs = [wsd(s, lr=lr) for s in STEPS[:2] for lr in (0.004, 0.015)]

    def crash(config, result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_trunk(configs, tmp_path, on_result=crash)
    assert len(list(tmp_path.glob("branch-*.json"))) == 1 and len(list(tmp_path.glob("trunk-*.pt"))) == 1
    heard = []
    results = train_trunk(configs, tmp_path, on_result=lambda c, r: heard.append(c.run_id()))
    assert heard == [c.run_id() for c in configs[1:]]
    for result, config in zip(results, configs):
        alone = run(config)
        assert result.final_train_loss == alone.final_train_loss and result.final_val_loss == alone.final_val_loss
        assert result.curve == alone.curve
