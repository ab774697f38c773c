"""LLaMA-style decoder: RMSNorm, rotary embeddings, SwiGLU, causal SDPA attention.

Feed-forward layers are dense SwiGLU MLPs or, where `config.moe.is_moe_layer(i)`, the
MoE layer of steplaw.models.moe (imported only when a model has MoE layers). The
arithmetic is steplaw.models.layers' with one member: the model runs on [1, B*T, d]
activations and its own weights as one member's, as each member of a stack of runs
(steplaw.models.stacked) does, so that a stacked run computes its run alone's values.

Parameter names (the accounting in steplaw.models.accounting counts the same tensors):
  tok_emb.weight [V, d]                          embedding
  blocks.i.attn_norm.weight [d]
  blocks.i.attn.qkv.weight [3d, d], attn.out.weight [d, d]
  blocks.i.ffn_norm.weight [d]
  blocks.i.ffn.gate_up.weight [2 d_ff, d], ffn.down.weight [d, d_ff]   (dense)
  blocks.i.ffn.router.weight, ffn.experts.*, ffn.shared.*               (MoE)
  norm.weight [d]
  lm_head.weight [V, d]                          embedding (absent when tied)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from steplaw.models import layers
from steplaw.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> the same shape (the model's own [1, B*T, d] without a reshape)."""
        return _as_one_member(x, lambda rows: layers.rms_norm(rows, self.weight, self.eps))


def _as_one_member(x: torch.Tensor, fn) -> torch.Tensor:
    """fn applied to x [..., d] as one member's rows [1, M, d], in x's shape. The model's
    own activations are [1, M, d] already: no view nodes for them (at the demo's sizes
    every autograd node costs more than its arithmetic)."""
    if x.dim() == 3 and x.shape[0] == 1:
        return fn(x)
    return fn(x.reshape(1, -1, x.shape[-1])).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, batch: int, seq: int, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
        """x [1, B*T, d] (B sequences of T rows) -> [1, B*T, d]; cos2, sin2 as layers.attention's."""
        return layers.attention(x, self.qkv.weight, self.out.weight, batch, seq, self.n_heads, cos2, sin2)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> [..., d]."""
        return _as_one_member(x, lambda rows: layers.feed_forward(rows, self.gate_up.weight, self.down.weight))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = config.moe is not None and config.moe.is_moe_layer(layer_index)
        if self.is_moe:
            from steplaw.models.moe import MoE  # lazy: dense models never need it

            self.ffn = MoE(config.d_model, config.moe)
        else:
            self.ffn = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x: torch.Tensor, batch: int, seq: int, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
        """x [1, B*T, d] -> [1, B*T, d]."""
        x = x + self.attn(self.attn_norm(x), batch, seq, cos2, sin2)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos2, sin2 = layers.rotary_pair_tables(*layers.rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta))
        self.register_buffer("rope_cos2", cos2, persistent=False)
        self.register_buffer("rope_sin2", sin2, persistent=False)
        self.reset_parameters()

    def moe_layers(self) -> list[nn.Module]:
        return [block.ffn for block in self.blocks if block.is_moe]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, residual output projections scaled by
        1/sqrt(2 n_layers) so the residual stream's variance does not grow with depth."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            if not block.is_moe:
                nn.init.normal_(block.ffn.gate_up.weight, std=std)
                nn.init.normal_(block.ffn.down.weight, std=residual_std)
            # MoE layers initialise themselves (their own rule for router and experts).

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, V], or with targets [B, T] the mean
        cross-entropy (nats per token) of predicting them. MoE auxiliary losses of the
        same forward are in `aux_loss()`, not in this value."""
        batch, seq = idx.shape
        # One member of steplaw.models.layers' [K, M, d] arithmetic, as a stack's member
        # computes it (so a stacked run and its run alone agree to the last bit).
        cos2, sin2 = layers.rotary_rows(self.rope_cos2, self.rope_sin2, seq)
        x = F.embedding(idx.reshape(1, -1), self.tok_emb.weight)  # [1, B*T, d]
        for block in self.blocks:
            x = block(x, batch, seq, cos2, sin2)
        x = self.norm(x)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = layers.linear(x, head)  # [1, B*T, V]
        if targets is None:
            return logits.view(batch, seq, -1)
        return layers.cross_entropy(logits, targets).mean(dim=1).squeeze(0)

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the MoE layers' auxiliary losses of the last forward (0.0 for dense)."""
        total = 0.0
        for layer in self.moe_layers():
            total = total + layer.aux_loss
        return total
