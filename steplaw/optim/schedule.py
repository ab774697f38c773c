"""Learning-rate schedules, as a multiplier of the peak LR at each optimizer step.

  cosine    linear warmup to the peak, then cosine decay to min_lr_ratio * peak at the
            last step (the Step Law setup, arXiv:2503.04715)
  wsd       warmup-stable-decay: linear warmup, constant peak, then a cooldown to
            min_lr_ratio * peak over the last `decay_fraction` of the steps
            (MiniCPM, arXiv:2404.06395), of shape `decay_shape`:
              linear  1 - x
              sqrt    1 - sqrt(x), "1-sqrt" (Hägele et al. 2024, arXiv:2405.18392, which
                      finds it ahead of linear cooldowns)
            where x runs from 1/cooldown at the cooldown's first step to 1 at the last.
  constant  linear warmup, then the peak

Warmup: step s (0-based) of a warmup of W steps uses (s + 1) / W of the peak, so no
step trains at LR 0.

WSD branches (steplaw.train.branch): a WSD run of S steps is at the peak from its warmup's
end until `wsd_branch_point(S, W, f)`, the first step of its cooldown. So runs that differ
only in S share every multiplier before their own branch points (the same Python float,
1.0 or the warmup's), when their warmup is the same number of steps: one trunk trains the
stable phase, and each run's cooldown starts from the trunk's state at its branch point.
`check_branching` refuses the settings under which that is not so.
"""
from __future__ import annotations

import math

from steplaw.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "sqrt")
# Default warmup when a run does not give one: this fraction of its steps, at least one.
DEFAULT_WARMUP_FRACTION = 0.05


def default_warmup_steps(total_steps: int) -> int:
    return max(1, round(DEFAULT_WARMUP_FRACTION * total_steps))


def check_schedule(schedule: str, min_lr_ratio: float, decay_fraction: float, decay_shape: str = "linear") -> None:
    if schedule not in SCHEDULES:
        raise UserError(f"schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if not 0 <= min_lr_ratio <= 1:
        raise UserError(f"min_lr_ratio={min_lr_ratio}: expected a fraction of the peak LR between 0 and 1")
    if not 0 < decay_fraction <= 1:
        raise UserError(f"decay_fraction={decay_fraction}: expected a fraction of training in (0, 1]")
    if decay_shape not in DECAY_SHAPES:
        raise UserError(f"decay_shape={decay_shape!r}: expected one of {', '.join(DECAY_SHAPES)}")


def wsd_branch_point(total_steps: int, warmup_steps: int, decay_fraction: float) -> int:
    """The first (0-based) step of a WSD run's cooldown: its last round(f * S) steps (at
    least one) decay, but never a step of the warmup."""
    decay_steps = max(1, round(decay_fraction * total_steps))
    return max(warmup_steps, total_steps - decay_steps)


def check_branching(total_steps: int, warmup_steps: int | None, decay_fraction: float, schedule: str = "wsd") -> int:
    """The branch point of a WSD run that is to branch off a trunk (see the module doc),
    or a UserError saying in one sentence why it cannot. warmup_steps None: the warmup was
    left to its default fraction of each run's own steps."""
    if schedule != "wsd":
        raise UserError(f"schedule={schedule!r}: only 'wsd' runs branch off a trunk (their stable phase is shared)")
    if not 0 < decay_fraction < 1:
        raise UserError(f"decay_fraction={decay_fraction}: a branching WSD run needs a cooldown fraction in (0, 1), "
                        "strictly, so that it has a stable phase to share")
    if warmup_steps is None:
        raise UserError("warmup_tokens is not set, so each run's warmup is a fraction of its own D and runs of different D "
                        "share no steps: give warmup_tokens to branch WSD runs")
    decay_steps = max(1, round(decay_fraction * total_steps))
    if total_steps - decay_steps < warmup_steps:
        raise UserError(f"a WSD run of {total_steps} steps would start its cooldown at step {total_steps - decay_steps}, "
                        f"inside its warmup of {warmup_steps} steps: branch points must follow the warmup "
                        "(use more tokens, a shorter warmup or a smaller decay_fraction)")
    return total_steps - decay_steps


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
) -> float:
    """Multiplier of the peak LR for 0-based optimizer step `step` of `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = total_steps - warmup_steps
        if span <= 1:
            return 1.0
        progress = (step - warmup_steps) / (span - 1)  # 0 at the first step after warmup, 1 at the last
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_start = wsd_branch_point(total_steps, warmup_steps, decay_fraction)
        if step < decay_start:
            return 1.0
        span = total_steps - decay_start
        progress = min(1.0, (step - decay_start + 1) / span)  # reaches 1 at the last step
        if decay_shape == "sqrt":
            return min_lr_ratio + (1 - min_lr_ratio) * (1.0 - math.sqrt(progress))
        return 1.0 - (1 - min_lr_ratio) * progress
    raise UserError(f"schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
