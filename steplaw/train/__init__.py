"""Training runs: `run(RunConfig) -> RunResult` (steplaw.train.runner), and stacks of runs
of one model (differing in lr, token budget and, for small dense models, batch size)
trained as one model: `run_stack(configs) -> list[RunResult]`,
grouped by `plan_stacks(configs, stack="auto"|K|"off")` (steplaw.train.stacked); WSD runs
that differ only in token budget (and lr, stacked) as one trunk with a cooldown branch per
budget: `train_trunk(configs, trunk_dir)`, grouped by `plan_trunks` (steplaw.train.branch).

Names are resolved lazily, so that importing steplaw.train.config (the sweep, the CLI's
parser) does not import torch.
"""
from __future__ import annotations

__all__ = ["RunConfig", "RunResult", "plan_stacks", "plan_trunks", "run", "run_stack", "stack_key", "train_trunk"]


def __getattr__(name: str):
    if name == "run":
        from steplaw.train.runner import run

        return run
    if name in ("run_stack", "plan_stacks", "stack_key"):
        from steplaw.train import stacked

        return getattr(stacked, name)
    if name in ("train_trunk", "plan_trunks"):
        from steplaw.train import branch

        return getattr(branch, name)
    if name in ("RunConfig", "RunResult"):
        from steplaw.train import config

        return getattr(config, name)
    raise AttributeError(f"module 'steplaw.train' has no attribute {name!r}")
