"""Small statistics shared by the fitters: bootstrap percentile intervals.

- `percentile_interval(samples)`: the 95% percentile interval of bootstrap samples
  (non-finite samples left out; (nan, nan) when none is finite).
- `check_bootstrap(n_boot, seed)`: a UserError unless both are whole numbers >= 0.
- `NO_INTERVALS`: the warning of a fit made without a bootstrap.
(Strict JSON of results: steplaw.runtable.json_safe.)
"""
from __future__ import annotations

import numpy as np

from steplaw.errors import UserError, whole_number_problem

NO_INTERVALS = ("no bootstrap intervals were computed (n_boot = 0), so nothing says how well the data pin down the "
                "law's exponents; its trust is unchecked (fit with n_boot > 0 for intervals).")


def check_bootstrap(n_boot, seed) -> None:
    """Refuse a resample count or seed that is not a whole number >= 0 (numpy's own
    errors for a negative or non-integer seed would name neither)."""
    for name, value in (("n_boot", n_boot), ("seed", seed)):
        value = int(value) if isinstance(value, np.integer) else value
        problem = whole_number_problem(name, value, 0)
        if problem:
            raise UserError(problem + ".")


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile interval of the finite entries of `samples`."""
    values = np.asarray(samples, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return (float(low), float(high))
