"""Exact parameter counts and training FLOPs per token of a ModelConfig.

Which parameters are which (the convention of Kaplan et al. 2020 and of the Step Law paper,
arXiv:2503.04715, whose N is the non-embedding count):
  embedding      the token embedding [V, d] and, when untied, the output head [V, d]
  non-embedding  everything else: attention, feed-forward (all experts), RMSNorm weights,
                 MoE routers
  active         the non-embedding parameters one token passes through: MoE layers count
                 the router, the top_k routed experts and the shared experts only
                 (equal to non-embedding for dense models)

Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add):
  6 * N_active                      every weight matrix of the blocks
  + 6 * d_model * vocab_size        the output head (the input embedding is a lookup)
  + 6 * n_layers * seq_len * d_model  attention scores QK^T and the weighted sum AV:
                                    2 matmuls x 2 FLOPs x d_model per (query, key) pair,
                                    with causal masking averaging seq_len/2 keys per query
The PaLM/nanoGPT MFU convention counts attention without the causal halving
(12 * n_layers * seq_len * d_model); `flops_per_token(..., causal=False)` gives that.
Norms, activations, softmax and the loss are elementwise and not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from steplaw.models.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter, embeddings included
    non_embedding: int  # N of the scaling laws (all experts counted)
    active: int  # non-embedding parameters activated per token
    embedding: int


def _ffn_counts(config: ModelConfig, layer_index: int) -> tuple[int, int]:
    """(parameters, activated parameters per token) of one feed-forward layer."""
    d = config.d_model
    moe = config.moe
    if moe is None or not moe.is_moe_layer(layer_index):
        n = 3 * d * config.d_ff
        return n, n
    per_expert = 3 * d * moe.d_expert  # SwiGLU: gate, up [d_expert, d] and down [d, d_expert]
    router = d * moe.n_experts
    shared = moe.n_shared_experts * per_expert
    total = router + moe.n_experts * per_expert + shared
    active = router + moe.top_k * per_expert + shared
    return total, active


def param_counts(config: ModelConfig) -> ParamCounts:
    d = config.d_model
    attention = 4 * d * d  # qkv [3d, d] and out [d, d], no biases
    norms = 2 * d
    non_embedding = d  # final RMSNorm
    active = d
    for i in range(config.n_layers):
        ffn_total, ffn_active = _ffn_counts(config, i)
        non_embedding += attention + norms + ffn_total
        active += attention + norms + ffn_active
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    return ParamCounts(total=non_embedding + embedding, non_embedding=non_embedding, active=active, embedding=embedding)


def flops_per_token(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`; see the
    module docstring for what is counted."""
    counts = param_counts(config)
    attention_factor = 6 if causal else 12
    return float(
        6 * counts.active
        + 6 * config.d_model * config.vocab_size
        + attention_factor * config.n_layers * seq_len * config.d_model
    )


def module_param_counts(model) -> ParamCounts:
    """The same split counted from a live Transformer's parameters (for checks)."""
    embedding_names = {"tok_emb.weight", "lm_head.weight"}
    total = embedding = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name in embedding_names:
            embedding += p.numel()
    predicted = param_counts(model.config)
    # The active count cannot be read off the module; it is the formula's, given the
    # module agrees with the formula on everything countable.
    return ParamCounts(total=total, non_embedding=total - embedding, active=predicted.active, embedding=embedding)
