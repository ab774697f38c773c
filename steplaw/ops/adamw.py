"""steplaw::fused_adamw_ — one in-place AdamW step over many parameters.

The schema (csrc/steplaw.cpp, repeated in SCHEMA below for builds without _C):

    fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,
                 Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs,
                 Tensor(e!)[] master_params, Tensor(f!)[] steps, Tensor hparams,
                 int[] group_index, bool amsgrad, Tensor? grad_scale=None,
                 Tensor? found_inf=None, int[]? members=None) -> ()

Why this shape: parameters of every param group go in ONE call (one parallel region on
CPU, one multi-tensor launch per dtype on CUDA); `group_index[i]` picks parameter i's
first row of the float64 table `hparams` [rows, 7] = (lr, beta1, beta2, weight_decay,
eps, maximize, is_member), which lives on the parameters' device, so an lr tensor is
copied into it on the device and nothing syncs with the host. `steps` (0-d float32, on
the device) are read by the kernel and incremented by the op, as torch's fused AdamW
does, and left alone when `found_inf` is nonzero (GradScaler skipped the step: nothing
changes). amsgrad and master weights are whole-call switches (`max_exp_avg_sqs` /
`master_params` empty when off) because a list entry cannot be "absent" in a schema
with alias annotations; the optimizer issues at most one call per (amsgrad, master)
combination. Gradients are read only: GradScaler's scale is divided out in registers
(torch's fused kernel also writes the unscaled gradient back; this op does not).

Stacked parameters (K runs trained as one model): `members[i]` = K says that parameter
i has a leading member dimension of size K; member k = params[i][k] (and the same slice
of its grad and state) is updated with row group_index[i] + k. Rows with is_member = 1
and lr exactly 0 are frozen: that member's slices of the param and of every state
tensor are not written at all, whatever its gradient holds (csrc/adamw/adamw_math.h).
The step count is per tensor, shared by its members.

State dtype: float32 for float32/bf16/fp16 params, float64 for float64 params;
master_params (float32) hold the parameter value the update is applied to, and the
low-precision parameter receives its rounded copy.
"""
from __future__ import annotations

import math

import torch

from steplaw.ops._loader import define_op, op_error

OP_NAME = "fused_adamw_"
QUALNAME = f"steplaw::{OP_NAME}"
SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
    "Tensor(f!)[] steps, Tensor hparams, int[] group_index, bool amsgrad, "
    "Tensor? grad_scale=None, Tensor? found_inf=None, int[]? members=None) -> ()"
)
# Columns of `hparams`, as in csrc/adamw/adamw_math.h.
HPARAM_COLUMNS = ("lr", "beta1", "beta2", "weight_decay", "eps", "maximize", "is_member")
LR, BETA1, BETA2, WEIGHT_DECAY, EPS, MAXIMIZE, IS_MEMBER = range(len(HPARAM_COLUMNS))


def _coefficients(rows: torch.Tensor, step: torch.Tensor, math_dtype: torch.dtype):
    """Coefficients of the K members whose hparams rows are `rows` [K, 7], computed in
    float64 and rounded once to the math dtype, as make_coeffs in adamw_math.h; [K, 1]
    tensors (no host sync), plus `frozen` [K, 1] (row_frozen)."""
    if rows.device.type == "cpu" and step.device.type == "cpu":
        # On the CPU reading the values costs no sync; Python floats give C's pow, which
        # the kernels use (torch's vectorised pow may differ in the last bit).
        step_value = float(step) + 1
        values = rows.tolist()
        beta1_pow = torch.tensor([math.pow(r[BETA1], step_value) for r in values], dtype=torch.float64)
        beta2_pow = torch.tensor([math.pow(r[BETA2], step_value) for r in values], dtype=torch.float64)
        rows = torch.tensor(values, dtype=torch.float64)
    else:
        step = step.to(torch.float64) + 1
        beta1_pow, beta2_pow = rows[:, BETA1] ** step, rows[:, BETA2] ** step
    lr, beta1, beta2, weight_decay, eps, maximize, is_member = (col.unsqueeze(1) for col in rows.unbind(1))
    bias_correction1 = 1 - beta1_pow.unsqueeze(1)
    bias_correction2 = 1 - beta2_pow.unsqueeze(1)
    lerp_weight = (1 - beta1).to(math_dtype)
    return dict(
        lerp_weight=lerp_weight,
        lerp_weight_m1=lerp_weight - 1,
        lerp_small=lerp_weight.abs() < 0.5,
        beta2=beta2.to(math_dtype),
        one_minus_beta2=(1 - beta2).to(math_dtype),
        decay_factor=(1 - lr * weight_decay).to(math_dtype),
        neg_step_size=(-(lr / bias_correction1)).to(math_dtype),
        bc2_sqrt=bias_correction2.sqrt().to(math_dtype),
        eps=eps.to(math_dtype),
        maximize=maximize != 0,
        frozen=(is_member != 0) & (lr == 0),
    )


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c rounded once, as the kernels' fma, for float32 math (the product of two
    floats is exact in float64); float64 math rounds twice (the oracle needs no more)."""
    if c.dtype == torch.float64:
        return a * b + c
    return (a.double() * b.double() + c.double()).to(c.dtype)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded sqrt, as the kernels' (torch's float32 CPU sqrt is not: it
    differs in the last bit for ~20% of inputs); float64 sqrt rounded to float32 is."""
    if x.dtype == torch.float64:
        return x.sqrt()
    return x.double().sqrt().to(x.dtype)


