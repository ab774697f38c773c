"""Small statistics shared by the fitters: bootstrap percentile intervals and strict JSON.

- `percentile_interval(samples)`: the 95% percentile interval of bootstrap samples
  (non-finite samples left out; (nan, nan) when none is finite).
- `finite_or_none(obj)`: the same structure with every NaN or infinity replaced by None,
  so that `json.dumps(..., allow_nan=False)` writes valid JSON.
"""
from __future__ import annotations

import math

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


def finite_or_none(obj):
    """obj with NaN / inf floats (numpy ones too) replaced by None, recursively."""
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return [finite_or_none(item) for item in obj.tolist()]
    if isinstance(obj, dict):
        return {key: finite_or_none(item) for key, item in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(item) for item in obj]
    return obj
