"""Dense and MoE decoder-only transformers, their parameter/FLOP accounting and shape recipe.

Configs, accounting and the recipe are plain Python; only the modules need torch, so names
are resolved lazily (importing steplaw.models.config does not import torch).
"""
from __future__ import annotations

import importlib

_WHERE = {
    "ModelConfig": "config",
    "MoEConfig": "config",
    "ParamCounts": "accounting",
    "param_counts": "accounting",
    "flops_per_token": "accounting",
    "model_for_params": "recipe",
    "Transformer": "transformer",
    "MoE": "moe",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"steplaw.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'steplaw.models' has no attribute {name!r}")
