import numpy as np
import pytest

from steplaw.errors import UserError
from steplaw.train.batching import plan_batches, step_offsets


@pytest.mark.parametrize(
    "tokens,batch,seq,micro,world,expect",
    [
        # (micro_seqs, accumulation, steps)
        (10_000, 1024, 64, None, 1, (16, 1, 9)),
        (10_000, 1024, 64, 256, 1, (4, 4, 9)),
        (10_000, 1024, 64, 256, 2, (4, 2, 9)),
        (10_000, 1024, 64, 4096, 2, (8, 1, 9)),
        (2048, 2048, 128, 128, 4, (1, 4, 1)),
    ],
)
def test_batch_arithmetic_is_exact(tokens, batch, seq, micro, world, expect):
    plan = plan_batches(tokens, batch, seq, micro, world)
    assert (plan.micro_seqs, plan.accumulation, plan.steps) == expect
    assert plan.micro_seqs * seq * plan.accumulation * world == batch
    assert plan.tokens == plan.steps * batch <= tokens


@pytest.mark.parametrize(
    "tokens,batch,seq,micro,world,match",
    [
        (10_000, 1000, 64, None, 1, "batch_tokens=1000 is not a multiple of seq_len=64"),
        (10_000, 192, 64, None, 2, "3 sequences of 64, which do not split over 2 processes"),
        (10_000, 1024, 64, 100, 1, "micro_batch_tokens=100 is not a positive multiple"),
        (10_000, 768, 64, 320, 1, r"micro_batch_tokens=320 \(5 sequences\) does not divide the 12"),
        (500, 1024, 64, None, 1, "tokens=500 is less than one batch"),
    ],
)
def test_batch_arithmetic_refusals(tokens, batch, seq, micro, world, match):
    with pytest.raises(UserError, match=match):
        plan_batches(tokens, batch, seq, micro, world)


def test_step_offsets_depend_on_seed_and_step_only():
    a = step_offsets(0, 5, 8, 10_000, 64)
    np.testing.assert_array_equal(a, step_offsets(0, 5, 8, 10_000, 64))
    assert not np.array_equal(a, step_offsets(0, 6, 8, 10_000, 64))
    assert not np.array_equal(a, step_offsets(1, 5, 8, 10_000, 64))
    assert a.min() >= 0 and a.max() <= 10_000 - 65


@pytest.mark.parametrize(
    "batch,world,cap,expect_micro",
    [
        (1024 * 64, 1, 10**9, 1024),  # fits: all at once
        (1024 * 64, 1, 300 * 64, 256),  # largest divisor of 1024 sequences under 300
        (96 * 64, 2, 40 * 64, 24),  # 48 per rank -> 24
        (7 * 64, 1, 3 * 64, 1),  # prime: one sequence at a time
    ],
)
def test_auto_micro_batch(batch, world, cap, expect_micro):
    plan = plan_batches(batch, batch, 64, None, world, auto_micro_tokens=cap)
    assert plan.micro_seqs == expect_micro
    assert plan.micro_seqs * 64 * plan.accumulation * world == batch


def test_explicit_micro_batch_ignores_the_cap():
    assert plan_batches(4096, 4096, 64, 4096, 1, auto_micro_tokens=64).micro_seqs == 64


def test_auto_cap_shrinks_with_model_size():
    from steplaw.models import ModelConfig
    from steplaw.train.batching import auto_micro_batch_tokens

    small = auto_micro_batch_tokens(ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=192), "cpu")
    large = auto_micro_batch_tokens(ModelConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1376), "cpu")
    assert large < small and 1024 < large


@pytest.mark.parametrize("seed,step,expect", [
    (0, 10**6, [14539, 65041, 25053, 16053]),
    (2**63 - 1, 3, [51816, 90485, 81779, 63646]),
    (12345, 10**9, [41101, 15748, 16450, 81609]),
])
def test_step_offsets_wrap_without_overflow_warnings(seed, step, expect):
    """The hash wraps modulo 2^64 on purpose: no numpy overflow warning at any step or
    seed. The expected offsets were computed with the earlier uint64-scalar arithmetic,
    so a rewrite of the wrap-around cannot change any run's data order."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        offsets = step_offsets(seed, step, 4, 100_000, 64)
    assert offsets.tolist() == expect
