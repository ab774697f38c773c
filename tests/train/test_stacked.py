import json
import math

import pytest
import torch

from steplaw.errors import UserError
from steplaw.models import ModelConfig, MoEConfig
from steplaw.train import RunConfig, run, stacked
from steplaw.train.stacked import plan_stacks, run_stack, stack_key

DENSE = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=96, max_seq_len=64)
MOE = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=96, max_seq_len=64,
                  moe=MoEConfig(n_experts=4, top_k=2, d_expert=32, bias_update_rate=1e-3))
MOE_SHARED = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=96, max_seq_len=64,
                         moe=MoEConfig(n_experts=4, top_k=1, d_expert=32, n_shared_experts=1, capacity_factor=1.25))


def config(lr: float, model=DENSE, **overrides) -> RunConfig:
    fields = dict(model=model, tokens=40 * 256, lr=lr, batch_tokens=256, seq_len=64, device="cpu", eval_tokens=1024)
    fields.update(overrides)
    return RunConfig(**fields)


def assert_same_as_alone(member, alone):
    assert member.status == alone.status, (member.reason, alone.reason)
    assert member.steps == alone.steps and member.tokens == alone.tokens
    assert member.run_id == alone.run_id and member.config == alone.config
    # The same code as a stack of one (steplaw.models.layers): the same losses to the last bit.
    assert member.final_train_loss == alone.final_train_loss
    assert member.final_val_loss == alone.final_val_loss
    assert member.curve == alone.curve
    # The MoE load statistic is that of the last training batch in both (not of an evaluation forward).
    assert member.moe_max_mean_load == alone.moe_max_mean_load
    assert (member.params_total, member.params_non_embedding, member.params_active) == (
        alone.params_total, alone.params_non_embedding, alone.params_active)
    assert member.compute_flops == alone.compute_flops


@pytest.mark.parametrize("model", [DENSE, MOE, MOE_SHARED], ids=["dense", "moe-bias", "moe-shared-capacity"])
def test_members_end_as_their_runs_alone(model):
    configs = [config(lr, model) for lr in (0.002, 0.006, 0.02)]
    results = run_stack(configs)
    for member, c in zip(results, configs):
        assert_same_as_alone(member, run(c))
        assert member.stack == results[0].stack and member.stack is not None
        if model.moe is not None:
            assert 1.0 <= member.moe_max_mean_load <= 4.0
    assert len({r.final_train_loss for r in results}) == 3  # each followed its own lr


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
def test_members_of_other_lengths_and_batch_sizes_end_as_their_runs_alone(model):
    """Members leave the stack at their own last step (evaluated there); a small dense
    model's members may also differ in batch size (each counts its own first sequences of
    the widest batch). Each ends as its run alone, at its own steps and schedule."""
    batches = (64, 32, 128, 64) if model.moe is None else (64,) * 4
    configs = [short(lr, model, tokens=tokens, batch_tokens=b)
               for lr, tokens, b in zip((0.004, 0.002, 0.008, 0.004), (40 * 64, 30 * 64, 40 * 64, 12 * 64), batches)]
    results = run_stack(configs)
    assert len({r.steps for r in results}) >= 3
    for member, c in zip(results, configs):
        assert_same_as_alone(member, run(c))
    shares = [r.wall_s for r in results]
    assert shares[3] < shares[0]  # the shortest run's share of the stack's time is the smallest


TINY = ModelConfig(d_model=16, n_layers=2, n_heads=1, d_ff=48, max_seq_len=8)  # the demo's smallest model
TINY_MOE = ModelConfig(d_model=16, n_layers=2, n_heads=1, d_ff=48, max_seq_len=8,
                       moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, bias_update_rate=1e-3))


