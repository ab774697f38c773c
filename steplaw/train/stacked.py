"""Stacked runs: K runs of one model shape, trained together as one model.

A sweep's runs of one model share the shape, sequence length, schedule, seed and so data
order; they differ in peak LR, token budget and batch size. `run_stack(configs)` trains
runs that may stack (`stack_key`) as one `steplaw.models.stacked.StackedTransformer`
(every weight has a leading member dimension, every matmul is batched over members, an
MoE layer's K*E experts dispatch in one `moe_permute`) with one `FusedAdamW` whose param
groups hold a [K] tensor of learning rates (member k's peak lr x its own schedule's
multiplier, written in place on the device each step, no host sync). Small models spend
most of a step in per-op overhead (Python, autograd, dispatch), so K members cost about
one run's overhead: several times more runs per hour (bench/sweep.py measures it).

What may stack (`stack_key`; equal keys stack):
  * runs that differ only in lr;
  * and in token budget: step s's batch depends only on (seed, s), so a shorter run reads a
    prefix of a longer one's batches. Each member follows its own schedule and leaves the
    stack after its own last step, evaluated there with its own evaluation batches;
  * and, for a small dense model whose batch is one micro-batch (`mixes_batches`), in
    batch size: step s's first n sequences do not depend on the batch size, so every
    member reads the stack's widest batch and its loss counts its own first sequences
    only (rows of a dense model do not see each other; MoE routing statistics do, so MoE
    members share a batch size). The narrower members' padding costs compute, so batch
    sizes mix only below MIXED_BATCH_MAX_STEP_FLOPS.
Stacks need optimizer "steplaw" and one process (no DDP); other runs run alone
(`plan_stacks` puts them in groups of one). How many: `max_stack` estimates what fits a
memory budget; `plan_stacks` groups a list of configs, and a stack that still runs out of
memory is split in halves (said once).

Each member sees exactly the batches it would see alone, and nothing mixes members: the
forward, the per-member gradient clipping and the optimizer act on member k's slice
alone. So a member's result is its single run's, to the last bit on a CPU: the run alone
computes with the same layer code as a stack of one (steplaw.models.layers), and a
member's slice of a batched op rounds as the op on that slice alone. (On a GPU, batched
matmuls may pick other kernels for other batch counts, so members agree to rounding.) A member whose loss turns non-finite or passes the
divergence rule is marked `diverged` at that step, frozen (learning rate 0: FusedAdamW
leaves its weights and state untouched, NaN gradients and all) and taken out of the stack,
so that it stops costing compute; the others go on exactly as they would without it.
Results are RunResults as `run` returns them, one per config in order, with `stack`
naming the stack; their `wall_s` and `tokens_per_s` are each member's share of the
stack's time (each interval of training split evenly over the members in the stack then).

Why a model with a native member dimension rather than torch.func.vmap over
functional_call: see steplaw.models.stacked. No checkpoints: a stack killed part-way is
re-run whole (its members have no result yet, so no finished run is lost).
"""
from __future__ import annotations

import dataclasses
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
    plan_steps,
    prepare,
    record_training,
    resolve_device,
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
# Runs of different batch sizes stack (the narrower ones padded to the widest batch) only
# where a member's step costs at most this many FLOPs, so that padding costs less than the
# per-step overhead it saves. Measured on 2 CPU cores, one thread (2026-12-05, a demo cell's
# round: 3 LRs at B plus one run at B/2 and one at 2B, as one stack vs a stack of the 3 and
# two runs alone): 1.5x faster at d_model 16 (widest step 8.5e6 FLOPs), 1.13x at d_model 64
# (9.5e7), 0.93x at d_model 64 with the batches doubled (1.9e8).
MIXED_BATCH_MAX_STEP_FLOPS = 5e7
_warned: set[str] = set()


def step_flops(config: RunConfig) -> float:
    """FLOPs of one member's optimizer step (forward and backward over its batch)."""
    from steplaw.models.accounting import flops_per_token

    return flops_per_token(config.model, config.seq_len) * config.batch_tokens


