"""One training run: `run(RunConfig) -> RunResult`.

On one CPU, one GPU, or several processes under torchrun (DDP; gloo on CPU, NCCL on
GPU). Batch arithmetic and data order: steplaw.train.batching. Checkpoints:
steplaw.train.checkpoint. Results: final smoothed training loss (bias-corrected EMA of
the step losses, time constant `EMA_STEPS` steps), validation loss on `eval_tokens`
held-out tokens, a loss curve of at most `CURVE_POINTS` points (mean loss of each interval,
at the tokens seen at its end), throughput and compute.

Divergence: a non-finite loss, or a smoothed loss above DIVERGENCE_FACTOR x the first
step's loss, ends the run with status "diverged" (a result, not an exception).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from steplaw.errors import UserError
from steplaw.models.accounting import flops_per_token, param_counts
from steplaw.optim.schedule import check_schedule, default_warmup_steps, lr_multiplier
from steplaw.train import checkpoint as ckpt
from steplaw.train.batching import auto_micro_batch_tokens, eval_offsets, gather_windows, plan_batches, step_offsets
from steplaw.train.config import RunConfig, RunResult

EMA_STEPS = 10
CURVE_POINTS = 256
DIVERGENCE_FACTOR = 1.5
PROGRESS_INTERVAL_S = 1.0

ProgressFn = Callable[[dict], None]


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


_warned_fallback = False


def make_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (ndim >= 2, embeddings included) and none on
    norm weights. "steplaw": steplaw.optim.FusedAdamW, falling back to torch's fused AdamW
    (one warning) while it is not there; "torch": torch.optim.AdamW with its defaults."""
    global _warned_fallback
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    if config.optimizer == "steplaw":
        try:
            from steplaw.optim import FusedAdamW
        except ImportError:
            if not _warned_fallback:
                warnings.warn("steplaw.optim.FusedAdamW is not available; using torch.optim.AdamW(fused=True)", stacklevel=2)
                _warned_fallback = True
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        return FusedAdamW(groups, **kwargs)
    if config.optimizer == "torch":
        return torch.optim.AdamW(groups, **kwargs)
    raise UserError(f"optimizer={config.optimizer!r}: expected 'steplaw' or 'torch'")


