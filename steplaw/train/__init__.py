"""One training run: `run(RunConfig) -> RunResult` (implementation in steplaw.train.runner).

Names are resolved lazily, so that importing steplaw.train.config (the sweep, the CLI's
parser) does not import torch.
"""
from __future__ import annotations

__all__ = ["RunConfig", "RunResult", "run"]


def __getattr__(name: str):
    if name == "run":
        from steplaw.train.runner import run

        return run
    if name in ("RunConfig", "RunResult"):
        from steplaw.train import config

        return getattr(config, name)
    raise AttributeError(f"module 'steplaw.train' has no attribute {name!r}")
