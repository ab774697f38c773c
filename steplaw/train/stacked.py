"""Stacked runs: K runs that differ only in their peak LR, trained together as one model.

A sweep cell's runs share the model shape, tokens, batch size, sequence length, schedule,
seed and so data order; only `lr` differs. `run_stack(configs)` trains them as one
`steplaw.models.stacked.StackedTransformer` (every weight has a leading member dimension,
every matmul is batched over members, an MoE layer's K*E experts dispatch in one
`moe_permute`) with one `FusedAdamW` whose param groups hold a [K] tensor of learning
rates (member k's schedule: its peak lr x the shared multiplier, updated in place on the
device each step, no host sync). Small models spend most of a step in per-op overhead
(Python, autograd, dispatch), so K members cost about one run's overhead: several times
more runs per hour (bench/sweep.py measures it).

Each member sees exactly the batches it would see alone, and nothing mixes members: the
forward, the per-member gradient clipping and the optimizer act on member k's slice
alone. So a member's result is its single run's (to rounding: batched matmuls may
round differently from unbatched ones). A member whose loss turns non-finite or passes
the divergence rule is marked `diverged` at that step, frozen (learning rate 0: FusedAdamW
leaves its weights and state untouched, NaN gradients and all) and taken out of the
stack, so that it stops costing compute; the others go on exactly as they would without
it. Results are RunResults as `run` returns them,
one per config in order, with `stack` naming the stack; their `wall_s` and
`tokens_per_s` are each member's share (1/K) of the stack's time.

What may stack: `stack_key(config)` (equal keys stack). Stacks need optimizer "steplaw"
and one process (no DDP); other runs run alone (`plan_stacks` puts them in groups of
one). How many: `max_stack` estimates what fits a memory budget; `plan_stacks` groups a
list of configs, and a stack that still runs out of memory is split in halves (said once).

Why a model with a native member dimension rather than torch.func.vmap over
functional_call: see steplaw.models.stacked. No checkpoints: a stack killed part-way is
re-run whole (its members have no result yet, so no finished run is lost).
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steplaw.errors import UserError
from steplaw.optim import FusedAdamW
from steplaw.runtable import finite_or_none
from steplaw.train import checkpoint as ckpt
from steplaw.train.config import RunConfig, RunResult
from steplaw.train.memory import available_bytes, needed_bytes, stack_fits
from steplaw.train.runner import (
    Setup,
    _autocast,
    _Distributed,
    check_lr,
    evaluate,
    failure_reason,
    mean_moe_load,
    new_result,
    prepare,
    record_training,
)
from steplaw.train.tracking import LossTracker, ProgressFn, ProgressReporter

# Largest stack `auto` picks, by device: past it a stack gains little (the step is compute-bound).
AUTO_STACK_LIMIT = {"cpu": 8, "cuda": 32}
# CPU: `auto` stacks only runs whose step costs at most this many FLOPs per member. Stacking
# saves per-op overhead; bigger steps are compute-bound and K members' larger activations
# fall out of cache. Measured (bench/results/sweep_2026-11-29_cpu-1thread*.json, under
# load): 3e7..4e8 FLOPs per member step (the demo's models) gained 1.1-2.6x, 1.2e10
# (~1M parameters, 2048-token batches) lost (0.7x).
CPU_AUTO_MAX_STEP_FLOPS = 1e9
_warned: set[str] = set()


def stack_key(config: RunConfig) -> str:
    """Runs with equal keys can train as one stack: the whole config except the peak lr."""
    fields = config.to_dict()
    fields.pop("lr")
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def stackable(config: RunConfig) -> bool:
    """Whether `config` may train in a stack at all (else it runs alone)."""
    return config.optimizer == "steplaw"


def stack_id(configs: list[RunConfig]) -> str:
    """16 hex digits naming the stack of these runs (a hash of their run ids)."""
    ids = ",".join(sorted(c.run_id() for c in configs))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------- how many per stack

def member_bytes(config: RunConfig, device_type: str) -> int:
    """Rough training memory of one stack member (steplaw.train.memory.needed_bytes) on
    the micro-batches it would use."""
    from steplaw.train.batching import auto_micro_batch_tokens

    micro = config.micro_batch_tokens or min(config.batch_tokens, auto_micro_batch_tokens(config.model, device_type))
    return needed_bytes(config.model, micro)


def memory_budget(device_type: str) -> int:
    """Bytes a stack may use: 80% of the GPU's memory, or half of the available RAM."""
    if device_type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    available = available_bytes(torch.device("cpu"))
    return (8 * 2**30 if available is None else available) // 2


