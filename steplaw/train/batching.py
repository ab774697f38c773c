"""Batch arithmetic and the token batches of each step.

A batch of B tokens is B / seq_len sequences, split evenly over the world's ranks, and on
each rank into micro-batches run one after the other with gradient accumulation:
  batch_tokens = micro_batch_seqs x seq_len x accumulation x world_size   (exactly)
A batch that does not divide so is refused (UserError naming the numbers), never rounded.
A run trains floor(D / B) steps, so it sees steps x B tokens (at most B - 1 fewer than D).

Data position: the sequences of step s are windows at offsets given by a counter-based
hash of (seed, s, i) (SplitMix64), identical on every rank (each rank takes its slice).
So a step's batch depends only on (seed, step): resuming at step s needs only s, and 2
ranks see exactly the batch one process would. (A hash costs microseconds per step,
where seeding a numpy Generator per step costs ~0.3 ms, noticeable in tiny CPU runs.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from steplaw.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    seq_len: int
    batch_seqs: int  # sequences per optimizer step, all ranks
    rank_seqs: int  # sequences per step on one rank
    micro_seqs: int  # sequences per forward/backward
    accumulation: int  # micro-batches per step on one rank
    world_size: int
    steps: int  # optimizer steps

    @property
    def batch_tokens(self) -> int:
        return self.batch_seqs * self.seq_len

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_tokens


def activation_bytes_per_token(model) -> int:
    """Rough training memory per token of a micro-batch (fp32 activations kept for the
    backward pass, and the logits with their gradient), for choosing micro-batches."""
    if model.moe is not None:
        ffn = (model.moe.top_k + model.moe.n_shared_experts) * model.moe.d_expert + 2 * model.moe.top_k * model.d_model
    else:
        ffn = model.d_ff
    return 4 * (model.n_layers * (16 * model.d_model + 4 * ffn) + 3 * model.vocab_size)


def auto_micro_batch_tokens(model, device_type: str) -> int:
    """The micro-batch cap (tokens) used when a run does not set one: what fits 2 GiB of
    activations on CPU, or 40% of the GPU's memory."""
    budget = 2 * 2**30
    if device_type == "cuda":
        import torch

        budget = int(0.4 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return max(1, budget // activation_bytes_per_token(model))


def plan_batches(
    tokens: int,
    batch_tokens: int,
    seq_len: int,
    micro_batch_tokens: int | None = None,
    world_size: int = 1,
    auto_micro_tokens: int | None = None,
) -> BatchPlan:
    """The exact split of each batch (see the module doc). `micro_batch_tokens` None:
    each rank's whole share at once, or, when that exceeds `auto_micro_tokens`, the largest
    number of sequences that divides the share and fits under it (at least one)."""
    for name, value in (("tokens", tokens), ("batch_tokens", batch_tokens), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name}={value!r}: expected a positive whole number of tokens")
    if batch_tokens % seq_len:
        raise UserError(
            f"batch_tokens={batch_tokens} is not a multiple of seq_len={seq_len}: "
            f"use e.g. {max(1, round(batch_tokens / seq_len)) * seq_len}"
        )
    batch_seqs = batch_tokens // seq_len
    if batch_seqs % world_size:
        raise UserError(
            f"batch_tokens={batch_tokens} is {batch_seqs} sequences of {seq_len}, which do not split over "
            f"{world_size} processes: expected a multiple of {seq_len * world_size} tokens"
        )
    rank_seqs = batch_seqs // world_size
    micro_seqs = rank_seqs
    if micro_batch_tokens is None and auto_micro_tokens is not None and rank_seqs * seq_len > auto_micro_tokens:
        limit = max(1, auto_micro_tokens // seq_len)
        micro_seqs = max(n for n in range(1, min(limit, rank_seqs) + 1) if rank_seqs % n == 0)
    if micro_batch_tokens is not None:
        if micro_batch_tokens < seq_len or micro_batch_tokens % seq_len:
            raise UserError(f"micro_batch_tokens={micro_batch_tokens} is not a positive multiple of seq_len={seq_len}")
        micro_seqs = min(rank_seqs, micro_batch_tokens // seq_len)
        if rank_seqs % micro_seqs:
            raise UserError(
                f"micro_batch_tokens={micro_batch_tokens} ({micro_seqs} sequences) does not divide the "
                f"{rank_seqs} sequences each of {world_size} process(es) gets from batch_tokens={batch_tokens}"
            )
    steps = tokens // batch_tokens
    if steps < 1:
        raise UserError(f"tokens={tokens} is less than one batch of batch_tokens={batch_tokens}")
    return BatchPlan(seq_len, batch_seqs, rank_seqs, micro_seqs, rank_seqs // micro_seqs, world_size, steps)


def step_offsets(seed: int, step: int, batch_seqs: int, stream_len: int, seq_len: int) -> np.ndarray:
    """Start offsets of the `batch_seqs` training windows of step `step` (all ranks)."""
    high = stream_len - seq_len - 1
    if high < 1:
        raise UserError(f"the training data has {stream_len} tokens: too few for sequences of {seq_len}")
    # The step's counter base, in Python integers modulo 2^64 (numpy scalars would warn
    # about the wrap-around that the hash relies on).
    base = ((step * 0x9E3779B1 + seed * 0x85EBCA77) << 20) % 2**64
    counters = np.arange(batch_seqs, dtype=np.uint64) + np.uint64(base)
    return (_splitmix64(counters ^ np.uint64((seed * 0xC2B2AE3D27D4EB4F) % 2**64)) % np.uint64(high + 1)).astype(np.int64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014): a bijective mix of 64-bit counters."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def gather_windows(stream: np.ndarray, offsets: np.ndarray, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [len(offsets), seq_len] from the token stream."""
    windows = stream[offsets[:, None] + np.arange(seq_len + 1)]
    batch = torch.from_numpy(windows.astype(np.int64))
    if device.type != "cpu":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def eval_offsets(stream_len: int, seq_len: int, eval_tokens: int) -> np.ndarray:
    """Evenly spaced validation windows covering about `eval_tokens` tokens."""
    count = max(1, eval_tokens // seq_len)
    high = stream_len - seq_len - 1
    if high < 0:
        raise UserError(f"the validation data has {stream_len} tokens: too few for sequences of {seq_len}")
    return np.unique(np.linspace(0, high, count).astype(np.int64))
