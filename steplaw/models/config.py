"""Model configs: plain dataclasses, JSON round-trippable.

A LLaMA-style decoder (RMSNorm, rotary embeddings, SwiGLU, causal SDPA attention),
optionally with Mixture-of-Experts feed-forward layers. These are the contracts shared
by steplaw.models (the modules), steplaw.train (one run) and steplaw.sweep (run ids):
a field added here changes every run id, so add fields with care and with defaults.

Both configs check themselves when made (`problems()` lists every invalid field, and a
UserError names them all): a config that cannot describe a model is never built, and
every config ever stored passed the same checks when it was made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from steplaw.errors import UserError, number_problem, raise_problems, whole_number_problem


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
        self.validate()

    def problems(self) -> list[str]:
        """One sentence per invalid field (empty when the config is valid)."""
        found = [
            whole_number_problem("n_experts", self.n_experts, 1),
            whole_number_problem("top_k", self.top_k, 1),
            whole_number_problem("d_expert", self.d_expert, 1),
            whole_number_problem("n_shared_experts", self.n_shared_experts, 0),
            whole_number_problem("moe_every", self.moe_every, 1),
            whole_number_problem("moe_first", self.moe_first, 0),
            number_problem("aux_loss_coef", self.aux_loss_coef, 0.0),
            number_problem("z_loss_coef", self.z_loss_coef, 0.0),
            number_problem("bias_update_rate", self.bias_update_rate, 0.0),
        ]
        if not found[0] and not found[1] and self.top_k > self.n_experts:
            found.append(f"top_k={self.top_k}: expected 1 <= top_k <= n_experts={self.n_experts}")
        if self.score_func not in ("softmax", "sigmoid"):
            found.append(f"score_func={self.score_func!r}: expected 'softmax' or 'sigmoid'")
        if not isinstance(self.renormalize, bool):
            found.append(f"renormalize={self.renormalize!r}: expected true or false")
        if self.capacity_factor is not None:
            found.append(number_problem("capacity_factor", self.capacity_factor, 0.0, low_open=True))
        return [p for p in found if p]

    def validate(self) -> None:
        """Raise one UserError naming every invalid field (cheap; run at construction)."""
        raise_problems(self.problems())

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
        self.validate()

    def problems(self) -> list[str]:
        """One sentence per invalid field (empty when the config is valid)."""
        found = [whole_number_problem(name, getattr(self, name), 1) for name in _SIZES]
        found += [
            number_problem("rope_theta", self.rope_theta, 0.0, low_open=True),
            number_problem("norm_eps", self.norm_eps, 0.0, low_open=True),
        ]
        if not found[1] and not found[3]:
            if self.d_model % self.n_heads:
                found.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            elif (self.d_model // self.n_heads) % 2:
                found.append(f"head size d_model/n_heads={self.d_model // self.n_heads} is odd: rotary embeddings need an even head size")
        if not isinstance(self.tie_embeddings, bool):
            found.append(f"tie_embeddings={self.tie_embeddings!r}: expected true or false")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            found.append(f"moe={self.moe!r}: expected MoE settings (MoEConfig) or None for a dense model")
        elif self.moe is not None and not found[2] and not any(self.moe.is_moe_layer(i) for i in range(self.n_layers)):
            # Otherwise the "MoE" model would silently be dense.
            found.append(f"moe_first={self.moe.moe_first} with n_layers={self.n_layers}: no layer would be an MoE layer")
        return [p for p in found if p]

    def validate(self) -> None:
        """Raise one UserError naming every invalid field (cheap; run at construction)."""
        raise_problems(self.problems())

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """From to_dict()'s form; unknown keys are a UserError (missing ones take defaults)."""
        data = dict(known_fields(cls, data, "model"))
        moe = data.pop("moe", None)
        if moe is not None:
            moe = MoEConfig(**known_fields(MoEConfig, moe, "moe"))
        return cls(**data, moe=moe)


_SIZES = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")


def known_fields(cls, data, what: str) -> dict:
    """`data` as a dict of `cls`'s fields, or a UserError naming the unknown keys."""
    if not isinstance(data, dict):
        raise UserError(f"{what}={data!r}: expected a table of settings (a dict)")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise UserError(f"{what}: unknown setting(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(names)}")
    return data