@pytest.mark.parametrize("model", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_members_end_as_their_runs_alone_to_the_last_bit(model, dtype):
    """Stacking changes nothing, not even rounding: a member and its run alone compute with
    the same code (steplaw.models.layers, the run alone as one member), in the same order
    (per-member lrs as the run's own float products, gradient norms summed in a run's
    parameter order, a narrower member's loss the mean over its own rows). The LRs reach
    0.04, where float32 rounding alone moves a run's final loss by up to a few percent
    (bench/sweep.py's rounding twin): a member that agrees to the last bit there follows
    its run's exact path. Dense members mix batch sizes of 4, 3 and 5 sequences."""
    batches = (32, 24, 40) if model.moe is None else (32, 32, 32)
    configs = [RunConfig(model=model, tokens=steps * 32, lr=lr, batch_tokens=b, seq_len=8, device="cpu", eval_tokens=256)
               for lr, steps, b in zip((0.004, 0.015, 0.04), (200, 120, 200), batches)]
    results = run_stack(configs)
    for member, c in zip(results, configs):
        alone = run(c)
        assert member.status == alone.status == "ok"
        assert member.final_val_loss == alone.final_val_loss
        assert member.final_train_loss == alone.final_train_loss
        assert member.curve == alone.curve


def test_a_stack_of_compiled_runs_trains_compiled(monkeypatch):
    """compile=True is honoured in a stack as in a run alone (its model compiled; this spy
    stands in for torch.compile, whose first step takes seconds on a CPU)."""
    compiled = []

    def spy(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", spy)
    configs = [short(lr, compile=True, tokens=8 * 64) for lr in (0.002, 0.004)]
    assert all(r.status == "ok" for r in run_stack(configs))
    assert len(compiled) == 1 and compiled[0].members == 2
    compiled.clear()
    run_stack([short(lr, tokens=8 * 64) for lr in (0.002, 0.004)])
    assert compiled == []


def test_batch_sizes_that_need_micro_batches_train_apart(monkeypatch):
    import steplaw.train.runner as runner

    monkeypatch.setattr(runner, "auto_micro_batch_tokens", lambda model, device_type: 32)
    configs = [short(0.004, tokens=8 * 64), short(0.004, tokens=8 * 64, batch_tokens=32)]
    results = run_stack(configs)
    assert results[0].stack != results[1].stack  # two stacks of one
    for member, c in zip(results, configs):
        assert_same_as_alone(member, run(c))


@pytest.mark.parametrize("batch", [64, 128], ids=["middle", "widest"])
def test_a_diverging_member_of_a_mixed_stack_leaves_the_others_as_they_were(batch):
    good = [short(0.003, grad_clip=None, warmup_tokens=128), short(0.01, grad_clip=None, warmup_tokens=128, batch_tokens=32)]
    absurd = short(50.0, grad_clip=None, warmup_tokens=128, tokens=20 * 64, batch_tokens=batch)
    with_it = run_stack([good[0], absurd, good[1]])
    without = run_stack(good)
    assert with_it[1].status == "diverged" and with_it[1].steps < 20
    for a, b in zip((with_it[0], with_it[2]), without):
        assert a.status == b.status == "ok"
        assert a.curve == b.curve and a.final_train_loss == b.final_train_loss and a.final_val_loss == b.final_val_loss


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
def test_a_diverging_member_is_frozen_and_the_others_do_not_notice(model):
    good = [config(0.003, model, grad_clip=None, warmup_tokens=256), config(0.01, model, grad_clip=None, warmup_tokens=256)]
    absurd = config(50.0, model, grad_clip=None, warmup_tokens=256)
    with_it = run_stack([good[0], absurd, good[1]])
    without = run_stack(good)
    assert with_it[1].status == "diverged" and with_it[1].steps < 40
    assert with_it[1].final_val_loss is None
    json.dumps(with_it[1].to_dict(), allow_nan=False)
    alone = run(absurd)
    assert alone.status == "diverged" and with_it[1].steps == alone.steps
    for a, b in zip((with_it[0], with_it[2]), without):
        assert a.status == b.status == "ok"
        assert a.curve == b.curve and a.final_train_loss == b.final_train_loss and a.final_val_loss == b.final_val_loss
        assert a.moe_max_mean_load == b.moe_max_mean_load


def test_a_nan_member_is_frozen(monkeypatch):
    from steplaw.models.stacked import StackedTransformer

    real_forward = StackedTransformer.forward
    calls = []

    def second_member_turns_nan(self, idx, targets=None, sequences=None):
        calls.append(1)
        losses = real_forward(self, idx, targets, sequences)
        if len(calls) == 5:
            return losses * torch.tensor([1.0, float("nan"), 1.0])
        return losses

    configs = [config(lr, tokens=10 * 256) for lr in (0.002, 0.004, 0.008)]
    plain = run_stack([configs[0], configs[2]])
    monkeypatch.setattr(StackedTransformer, "forward", second_member_turns_nan)
    results = run_stack(configs)
    assert results[1].status == "diverged" and "nan" in results[1].reason and results[1].steps == 5
    assert len(results[1].curve) == 4 and all(math.isfinite(loss) for _, loss in results[1].curve)
    assert [r.status for r in (results[0], results[2])] == ["ok", "ok"]
    assert results[0].curve == plain[0].curve and results[2].curve == plain[1].curve


def test_grad_clipping_is_per_member():
    from steplaw.train.stacked import clip_member_grads

    p = torch.zeros(3, 4, 5, requires_grad=True)
    q = torch.zeros(3, 5, requires_grad=True)
    p.grad = torch.randn(3, 4, 5) * torch.tensor([0.01, 10.0, 1e3]).view(3, 1, 1)
    q.grad = torch.randn(3, 5)
    expected = []
    for k in range(3):
        pk, qk = p[k].detach().clone().requires_grad_(), q[k].detach().clone().requires_grad_()
        pk.grad, qk.grad = p.grad[k].clone(), q.grad[k].clone()
        torch.nn.utils.clip_grad_norm_([pk, qk], 1.0)
        expected.append((pk.grad, qk.grad))
    clip_member_grads([p, q], 1.0)
    for k in range(3):
        torch.testing.assert_close(p.grad[k], expected[k][0])
        torch.testing.assert_close(q.grad[k], expected[k][1])


def test_run_dirs_keep_each_members_result(tmp_path):
    configs = [config(lr, tokens=4 * 256) for lr in (0.002, 0.004)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    first = run_stack(configs, run_dirs=dirs)
    saved = json.loads((dirs[1] / "result.json").read_text())
    assert saved["run_id"] == configs[1].run_id() and saved["stack"] == first[1].stack
    assert run(configs[0], run_dir=dirs[0]).curve == first[0].curve  # a finished run is not trained again
    again = run_stack(configs, run_dirs=dirs)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in first]


BIG = ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=768, max_seq_len=64)


def short(lr: float, model=DENSE, **overrides) -> RunConfig:
    """16-token sequences, 64-token batches: steps small enough (<= 3e7 FLOPs up to 128-token
    batches) that a dense model's batch sizes may share a stack."""
    fields = dict(seq_len=16, batch_tokens=64, tokens=40 * 64)
    fields.update(overrides)
    return config(lr, model, **fields)


def test_stack_key_is_everything_but_lr_tokens_and_a_small_dense_batch():
    key = stack_key(short(0.001))
    assert key == stack_key(short(0.1)) == stack_key(short(0.001, tokens=7 * 64))
    assert key == stack_key(short(0.001, batch_tokens=128))  # small dense: batch sizes mix
    assert key != stack_key(short(0.001, seed=1))
    assert key != stack_key(short(0.001, warmup_tokens=512))
    assert stack_key(config(0.001)) != stack_key(config(0.001, batch_tokens=512))  # 1.2e8 FLOPs a step: too big to pad
    # batch sizes do not mix for MoE (routing sees every row), with micro-batches, or
    # where a step is compute-bound (padding would cost real work)
    assert stack_key(config(0.001, MOE)) == stack_key(config(0.001, MOE, tokens=7 * 256))
    assert stack_key(config(0.001, MOE)) != stack_key(config(0.001, MOE, batch_tokens=128))
    assert stack_key(short(0.001, micro_batch_tokens=32)) != stack_key(short(0.001, batch_tokens=32))
    assert stack_key(config(0.001, BIG, batch_tokens=4096)) != stack_key(config(0.001, BIG, batch_tokens=2048))
    assert not stacked.mixes_batches(config(0.001, BIG, batch_tokens=4096))


def test_runs_that_cannot_stack_are_refused_or_run_alone():
    with pytest.raises(UserError, match="differs from run .* in seed: runs of a stack may differ only in lr, tokens"):
        run_stack([config(0.001), config(0.002, seed=1)])
    with pytest.raises(UserError, match="in batch_tokens"):
        run_stack([config(0.001, MOE), config(0.002, MOE, batch_tokens=128)])
    with pytest.raises(UserError, match="optimizer"):
        run_stack([config(0.001, optimizer="torch")])
    with pytest.raises(UserError, match="lr"):
        run_stack([config(0.001), config(-1.0)])
    with pytest.raises(UserError, match="empty"):
        run_stack([])
    groups = plan_stacks([config(0.001), config(0.002, optimizer="torch"), config(0.003), config(0.004, seed=1)])
    assert [[c.lr for c in g] for g in groups] == [[0.001, 0.003], [0.002], [0.004]]
    # longest first within a group, so that runs of similar length share a stack
    mixed = [short(0.001, tokens=10 * 64), short(0.002, batch_tokens=32), short(0.003), short(0.004, batch_tokens=128)]
    assert [[c.lr for c in g] for g in plan_stacks(mixed, 2)] == [[0.002, 0.003], [0.004, 0.001]]


def test_plan_stacks_sizes_and_bad_values(recwarn):
    configs = [config(0.001 * (i + 1)) for i in range(5)]
    assert [len(g) for g in plan_stacks(configs, 2)] == [2, 2, 1]
    assert [len(g) for g in plan_stacks(configs, "off")] == [1] * 5
    assert [len(g) for g in plan_stacks(configs, "auto")] == [5]
    for bad in (0, -2, "many", True):
        with pytest.raises(UserError, match="stack"):
            plan_stacks(configs, bad)
    one_member = stacked.member_bytes(configs[0], "cpu")
    with pytest.warns(UserWarning, match="do not fit"):
        groups = plan_stacks(configs, 4, budget_bytes=2 * one_member)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [len(g) for g in plan_stacks(configs, "auto", budget_bytes=3 * one_member)] == [3, 2]
    big = [config(lr, BIG, batch_tokens=4096) for lr in (0.001, 0.002)]
    assert not stacked.worth_stacking(big[0]) and stacked.worth_stacking(configs[0])
    assert [len(g) for g in plan_stacks(big, "auto")] == [1, 1]  # compute-bound on a CPU: alone
    assert [len(g) for g in plan_stacks(big, 2)] == [2]  # asked for: stacked


def test_a_stack_out_of_memory_splits(monkeypatch):
    real_train = stacked._train
    sizes = []

    def small_memory(configs, progress):
        sizes.append(len(configs))
        if len(configs) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real_train(configs, progress)

    monkeypatch.setattr(stacked, "_train", small_memory)
    configs = [config(lr, tokens=2 * 256) for lr in (0.001, 0.002, 0.004)]
    with pytest.warns(UserWarning, match="out of memory"):
        results = run_stack(configs)
    assert sizes == [3, 1, 2, 1, 1] and [r.status for r in results] == ["ok"] * 3
    assert [r.run_id for r in results] == [c.run_id() for c in configs]


def test_progress_reports_every_members_loss():
    seen = []
    run_stack([config(lr, tokens=4 * 256) for lr in (0.001, 0.002)], progress=seen.append)
    assert seen and seen[-1]["done"] and len(seen[-1]["losses"]) == 2


def test_run_group_runs_a_group_of_one_alone(tmp_path):
    from steplaw.train.stacked import run_group

    alone = config(0.002, tokens=2 * 256, optimizer="torch")
    [result] = run_group([alone], [tmp_path / "a"])
    assert result.stack is None and result.status == "ok" and (tmp_path / "a" / "result.json").exists()
    results = run_group([config(0.002, tokens=2 * 256), config(0.004, tokens=2 * 256)])
    assert results[0].stack == results[1].stack is not None
