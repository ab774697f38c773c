"""Small statistics shared by the fitters: bootstrap percentile intervals.

- `percentile_interval(samples)`: the 95% percentile interval of bootstrap samples
  (non-finite samples left out; (nan, nan) when none is finite).
(Strict JSON of results: steplaw.runtable.json_safe.)
"""
from __future__ import annotations

import numpy as np


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile interval of the finite entries of `samples`."""
    values = np.asarray(samples, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return (float(low), float(high))
