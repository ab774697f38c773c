"""Whether a run fits in memory, estimated before its model is built.

A model too large for the machine is otherwise allocated tensor by tensor until, on a
CPU, the OOM killer ends the process (exit 137, no message) and may take other work on
the machine with it; on a GPU it fails after minutes of setup. So `prepare` refuses a
run whose estimate exceeds the memory available, with one sentence, before allocating.

The estimate (a floor rather than a bound: allocator slack, the data loader and the
framework itself come on top):
  * 16 bytes per parameter: fp32 weights, their fp32 gradients and AdamW's two fp32
    moments. The runner keeps fp32 weights whatever the precision (bf16 is autocast, so
    there are no fp32 master copies to add);
  * activations of one micro-batch: steplaw.train.batching.activation_bytes_per_token,
    the estimate that also sizes automatic micro-batches.
Memory available: MemAvailable of /proc/meminfo on a CPU (what the kernel can hand out
without swapping; os.sysconf's free pages where there is no /proc), shared by the
processes of this machine; the free memory of the device on a GPU.
"""
from __future__ import annotations

import os

import torch

from steplaw.errors import UserError
from steplaw.models.accounting import param_counts
from steplaw.train.batching import activation_bytes_per_token

BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
MEMINFO = "/proc/meminfo"


def needed_bytes(model, micro_tokens: int, members: int = 1) -> int:
    """Estimated bytes to train `members` copies of `model` (a stack) on micro-batches of
    `micro_tokens` tokens (see the module docstring)."""
    per_member = BYTES_PER_PARAM * param_counts(model).total + micro_tokens * activation_bytes_per_token(model)
    return members * per_member


def available_bytes(device: torch.device) -> int | None:
    """Memory this run may use on `device`, or None when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open(MEMINFO, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n < 1e15 else f"{n / 1e9:.3g} GB"


def check_fits(model, micro_tokens: int, device: torch.device, processes: int = 1) -> None:
    """UserError when one run of `model` (times `processes` sharing this machine's CPU
    memory) is estimated to need more memory than `device` has available."""
    free = available_bytes(device)
    if free is None:
        return
    need = needed_bytes(model, micro_tokens) * (processes if device.type == "cpu" else 1)
    if need > free:
        params = param_counts(model).total
        raise UserError(
            f"the run needs about {_gb(need)} of memory ({params:.3g} parameters at {BYTES_PER_PARAM} bytes each for "
            f"weights, gradients and AdamW state, plus activations of {micro_tokens} tokens) but {device} has "
            f"{_gb(free)} available: expected a smaller model or micro-batch")


def stack_fits(model, micro_tokens: int, device: torch.device, members: int) -> bool:
    """Whether `members` stacked copies of `model` are estimated to fit in memory."""
    free = available_bytes(device)
    return free is None or needed_bytes(model, micro_tokens, members) <= free
