"""MoE token dispatch ops: route, permute (tokens -> rows grouped by expert), unpermute.

Data flow of one MoE layer (T tokens, hidden size H, E experts, k experts per token):

    logits [T, E] --moe_route--> expert_ids [T, k] int32, weights [T, k], counts [E] int64
    x [T, H] --moe_permute--> permuted [R, H]: rows grouped by expert, token order kept
                              row_map [T, k] int64: row of each (token, slot), -1 if dropped
                              src_index [R] int64: flat slot t*k+j of each row, -1 for padding
                              offsets [E+1] int64: expert e owns rows offsets[e]:offsets[e+1]
                              dropped [] int64: slots dropped by the capacity
    expert outputs [R, H] --moe_unpermute--> [T, H] = sum_j weights[t, j] * y[row_map[t, j]]

R is known before any kernel runs (no host sync, works under torch.compile and CUDA
graphs): T*k when dropless and unpadded; the upper bound T*k + E*(pad_multiple-1) when
each expert's group is padded to a multiple of `pad_multiple`; E*capacity' (capacity
rounded up to pad_multiple) with a capacity. Padding and unused rows are zero.

Each op has three implementations that agree: CUDA (csrc/moe/moe_cuda.cu), C++ CPU
(csrc/moe/moe_cpu.cpp) and the pure-PyTorch reference below, registered as the op's
fallback kernel (steplaw.ops._loader.define_op) and used by the tests as the oracle.
The wrappers call torch.ops.steplaw.* and return what the ops return. Permuted rows
and unpermuted outputs are bitwise identical across the three (same gather order, fp32
accumulation in slot order j = 0..k-1); the routing weights and the weight gradients are
reductions and agree to rounding. All backward kernels are deterministic: each output
element is written by one thread, with no float atomics.

NaN router scores rank above every number (NaNs among themselves by expert index), as
in torch.topk: a NaN logit's expert is chosen and its NaN weight reaches the token's
output, so a diverged router shows up in the loss at once (csrc/moe/moe_index.h says
why). Bad arguments raise ValueError with the same sentence from every implementation.
"""
from __future__ import annotations

import math

import torch

from steplaw.ops._loader import define_op, op_error

SCHEMAS = {  # as in csrc/steplaw.cpp
    "moe_route": "(Tensor logits, int k, str score_func, bool renormalize, Tensor? bias) "
                 "-> (Tensor expert_ids, Tensor weights, Tensor counts)",
    "moe_permute": "(Tensor x, Tensor expert_ids, int num_experts, int pad_multiple, int capacity) "
                   "-> (Tensor permuted, Tensor row_map, Tensor src_index, Tensor offsets, Tensor dropped)",
    "moe_permute_backward": "(Tensor grad_permuted, Tensor row_map) -> Tensor",
    "moe_unpermute": "(Tensor y, Tensor row_map, Tensor src_index, Tensor weights) -> Tensor",
    "moe_unpermute_backward": "(Tensor grad_out, Tensor y, Tensor row_map, Tensor src_index, Tensor weights) "
                              "-> (Tensor grad_y, Tensor grad_weights)",
}
OP_NAMES = tuple(SCHEMAS)
SCORE_FUNCS = ("softmax", "sigmoid")
_INT32_MAX = 2**31 - 1


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
# Argument checks: csrc/moe/moe_checks.h, same order, same sentences
# --------------------------------------------------------------------------------------

def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))  # as C++ prints sizes: [4, 3]


def _check(ok, message: str) -> None:
    if not ok:
        raise op_error(message)


