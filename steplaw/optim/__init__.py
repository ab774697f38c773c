"""Optimizers of steplaw."""
from steplaw.optim.adamw import FusedAdamW

__all__ = ["FusedAdamW"]
