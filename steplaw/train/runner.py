"""One training run: `run(RunConfig) -> RunResult`.

On one CPU, one GPU, or several processes under torchrun (DDP; gloo on CPU, NCCL on
GPU). Batch arithmetic and data order: steplaw.train.batching. Checkpoints:
steplaw.train.checkpoint. The smoothed loss, the divergence rule, the loss curve and
progress: steplaw.train.tracking. Results: final smoothed training loss, validation loss
on `eval_tokens` held-out tokens, the loss curve, throughput and compute.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from steplaw.errors import UserError
from steplaw.models.accounting import flops_per_token, param_counts
from steplaw.optim.schedule import check_schedule, default_warmup_steps, lr_multiplier
from steplaw.runtable import finite_or_none
from steplaw.train import checkpoint as ckpt
from steplaw.train.batching import BatchPlan, auto_micro_batch_tokens, eval_offsets, gather_windows, plan_batches, step_offsets
from steplaw.train.config import RunConfig, RunResult
from steplaw.train.memory import check_fits
from steplaw.train.tracking import LossTracker, ProgressFn, ProgressReporter, loss_curve

# ---------------------------------------------------------------- environment

def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r}: no CUDA device is available here (use 'cpu' or 'auto')")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise UserError(f"precision={precision!r}: expected 'auto', 'fp32' or 'bf16'")


class _Distributed:
    """torchrun's world (WORLD_SIZE/RANK/LOCAL_RANK), or a world of one."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def start(self, device: torch.device) -> None:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank to its current device
        if self.active and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return values
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
        return values / self.world_size

    def finish(self, synchronize: bool = True) -> None:
        """Tear down the group we started. Callers drop their DDP wrapper first: gloo's
        worker threads must not outlive the objects they reference, or the process aborts
        at exit ("terminate called without an active exception")."""
        if self.owns_group:
            import gc

            import torch.distributed as dist

            gc.collect()
            if synchronize:  # not after a failure: the other ranks may never arrive
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def make_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (ndim >= 2, embeddings included) and none on
    norm weights. "steplaw": steplaw.optim.FusedAdamW; "torch": torch.optim.AdamW with its
    defaults."""
    from steplaw.optim import FusedAdamW

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    if config.optimizer == "steplaw":
        return FusedAdamW(groups, **kwargs)
    if config.optimizer == "torch":
        return torch.optim.AdamW(groups, **kwargs)
    raise UserError(f"optimizer={config.optimizer!r}: expected 'steplaw' or 'torch'")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- setup

@dataclass
class Setup:
    """What a run (or a stack of runs) needs once its config is validated."""

    config: RunConfig
    plan: BatchPlan
    device: torch.device
    autocast_dtype: torch.dtype | None
    warmup_steps: int
    data: object  # steplaw.data.tokens' token data: .train, .val streams

    def lr_multiplier(self, step: int) -> float:
        c = self.config
        return lr_multiplier(step, self.plan.steps, self.warmup_steps, c.schedule, c.min_lr_ratio, c.decay_fraction,
                             c.decay_shape)

    def batch(self, step: int, rank_slice: slice, micro: int):
        """Inputs and targets of micro-batch `micro` of step `step` on this rank."""
        plan, stream = self.plan, self.data.train
        offsets = step_offsets(self.config.seed, step, plan.batch_seqs, len(stream), plan.seq_len)[rank_slice]
        return gather_windows(stream, offsets[micro * plan.micro_seqs:(micro + 1) * plan.micro_seqs], plan.seq_len, self.device)


def prepare(config: RunConfig, world_size: int = 1, local_rank: int = 0) -> Setup:
    """Validate `config` (UserError naming the bad value) and load its data, before any
    device work."""
    from steplaw.data.tokens import load_token_data

    check_schedule(config.schedule, config.min_lr_ratio, config.decay_fraction, config.decay_shape)
    device = resolve_device(config.device, local_rank)
    plan, warmup = plan_steps(config, device, world_size)
    if config.seq_len > config.model.max_seq_len:
        raise UserError(f"seq_len={config.seq_len} exceeds the model's max_seq_len={config.model.max_seq_len}")
    check_lr(config.lr)
    if config.optimizer not in ("steplaw", "torch"):
        raise UserError(f"optimizer={config.optimizer!r}: expected 'steplaw' or 'torch'")
    autocast_dtype = resolve_precision(config.precision, device)
    # Before any allocation: a model too large for the machine is refused here, not
    # ended by the OOM killer. Processes of one machine share its CPU memory.
    check_fits(config.model, plan.micro_seqs * plan.seq_len, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    data = load_token_data(config.data)
    data.check_model_vocab(config.model.vocab_size)
    if device.type == "cuda":
        # fp32 matmuls (an fp32 run, the optimizer's norms) on TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Setup(config, plan, device, autocast_dtype, warmup, data)


def plan_steps(config: RunConfig, device: torch.device, world_size: int = 1) -> tuple[BatchPlan, int]:
    """The run's batch plan and its warmup steps (at most its steps)."""
    plan = plan_batches(
        config.tokens, config.batch_tokens, config.seq_len, config.micro_batch_tokens, world_size,
        auto_micro_tokens=auto_micro_batch_tokens(config.model, device.type),
    )
    warmup = default_warmup_steps(plan.steps) if config.warmup_tokens is None else max(1, round(config.warmup_tokens / plan.batch_tokens))
    return plan, min(warmup, plan.steps)


