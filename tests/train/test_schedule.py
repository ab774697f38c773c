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