def _check_route_args(logits, top_k, score_func, bias):
    _check(logits.dim() == 2 and logits.is_floating_point(), f"router logits of shape {_shape(logits)} and dtype "
           f"{logits.dtype}: expected a float tensor [tokens, experts]")
    experts = logits.shape[1]
    _check(1 <= top_k <= experts, f"top_k={top_k}: expected 1 <= top_k <= number of experts ({experts})")
    _check(experts <= _INT32_MAX, f"number of experts {experts}: expected at most 2^31-1")
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == experts, f"expert bias of shape {_shape(bias)}: expected [{experts}]")
        _check(bias.device == logits.device, f"expert bias on {bias.device}: expected it on {logits.device} like the logits")
    _check(score_func in SCORE_FUNCS, f"score_func='{score_func}': expected one of ('softmax', 'sigmoid')")


def _check_permute_args(x, expert_ids, num_experts, pad_multiple, capacity):
    _check(x.dim() == 2, f"tokens of shape {_shape(x)}: expected [tokens, hidden]")
    _check(expert_ids.dim() == 2 and expert_ids.shape[0] == x.shape[0],
           f"expert ids of shape {_shape(expert_ids)}: expected [{x.shape[0]}, top_k] to match the tokens")
    _check(expert_ids.dtype in (torch.int32, torch.int64),
           f"expert ids of dtype {expert_ids.dtype}: expected torch.int32 or torch.int64")
    _check(1 <= num_experts <= _INT32_MAX and 1 <= expert_ids.shape[1] <= num_experts,
           f"top_k={expert_ids.shape[1]} with num_experts={num_experts}: expected 1 <= top_k <= num_experts <= 2^31-1")
    _check(pad_multiple >= 1 and capacity >= 0,
           f"pad_multiple={pad_multiple}, capacity={capacity}: expected pad_multiple >= 1 and capacity >= 0")
    _check(expert_ids.device == x.device, f"expert ids on {expert_ids.device}: expected them on {x.device} like the tokens")


def _check_expert_ids_in_range(flat_ids: torch.Tensor, num_experts: int) -> None:
    """The first id outside [0, E) in slot order, as the CPU kernel reports it (int64
    values, before any cast)."""
    bad = (flat_ids < 0) | (flat_ids >= num_experts)
    if bool(bad.any()):
        first = int(flat_ids[bad.nonzero()[0, 0]])
        raise op_error(f"expert id {first} is out of range: expected ids in [0, {num_experts})")


def _check_unpermute_args(y, row_map, src_index, weights):
    _check(y.dim() == 2 and row_map.dim() == 2 and src_index.dim() == 1 and src_index.shape[0] == y.shape[0],
           f"expert outputs {_shape(y)}, row map {_shape(row_map)}, src index {_shape(src_index)}: "
           "expected [rows, hidden], [tokens, top_k] and [rows] from moe_permute")
    _check(weights.shape == row_map.shape,
           f"combine weights of shape {_shape(weights)}: expected {_shape(row_map)} like the row map")
    _check(row_map.dtype == torch.int64 and src_index.dtype == torch.int64,
           f"row map and src index of dtypes {row_map.dtype}, {src_index.dtype}: "
           "expected torch.int64 as moe_permute returns them")
    _check(weights.is_floating_point(), f"combine weights of dtype {weights.dtype}: expected a float dtype")
    _check(row_map.device == y.device and src_index.device == y.device and weights.device == y.device,
           f"expert outputs, row map, src index and weights: expected all on {y.device}")


def _check_rows(row_map: torch.Tensor, rows: int) -> None:
    _check(not bool((row_map >= rows).any()), f"row map holds a row >= {rows}: expected rows of the permuted tensor")


def _check_permute_backward_args(grad_permuted, row_map):
    _check(grad_permuted.dim() == 2 and row_map.dim() == 2 and row_map.dtype == torch.int64,
           f"grad of shape {_shape(grad_permuted)} and row map {_shape(row_map)}: "
           "expected [rows, hidden] and an int64 [tokens, top_k]")
    _check(row_map.device == grad_permuted.device,
           f"row map on {row_map.device}: expected it on {grad_permuted.device} like the grad")