def check_lr(lr: float) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"lr={lr!r}: expected a positive learning rate")


def new_result(config: RunConfig) -> RunResult:
    """A RunResult with the run's identity and size filled in (status "ok" until told otherwise)."""
    counts = param_counts(config.model)
    return RunResult(
        status="ok", params_total=counts.total, params_non_embedding=counts.non_embedding,
        params_active=counts.active, flops_per_token=flops_per_token(config.model, config.seq_len),
        config=config.to_dict(), run_id=config.run_id(),
    )


def record_training(result: RunResult, tracker: LossTracker, steps: int, plan: BatchPlan, train_s: float) -> None:
    """Fill the training part of a result: steps, tokens, curve, final loss, throughput, compute.
    A diverged run's curve and smoothed loss keep the finite steps before its first
    non-finite loss (results stay valid JSON, no NaN)."""
    finite = tracker.finite()
    result.steps = steps
    result.tokens = steps * plan.batch_tokens
    result.tokens_trained = result.tokens  # a trunk's branches count their own share (steplaw.train.branch)
    result.curve = loss_curve(finite, plan.batch_tokens)
    result.final_train_loss = finite_or_none(tracker.smoothed) if finite else None
    result.tokens_per_s = result.tokens / train_s if train_s > 0 else None
    result.compute_flops = result.flops_per_token * result.tokens


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@torch.no_grad()
def evaluate(model, setup: Setup, dist: _Distributed) -> torch.Tensor:
    """Mean validation loss (nats/token) over evenly spaced windows, split over ranks: a
    0-d tensor, or one value per member [K] for a stacked model (whose forward returns
    [K] losses). Runs the plain module (not the compiled or DDP-wrapped one): no
    gradients to sync, and no recompilation for eval mode."""
    plan, device = setup.plan, setup.device
    model.eval()
    offsets = eval_offsets(len(setup.data.val), plan.seq_len, setup.config.eval_tokens)
    mine = offsets[dist.rank::dist.world_size]
    loss_sum, count = None, torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(mine), plan.micro_seqs):
        x, y = gather_windows(setup.data.val, mine[start:start + plan.micro_seqs], plan.seq_len, device)
        with _autocast(device, setup.autocast_dtype):
            loss = model(x, y)
        term = loss.double() * y.numel()
        loss_sum = term if loss_sum is None else loss_sum + term
        count += y.numel()
    model.train()
    total = dist.mean(torch.cat([loss_sum.reshape(-1), count.reshape(1)]))  # the ratio of sums is what matters
    return (total[:-1] / total[-1]).reshape(loss_sum.shape)


# ---------------------------------------------------------------- the run

@dataclass
class TrainState:
    """The model being trained and how far it has got (restored from a checkpoint on resume)."""

    model: torch.nn.Module  # the plain module (checkpoints, evaluation)
    train_model: torch.nn.Module  # what the forward runs: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    tracker: LossTracker
    step: int = 0
    prior_train_s: float = 0.0  # time spent in earlier sessions of a resumed run
    prior_wall_s: float = 0.0


