"""Optimizers of steplaw (FusedAdamW) and LR schedules.

The schedules are plain Python; only the optimizer needs torch, so `FusedAdamW` is
resolved lazily (RunConfig.validate() reads the schedule names without importing torch).
"""
from __future__ import annotations

__all__ = ["FusedAdamW"]


def __getattr__(name: str):
    if name == "FusedAdamW":
        from steplaw.optim.adamw import FusedAdamW

        return FusedAdamW
    raise AttributeError(f"module 'steplaw.optim' has no attribute {name!r}")
