"""The record of one finished (or failed) run that every layer passes around: what a
trainer reports and the sweep stores (`RunResult`). Plain data, no torch: steplaw's own
trainer fills it (steplaw.train), the sweep's executors and store read it without
knowing which trainer made it; steplaw.train.config re-exports it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RunResult:
    status: str  # "ok", "diverged" or "failed"
    reason: str | None = None  # why, when not ok
    final_train_loss: float | None = None  # smoothed (EMA) training loss at the end
    final_val_loss: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, train loss)
    tokens: int = 0  # tokens actually trained on
    steps: int = 0
    tokens_per_s: float | None = None
    wall_s: float | None = None
    params_total: int | None = None
    params_non_embedding: int | None = None
    params_active: int | None = None  # activated per token (MoE); = non-embedding for dense
    flops_per_token: float | None = None
    compute_flops: float | None = None  # C = flops_per_token * tokens
    config: dict | None = None  # the run's config dict (RunConfig.to_dict() or a trial)
    run_id: str | None = None
    # MoE only: max/mean tokens per expert in the last training batch, averaged over layers
    # (1.0 = perfectly balanced).
    moe_max_mean_load: float | None = None
    # Stacked runs (steplaw.train.stacked): the id of the stack that trained this run with
    # other runs of its model shape; wall_s and tokens_per_s are then its share of the stack's.
    stack: str | None = None
    # WSD branches (steplaw.train.branch): the id (16 hex) of the trunk whose stable phase
    # this run branched off; None for a run trained alone.
    trunk: str | None = None
    # Tokens this result actually trained (None in results stored before the field): a
    # run alone's `tokens`; in a trunk, the longest run trained the shared stable phase
    # and the others only their cooldowns, so the sum over a trunk's results is what it
    # trained (steplaw.train.branch).
    tokens_trained: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        data = dict(data)
        data["curve"] = [tuple(p) for p in data.get("curve") or []]
        return cls(**data)