@dataclass
class LoopOptions:
    run_path: Path | None  # checkpoints go here (rank 0 only)
    checkpoint_every: int | None
    stop_after_steps: int | None
    progress: bool | ProgressFn | None
    started: float  # perf_counter() when this session of the run began (wall time)


@dataclass
class Outcome:
    status: str  # "ok", "diverged" or "pending"
    reason: str | None
    steps: int
    train_s: float


def run(
    config: RunConfig,
    run_dir: str | Path | None = None,
    progress: bool | ProgressFn | None = None,
    *,
    checkpoint_every: int | None = None,
    stop_after_steps: int | None = None,
) -> RunResult:
    """Train `config.model` on `config.tokens` tokens and return its RunResult.

    run_dir: where result.json (and checkpoint.pt) go; a run_dir holding a checkpoint of
      the same run resumes from it, and one holding its result.json returns that result.
    progress: True for a progress line on stderr, or a function given a dict (tokens,
      total_tokens, loss, tokens_per_s, eta_s, done) about once a second.
    checkpoint_every: save a checkpoint every this many steps (needs run_dir).
    stop_after_steps: stop after this step count with status "pending" and a checkpoint
      (preemption; a later call with the same run_dir resumes).
    User mistakes in the config raise UserError; a run that breaks while training returns
    status "failed" with the reason.
    """
    started = time.perf_counter()
    dist = _Distributed()
    run_path = Path(run_dir) if run_dir is not None else None
    if (checkpoint_every or stop_after_steps) and run_path is None:
        raise UserError("checkpointing needs a run directory: pass run_dir (--out DIR)")
    if run_path is not None:
        finished = ckpt.load_result(run_path, config.run_id())
        if finished is not None:
            return finished
    setup = prepare(config, dist.world_size, dist.local_rank)  # everything validated before devices
    result = new_result(config)
    prior_wall_s = 0.0
    dist.start(setup.device)
    state = None
    try:
        state = build_state(setup, run_path, dist)
        prior_wall_s = state.prior_wall_s
        is_main = dist.rank == 0
        options = LoopOptions(run_path if is_main else None, checkpoint_every, stop_after_steps,
                              progress if is_main else None, started)
        train_and_evaluate(setup, state, dist, options, result)
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        result.status, result.reason = "failed", failure_reason(exc)
    finally:
        state = None  # release the DDP reducer before the group goes
        dist.finish(synchronize=result.status != "failed")
    result.wall_s = prior_wall_s + time.perf_counter() - started
    if run_path is not None and dist.rank == 0 and result.status != "pending":
        ckpt.save_result(run_path, result)
    return result


def train_and_evaluate(setup: Setup, state: TrainState, dist: _Distributed, options: LoopOptions,
                       result: RunResult) -> None:
    """Train `state` to the end of its plan and write the outcome into `result`: status,
    the training record, the MoE load of the last training batch and, when it ended ok,
    the validation loss (a run alone and a WSD branch end the same way)."""
    outcome = train_loop(setup, state, dist, options)
    result.status, result.reason = outcome.status, outcome.reason
    record_training(result, state.tracker, outcome.steps, setup.plan, outcome.train_s)
    result.moe_max_mean_load = mean_moe_load(state.model.moe_layers())
    if outcome.status == "ok":
        # A NaN validation loss is no measurement: None keeps results strict JSON.
        result.final_val_loss = finite_or_none(evaluate(state.model, setup, dist))


def mean_moe_load(moe_layers, member: int | None = None) -> float | None:
    """max/mean expert load of the last training batch, averaged over the MoE layers (of
    one member of a stacked model when `member` is given); None for dense models."""
    if not moe_layers or not all("max_mean_load" in layer.stats for layer in moe_layers):
        return None
    values = [layer.stats["max_mean_load"] if member is None else layer.stats["max_mean_load"][member] for layer in moe_layers]
    return finite_or_none(sum(float(v) for v in values) / len(values))