def max_stack(config: RunConfig, budget_bytes: int | None = None) -> int:
    """The most members of `config`'s stack that fit the memory budget (at least 1), capped
    at AUTO_STACK_LIMIT for its device."""
    from steplaw.train.runner import resolve_device

    device_type = resolve_device(config.device).type
    budget = memory_budget(device_type) if budget_bytes is None else budget_bytes
    return max(1, min(AUTO_STACK_LIMIT[device_type], budget // member_bytes(config, device_type)))


def worth_stacking(config: RunConfig) -> bool:
    """Whether `auto` should stack this run: always on a GPU (kernel launches dominate
    small models there), on a CPU only below CPU_AUTO_MAX_STEP_FLOPS per member step."""
    from steplaw.models.accounting import flops_per_token
    from steplaw.train.runner import resolve_device

    if resolve_device(config.device).type == "cuda":
        return True
    return flops_per_token(config.model, config.seq_len) * config.batch_tokens <= CPU_AUTO_MAX_STEP_FLOPS


def plan_stacks(configs: list[RunConfig], stack: str | int = "auto", budget_bytes: int | None = None) -> list[list[RunConfig]]:
    """Group `configs` into stacks to train with `run_stack` (groups of one: `run`).

    stack: "auto" (as many as fit the memory budget, up to AUTO_STACK_LIMIT, for runs
    `worth_stacking`), a positive int K (at most K per stack; fewer, said once, when K
    does not fit), or "off" (every run alone). Runs keep
    their order within a group; groups come in the order of their first run.
    """
    if stack == "off":
        return [[c] for c in configs]
    if stack != "auto" and (isinstance(stack, bool) or not isinstance(stack, int) or stack < 1):
        raise UserError(f"stack={stack!r}: expected 'auto', 'off' or a positive number of runs per stack")
    groups: dict[str, list[RunConfig]] = {}
    for config in configs:
        key = stack_key(config) if stackable(config) else f"alone:{config.run_id()}:{len(groups)}"
        groups.setdefault(key, []).append(config)
    out: list[list[RunConfig]] = []
    for members in groups.values():
        fits = max_stack(members[0], budget_bytes)
        size = (fits if worth_stacking(members[0]) else 1) if stack == "auto" else min(stack, fits)
        if stack != "auto" and stack > fits and len(members) > fits:
            _warn_once(f"stacks of {stack} runs do not fit the memory budget; using stacks of {fits}")
        out.extend(members[i:i + size] for i in range(0, len(members), size))
    return out


def run_group(
    configs: list[RunConfig],
    run_dirs: list[str | Path | None] | None = None,
    progress: bool | ProgressFn | None = None,
) -> list[RunResult]:
    """What an executor runs for one group of `plan_stacks`: `run` for a group of one
    (checkpoints and resume as usual), `run_stack` for more. RunResults in order."""
    if len(configs) == 1:
        from steplaw.train.runner import run

        return [run(configs[0], run_dir=None if not run_dirs else run_dirs[0], progress=progress)]
    return run_stack(configs, run_dirs, progress)


# ---------------------------------------------------------------- the stack

@dataclass
class Member:
    """One run of a stack and how far it got."""

    config: RunConfig
    tracker: LossTracker = field(default_factory=LossTracker)
    status: str = "ok"
    reason: str | None = None
    steps: int = 0  # steps trained (a diverged member stops counting at its divergence)
    moe_load: float | None = None  # MoE: max/mean expert load of its last training batch

    @property
    def live(self) -> bool:
        return self.status == "ok"


@dataclass
class StackState:
    model: torch.nn.Module  # steplaw.models.stacked.StackedTransformer
    optimizer: FusedAdamW
    peaks: torch.Tensor  # [slots] peak learning rates on the device; 0 for a frozen member
    members: list[Member]
    params: list[torch.Tensor]  # the trained parameters, in the optimizer's order
    slots: list[int]  # the member in each slot of the stacked model (diverged ones leave)
    step: int = 0


def run_stack(
    configs: list[RunConfig],
    run_dirs: list[str | Path | None] | None = None,
    progress: bool | ProgressFn | None = None,
) -> list[RunResult]:
    """Train `configs` (equal `stack_key`s) as one stack; their RunResults, in order.

    run_dirs: one directory per config (or None): a directory holding the run's
      result.json returns it without training again; each finished result is saved there.
    progress: as `run`'s, with `losses` (every member's last loss) added to the dict.
    User mistakes raise UserError; a stack that breaks returns every member "failed";
    one that runs out of memory is split in two halves and each run as a stack.
    """
    configs = list(configs)
    paths = [None if d is None else Path(d) for d in (run_dirs or [None] * len(configs))]
    if len(paths) != len(configs):
        raise UserError(f"{len(paths)} run directories for {len(configs)} runs: expected one per run")
    _check_stack(configs)
    results: list[RunResult | None] = [None if p is None else ckpt.load_result(p, c.run_id()) for c, p in zip(configs, paths)]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        trained = _train_or_split([configs[i] for i in todo], progress)
        for i, result in zip(todo, trained):
            results[i] = result
            if paths[i] is not None:
                ckpt.save_result(paths[i], result)
    return results


def _check_stack(configs: list[RunConfig]) -> None:
    if not configs:
        raise UserError("an empty stack: expected at least one run")
    for config in configs:
        if not stackable(config):
            raise UserError(f"optimizer={config.optimizer!r} cannot stack: stacked runs need optimizer 'steplaw' (run it alone)")
        if stack_key(config) != stack_key(configs[0]):
            raise UserError(f"run {config.run_id()} differs from run {configs[0].run_id()} in more than lr: only such runs stack")
    if _Distributed().active:
        raise UserError("stacked runs train in one process: run them without torchrun, or one at a time")


def _train_or_split(configs: list[RunConfig], progress) -> list[RunResult]:
    try:
        return _train(configs, progress)
    except torch.OutOfMemoryError as exc:
        if len(configs) == 1:
            result = new_result(configs[0])
            result.status, result.reason, result.stack = "failed", failure_reason(exc), stack_id(configs)
            return [result]
        _warn_once(f"a stack of {len(configs)} runs ran out of memory; running it as smaller stacks")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(configs) // 2
        return _train_or_split(configs[:half], progress) + _train_or_split(configs[half:], progress)


def _train(configs: list[RunConfig], progress) -> list[RunResult]:
    """Train one stack (run_stack without directories or splitting)."""
    started = time.perf_counter()
    setup = prepare(configs[0])  # refuses a run that does not fit even alone
    for config in configs[1:]:
        check_lr(config.lr)  # all else is equal to the first's
    if len(configs) > 1 and not stack_fits(setup.config.model, setup.plan.micro_seqs * setup.plan.seq_len,
                                           setup.device, len(configs)):
        # Split before allocating, as after a real out-of-memory error: on a CPU the OOM
        # killer would end the process instead of raising one.
        raise torch.OutOfMemoryError(f"a stack of {len(configs)} runs is estimated not to fit in {setup.device}'s memory")
    results = [new_result(c) for c in configs]
    ident = stack_id(configs)
    train_s = 0.0
    try:
        state = build_stack(setup, configs)
        train_s = stack_loop(setup, state, progress)
        live = [(slot, k) for slot, k in enumerate(state.slots) if state.members[k].live]
        val = evaluate(state.model, setup, _Distributed()).tolist() if live else []
        for slot, k in live:
            state.members[k].moe_load = mean_moe_load(state.model.moe_layers(), slot)
            results[k].final_val_loss = finite_or_none(val[slot])
        for member, result in zip(state.members, results):
            result.status, result.reason = member.status, member.reason
            record_training(result, member.tracker, member.steps, setup.plan, train_s / len(configs))
            result.moe_max_mean_load = member.moe_load
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        for result in results:
            result.status, result.reason = "failed", failure_reason(exc)
    wall_share = (time.perf_counter() - started) / len(configs)
    for result in results:
        result.stack, result.wall_s = ident, wall_share
    return results


def build_stack(setup: Setup, configs: list[RunConfig]) -> StackState:
    """K members from the seed's initialisation (the weights each run alone starts from),
    and a FusedAdamW with per-member learning rates (weight decay on matrices only, as
    steplaw.train.runner.make_optimizer)."""
    from steplaw.models.stacked import StackedTransformer
    from steplaw.models.transformer import Transformer

    config, device = setup.config, setup.device
    torch.manual_seed(config.seed)
    model = StackedTransformer(config.model, len(configs), init=Transformer(config.model)).to(device)
    peaks = torch.tensor([c.lr for c in configs], dtype=torch.float32, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, peaks, config)
    return StackState(model, optimizer, peaks, [Member(c) for c in configs], params, list(range(len(configs))))


def _optimizer(params: list[torch.Tensor], peaks: torch.Tensor, config: RunConfig) -> FusedAdamW:
    groups = [  # a member's matrices have ndim >= 2, so the stacked ones >= 3
        {"params": [p for p in params if p.ndim >= 3], "weight_decay": config.weight_decay, "lr": peaks.clone()},
        {"params": [p for p in params if p.ndim < 3], "weight_decay": 0.0, "lr": peaks.clone()},
    ]
    return FusedAdamW(groups, betas=(config.beta1, config.beta2), eps=config.eps)


def drop_frozen(state: StackState, config: RunConfig) -> None:
    """Take the diverged members out of the stack so that they stop costing compute: the
    others' weights and optimizer state move to fewer slots, unchanged (no gradients are
    held between steps)."""
    keep = [slot for slot, k in enumerate(state.slots) if state.members[k].live]
    if not keep or len(keep) == len(state.slots):
        return
    old = state.optimizer
    state.model.keep_members(keep)
    index = torch.tensor(keep, dtype=torch.long, device=state.peaks.device)
    state.peaks = state.peaks.index_select(0, index)
    state.optimizer = _optimizer(state.params, state.peaks, config)
    for param in state.params:
        moved = {}
        for key, value in old.state.get(param, {}).items():
            moved[key] = value.index_select(0, index) if isinstance(value, torch.Tensor) and value.dim() > 0 else value
        if moved:
            state.optimizer.state[param] = moved
    state.slots = [state.slots[slot] for slot in keep]


def clip_member_grads(params: list[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ member by member: member k's gradients (slice k of
    every parameter's) scaled by min(1, max_norm / (their total 2-norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    members = grads[0].shape[0]
    # The norm of the per-tensor norms, as torch computes it (same rounding as a run alone).
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(members, -1), dim=1) for g in grads])  # [P, K]
    total = torch.linalg.vector_norm(norms, dim=0)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [scale.view(members, *([1] * (g.dim() - 1))) for g in grads])


