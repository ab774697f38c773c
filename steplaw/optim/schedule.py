"""Learning-rate schedules, as a multiplier of the peak LR at each optimizer step.

  cosine    linear warmup to the peak, then cosine decay to min_lr_ratio * peak at the
            last step (the Step Law setup, arXiv:2503.04715)
  wsd       warmup-stable-decay: linear warmup, constant peak, then a linear decay to
            min_lr_ratio * peak over the last `decay_fraction` of the steps
            (MiniCPM, arXiv:2404.06395)
  constant  linear warmup, then the peak

Warmup: step s (0-based) of a warmup of W steps uses (s + 1) / W of the peak, so no
step trains at LR 0.
"""
from __future__ import annotations

import math

from steplaw.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")
# Default warmup when a run does not give one: this fraction of its steps, at least one.
DEFAULT_WARMUP_FRACTION = 0.05


def default_warmup_steps(total_steps: int) -> int:
    return max(1, round(DEFAULT_WARMUP_FRACTION * total_steps))


def check_schedule(schedule: str, min_lr_ratio: float, decay_fraction: float) -> None:
    if schedule not in SCHEDULES:
        raise UserError(f"schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if not 0 <= min_lr_ratio <= 1:
        raise UserError(f"min_lr_ratio={min_lr_ratio}: expected a fraction of the peak LR between 0 and 1")
    if not 0 < decay_fraction <= 1:
        raise UserError(f"decay_fraction={decay_fraction}: expected a fraction of training in (0, 1]")


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
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
        decay_steps = max(1, round(decay_fraction * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        span = total_steps - decay_start
        progress = (step - decay_start + 1) / span  # reaches 1 at the last step
        return 1.0 - (1 - min_lr_ratio) * min(1.0, progress)
    raise UserError(f"schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
