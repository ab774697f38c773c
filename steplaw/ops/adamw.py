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

from steplaw.ops._loader import load_extension, register_op_names

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
    skip = None if found_inf is None else (found_inf.reshape(()) != 0)
    for i, param in enumerate(params):
        k = 1 if members is None else int(members[i])
        _check_members(i, param, k, group_index[i], hparams.shape[0])
        state_dtype = exp_avgs[i].dtype
        target = master_params[i] if master_params else param
        rows = hparams[group_index[i]: group_index[i] + k].to(param.device)
        c = _coefficients(rows, steps[i], state_dtype)
        shape = (k, param.numel() // k)

        def flat(t, dtype=state_dtype):
            return t.to(dtype).reshape(shape)

        p = flat(target)
        g = flat(grads[i])
        if grad_scale is not None:
            g = g / grad_scale.to(device=param.device, dtype=state_dtype).reshape(()).expand_as(g).contiguous()
        g = torch.where(c["maximize"], -g, g)
        p = p * c["decay_factor"]
        m, v = flat(exp_avgs[i]), flat(exp_avg_sqs[i])
        m_new = torch.where(
            c["lerp_small"],
            _fma(c["lerp_weight"], g - m, m),
            _fma(c["lerp_weight_m1"], g - m, g),
        )
        v_new = _fma(c["one_minus_beta2"] * g, g, v * c["beta2"])
        second = v_new
        if amsgrad:
            vmax_new = torch.maximum(flat(max_exp_avg_sqs[i]), v_new)
            second = vmax_new
        # Divisors expanded to full size: torch turns division by a 0-d CPU tensor into
        # multiplication by its reciprocal, which rounds differently from the kernels
        # (so does an expanded, stride-0 divisor: materialise it).
        denom = _sqrt(second) / c["bc2_sqrt"].expand_as(second).contiguous() + c["eps"]
        p = p + (c["neg_step_size"] * m_new) / denom

        keep = c["frozen"] if skip is None else (c["frozen"] | skip.to(param.device))
        keep = keep.expand(shape)

        def put(dst, new):
            dst.copy_(torch.where(keep, dst.reshape(shape), new.to(dst.dtype)).reshape(dst.shape))

        put(exp_avgs[i], m_new)
        put(exp_avg_sqs[i], v_new)
        if amsgrad:
            put(max_exp_avg_sqs[i], vmax_new)
        if master_params:
            put(master_params[i], p)
        put(param, p.to(param.dtype))
        increment = 1 if skip is None else (~skip).to(torch.float32).to(steps[i].device)
        steps[i].add_(increment)


def _check_members(index: int, param: torch.Tensor, k: int, first_row: int, rows: int) -> None:
    """The kernels' checks of a stacked param (adamw_common.h), same messages."""
    if k < 1:
        raise RuntimeError(f"steplaw: members[{index}] = {k}: expected at least 1")
    if not (0 <= first_row and first_row + k <= rows):
        raise RuntimeError(f"steplaw: group_index[{index}] = {first_row} with {k} member(s) is outside the "
                           f"{rows} rows of hparams")
    if k != 1 and (param.dim() == 0 or param.shape[0] != k):
        raise RuntimeError(f"steplaw: param {index} of shape {list(param.shape)} has {k} stacked members: "
                           f"expected a leading member dimension of size {k}")


def _op_defined() -> bool:
    try:
        torch.ops.steplaw.fused_adamw_.default  # noqa: B018 - probing the registry
        return True
    except (AttributeError, RuntimeError):
        return False


_FALLBACK_LIB = None
if not (load_extension() and _op_defined()):
    # No compiled extension: define the op here so that FusedAdamW (and torch.compile of
    # it) work the same on the reference.
    _FALLBACK_LIB = torch.library.Library("steplaw", "FRAGMENT")  # noqa: TOR901
    _FALLBACK_LIB.define(OP_NAME + SCHEMA)

# The reference serves every device without a compiled kernel (e.g. CUDA tensors in a
# CPU-only build); a compiled CPU/CUDA kernel takes precedence for its device.
torch.library.impl(QUALNAME, "CompositeExplicitAutograd")(reference_fused_adamw_)


@torch.library.register_fake(QUALNAME)
def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                      steps, hparams, group_index, amsgrad, grad_scale=None, found_inf=None, members=None):
    return None


register_op_names(OP_NAME)


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