def _check_unpermute_backward_args(grad_out, y, row_map, src_index, weights):
    _check_unpermute_args(y, row_map, src_index, weights)
    _check(grad_out.dim() == 2 and grad_out.shape[0] == row_map.shape[0] and grad_out.shape[1] == y.shape[1]
           and grad_out.dtype == y.dtype and grad_out.device == y.device,
           f"grad of shape {_shape(grad_out)} and dtype {grad_out.dtype}: expected [{row_map.shape[0]}, "
           f"{y.shape[1]}] of dtype {y.dtype} on {y.device}")


# --------------------------------------------------------------------------------------
# Pure-PyTorch references (the ops' fallback kernels; differentiable when called directly)
# --------------------------------------------------------------------------------------

def _routing_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    scores = logits.to(_compute_dtype(logits.dtype))
    return torch.softmax(scores, dim=-1) if score_func == "softmax" else torch.sigmoid(scores)


def route_reference(logits, k: int, score_func: str = "softmax", renormalize: bool = True, bias=None):
    """Top-k routing -> (expert_ids, weights, counts). Selection by score (+ bias, which
    affects selection only); ties go to the lower expert index, NaN ranks first (as
    torch.sort); the k ids of a token are in descending selection score."""
    _check_route_args(logits, k, score_func, bias)
    scores = _routing_scores(logits, score_func)
    select = scores.detach()
    if bias is not None:
        select = select + bias.to(select.dtype)
    ids = torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts = torch.bincount(ids.reshape(-1), minlength=logits.shape[1])
    return ids.to(torch.int32), weights, counts


def permute_reference(x, expert_ids, num_experts: int, pad_multiple: int = 1, capacity: int = 0):
    _check_permute_args(x, expert_ids, num_experts, pad_multiple, capacity)
    num_tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    device = x.device
    flat = expert_ids.reshape(-1).long()
    _check_expert_ids_in_range(flat, num_experts)
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


def _combine(y, row_map, weights):
    """out[t] = sum_j w[t, j] * y[row_map[t, j]] (w = 1 when None), accumulated in fp32
    (fp64 for fp64) in slot order, skipping dropped slots (row -1)."""
    _check_rows(row_map, y.shape[0])
    num_tokens, top_k = row_map.shape
    acc_dtype = _compute_dtype(y.dtype)
    with_zero_row = torch.cat([y, y.new_zeros(1, y.shape[1])])
    rows = torch.where(row_map >= 0, row_map, y.shape[0])
    acc = y.new_zeros(num_tokens, y.shape[1], dtype=acc_dtype)
    for j in range(top_k):
        term = with_zero_row.index_select(0, rows[:, j]).to(acc_dtype)
        if weights is not None:
            term = term * weights[:, j: j + 1].to(acc_dtype)
        acc = term if j == 0 else acc + term
    return acc.to(y.dtype)


def unpermute_reference(y, row_map, src_index, weights):
    _check_unpermute_args(y, row_map, src_index, weights)
    return _combine(y, row_map, weights)


def permute_backward_reference(grad_permuted, row_map):
    """d loss / d x of moe_permute: the sum of each token's k row gradients."""
    _check_permute_backward_args(grad_permuted, row_map)
    return _combine(grad_permuted, row_map, None)


def unpermute_backward_reference(grad_out, y, row_map, src_index, weights):
    """grad_y[row_map[t, j]] = w[t, j] * grad_out[t] (zero for rows no slot maps to) and
    grad_w[t, j] = <grad_out[t], y[row_map[t, j]]> (0 for dropped slots)."""
    _check_unpermute_backward_args(grad_out, y, row_map, src_index, weights)
    acc_dtype = _compute_dtype(y.dtype)
    valid = (row_map >= 0) & (row_map < y.shape[0])
    rows = torch.where(valid, row_map, 0)
    g = grad_out.to(acc_dtype)
    w = weights.to(acc_dtype)
    grad_y = torch.zeros_like(y)
    flat_rows, flat_valid = rows.reshape(-1), valid.reshape(-1)
    per_slot = (g.unsqueeze(1) * w.unsqueeze(2)).to(y.dtype).reshape(-1, y.shape[1])
    grad_y[flat_rows[flat_valid]] = per_slot[flat_valid]
    dots = (g.unsqueeze(1) * y[rows].to(acc_dtype)).sum(-1)
    grad_w = torch.where(valid, dots, torch.zeros_like(dots))
    return grad_y, grad_w.to(weights.dtype)


