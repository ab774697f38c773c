"""One training run: RunConfig in, RunResult out (plain dataclasses, JSON round-trip).

Units: `tokens` (D) and `batch_tokens` (B) are token counts; `lr` is the peak learning
rate of the schedule. A run's id is a hash of its full config, so a sweep can skip runs
it has finished and treat any change of config as a new run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from steplaw.models.config import ModelConfig


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    tokens: int  # D: training tokens
    lr: float  # peak learning rate
    batch_tokens: int  # B: tokens per optimizer step (micro-batch x seq x accumulation x world)
    seq_len: int = 128
    # Largest micro-batch (in tokens) run at once; gradient accumulation makes up the rest.
    # None: the whole batch at once when it fits a memory budget, else the largest dividing
    # micro-batch that does (steplaw.train.batching.auto_micro_batch_tokens).
    micro_batch_tokens: int | None = None
    schedule: str = "cosine"  # "cosine" (warmup + cosine, the Step Law setup), "wsd", "constant"
    warmup_tokens: int | None = None  # None: a default fraction of `tokens` (see steplaw.optim.schedule)
    min_lr_ratio: float = 0.1  # cosine/WSD end at min_lr_ratio * lr
    decay_fraction: float = 0.2  # WSD: fraction of training spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32", "bf16"
    data: str | None = None  # token directory from `steplaw data prepare`; None: embedded corpus
    eval_tokens: int = 16384  # validation tokens at the end of the run
    optimizer: str = "steplaw"  # "steplaw" (FusedAdamW) or "torch" (torch.optim.AdamW)
    compile: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        model = ModelConfig.from_dict(data.pop("model"))
        return cls(model=model, **data)

    def run_id(self) -> str:
        """Deterministic id: a hash of every field (16 hex digits)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


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
    config: dict | None = None  # RunConfig.to_dict() of the run
    run_id: str | None = None
    # MoE only: max/mean tokens per expert in the last training batch, averaged over layers
    # (1.0 = perfectly balanced).
    moe_max_mean_load: float | None = None
    # Stacked runs (steplaw.train.stacked): the id of the stack that trained this run with
    # others differing only in lr; wall_s and tokens_per_s are then its share of the stack's.
    stack: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunResult":
        data = dict(data)
        data["curve"] = [tuple(p) for p in data.get("curve") or []]
        return cls(**data)
