"""Training runs: `run(RunConfig) -> RunResult` (steplaw.train.runner), and stacks of runs
of one model (differing in lr, token budget and, for small dense models, batch size)
trained as one model: `run_stack(configs) -> list[RunResult]`,
grouped by `plan_stacks(configs, stack="auto"|K|"off")` (steplaw.train.stacked).

Names are resolved lazily, so that importing steplaw.train.config (the sweep, the CLI's
parser) does not import torch.
"""
from __future__ import annotations

__all__ = ["RunConfig", "RunResult", "plan_stacks", "run", "run_stack", "stack_key"]


def __getattr__(name: str):
    if name == "run":
        from steplaw.train.runner import run

        return run
    if name in ("run_stack", "plan_stacks", "stack_key"):
        from steplaw.train import stacked

        return getattr(stacked, name)
    if name in ("RunConfig", "RunResult"):
        from steplaw.train import config

        return getattr(config, name)
    raise AttributeError(f"module 'steplaw.train' has no attribute {name!r}")