def mixes_batches(config: RunConfig) -> bool:
    """Whether `config` may stack with runs of other batch sizes: a dense model whose
    whole batch is one micro-batch and whose step is overhead-bound (at most
    MIXED_BATCH_MAX_STEP_FLOPS), so that padding a smaller member's batch to the stack's
    widest costs little. An MoE layer's routing statistics see every row of the batch,
    so MoE members must share it."""
    return (config.model.moe is None
            and (config.micro_batch_tokens is None or config.micro_batch_tokens >= config.batch_tokens)
            and step_flops(config) <= MIXED_BATCH_MAX_STEP_FLOPS)


def _key_fields(config: RunConfig) -> dict:
    fields = config.to_dict()
    fields.pop("lr")
    fields.pop("tokens")  # step s's batch depends only on (seed, s): a shorter run is a prefix
    if mixes_batches(config):
        fields.pop("batch_tokens")  # step s's first n sequences do not depend on the batch size
        fields.pop("micro_batch_tokens")
    return fields


def stack_key(config: RunConfig) -> str:
    """Runs with equal keys can train as one stack: the whole config except the peak lr
    and the token budget (members of different lengths leave the stack at their own last
    step), and except the batch size where `mixes_batches`."""
    return json.dumps(_key_fields(config), sort_keys=True, separators=(",", ":"))


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
    device_type = resolve_device(config.device).type
    budget = memory_budget(device_type) if budget_bytes is None else budget_bytes
    return max(1, min(AUTO_STACK_LIMIT[device_type], budget // member_bytes(config, device_type)))


def worth_stacking(config: RunConfig) -> bool:
    """Whether `auto` should stack this run: always on a GPU (kernel launches dominate
    small models there), on a CPU only below CPU_AUTO_MAX_STEP_FLOPS per member step."""
    return resolve_device(config.device).type == "cuda" or step_flops(config) <= CPU_AUTO_MAX_STEP_FLOPS


def plan_stacks(configs: list[RunConfig], stack: str | int = "auto", budget_bytes: int | None = None) -> list[list[RunConfig]]:
    """Group `configs` into stacks to train with `run_stack` (groups of one: `run`).

    stack: "auto" (as many as fit the memory budget, up to AUTO_STACK_LIMIT, for runs
    `worth_stacking`), a positive int K (at most K per stack; fewer, said once, when K
    does not fit), or "off" (every run alone). Within a group the runs come longest
    first (in their given order among equals); groups come in the order in which
    their key first appears.
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
        # The longest runs first, so that runs of similar length share a stack (a stack
        # lasts as long as its longest member); the widest batch sizes the memory.
        members.sort(key=lambda c: -(c.tokens // c.batch_tokens))
        widest = max(members, key=lambda c: c.batch_tokens)
        fits = max_stack(widest, budget_bytes)
        size = (fits if worth_stacking(widest) else 1) if stack == "auto" else min(stack, fits)
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
    setup: Setup  # the run's own batch plan and schedule (data and device shared with the stack)
    tracker: LossTracker = field(default_factory=LossTracker)
    status: str = "ok"
    reason: str | None = None
    steps: int = 0  # steps trained (a diverged member stops counting at its divergence)
    finished: bool = False  # trained all its steps and evaluated
    val_loss: float | None = None
    moe_load: float | None = None  # MoE: max/mean expert load of its last training batch
    train_s: float = 0.0  # its share of the stack's seconds (each interval split over the members in it)

    @property
    def live(self) -> bool:
        return self.status == "ok" and not self.finished


@dataclass
class StackState:
    model: torch.nn.Module  # steplaw.models.stacked.StackedTransformer
    optimizer: FusedAdamW
    # [slots] peak learning rates on the device, 0 for a frozen member; float64, so that
    # peak * multiplier is the alone run's lr bit for bit (it multiplies Python floats)
    peaks: torch.Tensor
    members: list[Member]
    params: list[torch.Tensor]  # the trained parameters, in the optimizer's order
    slots: list[int]  # the member in each slot of the stacked model (diverged and finished ones leave)
    train_model: torch.nn.Module | None = None  # what the training forward runs: `model`, compiled with config.compile
    step: int = 0
    wide: Setup | None = None  # the plan of the slots' widest batch: the batch every slot reads
    sequences: tuple[int, ...] | None = None  # each slot's sequences of it, None when all are equal
    shared_schedule: bool = True  # every slot's lr multiplier is the same function of the step
    _table: tuple[int, torch.Tensor] | None = None  # (first step, [steps, slots] multipliers) on the device

    def refresh(self) -> None:
        """Recompute what depends on which members are in the slots."""
        setups = [self.members[k].setup for k in self.slots]
        self.wide = max(setups, key=lambda s: s.plan.batch_seqs)
        counts = tuple(s.plan.batch_seqs for s in setups)
        self.sequences = None if len(set(counts)) == 1 else counts
        self.shared_schedule = len({(s.plan.steps, s.warmup_steps) for s in setups}) == 1
        self._table = None

    def lrs(self) -> torch.Tensor:
        """[slots] learning rates of this step, computed without a host-device sync."""
        if self.shared_schedule:
            return self.peaks * self.wide.lr_multiplier(self.step)
        if self._table is None or not (0 <= self.step - self._table[0] < self._table[1].shape[0]):
            # Members of different lengths: a table of the next steps' multipliers, one copy per 256 steps.
            setups = [self.members[k].setup for k in self.slots]
            rows = [[s.lr_multiplier(step) for s in setups] for step in range(self.step, self.step + 256)]
            self._table = (self.step, torch.tensor(rows, dtype=torch.float64, device=self.peaks.device))
        return self.peaks * self._table[1][self.step - self._table[0]]


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
    first = _key_fields(configs[0])
    for config in configs:
        if not stackable(config):
            raise UserError(f"optimizer={config.optimizer!r} cannot stack: stacked runs need optimizer 'steplaw' (run it alone)")
        fields = _key_fields(config)
        if fields != first:
            differ = sorted(set(fields) ^ set(first) | {k for k in fields.keys() & first.keys() if fields[k] != first[k]})
            raise UserError(f"run {config.run_id()} differs from run {configs[0].run_id()} in {', '.join(differ)}: runs of a "
                            "stack may differ only in lr, tokens and (small dense models) batch_tokens")
    if _Distributed().active:
        raise UserError("stacked runs train in one process: run them without torchrun, or one at a time")


def _train_or_split(configs: list[RunConfig], progress) -> list[RunResult]:
    by_batch = _one_micro_batch_or_split(configs)
    if len(by_batch) > 1:  # rare: a member's batch needs micro-batches, so the batch sizes train apart
        results: dict[int, RunResult] = {}
        for group in by_batch:
            results.update(zip(group, _train_or_split([configs[i] for i in group], progress)))
        return [results[i] for i in range(len(configs))]
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


def _one_micro_batch_or_split(configs: list[RunConfig]) -> list[list[int]]:
    """[all indices] when the members share a batch size or each trains its batch in one
    micro-batch (which `mixes_batches` expects but the device's memory decides); else
    the indices grouped by batch size."""
    groups: dict[int, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(config.batch_tokens, []).append(i)
    if len(groups) == 1:
        return [list(range(len(configs)))]
    device = resolve_device(configs[0].device)
    if all(plan_steps(c, device)[0].accumulation == 1 for c in configs):
        return [list(range(len(configs)))]
    return list(groups.values())


def _train(configs: list[RunConfig], progress) -> list[RunResult]:
    """Train one stack (run_stack without directories or splitting)."""
    started = time.perf_counter()
    # The widest batch (then the longest run) is what the stack reads and holds in memory.
    widest = max(range(len(configs)), key=lambda i: (configs[i].batch_tokens, configs[i].tokens))
    setup = prepare(configs[widest])  # refuses a run that does not fit even alone
    setups = [setup if i == widest else member_setup(setup, c) for i, c in enumerate(configs)]
    if len(configs) > 1 and not stack_fits(setup.config.model, setup.plan.micro_seqs * setup.plan.seq_len,
                                           setup.device, len(configs)):
        # Split before allocating, as after a real out-of-memory error: on a CPU the OOM
        # killer would end the process instead of raising one.
        raise torch.OutOfMemoryError(f"a stack of {len(configs)} runs is estimated not to fit in {setup.device}'s memory")
    results = [new_result(c) for c in configs]
    ident = stack_id(configs)
    state = None
    try:
        state = build_stack(setup, configs, setups)
        stack_loop(state, progress)
        for member, result in zip(state.members, results):
            result.status, result.reason = member.status, member.reason
            record_training(result, member.tracker, member.steps, member.setup.plan, member.train_s)
            result.final_val_loss, result.moe_max_mean_load = finite_or_none(member.val_loss), member.moe_load
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        for result in results:
            result.status, result.reason = "failed", failure_reason(exc)
    wall = time.perf_counter() - started
    shares = [m.train_s for m in state.members] if state is not None else []
    for i, result in enumerate(results):
        # Each member's share of the stack's wall time, in proportion to its training share.
        result.stack = ident
        result.wall_s = wall * shares[i] / sum(shares) if shares and sum(shares) > 0 else wall / len(configs)
    return results


def member_setup(setup: Setup, config: RunConfig) -> Setup:
    """`config`'s Setup in a stack read through `setup` (same data and device): its own
    batch plan and schedule. Refuses a bad lr or batch as `prepare` would."""
    check_lr(config.lr)
    plan, warmup = plan_steps(config, setup.device)
    return dataclasses.replace(setup, config=config, plan=plan, warmup_steps=warmup)


def build_stack(setup: Setup, configs: list[RunConfig], setups: list[Setup] | None = None) -> StackState:
    """K members from the seed's initialisation (the weights each run alone starts from),
    and a FusedAdamW with per-member learning rates (weight decay on matrices only, as
    steplaw.train.runner.make_optimizer). setups: each member's (default: `setup`'s batch
    plan and schedule for all)."""
    from steplaw.models.stacked import StackedTransformer
    from steplaw.models.transformer import Transformer

    config, device = setup.config, setup.device
    torch.manual_seed(config.seed)
    model = StackedTransformer(config.model, len(configs), init=Transformer(config.model)).to(device)
    peaks = torch.tensor([c.lr for c in configs], dtype=torch.float64, device=device)
    params = model.member_parameters()  # a run alone's order: its clipping sums the norms in it
    optimizer = _optimizer(params, peaks, config)
    members = [Member(c, s) for c, s in zip(configs, setups or [setup] * len(configs))]
    # Compiled as a run alone is (evaluation runs the plain module, as there); members
    # leaving the stack change its shapes, which recompiles.
    train_model = torch.compile(model) if config.compile else model
    state = StackState(model, optimizer, peaks, members, params, list(range(len(configs))), train_model=train_model)
    state.refresh()
    return state


def _optimizer(params: list[torch.Tensor], peaks: torch.Tensor, config: RunConfig) -> FusedAdamW:
    groups = [  # a member's matrices have ndim >= 2, so the stacked ones >= 3
        {"params": [p for p in params if p.ndim >= 3], "weight_decay": config.weight_decay, "lr": peaks.clone()},
        {"params": [p for p in params if p.ndim < 3], "weight_decay": 0.0, "lr": peaks.clone()},
    ]
    return FusedAdamW(groups, betas=(config.beta1, config.beta2), eps=config.eps)


def drop_frozen(state: StackState) -> None:
    """Take the diverged and finished members out of the stack so that they stop costing
    compute: the others' weights and optimizer state move to fewer slots, unchanged (no
    gradients are held between steps)."""
    keep = [slot for slot, k in enumerate(state.slots) if state.members[k].live]
    if not keep or len(keep) == len(state.slots):
        return
    old = state.optimizer
    state.model.keep_members(keep)
    index = torch.tensor(keep, dtype=torch.long, device=state.peaks.device)
    state.peaks = state.peaks.index_select(0, index)
    state.optimizer = _optimizer(state.params, state.peaks, state.members[0].config)
    for param in state.params:
        moved = {}
        for key, value in old.state.get(param, {}).items():
            moved[key] = value.index_select(0, index) if isinstance(value, torch.Tensor) and value.dim() > 0 else value
        if moved:
            state.optimizer.state[param] = moved
    state.slots = [state.slots[slot] for slot in keep]
    state.refresh()


def clip_member_grads(params: list[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ member by member: member k's gradients (slice k of
    every parameter's) scaled by min(1, max_norm / (their total 2-norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    members = grads[0].shape[0]
    # The norm of the per-tensor norms, as torch computes it, summed in `params`' order (a
    # run alone's, StackedTransformer.member_parameters): the same rounding as the run alone.
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(members, -1), dim=1) for g in grads], dim=1)  # [K, P]
    total = torch.linalg.vector_norm(norms, dim=1)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [scale.view(members, *([1] * (g.dim() - 1))) for g in grads])


def stack_step(state: StackState) -> torch.Tensor:
    """One optimizer step of every member in the stack; their losses of the step [slots].
    Every slot reads the widest member's batch; a narrower member's loss (so its
    gradient) counts its own first sequences only."""
    setup = state.wide
    plan, config = setup.plan, setup.config
    lrs = state.lrs()
    for group in state.optimizer.param_groups:
        group["lr"].copy_(lrs)
    step_loss = torch.zeros(len(state.slots), device=setup.device)
    for micro in range(plan.accumulation):  # > 1 only when every member has this batch
        x, y = setup.batch(state.step, slice(0, plan.rank_seqs), micro)
        with _autocast(setup.device, setup.autocast_dtype):
            losses = state.train_model(x, y, state.sequences)
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


def stack_loop(state: StackState, progress) -> None:
    """Steps until every member has trained its steps or diverged. Losses are read back
    at every step on a CPU, every 16 on a GPU, and at each member's last step, where it
    is evaluated and leaves the stack."""
    ends = {m.setup.plan.steps for m in state.members}
    longest = max((m.setup for m in state.members), key=lambda s: s.plan.steps)
    sync_every = 1 if longest.device.type == "cpu" else 16  # GPU: read losses back in batches
    pending: list[torch.Tensor] = []
    reporter = ProgressReporter(progress, longest.plan)
    last = time.perf_counter()
    while any(state.members[k].live for k in state.slots):
        pending.append(stack_step(state))
        reporter.step_done()
        if len(pending) < sync_every and state.step not in ends:
            continue
        rows = torch.stack(pending).tolist()
        first_step = state.step - len(pending)
        pending.clear()
        now = time.perf_counter()
        for k in state.slots:
            state.members[k].train_s += (now - last) / len(state.slots)
        last = now
        for offset, row in enumerate(rows):
            for slot, k in enumerate(state.slots):
                member = state.members[k]
                if member.live:
                    _member_step(state, slot, member, row[slot], first_step + offset + 1)
        live = [m.tracker.losses[-1] for m in state.members if m.live]
        if live:
            reporter.maybe_report(state.step, min(live), losses=[m.tracker.losses[-1] for m in state.members])
        _finish(state, [(slot, k) for slot, k in enumerate(state.slots)
                        if state.members[k].live and state.members[k].setup.plan.steps == state.step])
        last = time.perf_counter()  # the evaluation's time went to the members it evaluated
        drop_frozen(state)  # (none left live: nothing to drop, and the loop ends)


def _finish(state: StackState, done: list[tuple[int, int]]) -> None:
    """Evaluate the members in `done` (slot, member) after their last step, with each
    one's own evaluation batches (as their runs alone would), and mark them finished."""
    started = time.perf_counter()
    by_micro: dict[int, list[tuple[int, int]]] = {}
    for slot, k in done:
        by_micro.setdefault(state.members[k].setup.plan.micro_seqs, []).append((slot, k))
        # Before any evaluation forward overwrites the layers' stats: like the run alone's,
        # the load is that of the member's last training batch.
        state.members[k].moe_load = mean_moe_load(state.model.moe_layers(), slot)
    for group in by_micro.values():
        values = evaluate(state.model, state.members[group[0][1]].setup, _Distributed()).tolist()
        for slot, k in group:
            member = state.members[k]
            member.val_loss, member.finished = values[slot], True
    for _, k in done:
        state.members[k].train_s += (time.perf_counter() - started) / len(done)


def _member_step(state: StackState, slot: int, member: Member, loss: float, step: int) -> None:
    """Record the loss of `step` of the member in `slot`; freeze it (lr 0) when it
    diverges, and say so."""
    reason = member.tracker.add(loss)
    member.steps = step
    if reason is None:
        return
    member.status, member.reason = "diverged", reason
    member.moe_load = mean_moe_load(state.model.moe_layers(), slot)
    state.peaks[slot] = 0.0
