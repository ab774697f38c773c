"""MoE token dispatch ops: route, permute (tokens -> rows grouped by expert), unpermute.

Data flow of one MoE layer (T tokens, hidden size H, E experts, k experts per token):

    logits [T, E] --moe_route--> expert_ids [T, k] int32, weights [T, k], counts [E] int64
    x [T, H] --moe_permute--> permuted [R, H]: rows grouped by expert, token order kept
                              row_map [T, k] int64: row of each (token, slot), -1 if dropped
                              src_index [R] int64: flat slot t*k+j of each row, -1 for padding
                              offsets [E+1] int64: expert e owns rows offsets[e]:offsets[e+1]
                              dropped [] int64: slots dropped by the capacity
    expert outputs [R, H] --moe_unpermute--> [T, H] = sum_j weights[t, j] * y[row_map[t, j]]

(The raw op torch.ops.steplaw.moe_route returns (weights, expert_ids, counts): the float
output first, as autograd tooling expects; the wrapper moe_route reorders.)

R is known before any kernel runs (no host sync, works under torch.compile and CUDA
graphs): T*k when dropless and unpadded; the upper bound T*k + E*(pad_multiple-1) when
each expert's group is padded to a multiple of `pad_multiple`; E*capacity' (capacity
rounded up to pad_multiple) with a capacity. Padding and unused rows are zero.

Each op has three implementations that agree: CUDA (csrc/moe/moe_cuda.cu), C++ CPU
(csrc/moe/moe_cpu.cpp) and the pure-PyTorch reference below, used when the compiled
kernel is missing and as the tests' oracle. Permuted rows and unpermuted outputs are
bitwise identical across the three (same gather order, fp32 accumulation in slot order
j = 0..k-1); the routing weights and the weight gradients are reductions and agree to
rounding. All backward kernels are deterministic: each output element is written by one
thread, with no float atomics (there is no non-deterministic fast path).
"""
from __future__ import annotations

import math

import torch

from steplaw.errors import UserError
from steplaw.ops._loader import has_kernel, load_extension, register_op_names

OP_NAMES = ("moe_route", "moe_permute", "moe_permute_backward", "moe_unpermute", "moe_unpermute_backward")
register_op_names(*OP_NAMES)

SCORE_FUNCS = ("softmax", "sigmoid")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_up(n, multiple: int):
    return (n + multiple - 1) // multiple * multiple


