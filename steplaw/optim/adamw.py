"""FusedAdamW: a drop-in for torch.optim.AdamW running steplaw's fused kernel.

Same constructor, defaults, param-group keys and state names as torch.optim.AdamW
(`step` a 0-d float32 tensor on the parameter's device, `exp_avg`, `exp_avg_sq`,
`max_exp_avg_sq`), so state_dicts move between the two in both directions. Beyond
torch: bf16/fp16 parameters always keep float32 optimizer state, and
`master_weights=True` keeps a float32 copy of each bf16/fp16 parameter (state key
`master_param`) that the update is applied to; it and the float32 state stay float32
across load_state_dict (torch's loader casts state to the parameter dtype).

All param groups go through one kernel call per (amsgrad, master-weights) combination
and device; GradScaler's `grad_scale`/`found_inf` are consumed on the device without a
host sync, and a step with inf/nan gradients changes nothing.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch

from steplaw.errors import UserError
from steplaw.ops.adamw import fused_adamw_

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise UserError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}.")
        return float(value.item())
    return float(value)


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) in one fused kernel.

    Args are torch.optim.AdamW's: lr (float or tensor; the peak learning rate when a
    schedule scales it), betas, eps, weight_decay, amsgrad, maximize, foreach (ignored),
    capturable (accepted: the kernel never syncs with the host), differentiable (must be
    False), fused (ignored: this optimizer is always fused). `master_weights`: keep float32
    master copies of bf16/fp16 parameters.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
    ):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise UserError(f"lr must be a float or a one-element tensor, got a tensor of shape {tuple(lr.shape)}.")
        if not 0.0 <= _as_float(lr, "lr"):
            raise UserError(f"lr must be >= 0, got {lr}.")
        if not 0.0 <= eps:
            raise UserError(f"eps must be >= 0, got {eps}.")
        for index, beta in enumerate(betas):
            if not 0.0 <= _as_float(beta, f"betas[{index}]") < 1.0:
                raise UserError(f"betas[{index}] must be in [0, 1), got {beta}.")
        if not 0.0 <= weight_decay:
            raise UserError(f"weight_decay must be >= 0, got {weight_decay}.")
        if differentiable:
            raise UserError("differentiable=True is not supported by FusedAdamW; use torch.optim.AdamW.")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights,
        )
        super().__init__(params, defaults)
        # GradScaler then hands over grad_scale/found_inf instead of unscaling (no sync).
        self._step_supports_amp_scaling = True
        self._hparams_cache: dict[torch.device, tuple[tuple, torch.Tensor]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._hparams_cache = {}

    # ---- state ----

    def _init_state(self, group: dict, param: torch.Tensor) -> dict:
        state = self.state[param]
        dtype = _state_dtype(param)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        elif not isinstance(state["step"], torch.Tensor) or state["step"].device != param.device:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)
        for key in _STATE_KEYS:
            if key == "max_exp_avg_sq" and not group["amsgrad"]:
                continue
            if key not in state:
                state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            elif state[key].dtype != dtype or state[key].device != param.device:
                state[key] = state[key].to(device=param.device, dtype=dtype)
        if group["master_weights"] and param.dtype in _LOW_PRECISION:
            if "master_param" not in state:
                state["master_param"] = param.detach().to(torch.float32, memory_format=torch.preserve_format).clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but float32 optimizer state and master weights of bf16/fp16
        parameters stay float32 (torch casts them to the parameter dtype)."""
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        exact = {
            (pid, key): value
            for pid, pstate in state_dict["state"].items()
            for key, value in pstate.items()
            if key in _STATE_KEYS + ("master_param",) and isinstance(value, torch.Tensor)
        }
        super().load_state_dict(state_dict)
        params = list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))
        by_id = dict(zip(saved_ids, params))
        for (pid, key), value in exact.items():
            param = by_id.get(pid)
            if param is None:
                continue
            dtype = torch.float32 if key == "master_param" else _state_dtype(param)
            self.state[param][key] = value.to(device=param.device, dtype=dtype, copy=True)
        for param in params:
            state = self.state.get(param)
            if state and "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device).clone()

    # ---- step ----

    @staticmethod
    def _check_param(param: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            raise UserError("FusedAdamW does not support sparse gradients; use torch.optim.SparseAdam.")
        if torch.is_complex(param) or torch.is_complex(grad):
            raise UserError("FusedAdamW does not support complex parameters; use torch.optim.AdamW or view them as real.")
        if not param.is_floating_point():
            raise UserError(f"FusedAdamW expects floating-point parameters, got {param.dtype}.")

    def _hparams(self, device: torch.device) -> torch.Tensor:
        """The float64 [groups, 6] table of the kernel on `device`; rebuilt only when a
        float hyperparameter changed, tensor lrs copied in on the device."""
        rows, tensor_lrs = [], []
        for index, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                tensor_lrs.append((index, lr))
                lr = 0.0
            beta1, beta2 = group["betas"]
            rows.append((float(lr), _as_float(beta1, "beta1"), _as_float(beta2, "beta2"),
                         float(group["weight_decay"]), float(group["eps"]), float(bool(group["maximize"]))))
        key = tuple(rows)
        if torch.compiler.is_compiling():
            table = torch.tensor(rows, dtype=torch.float64, device=device)
        else:
            cached = self._hparams_cache.get(device)
            if cached is None or cached[0] != key:
                cached = (key, torch.tensor(rows, dtype=torch.float64, device=device))
                self._hparams_cache[device] = cached
            table = cached[1]
        for index, lr in tensor_lrs:
            table[index, 0].copy_(lr.reshape(()))
        return table

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every parameter with a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        # (device, amsgrad, master) -> the op's lists.
        calls: dict[tuple, dict[str, list]] = {}
        for group_index, group in enumerate(self.param_groups):
            amsgrad = bool(group["amsgrad"])
            wants_master = bool(group["master_weights"])
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                state = self.state[param]
                # Full checks only when something is missing (first step, amsgrad or
                # master weights switched on); load_state_dict fixes dtypes and devices.
                if ("step" not in state or (amsgrad and "max_exp_avg_sq" not in state)
                        or (wants_master and "master_param" not in state and param.dtype in _LOW_PRECISION)):
                    self._check_param(param, grad)
                    state = self._init_state(group, param)
                elif grad.is_sparse or grad.dtype != param.dtype:
                    self._check_param(param, grad)
                master = state.get("master_param")
                key = (param.device, amsgrad, master is not None)
                lists = calls.get(key)
                if lists is None:
                    lists = calls[key] = {
                        "params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [],
                        "max_exp_avg_sqs": [], "master_params": [], "steps": [], "group_index": []}
                lists["params"].append(param)
                lists["grads"].append(grad if grad.dtype == param.dtype else grad.to(param.dtype))
                lists["exp_avgs"].append(state["exp_avg"])
                lists["exp_avg_sqs"].append(state["exp_avg_sq"])
                if amsgrad:
                    lists["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
                if master is not None:
                    lists["master_params"].append(master)
                lists["steps"].append(state["step"])
                lists["group_index"].append(group_index)

        for (device, amsgrad, _master), lists in calls.items():
            fused_adamw_(
                lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                lists["max_exp_avg_sqs"], lists["master_params"], lists["steps"],
                self._hparams(device), lists["group_index"], amsgrad,
                None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                None if found_inf is None else found_inf.to(device, non_blocking=True),
            )
        return loss