# --------------------------------------------------------------------------------------
# Registration: schemas, reference kernels, fake kernels, autograd
# --------------------------------------------------------------------------------------

_REFERENCES = {
    "moe_route": route_reference,
    "moe_permute": permute_reference,
    "moe_permute_backward": permute_backward_reference,
    "moe_unpermute": unpermute_reference,
    "moe_unpermute_backward": unpermute_backward_reference,
}
for _name in OP_NAMES:
    define_op(_name, SCHEMAS[_name], _REFERENCES[_name])


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


@torch.library.register_fake("steplaw::moe_route")
def _route_fake(logits, k, score_func, renormalize, bias):
    num_tokens, num_experts = logits.shape
    return (logits.new_empty(num_tokens, k, dtype=torch.int32),
            logits.new_empty(num_tokens, k, dtype=_compute_dtype(logits.dtype)),
            logits.new_empty(num_experts, dtype=torch.int64))


def _route_setup(ctx, inputs, output):
    logits, k, score_func, renormalize, bias = inputs
    ctx.score_func, ctx.renormalize = score_func, renormalize
    ctx.save_for_backward(logits, output[0])


def _route_backward(ctx, grad_ids, grad_weights, grad_counts):
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


# --------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------

def moe_route(logits, top_k: int, score_func: str = "softmax", renormalize: bool = True, bias=None):
    """Router logits [T, E] -> (expert_ids [T, k] int32, weights [T, k], counts [E] int64).

    score_func "softmax": softmax over the E experts, then top-k; "sigmoid": sigmoid
    scores, then top-k (DeepSeek-V3). `bias` [E] is added to the scores for selection
    only (auxiliary-loss-free balancing); the weights are the unbiased scores of the
    chosen experts, renormalised to sum to 1 per token when `renormalize`. Weights are
    fp32 (fp64 for fp64 logits) and differentiable w.r.t. the logits. counts[e] = how
    many of the T*k slots chose expert e. A NaN score ranks above every number.
    """
    return torch.ops.steplaw.moe_route(logits, top_k, score_func, renormalize, bias)


def moe_permute(x, expert_ids, num_experts: int, pad_multiple: int = 1, capacity: int = 0):
    """Tokens x [T, H] -> (permuted [R, H], row_map [T, k], src_index [R], offsets [E+1], dropped []).

    Rows are grouped by expert in expert order, and within an expert in token order.
    pad_multiple pads each expert's group with zero rows to a multiple of it (for grouped
    GEMMs); capacity > 0 keeps at most `capacity` tokens per expert (the first in token
    order) and drops the rest (row_map -1, counted in `dropped`). Differentiable w.r.t. x.
    expert_ids are int32 or int64 and must lie in [0, E): a ValueError on CPU; on CUDA a
    device-side assert (checking there would wait for the GPU).
    """
    return torch.ops.steplaw.moe_permute(x, expert_ids, num_experts, pad_multiple, capacity)


def moe_unpermute(y, row_map, src_index, weights):
    """Expert outputs y [R, H] -> [T, H]: out[t] = sum_j weights[t, j] * y[row_map[t, j]].

    row_map and src_index come from moe_permute. Accumulates in fp32 (fp64 for fp64),
    returns y's dtype. Differentiable w.r.t. y and weights (deterministic backward).
    """
    return torch.ops.steplaw.moe_unpermute(y, row_map, src_index, weights)
