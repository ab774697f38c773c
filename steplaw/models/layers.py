"""The decoder's arithmetic, written once for tensors with a leading member dimension.

Activations are [K, M, d] (K members, M = batch x sequence rows), weights [K, ...]. A
single model (steplaw.models.transformer) calls these with K = 1 (its [1, M, d]
activations and its own weights, taken as one member's), a stack of K runs
(steplaw.models.stacked) with K. So a stacked member does its run alone's arithmetic op
for op: batched matmuls, reductions over a row and elementwise ops give each member's
slice the same bits whatever K is (checked in float32 and float64 by
tests/train/test_stacked.py, on CI's CPU and with every ISA-dependent library forced onto
its AVX2 and pre-AVX2 paths by tests/test_isa_paths.py), and a member of a stack ends with its run alone's
losses to the last bit (the run alone trains this same code with one member).

float32 and float64 without autocast, where a step at the demo's sizes (d_model 16-64,
8-token sequences) is mostly per-op overhead, take hand-written autograd Functions
(_MemberLinear, _MemberRMSNorm, _SwiGLU, _CrossEntropy) that do the same forward
arithmetic in fewer ops and autograd nodes; their gradients are autograd's to rounding
(gradcheck in float64). bf16/fp16 and autocast take plain torch ops (the Functions do not
follow autocast's dtype rules, and compute in their inputs' dtype).

Rotary embeddings (RoFormer) rotate q and k together in the qkv projection's layout
(`apply_rotary_rolled`, the half-layout `apply_rotary`'s values bit for bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least: the loss of bf16/fp16 logits is taken in float32, float64
    stays float64 (a float64 model's numerics are float64 throughout)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _plain(*tensors: torch.Tensor) -> bool:
    """Whether the hand-written autograd Functions apply: float32 or float64 tensors, no
    autocast (whose dtype rules they do not follow), not bf16/fp16 (whose RMSNorm and
    loss want float32 inside); the other cases take plain torch ops."""
    return (all(t.dtype in (torch.float32, torch.float64) for t in tensors)
            and not torch.is_autocast_enabled(tensors[0].device.type))


# ---------------------------------------------------------------- linear

class _MemberLinear(torch.autograd.Function):
    """bmm(x, weight.transpose(1, 2)) whose backward gives the weight's gradient in the
    weight's own layout (bmm(grad.T, x)): autograd's gives it transposed, which costs a
    TransposeBackward node and a copy per weight and step. Same values bit for bit. A
    weight without the member dim (one member's [d_out, d_in]) is taken as [1, d_out,
    d_in] inside, so a single model pays no view node for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, _members(weight).transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, _members(weight)) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(grad.transpose(1, 2), x)
            grad_weight = grad_weight if weight.dim() == 3 else grad_weight.squeeze(0)
        return grad_x, grad_weight