def _stderr_progress(info: dict) -> None:
    eta = info["eta_s"]
    eta_text = f"{eta / 60:.1f} min" if eta >= 60 else f"{eta:.0f} s"
    line = (
        f"\r{info['tokens'] / 1e6:8.2f}M / {info['total_tokens'] / 1e6:.2f}M tokens"
        f"  loss {info['loss']:.4f}  {info['tokens_per_s']:,.0f} tok/s  ETA {eta_text}   "
    )
    sys.stderr.write(line)
    if info.get("done"):
        sys.stderr.write("\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- helpers

def smoothed(losses: list[float]) -> float:
    """Bias-corrected EMA of the step losses (time constant EMA_STEPS steps)."""
    beta = 1 - 1 / EMA_STEPS
    value = 0.0
    for loss in losses:
        value = beta * value + (1 - beta) * loss
    return value / (1 - beta ** len(losses)) if losses else float("nan")


def loss_curve(losses: list[float], batch_tokens: int, points: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """(tokens seen, mean step loss) over at most `points` equal intervals of the steps."""
    if not losses:
        return []
    every = max(1, math.ceil(len(losses) / points))
    curve = []
    for start in range(0, len(losses), every):
        chunk = losses[start:start + every]
        curve.append(((start + len(chunk)) * batch_tokens, float(sum(chunk) / len(chunk))))
    return curve


@torch.no_grad()
def evaluate(model, stream, plan, eval_tokens, device, autocast_dtype, dist: _Distributed) -> float:
    """Mean validation loss (nats/token) over evenly spaced windows, split over ranks.
    Runs the plain module (not the compiled or DDP-wrapped one): no gradients to sync,
    and no recompilation for eval mode."""
    model.eval()
    offsets = eval_offsets(len(stream), plan.seq_len, eval_tokens)
    mine = offsets[dist.rank::dist.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(mine), plan.micro_seqs):
        x, y = gather_windows(stream, mine[start:start + plan.micro_seqs], plan.seq_len, device)
        with _autocast(device, autocast_dtype):
            loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    model.train()
    total = dist.mean(total)  # the ratio of sums is what matters; mean keeps it
    return float(total[0] / total[1])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- the run

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
    from steplaw.data.tokens import load_token_data
    from steplaw.models.transformer import Transformer

    started = time.perf_counter()
    dist = _Distributed()
    is_main = dist.rank == 0
    run_path = Path(run_dir) if run_dir is not None else None
    run_id = config.run_id()
    if (checkpoint_every or stop_after_steps) and run_path is None:
        raise UserError("checkpointing needs a run directory: pass run_dir (--out DIR)")
    if run_path is not None:
        finished = ckpt.load_result(run_path, run_id)
        if finished is not None:
            return finished

    # Validate everything before touching data or devices.
    check_schedule(config.schedule, config.min_lr_ratio, config.decay_fraction)
    device = resolve_device(config.device, dist.local_rank)
    plan = plan_batches(
        config.tokens, config.batch_tokens, config.seq_len, config.micro_batch_tokens, dist.world_size,
        auto_micro_tokens=auto_micro_batch_tokens(config.model, device.type),
    )
    if config.seq_len > config.model.max_seq_len:
        raise UserError(f"seq_len={config.seq_len} exceeds the model's max_seq_len={config.model.max_seq_len}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise UserError(f"lr={config.lr!r}: expected a positive learning rate")
    autocast_dtype = resolve_precision(config.precision, device)
    warmup_steps = default_warmup_steps(plan.steps) if config.warmup_tokens is None else max(1, round(config.warmup_tokens / plan.batch_tokens))
    warmup_steps = min(warmup_steps, plan.steps)
    data = load_token_data(config.data)
    if config.model.vocab_size < data.vocab_size:
        raise UserError(f"model vocab_size={config.model.vocab_size} is smaller than the data's vocabulary of {data.vocab_size}")

    counts = param_counts(config.model)
    per_token = flops_per_token(config.model, config.seq_len)
    result = RunResult(
        status="ok",
        params_total=counts.total,
        params_non_embedding=counts.non_embedding,
        params_active=counts.active,
        flops_per_token=per_token,
        config=config.to_dict(),
        run_id=run_id,
    )

    if device.type == "cuda":
        # fp32 matmuls (an fp32 run, the optimizer's norms) on TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dist.start(device)
    try:
        torch.manual_seed(config.seed)
        model = Transformer(config.model).to(device)
        optimizer = make_optimizer(model, config, device)
        losses: list[float] = []
        start_step, prior_wall_s, prior_train_s = 0, 0.0, 0.0
        if run_path is not None:
            state = ckpt.load_checkpoint(run_path, run_id, device)
            if state is not None:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                ckpt.restore_rng(state["rng"])
                losses = list(state["losses"])
                start_step = state["step"]
                prior_wall_s, prior_train_s = state["wall_s"], state["train_s"]
        train_model = model
        if config.compile:
            train_model = torch.compile(train_model)
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(
                train_model,
                device_ids=[device.index] if device.type == "cuda" else None,
            )
        outcome = _train(
            config, plan, model, train_model, optimizer, data.train, device, autocast_dtype, dist,
            losses, start_step, warmup_steps, run_path if is_main else None, checkpoint_every,
            stop_after_steps, progress if is_main else None, prior_train_s,
        )
        status, reason, steps_done, train_s = outcome
        result.status, result.reason = status, reason
        result.steps = steps_done
        result.tokens = steps_done * plan.batch_tokens
        # A diverged run stops at its first non-finite loss: the curve and smoothed loss
        # keep the finite steps before it (results stay valid JSON, no NaN).
        finite = [x for x in losses if math.isfinite(x)]
        result.curve = loss_curve(finite, plan.batch_tokens)
        result.final_train_loss = smoothed(finite) if finite else None
        moe_layers = model.moe_layers()
        if moe_layers and all("max_mean_load" in layer.stats for layer in moe_layers):
            load = sum(float(layer.stats["max_mean_load"]) for layer in moe_layers) / len(moe_layers)
            result.moe_max_mean_load = load if math.isfinite(load) else None
        if status == "ok":
            result.final_val_loss = evaluate(model, data.val, plan, config.eval_tokens, device, autocast_dtype, dist)
        result.tokens_per_s = steps_done * plan.batch_tokens / train_s if train_s > 0 else None
        result.compute_flops = per_token * result.tokens
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        result.status = "failed"
        result.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        train_model = None  # release the DDP reducer before the group goes
        dist.finish(synchronize=result.status != "failed")
    result.wall_s = prior_wall_s + time.perf_counter() - started
    if run_path is not None and is_main and result.status != "pending":
        ckpt.save_result(run_path, result)
    return result


def _train(
    config, plan, model, train_model, optimizer, stream, device, autocast_dtype, dist,
    losses, start_step, warmup_steps, run_path, checkpoint_every, stop_after_steps, progress, prior_train_s,
):
    """The optimizer-step loop. Returns (status, reason, steps done, training seconds)."""
    report = _stderr_progress if progress is True else (progress or None)
    moe_layers = model.moe_layers()
    params = [p for p in model.parameters() if p.requires_grad]
    sync_every = 1 if device.type == "cpu" else 16  # GPU: read losses back in batches
    pending: list[torch.Tensor] = []
    first_loss = losses[0] if losses else None
    ema_beta = 1 - 1 / EMA_STEPS
    ema, ema_n = 0.0, 0
    for value in losses:
        ema, ema_n = ema_beta * ema + (1 - ema_beta) * value, ema_n + 1
    t0 = time.perf_counter()
    last_report = t0
    tokens_this_session = 0
    step = start_step
    rank_slice = slice(dist.rank * plan.rank_seqs, (dist.rank + 1) * plan.rank_seqs)

    def train_seconds() -> float:
        return prior_train_s + time.perf_counter() - t0

    while step < plan.steps:
        multiplier = lr_multiplier(step, plan.steps, warmup_steps, config.schedule, config.min_lr_ratio, config.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * multiplier
        offsets = step_offsets(config.seed, step, plan.batch_seqs, len(stream), plan.seq_len)[rank_slice]
        step_loss = torch.zeros((), device=device)
        for micro in range(plan.accumulation):
            x, y = gather_windows(stream, offsets[micro * plan.micro_seqs:(micro + 1) * plan.micro_seqs], plan.seq_len, device)
            last = micro == plan.accumulation - 1
            sync_context = train_model.no_sync() if (dist.active and not last) else contextlib.nullcontext()
            with sync_context:
                with _autocast(device, autocast_dtype):
                    loss = train_model(x, y)
                    total = loss + model.aux_loss()
                (total / plan.accumulation).backward()
            step_loss += loss.detach() / plan.accumulation
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for layer in moe_layers:
            if dist.active and layer.cfg.bias_update_rate > 0:
                # Balance on the global batch's load, so every rank moves its bias alike.
                from torch import distributed as torch_dist

                torch_dist.all_reduce(layer._load_since_update)
            layer.update_bias()
        step += 1
        tokens_this_session += plan.batch_tokens
        pending.append(step_loss)

        checkpoint_due = bool(checkpoint_every) and step % checkpoint_every == 0
        if len(pending) >= sync_every or step == plan.steps or step == stop_after_steps or checkpoint_due:
            new = dist.mean(torch.stack(pending)).tolist()
            pending.clear()
            for value in new:
                losses.append(value)
                if first_loss is None:
                    first_loss = value
                if not math.isfinite(value):
                    return "diverged", f"loss became {value} at step {len(losses)}", len(losses), train_seconds()
                ema, ema_n = ema_beta * ema + (1 - ema_beta) * value, ema_n + 1
                smooth = ema / (1 - ema_beta ** ema_n)
                if smooth > DIVERGENCE_FACTOR * first_loss:
                    return (
                        "diverged",
                        f"smoothed loss {smooth:.3f} rose above {DIVERGENCE_FACTOR} x the first loss {first_loss:.3f} at step {len(losses)}",
                        len(losses),
                        train_seconds(),
                    )
            now = time.perf_counter()
            if report is not None and (now - last_report >= PROGRESS_INTERVAL_S or step == plan.steps):
                last_report = now
                rate = tokens_this_session / max(now - t0, 1e-9)
                report({
                    "tokens": step * plan.batch_tokens,
                    "total_tokens": plan.tokens,
                    "step": step,
                    "steps": plan.steps,
                    "loss": losses[-1],
                    "tokens_per_s": rate,
                    "eta_s": (plan.steps - step) * plan.batch_tokens / rate,
                    "done": step == plan.steps,
                })
            if run_path is not None and (checkpoint_due or step == stop_after_steps):
                ckpt.save_checkpoint(run_path, config.run_id(), model, optimizer, step, losses, train_seconds(), train_seconds())
            if step == stop_after_steps:
                return "pending", f"stopped after step {step} of {plan.steps}; run again with the same directory to resume", step, train_seconds()
    return "ok", None, step, train_seconds()