def build_state(setup: Setup, run_path: Path | None, dist: _Distributed) -> TrainState:
    """The seeded model and its optimizer, resumed from run_path's checkpoint when it holds one."""
    from steplaw.models.transformer import Transformer

    config = setup.config
    torch.manual_seed(config.seed)
    model = Transformer(config.model).to(setup.device)
    state = TrainState(model, model, make_optimizer(model, config, setup.device), LossTracker())
    saved = ckpt.load_checkpoint(run_path, config.run_id(), setup.device) if run_path is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        ckpt.restore_rng(saved["rng"])
        state.tracker = LossTracker(list(saved["losses"]))
        state.step = saved["step"]
        state.prior_wall_s, state.prior_train_s = saved["wall_s"], saved["train_s"]
    if config.compile:
        state.train_model = torch.compile(state.train_model)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        device = setup.device
        state.train_model = DistributedDataParallel(state.train_model, device_ids=[device.index] if device.type == "cuda" else None)
    return state


def forward_backward(setup: Setup, state: TrainState, dist: _Distributed, step: int) -> torch.Tensor:
    """Forward and backward of every micro-batch of one step on this rank (gradients
    accumulated, synchronised across ranks on the last); the step's mean loss (0-d tensor)."""
    plan = setup.plan
    rank_slice = slice(dist.rank * plan.rank_seqs, (dist.rank + 1) * plan.rank_seqs)
    step_loss = torch.zeros((), device=setup.device)
    for micro in range(plan.accumulation):
        x, y = setup.batch(step, rank_slice, micro)
        last = micro == plan.accumulation - 1
        sync_context = state.train_model.no_sync() if (dist.active and not last) else contextlib.nullcontext()
        with sync_context:
            with _autocast(setup.device, setup.autocast_dtype):
                loss = state.train_model(x, y)
                total = loss + state.model.aux_loss()
            (total / plan.accumulation).backward()
        step_loss += loss.detach() / plan.accumulation
    return step_loss


def train_step(setup: Setup, state: TrainState, dist: _Distributed) -> torch.Tensor:
    """One optimizer step at state.step: LR, forward/backward, clipping, update, MoE bias."""
    config = setup.config
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr * setup.lr_multiplier(state.step)
    step_loss = forward_backward(setup, state, dist, state.step)
    if config.grad_clip is not None:
        params = [p for p in state.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    for layer in state.model.moe_layers():
        if dist.active and layer.cfg.bias_update_rate > 0:
            # Balance on the global batch's load, so every rank moves its bias alike.
            from torch import distributed as torch_dist

            torch_dist.all_reduce(layer._load_since_update)
        layer.update_bias()
    state.step += 1
    return step_loss


def train_loop(setup: Setup, state: TrainState, dist: _Distributed, options: LoopOptions) -> Outcome:
    """Steps until the plan's end, a divergence, or options.stop_after_steps."""
    plan, tracker = setup.plan, state.tracker
    sync_every = 1 if setup.device.type == "cpu" else 16  # GPU: read losses back in batches
    pending: list[torch.Tensor] = []
    reporter = ProgressReporter(options.progress, plan)

    def train_seconds() -> float:
        return state.prior_train_s + time.perf_counter() - reporter.t0

    while state.step < plan.steps:
        pending.append(train_step(setup, state, dist))
        reporter.step_done()
        step = state.step
        checkpoint_due = bool(options.checkpoint_every) and step % options.checkpoint_every == 0
        if not (len(pending) >= sync_every or step == plan.steps or step == options.stop_after_steps or checkpoint_due):
            continue
        new = dist.mean(torch.stack(pending)).tolist()
        pending.clear()
        for value in new:
            reason = tracker.add(value)
            if reason is not None:
                return Outcome("diverged", reason, len(tracker.losses), train_seconds())
        reporter.maybe_report(step, tracker.losses[-1])
        if options.run_path is not None and (checkpoint_due or step == options.stop_after_steps):
            wall_s = state.prior_wall_s + time.perf_counter() - options.started
            ckpt.save_checkpoint(options.run_path, setup.config.run_id(), state.model, state.optimizer, step,
                                 tracker.losses, wall_s, train_seconds())
        if step == options.stop_after_steps:
            reason = f"stopped after step {step} of {plan.steps}; run again with the same directory to resume"
            return Outcome("pending", reason, step, train_seconds())
    return Outcome("ok", None, state.step, train_seconds())
