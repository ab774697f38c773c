"""LLaMA-style decoder: RMSNorm, rotary embeddings, SwiGLU, causal SDPA attention.

Feed-forward layers are dense SwiGLU MLPs or, where `config.moe.is_moe_layer(i)`, the
MoE layer of steplaw.models.moe (imported only when a model has MoE layers).

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

from steplaw.models.config import ModelConfig


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least: the loss of bf16/fp16 logits is taken in float32, float64
    stays float64 (a float64 model's numerics are float64 throughout)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim/2] of the rotary embedding (RoFormer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x [B, H, T, h] (the 'half' layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rotary_pair_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cat(cos, cos) and cat(-sin, sin) [.., head_dim]: the tables of `apply_rotary_rolled`."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary_rolled(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """apply_rotary in three elementwise ops, for x [..., h] of any layout (cos2, sin2 from
    rotary_pair_tables, broadcast to x): x * cat(cos, cos) + cat(x2, x1) * cat(-sin, sin).
    The same values bit for bit, also in the backward (a - b is a + (-b) in IEEE
    arithmetic, and each sum has two terms), so it can rotate q and k together straight
    from the qkv projection, before any permute."""
    return x * cos2.to(x.dtype) + x.roll(x.shape[-1] // 2, dims=-1) * sin2.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, d_model))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2F], gate its first F columns."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x)))


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
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
        seq = idx.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        logits = F.linear(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(upcast(logits).view(-1, logits.shape[-1]), targets.reshape(-1))

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the MoE layers' auxiliary losses of the last forward (0.0 for dense)."""
        total = 0.0
        for layer in self.moe_layers():
            total = total + layer.aux_loss
        return total