def stack_step(setup: Setup, state: StackState) -> torch.Tensor:
    """One optimizer step of every member; the members' losses of the step [K]."""
    plan, config = setup.plan, setup.config
    lrs = state.peaks * setup.lr_multiplier(state.step)
    for group in state.optimizer.param_groups:
        group["lr"].copy_(lrs)
    step_loss = torch.zeros(len(state.slots), device=setup.device)
    for micro in range(plan.accumulation):
        x, y = setup.batch(state.step, slice(0, plan.rank_seqs), micro)
        with _autocast(setup.device, setup.autocast_dtype):
            losses = state.model(x, y)
            total = (losses + state.model.aux_loss()).sum()
        (total / plan.accumulation).backward()
        step_loss += losses.detach() / plan.accumulation
    if config.grad_clip is not None:
        clip_member_grads(state.params, config.grad_clip)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    for layer in state.model.moe_layers():
        layer.update_bias()
    state.step += 1
    return step_loss


def stack_loop(setup: Setup, state: StackState, progress) -> float:
    """Steps until the plan's end or until every member has diverged; the training seconds."""
    plan = setup.plan
    sync_every = 1 if setup.device.type == "cpu" else 16  # GPU: read losses back in batches
    pending: list[torch.Tensor] = []
    reporter = ProgressReporter(progress, plan)
    while state.step < plan.steps and any(m.live for m in state.members):
        pending.append(stack_step(setup, state))
        reporter.step_done()
        if len(pending) < sync_every and state.step < plan.steps:
            continue
        rows = torch.stack(pending).tolist()
        first_step = state.step - len(pending)
        pending.clear()
        diverged = False
        for offset, row in enumerate(rows):
            for slot, k in enumerate(state.slots):
                member = state.members[k]
                if member.live:
                    diverged |= _member_step(state, slot, member, row[slot], first_step + offset + 1)
        if diverged:
            drop_frozen(state, setup.config)
        live = [m.tracker.losses[-1] for m in state.members if m.live]
        if live:
            reporter.maybe_report(state.step, min(live), losses=[m.tracker.losses[-1] for m in state.members])
    return time.perf_counter() - reporter.t0


def _member_step(state: StackState, slot: int, member: Member, loss: float, step: int) -> bool:
    """Record the loss of `step` of the member in `slot`; freeze it (lr 0) when it
    diverges, and say so."""
    reason = member.tracker.add(loss)
    member.steps = step
    if reason is None:
        return False
    member.status, member.reason = "diverged", reason
    member.moe_load = mean_moe_load(state.model.moe_layers(), slot)
    state.peaks[slot] = 0.0
    return True
