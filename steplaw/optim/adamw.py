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

Stacked groups (K runs of a sweep trained as one model whose every parameter has a
leading member dimension of size K): a group whose `lr` or `weight_decay` is a 1-D
tensor of K values (a list is turned into one) is stacked. Every parameter in it must
have size(0) == K; member k = param[k] is updated with lr[k] and weight_decay[k], as K
separate torch.optim.AdamW runs would update it. A member whose lr is exactly 0 is
frozen: its slice of the parameter and of every state tensor is not touched, even when
its gradient is NaN/inf, and the other members are unaffected. The lr/weight_decay
tensors should live on the parameters' device (float32 or float64; lists become
float64 there): the caller updates them in place (`group["lr"].copy_(peaks * mult)`)
and the step copies them into the kernel's table on the device, with no host sync.

Validation: float hyperparameters (lr, betas, eps, weight_decay) are checked on the host
at construction and again at every step in which one changed (no device sync): a
negative, NaN or infinite value raises UserError naming the group. Tensor values (a 0-d
or per-member lr, a per-member weight_decay) are checked when a group is added or
loaded, and at every step when they live on the CPU (reading host memory costs no
sync). A CUDA tensor is not read at a step: that would wait for the GPU every step
(what the on-device table exists to avoid), and a check kept on the device could only
abort the process (a device assert) or skip the update silently. Its values are the
caller's to keep valid, as with any tensor updated in place. load_state_dict
copies saved lr/weight_decay tensors into the group's existing tensors, so references
a trainer holds stay valid.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from steplaw.errors import UserError
from steplaw.ops.adamw import BETA1, BETA2, EPS, HPARAM_COLUMNS, IS_MEMBER, LR, MAXIMIZE, WEIGHT_DECAY, fused_adamw_

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


