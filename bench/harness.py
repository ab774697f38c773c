"""Shared timing and JSON output of the benchmarks in bench/.

Every benchmark prints one JSON object on stdout (progress goes to stderr):
{"bench": name, "device": ..., "torch": ..., "cases": [{"case": ..., "median_s": {contender: s},
 "speedup": {"vs_<contender>": their_time / our_time}, ...}]}
Contenders are timed in one process, interleaved round by round, so that drift of the
machine (clock, other load) hits all of them alike.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_interleaved(
    contenders: dict[str, Callable[[], object]],
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
) -> dict[str, float]:
    """Median seconds per call of each contender, timed round-robin.

    Each round calls every contender once (in a rotating order). On CUDA each call is
    bracketed by synchronisation, so the time is the kernel time plus launch overhead.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start) < min_time_s:
        order = names[rounds % len(names):] + names[: rounds % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def speedups(median_s: dict[str, float], ours: str) -> dict[str, float]:
    """{'vs_<other>': other_time / our_time} for every other contender."""
    return {f"vs_{name}": t / median_s[ours] for name, t in median_s.items() if name != ours}


def report(bench: str, device: str, cases: list[dict], **extra) -> dict:
    import torch

    result = {"bench": bench, "device": device_name(device), "torch": torch.__version__, **extra, "cases": cases}
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