def permuted_rows(num_tokens: int, top_k: int, num_experts: int, pad_multiple: int = 1, capacity: int = 0) -> int:
    """Rows of moe_permute's output: known from the shapes alone (an upper bound when padded)."""
    if capacity > 0:
        return num_experts * round_up(capacity, pad_multiple)
    return num_tokens * top_k + num_experts * (pad_multiple - 1)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Tokens one expert may take, ceil(capacity_factor * T * k / E); 0 means dropless."""
    if capacity_factor is None:
        return 0
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


# --------------------------------------------------------------------------------------
# Pure-PyTorch reference (differentiable through ordinary autograd)
# --------------------------------------------------------------------------------------

def _routing_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    l = logits.to(_compute_dtype(logits.dtype))
    return torch.softmax(l, dim=-1) if score_func == "softmax" else torch.sigmoid(l)


def route_reference(logits, top_k: int, score_func: str = "softmax", renormalize: bool = True, bias=None):
    """Top-k routing. Selection by score (+ bias, which affects selection only); ties
    go to the lower expert index; the k ids of a token are in descending selection score."""
    _check_route_args(logits, top_k, score_func, bias)
    num_experts = logits.shape[1]
    scores = _routing_scores(logits, score_func)
    select = scores.detach()
    if bias is not None:
        select = select + bias.to(select.dtype)
    ids = torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    return ids.to(torch.int32), weights, counts


def permute_reference(x, expert_ids, num_experts: int, pad_multiple: int = 1, capacity: int = 0):
    _check_permute_args(x, expert_ids, num_experts, pad_multiple, capacity)
    num_tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    device = x.device
    flat = expert_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        bad = int(flat.min()) if int(flat.min()) < 0 else int(flat.max())
        raise UserError(f"expert id {bad} is out of range: expected ids in [0, {num_experts})")
    order = torch.sort(flat, stable=True).indices  # slots grouped by expert, token order kept
    counts = torch.bincount(flat, minlength=num_experts)
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=device) - first_of_expert[sorted_experts]
    if capacity > 0:
        group = torch.full((num_experts,), round_up(capacity, pad_multiple), dtype=torch.long, device=device)
        keep = rank < capacity
        dropped = (counts - capacity).clamp(min=0).sum()
    else:
        group = round_up(counts, pad_multiple)
        keep = torch.ones_like(rank, dtype=torch.bool)
        dropped = torch.zeros((), dtype=torch.long, device=device)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(group, 0)])
    rows = offsets[sorted_experts] + rank
    num_rows = permuted_rows(num_tokens, top_k, num_experts, pad_multiple, capacity)
    row_map = torch.full((flat.numel(),), -1, dtype=torch.long, device=device)
    row_map[order[keep]] = rows[keep]
    src_index = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    src_index[rows[keep]] = order[keep]
    with_zero_row = torch.cat([x, x.new_zeros(1, hidden)])
    token = torch.where(src_index >= 0, src_index // top_k, num_tokens)
    permuted = with_zero_row.index_select(0, token)
    return permuted, row_map.view(num_tokens, top_k), src_index, offsets, dropped


def unpermute_reference(y, row_map, src_index, weights):
    """out[t] = sum_j weights[t, j] * y[row_map[t, j]], accumulated in fp32 (fp64 for
    fp64) in slot order, skipping dropped slots (row -1)."""
    _check_unpermute_args(y, row_map, src_index, weights)
    num_tokens, top_k = row_map.shape
    acc_dtype = _compute_dtype(y.dtype)
    with_zero_row = torch.cat([y, y.new_zeros(1, y.shape[1])])
    rows = torch.where(row_map >= 0, row_map, y.shape[0])
    acc = y.new_zeros(num_tokens, y.shape[1], dtype=acc_dtype)
    for j in range(top_k):
        term = with_zero_row.index_select(0, rows[:, j]).to(acc_dtype) * weights[:, j : j + 1].to(acc_dtype)
        acc = term if j == 0 else acc + term
    return acc.to(y.dtype)


# --------------------------------------------------------------------------------------
# Argument checks shared by the wrappers and the reference (the C++ kernels repeat them)
# --------------------------------------------------------------------------------------

def _check_route_args(logits, top_k, score_func, bias):
    if logits.dim() != 2 or not logits.is_floating_point():
        raise UserError(f"router logits of shape {tuple(logits.shape)} and dtype {logits.dtype}: expected a float tensor [tokens, experts]")
    num_experts = logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise UserError(f"top_k={top_k}: expected 1 <= top_k <= number of experts ({num_experts})")
    if score_func not in SCORE_FUNCS:
        raise UserError(f"score_func={score_func!r}: expected one of {SCORE_FUNCS}")
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise UserError(f"expert bias of shape {tuple(bias.shape)}: expected [{num_experts}]")


def _check_permute_args(x, expert_ids, num_experts, pad_multiple, capacity):
    if x.dim() != 2:
        raise UserError(f"tokens of shape {tuple(x.shape)}: expected [tokens, hidden]")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0]:
        raise UserError(f"expert ids of shape {tuple(expert_ids.shape)}: expected [{x.shape[0]}, top_k] to match the tokens")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise UserError(f"expert ids of dtype {expert_ids.dtype}: expected torch.int32")
    if num_experts < 1 or not 1 <= expert_ids.shape[1] <= num_experts:
        raise UserError(f"top_k={expert_ids.shape[1]} with num_experts={num_experts}: expected 1 <= top_k <= num_experts")
    if pad_multiple < 1 or capacity < 0:
        raise UserError(f"pad_multiple={pad_multiple}, capacity={capacity}: expected pad_multiple >= 1 and capacity >= 0")


def _check_unpermute_args(y, row_map, src_index, weights):
    if y.dim() != 2 or row_map.dim() != 2 or src_index.dim() != 1 or src_index.shape[0] != y.shape[0]:
        raise UserError(
            f"expert outputs {tuple(y.shape)}, row map {tuple(row_map.shape)}, src index {tuple(src_index.shape)}: "
            "expected [rows, hidden], [tokens, top_k] and [rows] from moe_permute")
    if tuple(weights.shape) != tuple(row_map.shape):
        raise UserError(f"combine weights of shape {tuple(weights.shape)}: expected {tuple(row_map.shape)} like the row map")


# --------------------------------------------------------------------------------------
# Public wrappers: the compiled op where a kernel exists for the device, else the reference
# --------------------------------------------------------------------------------------

_HAVE_SCHEMA = load_extension() and hasattr(torch.ops.steplaw, "moe_permute")
_KERNELS = {(name, dev): has_kernel(name, dev) for name in OP_NAMES for dev in ("cpu", "cuda")}


def _use_kernel(name: str, tensor: torch.Tensor) -> bool:
    return _KERNELS.get((name, tensor.device.type), False)


def moe_route(logits, top_k: int, score_func: str = "softmax", renormalize: bool = True, bias=None):
    """Router logits [T, E] -> (expert_ids [T, k] int32, weights [T, k], counts [E] int64).

    score_func "softmax": softmax over the E experts, then top-k; "sigmoid": sigmoid
    scores, then top-k (DeepSeek-V3). `bias` [E] is added to the scores for selection
    only (auxiliary-loss-free balancing); the weights are the unbiased scores of the
    chosen experts, renormalised to sum to 1 per token when `renormalize`. Weights are
    fp32 (fp64 for fp64 logits) and differentiable w.r.t. the logits. counts[e] = how
    many of the T*k slots chose expert e.
    """
    _check_route_args(logits, top_k, score_func, bias)
    if _use_kernel("moe_route", logits):
        # The op returns the float output first (autograd tooling sums outputs in order).
        weights, expert_ids, counts = torch.ops.steplaw.moe_route(logits, top_k, score_func, renormalize, bias)
        return expert_ids, weights, counts
    return route_reference(logits, top_k, score_func, renormalize, bias)


def moe_permute(x, expert_ids, num_experts: int, pad_multiple: int = 1, capacity: int = 0):
    """Tokens x [T, H] -> (permuted [R, H], row_map [T, k], src_index [R], offsets [E+1], dropped []).

    Rows are grouped by expert in expert order, and within an expert in token order.
    pad_multiple pads each expert's group with zero rows to a multiple of it (for grouped
    GEMMs); capacity > 0 keeps at most `capacity` tokens per expert (the first in token
    order) and drops the rest (row_map -1, counted in `dropped`). Differentiable w.r.t. x.
    Ids must lie in [0, E): a UserError on CPU; on CUDA a device-side assert (checking
    there would wait for the GPU).
    """
    _check_permute_args(x, expert_ids, num_experts, pad_multiple, capacity)
    if expert_ids.dtype != torch.int32:
        expert_ids = expert_ids.to(torch.int32)
    if _use_kernel("moe_permute", x):
        return torch.ops.steplaw.moe_permute(x, expert_ids, num_experts, pad_multiple, capacity)
    return permute_reference(x, expert_ids, num_experts, pad_multiple, capacity)


def moe_unpermute(y, row_map, src_index, weights):
    """Expert outputs y [R, H] -> [T, H]: out[t] = sum_j weights[t, j] * y[row_map[t, j]].

    row_map and src_index come from moe_permute. Accumulates in fp32 (fp64 for fp64),
    returns y's dtype. Differentiable w.r.t. y and weights (deterministic backward).
    """
    _check_unpermute_args(y, row_map, src_index, weights)
    if _use_kernel("moe_unpermute", y):
        return torch.ops.steplaw.moe_unpermute(y, row_map, src_index, weights)
    return unpermute_reference(y, row_map, src_index, weights)


# --------------------------------------------------------------------------------------
# Fake kernels and autograd of the compiled ops
# --------------------------------------------------------------------------------------

def _route_backward_math(logits, expert_ids, score_func: str, renormalize: bool, grad_weights):
    """d loss / d logits from d loss / d weights (pure torch; small [T, E] math)."""
    scores = _routing_scores(logits, score_func)
    ids = expert_ids.long()
    chosen = scores.gather(1, ids)
    grad_chosen = grad_weights.to(scores.dtype)
    if renormalize:
        total = chosen.sum(dim=-1, keepdim=True)
        weights = chosen / total
        grad_chosen = (grad_chosen - (grad_chosen * weights).sum(dim=-1, keepdim=True)) / total
    grad_scores = torch.zeros_like(scores).scatter_add(1, ids, grad_chosen)
    if score_func == "softmax":
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
    else:
        grad_logits = grad_scores * scores * (1 - scores)
    return grad_logits.to(logits.dtype)


if _HAVE_SCHEMA:

    @torch.library.register_fake("steplaw::moe_route")
    def _route_fake(logits, k, score_func, renormalize, bias):
        num_tokens, num_experts = logits.shape
        weights_dtype = _compute_dtype(logits.dtype)
        return (logits.new_empty(num_tokens, k, dtype=weights_dtype),
                logits.new_empty(num_tokens, k, dtype=torch.int32),
                logits.new_empty(num_experts, dtype=torch.int64))

    def _route_setup(ctx, inputs, output):
        logits, k, score_func, renormalize, bias = inputs
        ctx.score_func, ctx.renormalize = score_func, renormalize
        ctx.save_for_backward(logits, output[1])

    def _route_backward(ctx, grad_weights, grad_ids, grad_counts):
        logits, expert_ids = ctx.saved_tensors
        grad_logits = _route_backward_math(logits, expert_ids, ctx.score_func, ctx.renormalize, grad_weights)
        return grad_logits, None, None, None, None

    torch.library.register_autograd("steplaw::moe_route", _route_backward, setup_context=_route_setup)

    @torch.library.register_fake("steplaw::moe_permute")
    def _permute_fake(x, expert_ids, num_experts, pad_multiple, capacity):
        num_tokens, top_k = expert_ids.shape
        rows = permuted_rows(num_tokens, top_k, num_experts, pad_multiple, capacity)
        return (x.new_empty(rows, x.shape[1]),
                x.new_empty(num_tokens, top_k, dtype=torch.int64),
                x.new_empty(rows, dtype=torch.int64),
                x.new_empty(num_experts + 1, dtype=torch.int64),
                x.new_empty((), dtype=torch.int64))

    def _permute_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _permute_backward(ctx, grad_permuted, *unused):
        (row_map,) = ctx.saved_tensors
        return torch.ops.steplaw.moe_permute_backward(grad_permuted.contiguous(), row_map), None, None, None, None

    torch.library.register_autograd("steplaw::moe_permute", _permute_backward, setup_context=_permute_setup)

    @torch.library.register_fake("steplaw::moe_permute_backward")
    def _permute_backward_fake(grad_permuted, row_map):
        return grad_permuted.new_empty(row_map.shape[0], grad_permuted.shape[1])

    @torch.library.register_fake("steplaw::moe_unpermute")
    def _unpermute_fake(y, row_map, src_index, weights):
        return y.new_empty(row_map.shape[0], y.shape[1])

    def _unpermute_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _unpermute_backward(ctx, grad_out):
        y, row_map, src_index, weights = ctx.saved_tensors
        grad_y, grad_weights = torch.ops.steplaw.moe_unpermute_backward(grad_out.contiguous(), y, row_map, src_index, weights)
        return grad_y, None, None, grad_weights

    torch.library.register_autograd("steplaw::moe_unpermute", _unpermute_backward, setup_context=_unpermute_setup)

    @torch.library.register_fake("steplaw::moe_unpermute_backward")
    def _unpermute_backward_fake(grad_out, y, row_map, src_index, weights):
        return torch.empty_like(y), torch.empty_like(weights)