def _members(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight as [K, d_out, d_in] (one member's [d_out, d_in] as K = 1)."""
    return weight if weight.dim() == 3 else weight.unsqueeze(0)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-member x [K, M, d_in] @ weight[k].T with weight [K, d_out, d_in] (nn.Linear's
    layout), or one member's [d_out, d_in] when K = 1."""
    if _plain(x, weight):
        return _MemberLinear.apply(x, weight)
    return torch.bmm(x, _members(weight).to(x.dtype).transpose(1, 2))


# ---------------------------------------------------------------- RMSNorm

class _MemberRMSNorm(torch.autograd.Function):
    """x [K, M, d] normalised over d and scaled by weight [K, d] per member (or, K = 1,
    one member's [d]), with a hand-written backward: one autograd node instead of the
    composite's six (pow, mean, add, rsqrt, mul, mul), which at the demo's sizes cost
    more than their arithmetic. The forward is F.rms_norm's composite
    (x * rsqrt(mean(x^2) + eps)) times the weight, the same values bit for bit; the
    backward agrees with autograd's to rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))  # [K, M, 1]
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * _member_rows(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, rstd, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).sum(1)  # [K, d]
            grad_weight = grad_weight if weight.dim() == 2 else grad_weight.squeeze(0)
        grad_normed = grad * _member_rows(weight)
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)).
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed * dot).mul_(rstd) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, None


def _member_rows(weight: torch.Tensor) -> torch.Tensor:
    """A norm weight [K, d] as [K, 1, d], to scale [K, M, d] (one member's [d] broadcasts as it is)."""
    return weight.unsqueeze(1) if weight.dim() == 2 else weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [K, M, d] normalised over d and scaled by weight [K, d] per member (or one
    member's [d] when K = 1)."""
    if _plain(x, weight):
        return _MemberRMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), None, eps) * _member_rows(weight).to(x.dtype)


# ---------------------------------------------------------------- SwiGLU

class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of gate_up [K, M, 2F] (gate its first F columns) with a backward
    that writes both halves of the gradient into one [K, M, 2F] tensor: autograd's joins
    two [K, M, F] halves with a cat (chunk's backward), which at d_model 64 and K = 8 costs
    as much as a matmul (a memory-bound copy of the whole tensor). Same values bit for bit,
    gradients too (the same ops as autograd's: up's is g * silu(gate), gate's is
    silu_backward(g * up, gate))."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        silu = F.silu(gate)
        ctx.save_for_backward(gate_up, silu)
        return silu * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, silu = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        grad_gate, grad_up = out.chunk(2, dim=-1)
        torch.mul(grad, silu, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2F], gate its first F columns."""
    if _plain(gate_up):
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def feed_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The dense SwiGLU MLP down(silu(gate(x)) * up(x)) per member: x [K, M, d],
    gate_up [K, 2F, d] (gate and up in one matmul), down [K, d, F] (weights as `linear`'s)."""
    return linear(swiglu(linear(x, gate_up)), down)


# ---------------------------------------------------------------- attention

def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim/2] of the rotary embedding (RoFormer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x [B, H, T, h] (the 'half' layout).
    The reference that apply_rotary_rolled is tested against."""
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


def rotary_rows(cos2: torch.Tensor, sin2: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `seq` rows of rotary_pair_tables' tables [max_seq_len, h], shaped
    [T, 1, 1, h] for `attention`; a sequence longer than the tables is refused."""
    if seq > cos2.shape[0]:
        raise ValueError(f"sequence length {seq} exceeds max_seq_len={cos2.shape[0]}")
    return cos2[:seq].view(seq, 1, 1, -1), sin2[:seq].view(seq, 1, 1, -1)


def attention(x: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, batch: int, seq: int, n_heads: int,
              cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """Causal self-attention per member: x [K, B*T, d] (B sequences of T rows), qkv
    [K, 3d, d] (q, k, v stacked in nn.Linear's layout), out [K, d, d] (weights as
    `linear`'s), rotary tables cos2, sin2 [T, 1, 1, head_dim] (rotary_pair_tables)
    -> [K, B*T, d]."""
    members, _, d_model = x.shape
    head_dim = d_model // n_heads
    qkv_rows = linear(x, qkv).view(members * batch, seq, 3, n_heads, head_dim)
    # q and k rotated together in qkv's layout, then [N, H, T, h] views.
    q, k = apply_rotary_rolled(qkv_rows[:, :, :2], cos2, sin2).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, qkv_rows[:, :, 2].transpose(1, 2), is_causal=True)
    return linear(y.transpose(1, 2).reshape(members, batch * seq, d_model), out)


# ---------------------------------------------------------------- the loss

class _CrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits [K, N, V] against target [K, N, 1] (int64):
    F.cross_entropy(reduction="none")'s values bit for bit (the negated log_softmax at the
    target), with a backward of three passes over the logits (exp of the saved
    log-probabilities times the upstream gradient, less it at the target) where autograd's
    takes five (nll_loss's zero-filled gradient, its scatter, log_softmax's backward);
    the gradients agree to rounding."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, target)
        return log_probs.gather(-1, target).squeeze(-1).neg_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_probs, target = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        return torch.exp(log_probs).mul_(grad).scatter_add_(-1, target, grad.neg()), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy [K, N] (nats) of logits [K, N, V] against targets [N], the
    same rows for every member. bf16/fp16 logits are taken in float32."""
    members, rows, vocab = logits.shape
    if _plain(logits):
        return _CrossEntropy.apply(logits, targets.reshape(1, rows, 1).expand(members, rows, 1))
    losses = F.cross_entropy(upcast(logits).reshape(-1, vocab), targets.reshape(-1).repeat(members), reduction="none")
    return losses.view(members, rows)
