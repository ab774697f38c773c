"""Benchmark: one AdamW step of steplaw's FusedAdamW against torch.optim.AdamW
(for-loop, foreach and fused), on model-like sets of fp32 tensors.

Prints one JSON object (bench/harness.py shape). Per case: median seconds per step of
each contender (same process, interleaved), speedup = their time / ours, `gbps` =
28 bytes per parameter (read param, grad, exp_avg, exp_avg_sq: 16 B; write param,
exp_avg, exp_avg_sq: 12 B) / our time, and on CUDA `copy_gbps`: a device-to-device
copy moving the same 28 bytes per parameter (14 read + 14 written), the bandwidth
ceiling the kernel is measured against.

Stacked cases ("stacked K=..."): K runs of a sweep cell trained as one model (issue
10): one FusedAdamW step over parameters with a leading member dimension K and a
per-member lr tensor ("steplaw"), against K separate optimizers stepping each member's
own tensors, ours ("steplaw_per_member") and torch's fused ("torch_fused_per_member").

    python bench/adamw.py [--quick] [--device cpu|cuda] [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The steplaw of this checkout, not whichever one is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import log, report, speedups, time_interleaved

from steplaw.optim import FusedAdamW

BYTES_PER_PARAM = 28
# (name, total parameters, number of tensors)
FULL_CASES = [("50M fp32 / 100 tensors", 50_000_000, 100), ("5M fp32 / 1000 tensors", 5_000_000, 1000)]
QUICK_CASES = [("1M fp32 / 10 tensors", 1_000_000, 10), ("200K fp32 / 200 tensors", 200_000, 200)]
# (name, members K, parameters per member, tensors per member); demo models are 27K-107K.
FULL_STACKED = [("stacked K=8 demo 100K fp32 / 20 tensors", 8, 100_000, 20),
                ("stacked K=16 1M fp32 / 50 tensors", 16, 1_000_000, 50)]
QUICK_STACKED = [("stacked K=4 demo 30K fp32 / 10 tensors", 4, 30_000, 10)]


def make_tensors(total: int, count: int, device: str, seed: int):
    """`count` 2-D parameters (sizes varying around total / count, like a model's mix of
    matrices) with fixed gradients."""
    g = torch.Generator().manual_seed(seed)
    base = total // count
    sizes = [base + (base // 4) * ((k % 3) - 1) for k in range(count)]
    sizes[-1] += total - sum(sizes)
    params = []
    for size in sizes:
        p = torch.randn(size, generator=g).to(device).requires_grad_()
        p.grad = torch.randn(size, generator=g).to(device) * 1e-2
        params.append(p)
    return params


def contenders_for(total: int, count: int, device: str):
    factories = {
        "steplaw": lambda ps: FusedAdamW(ps, lr=1e-3),
        "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch_forloop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    }
    return {name: factory(make_tensors(total, count, device, seed=0)).step for name, factory in factories.items()}


def stacked_contenders(members: int, total: int, count: int, device: str):
    """One stacked optimizer vs one optimizer per member, on the same values."""
    stacked = [p.detach().unsqueeze(0).repeat(members, 1).requires_grad_() for p in make_tensors(total, count, device, 0)]
    for p, q in zip(stacked, make_tensors(total, count, device, 0)):
        p.grad = q.grad.unsqueeze(0).repeat(members, 1)
    lrs = torch.logspace(-4, -2, members, device=device)
    contenders = {"steplaw": FusedAdamW(stacked, lr=lrs.clone()).step}
    for name, factory in (("steplaw_per_member", lambda ps, lr: FusedAdamW(ps, lr=lr)),
                          ("torch_fused_per_member", lambda ps, lr: torch.optim.AdamW(ps, lr=lr, fused=True))):
        steps = [factory(make_tensors(total, count, device, 0), float(lr)).step for lr in lrs]
        contenders[name] = lambda steps=steps: [step() for step in steps]
    return contenders


def copy_gbps(total: int, device: str, repeats: int) -> float:
    nbytes = BYTES_PER_PARAM * total // 2
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_interleaved({"copy": lambda: dst.copy_(src)}, device=device, warmup=3, repeats=repeats)["copy"]
    return BYTES_PER_PARAM * total / seconds / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds-long smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per contender")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs a visible CUDA device")
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = args.repeats or (5 if args.quick else (9 if args.device == "cpu" else 50))
    results = []
    for name, total, count in cases:
        log(f"adamw: {name} on {args.device}")
        contenders = contenders_for(total, count, args.device)
        median_s = time_interleaved(contenders, device=args.device, warmup=2, repeats=repeats)
        case = {
            "case": name,
            "params": total,
            "tensors": count,
            "median_s": median_s,
            "speedup": speedups(median_s, "steplaw"),
            "gbps": BYTES_PER_PARAM * total / median_s["steplaw"] / 1e9,
        }
        if args.device.startswith("cuda"):
            case["copy_gbps"] = copy_gbps(total, args.device, repeats)
            case["fraction_of_copy"] = case["gbps"] / case["copy_gbps"]
        results.append(case)
        del contenders
    for name, members, total, count in (QUICK_STACKED if args.quick else FULL_STACKED):
        log(f"adamw: {name} on {args.device}")
        median_s = time_interleaved(stacked_contenders(members, total, count, args.device), device=args.device,
                                    warmup=2, repeats=repeats)
        results.append({"case": name, "members": members, "params": members * total, "tensors": count,
                        "median_s": median_s, "speedup": speedups(median_s, "steplaw"),
                        "gbps": BYTES_PER_PARAM * members * total / median_s["steplaw"] / 1e9})
    report("adamw", args.device, results, bytes_per_param=BYTES_PER_PARAM, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
