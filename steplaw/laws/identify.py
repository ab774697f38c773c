"""When can a table identify a scaling exponent? One rule for every fitter.

An exponent of a variable X (N, D, or the MoE sparsity N_active/N) is fitted only when
the (N, D) cells the fit uses

1. hold at least `min_distinct` distinct values of X (3 for N and D: with 2 any power
   law passes exactly through both and nothing tests the form; 2 for the sparsity,
   a contrast between dense and one MoE layout), and
2. span at least a factor `MIN_SPAN` = 2 in X (log10 spread >= 0.301).

Why a factor of 2: the optimum of a cell is located on an LR grid of steps of sqrt(2),
so its log has a rounding error of about ln(sqrt 2)/sqrt(12) = 0.10. With k cells whose
log X have standard deviation s, the least-squares exponent has a standard error of
about 0.10 / (s sqrt(k)). Three levels spanning a factor r have s = 0.41 ln r, so the
95% interval is about 3.92 * 0.10 / (0.41 ln r sqrt(k)) = 0.96 / (ln r sqrt(k)) wide.
With the usual 3 x 3 cells (k = 9) that is 0.32 / ln r: 0.46 at r = 2 (informative),
and wider than 1.0 only below r = 1.38. A 0.3% spread (a real MoE sweep whose total N
barely moves) gives a standard error near 40, an exponent of noise. The rule is
conservative on purpose: with the fewest cells a fit can have (k = 3) the width is
0.55 / ln r, over 1.0 below r = 1.74, and real optima scatter more than the grid's
rounding (loss noise, edge cells), so a factor 2 keeps even a small sweep's interval
under 1.0 with room to spare. A wide interval is also the second, after-the-fact test:

3. an exponent whose 95% bootstrap interval is wider than `MAX_INTERVAL_WIDTH` = 1.0 is
   kept but flagged (the law then says little about that variable), and
4. cells whose (log N, log D) are nearly collinear (|correlation| > `MAX_CORRELATION`)
   are flagged: the N and D exponents then trade off against each other.

A refused exponent is left out of the law (the law is fitted without that variable) and
the refusal, one sentence naming the variable and its range, goes into `warnings`.
"""
from __future__ import annotations

import math

import numpy as np

MIN_SPAN = 2.0
MIN_DISTINCT = {"N": 3, "D": 3, "S": 2}
MAX_INTERVAL_WIDTH = 1.0
MAX_CORRELATION = 0.95

VARIABLE_WORDS = {"N": "N", "D": "D", "S": "the sparsity N_active/N", "B": "the batch size B"}


def distinct_values(values: np.ndarray) -> np.ndarray:
    """Distinct values, merging those equal to 1e-9 relative (float noise of exports)."""
    values = np.sort(np.asarray(values, float))
    if values.size == 0:
        return values
    keep = np.concatenate([[True], np.diff(values) > 1e-9 * np.abs(values[1:])])
    return values[keep]


def exponent_problem(values: np.ndarray, variable: str) -> str | None:
    """Why the cells' values of `variable` cannot identify its exponent, or None."""
    distinct = distinct_values(values)
    word = VARIABLE_WORDS.get(variable, variable)
    need = MIN_DISTINCT.get(variable, 3)
    low, high = float(distinct[0]), float(distinct[-1])
    if distinct.size < need:
        return (f"the cells have {distinct.size} distinct value(s) of {word} ({low:.4g} to {high:.4g}); "
                f"an exponent needs at least {need}")
    if high / low < MIN_SPAN:
        return (f"{word} spans only {low:.4g} to {high:.4g} across the cells (a factor {high / low:.4g}); "
                f"an exponent needs at least a factor {MIN_SPAN:g}")
    return None


def refusal(law: str, variable: str, problem: str) -> str:
    """The one sentence that says an exponent was refused and what was fitted instead."""
    word = VARIABLE_WORDS.get(variable, variable)
    return f"the {law} law's exponent of {word} is not fitted because {problem}, so the law is fitted without it."


def wide_interval(law: str, variable: str, interval: tuple[float, float]) -> str | None:
    low, high = interval
    if not (math.isfinite(low) and math.isfinite(high)) or high - low <= MAX_INTERVAL_WIDTH:
        return None
    word = VARIABLE_WORDS.get(variable, variable)
    return (f"the {law} law's exponent of {word} has a 95% interval [{low:.3g}, {high:.3g}] wider than "
            f"{MAX_INTERVAL_WIDTH:g}: the data barely constrain it.")


def collinearity(log_n: np.ndarray, log_d: np.ndarray) -> str | None:
    """A warning when the cells' log N and log D move together (or None)."""
    if np.ptp(log_n) == 0 or np.ptp(log_d) == 0:
        return None
    r = float(np.corrcoef(log_n, log_d)[0, 1])
    if abs(r) <= MAX_CORRELATION:
        return None
    return (f"the cells' log N and log D are nearly collinear (correlation {r:+.3f}): the N and D exponents "
            "trade off against each other; add cells off that line.")
