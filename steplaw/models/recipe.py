"""Shape recipe: a ModelConfig from a target parameter count.

The rule (so that "N = 3M" names one model):
  * width/depth aspect ratio d_model / n_layers close to 64 (GPT-2 small: 768/12; Kaplan
    et al. 2020, Fig. 5, find loss nearly flat for ratios ~20..200, so the exact value
    matters little and a fixed one keeps the family comparable);
  * head size 64 once d_model >= 256, 32 for 64 <= d_model < 256, 16 below; d_model is a
    multiple of the head size;
  * dense SwiGLU hidden size d_ff = 8/3 d_model rounded up to a multiple of 32 (LLaMA),
    which keeps the FFN at ~8 d_model^2 parameters, as a 4x GELU MLP would be;
  * MoE (fine-grained experts): each expert's hidden size is d_ff / (top_k + n_shared),
    rounded up to a multiple of 16, so the experts one token uses hold about as many
    parameters as the dense FFN of the same width.
Among all (n_layers, d_model) shapes whose parameter count lies within `tolerance` of the
target, the one with aspect ratio closest to 64 (in log) wins; if none lies within it, the
closest count wins. Counts are exact (steplaw.models.accounting).

`n_params` is the non-embedding count N. For MoE, `target="total"` (default) matches N
counting every expert, the sweeps' N column; `target="active"` matches the parameters
activated per token, for comparing a dense and an MoE model of equal per-token compute.
"""
from __future__ import annotations

import dataclasses
import math

from steplaw.errors import UserError
from steplaw.models.accounting import param_counts
from steplaw.models.config import ModelConfig, MoEConfig

ASPECT_RATIO = 64.0
MAX_LAYERS = 128


def head_size_for(d_model: int) -> int:
    if d_model >= 256:
        return 64
    if d_model >= 64:
        return 32
    return 16


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def dense_ffn_size(d_model: int) -> int:
    return _round_up(8 * d_model / 3, 32)


def _shape(
    d_model: int,
    n_layers: int,
    vocab_size: int,
    moe: MoEConfig | None,
    d_expert: int | None,
    max_seq_len: int,
    tie_embeddings: bool,
) -> ModelConfig:
    d_ff = dense_ffn_size(d_model)
    if moe is not None:
        size = d_expert or _round_up(d_ff / (moe.top_k + moe.n_shared_experts), 16)
        moe = dataclasses.replace(moe, d_expert=size)
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=d_model // head_size_for(d_model),
        d_ff=d_ff,
        max_seq_len=max_seq_len,
        tie_embeddings=tie_embeddings,
        moe=moe,
    )


def model_for_params(
    n_params: float,
    vocab_size: int = 256,
    moe: MoEConfig | None = None,
    *,
    target: str = "total",
    aspect_ratio: float = ASPECT_RATIO,
    tolerance: float = 0.1,
    d_expert: int | None = None,
    max_seq_len: int = 1024,
    tie_embeddings: bool = False,
) -> ModelConfig:
    """The recipe's model with about `n_params` non-embedding parameters (see module doc).

    `moe`: its n_experts, top_k, n_shared_experts and routing settings are kept; its
    d_expert is replaced by the recipe's unless `d_expert` is given.
    """
    if not (isinstance(n_params, (int, float)) and math.isfinite(n_params) and n_params >= 1000):
        raise UserError(f"n_params={n_params!r}: expected a parameter count of at least 1000 (e.g. 3e6)")
    if target not in ("total", "active"):
        raise UserError(f"target={target!r}: expected 'total' or 'active'")
    if not aspect_ratio > 0:
        raise UserError(f"aspect_ratio={aspect_ratio!r}: expected a positive d_model/n_layers ratio")

    def count(config: ModelConfig) -> int:
        return _count(config, target)

    candidates = []
    for n_layers in range(1, MAX_LAYERS + 1):
        # Per layer ~ c * d^2 parameters; bracket the width that hits the target.
        probe = _shape(64, n_layers, vocab_size, moe, d_expert, max_seq_len, tie_embeddings)
        per_layer_coef = count(probe) / (n_layers * 64 * 64)
        d_guess = math.sqrt(n_params / (n_layers * per_layer_coef))
        widths = {_round_up(w, head_size_for(int(w))) for w in (d_guess * f for f in (0.8, 0.9, 1.0, 1.1, 1.25)) if w >= 8}
        for d_model in sorted(widths):
            config = _shape(d_model, n_layers, vocab_size, moe, d_expert, max_seq_len, tie_embeddings)
            error = abs(math.log(count(config) / n_params))
            shape_error = abs(math.log((d_model / n_layers) / aspect_ratio))
            candidates.append((error, shape_error, config))
        if d_guess < 16:
            break
    def smallest(spec: MoEConfig | None) -> int:
        return count(_shape(16, 1, vocab_size, spec, d_expert, max_seq_len, tie_embeddings))

    # Below the smallest shape the closest one would be a silently different (larger) model:
    # e.g. 20K parameters with 64 experts gave a 100K model named "20K".
    if not candidates or smallest(moe) > n_params * (1 + tolerance):
        raise _too_small(n_params, moe, target, tolerance, smallest)
    within = [c for c in candidates if c[0] <= math.log1p(tolerance)]
    if within:
        return min(within, key=lambda c: (c[1], c[0]))[2]
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def _count(config: ModelConfig, target: str) -> int:
    counts = param_counts(config)
    return counts.active if (config.moe is not None and target == "active") else counts.non_embedding


def _too_small(n_params: float, moe: MoEConfig | None, target: str, tolerance: float, smallest) -> UserError:
    """The sentence for a budget below the smallest shape (1 layer of width 16, whose
    count `smallest(moe)` gives): that count with these experts, and how many experts
    would fit."""
    need = smallest(moe)
    what = "a dense model" if moe is None else f"{moe.n_experts} experts per MoE layer"
    hint = ""
    if moe is not None:
        budget = n_params * (1 + tolerance)

        def fits(n_experts: int) -> bool:
            return smallest(dataclasses.replace(moe, n_experts=n_experts)) <= budget

        low, high = moe.top_k, moe.n_experts  # the largest expert count that fits, by bisection
        if not fits(low):
            hint = f", or a dense model (not even {low} experts fit)"
        else:
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fits(mid) else (low, mid - 1)
            hint = f", or at most {low} experts"
    label = "active" if (moe is not None and target == "active") else "non-embedding"
    return UserError(f"n_params={n_params:g} is too small for {what}: the smallest shape (1 layer, d_model 16) has "
                     f"{need:,} {label} parameters; expected n_params >= {need:,}{hint}")
