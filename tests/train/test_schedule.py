import math

import pytest

from steplaw.errors import UserError
from steplaw.optim.schedule import check_schedule, lr_multiplier

TOTAL, WARMUP = 100, 10


def curve(schedule, **kw):
    return [lr_multiplier(s, TOTAL, WARMUP, schedule, **kw) for s in range(TOTAL)]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_linear_warmup(schedule):
    values = curve(schedule)
    assert values[:WARMUP] == pytest.approx([(s + 1) / WARMUP for s in range(WARMUP)])
    assert values[WARMUP - 1] == 1.0


def test_cosine_decays_to_min():
    values = curve("cosine", min_lr_ratio=0.1)
    after = values[WARMUP:]
    assert after[0] == pytest.approx(1.0) and after[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(after, after[1:]))
    middle = WARMUP + (TOTAL - WARMUP - 1) // 2
    assert values[middle] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (middle - WARMUP) / (TOTAL - WARMUP - 1))))


def test_wsd_stable_then_linear_decay():
    values = curve("wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    assert values[WARMUP:80] == [1.0] * (80 - WARMUP)
    decay = values[80:]
    assert decay[-1] == pytest.approx(0.0)
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([0.05] * len(steps))


def test_constant():
    assert curve("constant")[WARMUP:] == [1.0] * (TOTAL - WARMUP)


@pytest.mark.parametrize("args,match", [(("linear", 0.1, 0.2), "schedule"), (("cosine", 1.5, 0.2), "min_lr_ratio"),
                                        (("wsd", 0.1, 0.0), "decay_fraction")])
def test_bad_schedule_settings(args, match):
    with pytest.raises(UserError, match=match):
        check_schedule(*args)


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_wsd_sqrt_cooldown_is_one_minus_sqrt(min_lr_ratio):
    """1-sqrt cooldown (Hägele et al. 2024, arXiv:2405.18392): min + (1 - min)(1 - sqrt(x)),
    x = 1/20 ... 1 over the last 20 of 100 steps; the stable phase is unchanged."""
    values = curve("wsd", min_lr_ratio=min_lr_ratio, decay_fraction=0.2, decay_shape="sqrt")
    assert values[WARMUP:80] == [1.0] * (80 - WARMUP)
    expected = [min_lr_ratio + (1 - min_lr_ratio) * (1 - math.sqrt((i + 1) / 20)) for i in range(20)]
    assert values[80:] == pytest.approx(expected) and values[-1] == pytest.approx(min_lr_ratio)
    linear = curve("wsd", min_lr_ratio=min_lr_ratio, decay_fraction=0.2)
    assert all(s < lin for s, lin in zip(values[80:-1], linear[80:-1]))  # 1-sqrt drops faster at first


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_every_step_before_a_branch_point_has_the_longest_runs_lr(shape):
    """Runs differing only in their steps share each multiplier (the same float) before
    their own branch point, so a trunk trained on the longest run's schedule gives each
    shorter run its own LRs; from the branch point on, each follows its own cooldown."""
    from steplaw.optim.schedule import check_branching

    warmup, longest = 7, 800
    for total in (100, 141, 200, 400, 566, 800):
        point = check_branching(total, warmup, 0.2)
        assert point == total - round(0.2 * total)
        for step in range(point):
            assert lr_multiplier(step, total, warmup, "wsd", 0.0, 0.2, shape) == \
                lr_multiplier(step, longest, warmup, "wsd", 0.0, 0.2, shape)
        assert lr_multiplier(point, total, warmup, "wsd", 0.0, 0.2, shape) < 1.0


@pytest.mark.parametrize("args,match", [
    ((100, 5, 0.0), r"decay_fraction=0.0: a branching WSD run needs a cooldown fraction in \(0, 1\)"),
    ((100, 5, 1.0), r"decay_fraction=1.0"),
    ((100, 5, 1.5), r"decay_fraction=1.5"),
    ((100, None, 0.2), "warmup_tokens is not set"),
    ((100, 90, 0.2), "start its cooldown at step 80, inside its warmup of 90 steps"),
    ((100, 5, 0.2, "cosine"), "only 'wsd' runs branch"),
])
def test_branching_refuses_with_one_sentence(args, match):
    from steplaw.optim.schedule import check_branching

    with pytest.raises(UserError, match=match) as caught:
        check_branching(*args)
    assert caught.value.args[0].count(". ") == 0  # one sentence


def test_decay_shape_is_validated_and_keeps_old_run_ids():
    import hashlib
    import json

    from steplaw.models import ModelConfig
    from steplaw.train import RunConfig

    config = RunConfig(model=ModelConfig(d_model=16, n_layers=1, n_heads=1, d_ff=48, max_seq_len=8), tokens=64, lr=1e-3,
                       batch_tokens=8, seq_len=8, schedule="wsd")
    before = {k: v for k, v in config.to_dict().items() if k != "decay_shape"}  # a config stored before the field
    old_id = hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert config.run_id() == old_id
    sqrt = RunConfig.from_dict(config.to_dict() | {"decay_shape": "sqrt"})
    assert sqrt.run_id() != old_id and sqrt.problems() == []
    assert RunConfig.from_dict(config.to_dict() | {"decay_shape": "cubic"}).problems() == [
        "decay_shape='cubic': expected one of linear, sqrt"]
    with pytest.raises(UserError, match="decay_shape"):
        check_schedule("wsd", 0.1, 0.2, "cubic")