def reference_fused_adamw_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, hparams,
    group_index, amsgrad, grad_scale=None, found_inf=None, members=None,
) -> None:
    """Pure-PyTorch fused_adamw_: the fallback when no compiled kernel exists and the
    tests' oracle (run it on float64 copies for a float64 oracle). Same operation order
    and rounding points as the kernels; sync-free (found_inf and frozen members select
    with torch.where). Every tensor is viewed as [K, numel / K], one row per member."""
    _check_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, hparams,
                group_index, amsgrad, members)
    skip = None if found_inf is None else (found_inf.reshape(()) != 0)
    for i, param in enumerate(params):
        k = 1 if members is None else int(members[i])
        state_dtype = exp_avgs[i].dtype
        target = master_params[i] if master_params else param
        rows = hparams[group_index[i]: group_index[i] + k].to(param.device)
        c = _coefficients(rows, steps[i], state_dtype)
        shape = (k, param.numel() // k)
        p = _member_rows(target, state_dtype, shape)
        g = _member_rows(grads[i], state_dtype, shape)
        if grad_scale is not None:
            g = g / grad_scale.to(device=param.device, dtype=state_dtype).reshape(()).expand_as(g).contiguous()
        g = torch.where(c["maximize"], -g, g)
        p = p * c["decay_factor"]
        m, v = _member_rows(exp_avgs[i], state_dtype, shape), _member_rows(exp_avg_sqs[i], state_dtype, shape)
        m_new = torch.where(
            c["lerp_small"],
            _fma(c["lerp_weight"], g - m, m),
            _fma(c["lerp_weight_m1"], g - m, g),
        )
        v_new = _fma(c["one_minus_beta2"] * g, g, v * c["beta2"])
        second = v_new
        if amsgrad:
            vmax_new = torch.maximum(_member_rows(max_exp_avg_sqs[i], state_dtype, shape), v_new)
            second = vmax_new
        # Divisors expanded to full size: torch turns division by a 0-d CPU tensor into
        # multiplication by its reciprocal, which rounds differently from the kernels
        # (so does an expanded, stride-0 divisor: materialise it).
        denom = _sqrt(second) / c["bc2_sqrt"].expand_as(second).contiguous() + c["eps"]
        p = p + (c["neg_step_size"] * m_new) / denom

        keep = c["frozen"] if skip is None else (c["frozen"] | skip.to(param.device))
        keep = keep.expand(shape)
        _put(exp_avgs[i], m_new, keep)
        _put(exp_avg_sqs[i], v_new, keep)
        if amsgrad:
            _put(max_exp_avg_sqs[i], vmax_new, keep)
        if master_params:
            _put(master_params[i], p, keep)
        _put(param, p.to(param.dtype), keep)
        increment = 1 if skip is None else (~skip).to(torch.float32).to(steps[i].device)
        steps[i].add_(increment)


def _member_rows(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """`t` in the math dtype as [K, numel / K]: row k is member k."""
    return t.to(dtype).reshape(shape)


def _put(dst: torch.Tensor, new: torch.Tensor, keep: torch.Tensor) -> None:
    """dst := new ([K, n] rows) except where `keep` (frozen members, a skipped step)."""
    dst.copy_(torch.where(keep, dst.reshape(keep.shape), new.to(dst.dtype)).reshape(dst.shape))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise op_error(message)


def _sizes(t: torch.Tensor) -> str:
    return str(list(t.shape))  # as C++ prints sizes: [4, 3]


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, hparams,
                group_index, amsgrad, members) -> None:
    """The kernels' argument checks (stage_lists in csrc/adamw/adamw_common.h, then the
    dtype dispatch), same order, same sentences, all before anything is written."""
    n = len(params)
    _check(members is None or len(members) == n, f"fused_adamw_ expects one members entry per param, got "
           f"{0 if members is None else len(members)} for {n} params")
    lengths = (n, len(grads), len(exp_avgs), len(exp_avg_sqs), len(steps), len(group_index))
    _check(len(set(lengths)) == 1, "fused_adamw_ expects params, grads, exp_avgs, exp_avg_sqs, steps and "
           f"group_index of one length, got {', '.join(map(str, lengths))}")
    _check(not amsgrad or len(max_exp_avg_sqs) == n, f"fused_adamw_ with amsgrad expects one max_exp_avg_sq per "
           f"param, got {len(max_exp_avg_sqs)} for {n} params")
    _check(not master_params or len(master_params) == n, f"fused_adamw_ expects master_params to be empty or one "
           f"per param, got {len(master_params)} for {n} params")
    _check(hparams.dtype == torch.float64 and hparams.dim() == 2 and hparams.shape[1] == len(HPARAM_COLUMNS)
           and hparams.is_contiguous(), f"fused_adamw_ expects hparams as a contiguous float64 [groups, "
           f"{len(HPARAM_COLUMNS)}] table, got {hparams.dtype} {_sizes(hparams)}")
    for i, p in enumerate(params):
        _check_param(i, p, grads[i], hparams.shape[0], int(group_index[i]), 1 if members is None else int(members[i]))
        has_master = bool(master_params)
        _check(not has_master or p.dtype != torch.float64,
               f"param {i} is float64: master_params are for float32, bfloat16 and float16 params")
        state_dtype = torch.float32 if has_master or p.dtype != torch.float64 else torch.float64
        for s in (exp_avgs[i], exp_avg_sqs[i]) + ((max_exp_avg_sqs[i],) if amsgrad else ()):
            _check(s.dtype == state_dtype and s.shape == p.shape and s.device == p.device,
                   f"optimizer state of param {i} must be {state_dtype} with the param's shape and device, "
                   f"got {s.dtype} {_sizes(s)}")
        if has_master:
            m = master_params[i]
            _check(m.dtype == torch.float32 and m.shape == p.shape and m.device == p.device,
                   f"master param {i} must be float32 with the param's shape and device")
        _check(steps[i].numel() == 1 and steps[i].dtype == torch.float32 and steps[i].device == p.device,
               f"step {i} must be a one-element float32 tensor on the param's device")
    for p in params:
        _check(p.dtype in _KERNEL_DTYPES,
               f"fused_adamw_ supports float32, float64, bfloat16 and float16 params, got {p.dtype}")


def _check_param(i: int, p: torch.Tensor, grad: torch.Tensor, rows: int, first_row: int, k: int) -> None:
    """Param i's own checks: its members, hparams rows, dtype and gradient."""
    _check(k >= 1, f"members[{i}] = {k}: expected at least 1")
    _check(0 <= first_row and first_row + k <= rows,
           f"group_index[{i}] = {first_row} with {k} member(s) is outside the {rows} rows of hparams")
    _check(k == 1 or (p.dim() >= 1 and p.shape[0] == k), f"param {i} of shape {_sizes(p)} has {k} stacked "
           f"members: expected a leading member dimension of size {k}")
    _check(not p.is_complex() and p.is_floating_point(),
           f"fused_adamw_ supports real floating-point params, got {p.dtype}")
    _check(grad.layout == torch.strided, "fused_adamw_ does not support sparse gradients")
    _check(grad.dtype == p.dtype and grad.shape == p.shape and grad.device == p.device,
           f"grad {i} must match its param in dtype, shape and device")


# Schema from _C (or SCHEMA without it); the reference serves every device without a
# compiled kernel (e.g. CUDA tensors in a CPU-only build).
define_op(OP_NAME, SCHEMA, reference_fused_adamw_)


@torch.library.register_fake(QUALNAME)
def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                      steps, hparams, group_index, amsgrad, grad_scale=None, found_inf=None, members=None):
    return None



def fused_adamw_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
    master_params: list[torch.Tensor], steps: list[torch.Tensor], hparams: torch.Tensor,
    group_index: list[int], amsgrad: bool, grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None, members: list[int] | None = None,
) -> None:
    """One AdamW step in place (see the module docstring for the arguments)."""
    torch.ops.steplaw.fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, hparams,
        group_index, amsgrad, grad_scale, found_inf, members,
    )
