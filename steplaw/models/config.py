"""Model configs: plain dataclasses, JSON round-trippable.

A LLaMA-style decoder (RMSNorm, rotary embeddings, SwiGLU, causal SDPA attention),
optionally with Mixture-of-Experts feed-forward layers. These are the contracts shared
by steplaw.models (the modules), steplaw.train (one run) and steplaw.sweep (run ids):
a field added here changes every run id, so add fields with care and with defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts feed-forward layer settings.

    Experts are SwiGLU MLPs of hidden size `d_expert` (fine-grained experts: independent
    of the dense FFN size). Each token goes to `top_k` of `n_experts` routed experts plus
    all `n_shared_experts` shared ones.
    """

    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 256
    n_shared_experts: int = 0
    # "softmax": softmax over experts then top-k (Switch/Mixtral); "sigmoid": sigmoid
    # scores then top-k (DeepSeek-V3).
    score_func: str = "softmax"
    # Renormalise the k combine weights of each token to sum to 1.
    renormalize: bool = True
    # None: dropless. Otherwise each expert takes at most ceil(capacity_factor*T*k/E) tokens.
    capacity_factor: float | None = None
    # Switch Transformer load-balancing loss coefficient (0 disables).
    aux_loss_coef: float = 0.01
    # Router z-loss coefficient (ST-MoE; 0 disables).
    z_loss_coef: float = 0.001
    # DeepSeek auxiliary-loss-free balancing: per-expert selection bias step size (0 disables).
    bias_update_rate: float = 0.0
    # Which layers are MoE: every `moe_every`-th layer starting at `moe_first`.
    moe_every: int = 1
    moe_first: int = 0

    def __post_init__(self):
        if self.n_experts < 1:
            raise ValueError(f"n_experts={self.n_experts}: expected at least 1 expert")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k}: expected 1 <= top_k <= n_experts={self.n_experts}")
        if self.d_expert < 1:
            raise ValueError(f"d_expert={self.d_expert}: expected a positive hidden size")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func={self.score_func!r}: expected 'softmax' or 'sigmoid'")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor}: expected a positive number or None")
        if self.moe_every < 1 or self.moe_first < 0:
            raise ValueError(f"moe_every={self.moe_every}, moe_first={self.moe_first}: expected moe_every >= 1, moe_first >= 0")

    def is_moe_layer(self, layer_index: int) -> bool:
        return layer_index >= self.moe_first and (layer_index - self.moe_first) % self.moe_every == 0


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape. `d_ff` is the dense SwiGLU hidden size."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 352
    max_seq_len: int = 1024
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    moe: MoEConfig | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size {self.d_model // self.n_heads} is odd: rotary embeddings need an even head size")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        moe = data.pop("moe", None)
        return cls(**data, moe=MoEConfig(**moe) if moe is not None else None)
