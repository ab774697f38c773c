"""A run's losses as it trains: the smoothed loss, the divergence rule, the loss curve and
the progress reports (steplaw.train.runner and steplaw.train.stacked keep one LossTracker
per run).

The final smoothed training loss is the bias-corrected EMA of the step losses (time
constant `EMA_STEPS` steps). Divergence: a non-finite loss, or a smoothed loss above
DIVERGENCE_FACTOR x the first step's loss, ends the run with status "diverged" (a result,
not an exception). The loss curve has at most `CURVE_POINTS` points (mean loss of each
interval, at the tokens seen at its end).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

from steplaw.progress import ProgressLine, format_duration
from steplaw.train.batching import BatchPlan

EMA_STEPS = 10
CURVE_POINTS = 256
DIVERGENCE_FACTOR = 1.5
PROGRESS_INTERVAL_S = 1.0

ProgressFn = Callable[[dict], None]


def progress_text(info: dict) -> str:
    """The training run's progress line from a progress dict (see ProgressReporter)."""
    return (f"{info['tokens'] / 1e6:8.2f}M / {info['total_tokens'] / 1e6:.2f}M tokens  loss {info['loss']:.4f}  "
            f"{info['tokens_per_s']:,.0f} tok/s  ETA {format_duration(info['eta_s'])}")


def stderr_progress(line: ProgressLine | None = None) -> ProgressFn:
    """A progress function drawing the run's progress line on stderr (`line`: a
    ProgressLine of one's own, e.g. on another stream), ended on its own line when the
    run is done."""
    line = line or ProgressLine()

    def report(info: dict) -> None:
        if info.get("done"):
            line.finish(progress_text(info))
        else:
            line.show(progress_text(info))

    return report


class LossTracker:
    """The step losses of one run, their bias-corrected EMA (time constant EMA_STEPS
    steps) and the divergence rule, kept up to date one loss at a time."""

    def __init__(self, losses: list[float] | None = None):
        self.losses: list[float] = []
        self._beta = 1 - 1 / EMA_STEPS
        self._ema, self._finite = 0.0, 0
        for value in losses or ():
            self.add(value)

    @property
    def smoothed(self) -> float:
        """Bias-corrected EMA of the finite losses so far (NaN before the first)."""
        n = self._finite
        return self._ema / (1 - self._beta ** n) if n else float("nan")

    def add(self, value: float) -> str | None:
        """Record one step's loss; the reason the run has diverged, or None."""
        self.losses.append(value)
        if not math.isfinite(value):
            return f"loss became {value} at step {len(self.losses)}"
        self._ema = self._beta * self._ema + (1 - self._beta) * value
        self._finite += 1
        smooth, first = self.smoothed, self.losses[0]
        if smooth > DIVERGENCE_FACTOR * first:
            return (f"smoothed loss {smooth:.3f} rose above {DIVERGENCE_FACTOR} x the first loss {first:.3f} "
                    f"at step {len(self.losses)}")
        return None

    def finite(self) -> list[float]:
        """The losses before the first non-finite one (a diverged run stops there)."""
        return [x for x in self.losses if math.isfinite(x)]


def smoothed(losses: list[float]) -> float:
    """Bias-corrected EMA of the step losses (time constant EMA_STEPS steps)."""
    return LossTracker(losses).smoothed


def loss_curve(losses: list[float], batch_tokens: int, points: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """(tokens seen, mean step loss) over at most `points` equal intervals of the steps."""
    if not losses:
        return []
    every = max(1, math.ceil(len(losses) / points))
    curve = []
    for start in range(0, len(losses), every):
        chunk = losses[start:start + every]
        curve.append(((start + len(chunk)) * batch_tokens, float(sum(chunk) / len(chunk))))
    return curve


class ProgressReporter:
    """Calls `report` (a progress function, True for the stderr line `stderr_progress`, or None) about once
    a second with tokens, total_tokens, step, steps, loss, tokens_per_s, eta_s, done."""

    def __init__(self, report: bool | ProgressFn | None, plan: BatchPlan):
        self.report = stderr_progress() if report is True else (report or None)
        self.plan = plan
        self.t0 = self.last = time.perf_counter()
        self.tokens = 0  # trained in this session (a resumed run's rate counts only these)

    def step_done(self) -> None:
        self.tokens += self.plan.batch_tokens

    def maybe_report(self, step: int, loss: float, **extra) -> None:
        now = time.perf_counter()
        if self.report is None or (now - self.last < PROGRESS_INTERVAL_S and step != self.plan.steps):
            return
        self.last = now
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.report({
            "tokens": step * self.plan.batch_tokens, "total_tokens": self.plan.tokens, "step": step,
            "steps": self.plan.steps, "loss": loss, "tokens_per_s": rate,
            "eta_s": (self.plan.steps - step) * self.plan.batch_tokens / rate, "done": step == self.plan.steps, **extra,
        })
