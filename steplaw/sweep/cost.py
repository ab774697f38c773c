"""What a sweep's runs cost in training tokens: alone, and as WSD trunks with branches.

A WSD run's stable phase is shared by every run that differs from it only in D
(steplaw.train.branch): one trunk trains the longest budget's whole run once and, for each
shorter budget D_k, only its cooldown, `decay_fraction` x D_k, from the trunk's checkpoint
at that budget's branch point. So a trunk of budgets D_1 < ... < D_m costs

    D_m + decay_fraction x (D_1 + ... + D_(m-1))     tokens,

against D_1 + ... + D_m for the same runs trained alone (Hägele et al. 2024,
arXiv:2405.18392, for the cooldown; the issue's 0.63 for budgets 1, 2, 4, 8 at 20%). This
module is the one statement of that cost model: the adaptive planner, the planner bench
and the report all use it. (The trainer charges each branch the cooldown it actually
trained, rounded to whole steps: the stored `tokens_trained`, which the report sums.)
"""
from __future__ import annotations

from collections.abc import Iterable


def trunk_tokens(budgets: Iterable[float], decay_fraction: float) -> float:
    """Tokens one trunk trains for its budgets (the tokens D of its runs): the longest
    budget in full, every shorter one only its cooldown. One budget: that run alone."""
    budgets = sorted(float(d) for d in budgets)
    if not budgets:
        return 0.0
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"decay fraction {decay_fraction!r}: expected a fraction in (0, 1]")
    return budgets[-1] + decay_fraction * sum(budgets[:-1])


def alone_tokens(budgets: Iterable[float]) -> float:
    """Tokens the same runs cost trained alone, each from step 0."""
    return float(sum(float(d) for d in budgets))