def check_hparams(where: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One UserError naming `where` and the bad value; host floats only (no device read)."""
    if not (0.0 <= lr and math.isfinite(lr)):
        raise UserError(f"{where}: lr={lr}: expected a finite learning rate >= 0.")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise UserError(f"{where}: betas[{index}]={beta}: expected a value in [0, 1).")
    if not (0.0 <= eps and math.isfinite(eps)):
        raise UserError(f"{where}: eps={eps}: expected a finite value >= 0.")
    if not (0.0 <= weight_decay and math.isfinite(weight_decay)):
        raise UserError(f"{where}: weight_decay={weight_decay}: expected a finite value >= 0.")


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _check_float_hparams(where: str, group: dict) -> None:
    """The group's float hyperparameters (tensor lr / weight_decay are checked apart)."""
    lr, weight_decay = group["lr"], group["weight_decay"]
    betas = tuple(_as_float(beta, f"{where}: betas[{i}]") for i, beta in enumerate(group["betas"]))
    check_hparams(where, 0.0 if _is_tensor(lr) else float(lr), betas, float(group["eps"]),
                  0.0 if _is_tensor(weight_decay) else float(weight_decay))


def _check_tensor_hparam(where: str, key: str, value: torch.Tensor) -> None:
    """A tensor lr or weight_decay: floating point, every value finite and >= 0 (the first
    bad one named as check_hparams names a float). Reads the tensor: a sync on a GPU."""
    if not value.is_floating_point():
        raise UserError(f"{where}: {key} tensor of dtype {value.dtype}: expected a floating-point tensor.")
    for v in value.detach().double().reshape(-1).tolist():
        if not (v >= 0.0 and math.isfinite(v)):
            check_hparams(where, v if key == "lr" else 0.0, (0.0, 0.0), 0.0, v if key == "weight_decay" else 0.0)


def _members(where: str, group: dict) -> int | None:
    """K when the group is stacked (a 1-D lr or weight_decay of K values), else None.
    Reads tensor metadata only (no device sync)."""
    members = None
    for key in ("lr", "weight_decay"):
        value = group[key]
        if not _is_tensor(value) or value.dim() == 0:
            continue
        if value.dim() != 1 or value.shape[0] == 0:
            raise UserError(f"{where}: {key} of shape {tuple(value.shape)}: expected a number, a 0-d tensor "
                            "or a 1-D tensor of one value per stacked member.")
        if members is not None and value.shape[0] != members:
            raise UserError(f"{where}: lr has {members} values and weight_decay {value.shape[0]}: "
                            "expected one per stacked member in both.")
        members = value.shape[0]
    return members


def _check_member_shape(where: str, param: torch.Tensor, members: int) -> None:
    if param.dim() == 0 or param.shape[0] != members:
        raise UserError(f"{where}: parameter of shape {tuple(param.shape)} in a group of {members} stacked "
                        f"members: expected a leading member dimension of size {members}.")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) in one fused kernel.

    Args are torch.optim.AdamW's: lr (float, 0-d tensor, or 1-D tensor of one value per
    stacked member; the peak learning rate when a schedule scales it), betas, eps,
    weight_decay (float, or 1-D tensor or list of one value per stacked member), amsgrad,
    maximize, foreach (ignored), capturable (accepted: the kernel never syncs with the
    host), differentiable (must be False), fused (ignored: this optimizer is always
    fused). `master_weights`: keep float32 master copies of bf16/fp16 parameters.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | torch.Tensor = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
    ):
        if differentiable:
            raise UserError("differentiable=True is not supported by FusedAdamW; use torch.optim.AdamW.")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights,
        )
        self._hparams_cache: dict[torch.device, tuple[tuple, torch.Tensor]] = {}
        super().__init__(params, defaults)
        # GradScaler then hands over grad_scale/found_inf instead of unscaling (no sync).
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, then validates the group (reading tensor hyperparameters once),
        turns list lr/weight_decay into tensors on the parameters' device and checks the
        parameters of a stacked group."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        self._prepare_group(index, self.param_groups[index])

    def _prepare_group(self, index: int, group: dict) -> None:
        where = f"param group {index}"
        params = group["params"]
        device = params[0].device if params else torch.device("cpu")
        for key in ("lr", "weight_decay"):
            if isinstance(group[key], (list, tuple)):
                group[key] = torch.tensor(group[key], dtype=torch.float64, device=device)
        members = _members(where, group)
        for key in ("lr", "weight_decay"):
            if _is_tensor(group[key]):
                _check_tensor_hparam(where, key, group[key])  # read once here, even on a GPU
        _check_float_hparams(where, group)
        if members is not None:
            for param in params:
                _check_member_shape(where, param, members)
        self._hparams_cache.clear()

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
        parameters stay float32 (torch casts them to the parameter dtype), and saved
        lr/weight_decay tensors are copied into the groups' existing tensors of the same
        shape (references held by a trainer stay valid); loaded groups are validated."""
        held = [{key: group[key] for key in ("lr", "weight_decay") if _is_tensor(group[key])}
                for group in self.param_groups]
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
        for index, (group, tensors) in enumerate(zip(self.param_groups, held)):
            for key, mine in tensors.items():
                loaded = group[key]
                if _is_tensor(loaded) and loaded is not mine and loaded.shape == mine.shape:
                    mine.copy_(loaded)
                    group[key] = mine
            self._prepare_group(index, group)

    # ---- step ----

    @staticmethod
    def _check_param(param: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            raise UserError("FusedAdamW does not support sparse gradients; use torch.optim.SparseAdam.")
        if torch.is_complex(param) or torch.is_complex(grad):
            raise UserError("FusedAdamW does not support complex parameters; use torch.optim.AdamW or view them as real.")
        if not param.is_floating_point():
            raise UserError(f"FusedAdamW expects floating-point parameters, got {param.dtype}.")

    def _plan(self) -> tuple[list[tuple], list[tuple], list[tuple[int, int | None]]]:
        """Host-side layout of the kernel's table: float rows (tensor values as 0.0), the
        tensor values to copy in on the device (first row, rows, column, tensor), and each
        group's (first row, K or None). A stacked group of K members has K rows."""
        rows, copies, layout = [], [], []
        for index, group in enumerate(self.param_groups):
            members = _members(f"param group {index}", group)
            lr, weight_decay = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            row = [0.0] * len(HPARAM_COLUMNS)
            row[LR] = 0.0 if _is_tensor(lr) else float(lr)
            row[BETA1], row[BETA2] = _as_float(beta1, "beta1"), _as_float(beta2, "beta2")
            row[WEIGHT_DECAY] = 0.0 if _is_tensor(weight_decay) else float(weight_decay)
            row[EPS], row[MAXIMIZE] = float(group["eps"]), float(bool(group["maximize"]))
            row[IS_MEMBER] = 0.0 if members is None else 1.0
            first, count = len(rows), members or 1
            layout.append((first, members))
            rows.extend([tuple(row)] * count)
            for column, value in ((LR, lr), (WEIGHT_DECAY, weight_decay)):
                if _is_tensor(value):
                    copies.append((first, count, column, value))
        return rows, copies, layout

    def _check_host_tensor_hparams(self) -> None:
        """Tensor lr / weight_decay values held on the CPU, checked at every step (see the
        module docstring for why CUDA ones are not)."""
        for index, group in enumerate(self.param_groups):
            for key in ("lr", "weight_decay"):
                value = group[key]
                if _is_tensor(value) and value.device.type == "cpu":
                    _check_tensor_hparam(f"param group {index}", key, value)

    def _check_float_hparams(self) -> None:
        for index, group in enumerate(self.param_groups):
            _check_float_hparams(f"param group {index}", group)

    def _table(self, device: torch.device, rows: list[tuple], copies: list[tuple]) -> torch.Tensor:
        """The float64 [rows, 7] table of the kernel on `device`; rebuilt (and the float
        hyperparameters validated) only when one of them changed; tensor values copied in
        on the device."""
        key = tuple(rows)
        if torch.compiler.is_compiling():
            table = torch.tensor(rows, dtype=torch.float64, device=device)
        else:
            cached = self._hparams_cache.get(device)
            if cached is None or cached[0] != key:
                self._check_float_hparams()
                cached = (key, torch.tensor(rows, dtype=torch.float64, device=device))
                self._hparams_cache[device] = cached
            table = cached[1]
        for first, count, column, value in copies:
            table[first:first + count, column].copy_(value)
        return table

    def _hparams(self, device: torch.device) -> torch.Tensor:
        rows, copies, _ = self._plan()
        return self._table(device, rows, copies)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every parameter with a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        rows, copies, layout = self._plan()
        if not torch.compiler.is_compiling():
            self._check_host_tensor_hparams()
        # (device, amsgrad, master) -> the op's lists.
        calls: dict[tuple, dict[str, list]] = {}
        for group_index, group in enumerate(self.param_groups):
            amsgrad = bool(group["amsgrad"])
            wants_master = bool(group["master_weights"])
            first_row, members = layout[group_index]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if members is not None:
                    _check_member_shape(f"param group {group_index}", param, members)
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
                        "params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "max_exp_avg_sqs": [],
                        "master_params": [], "steps": [], "group_index": [], "members": []}
                lists["params"].append(param)
                lists["grads"].append(grad if grad.dtype == param.dtype else grad.to(param.dtype))
                lists["exp_avgs"].append(state["exp_avg"])
                lists["exp_avg_sqs"].append(state["exp_avg_sq"])
                if amsgrad:
                    lists["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
                if master is not None:
                    lists["master_params"].append(master)
                lists["steps"].append(state["step"])
                lists["group_index"].append(first_row)
                lists["members"].append(members or 1)

        for (device, amsgrad, _master), lists in calls.items():
            stacked = any(k != 1 for k in lists["members"])
            fused_adamw_(
                lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                lists["max_exp_avg_sqs"], lists["master_params"], lists["steps"],
                self._table(device, rows, copies), lists["group_index"], amsgrad,
                None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                None if found_inf is None else found_inf.to(device, non_blocking=True),
                lists["members"] if stacked else None,
            )
        return loss
