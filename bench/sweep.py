"""Sweep throughput: runs per hour of K runs differing only in LR, trained as one stack
(steplaw.train.stacked.run_stack) vs one at a time (steplaw.train.run), same runs, same
machine, timed interleaved in one process (bench/harness.py).

One call of a contender trains all K runs of its case from scratch (set-up, training,
evaluation). `speedup.vs_one_at_a_time` = one-at-a-time time / stacked time, so it is
also the ratio of runs per hour. Each case also reports the process CPU seconds of each
contender (`cpu_s`, `speedup_cpu_time`: on a machine shared with other jobs the CPU time
is the steadier measure of the work done) and the largest relative difference between a
stacked member's final training loss and its run alone (`max_rel_loss_diff`, which
should stay below 1e-3).

Cases: CPU at the demo's sizes (names contain "demo"; steplaw.sweep.presets), and about
1M and 10M parameters; CUDA (only when a GPU is visible): about 1M, 10M and 100M
parameters in bf16, K = 16 (K = 8 at 100M).

    python bench/sweep.py [--quick] [--device cpu|cuda] [--threads N] [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from harness import log, report, speedups, time_interleaved

DEMO_LRS = [0.0015, 0.003, 0.006, 0.012, 0.002, 0.004, 0.008, 0.001, 0.0025, 0.005, 0.01, 0.0035, 0.0045, 0.007, 0.0055, 0.009]


def demo_shape(d_model: int, n_heads: int, d_ff: int, moe=None):
    from steplaw.models import ModelConfig

    return ModelConfig(d_model=d_model, n_layers=2, n_heads=n_heads, d_ff=d_ff, max_seq_len=64, moe=moe)


def cases(device: str, quick: bool) -> list[dict]:
    """(name, model, K, batch_tokens, seq_len, steps, precision) of each case."""
    from steplaw.models import MoEConfig, model_for_params

    if quick:
        return [dict(name="dense demo d=32 K=4 B=128 (quick)", model=demo_shape(32, 2, 96), members=4,
                     batch_tokens=128, seq_len=64, steps=4, eval_tokens=512)]
    if device.startswith("cuda"):
        out = []
        for n, members, seq_len, batch_tokens, steps in ((1e6, 16, 256, 8192, 40), (1e7, 16, 512, 8192, 30), (1e8, 8, 1024, 4096, 12)):
            vocab = 50304 if n >= 1e8 else 256
            model = model_for_params(n, vocab_size=vocab, max_seq_len=seq_len)
            out.append(dict(name=f"dense ~{n / 1e6:.0f}M K={members} B={batch_tokens} bf16", model=model, members=members,
                            batch_tokens=batch_tokens, seq_len=seq_len, steps=steps, eval_tokens=8 * seq_len, precision="bf16"))
        return out
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=48)
    return [
        dict(name="dense demo d=32 K=4 B=128", model=demo_shape(32, 2, 96), members=4, batch_tokens=128, seq_len=64, steps=64),
        dict(name="dense demo d=48 K=8 B=256", model=demo_shape(48, 4, 128), members=8, batch_tokens=256, seq_len=64, steps=64),
        dict(name="dense demo d=64 K=8 B=512", model=demo_shape(64, 4, 192), members=8, batch_tokens=512, seq_len=64, steps=64),
        dict(name="moe demo d=48 E=4 K=8 B=256", model=demo_shape(48, 4, 128, moe), members=8, batch_tokens=256, seq_len=64, steps=64),
        dict(name="dense ~1M K=8 B=2048", model=model_for_params(1e6, max_seq_len=128), members=8, batch_tokens=2048,
             seq_len=128, steps=12),
        dict(name="dense ~10M K=4 B=4096", model=model_for_params(1e7, max_seq_len=256), members=4, batch_tokens=4096,
             seq_len=256, steps=2, eval_tokens=1024),
    ]


def run_configs(case: dict, device: str):
    from steplaw.train import RunConfig

    return [
        RunConfig(model=case["model"], tokens=case["steps"] * case["batch_tokens"], lr=lr, batch_tokens=case["batch_tokens"],
                  seq_len=case["seq_len"], device=device, precision=case.get("precision", "auto"),
                  eval_tokens=case.get("eval_tokens", 4096))
        for lr in DEMO_LRS[:case["members"]]
    ]


def timed_cpu(fn, samples: list[float]):
    def call():
        t0 = time.process_time()
        out = fn()
        samples.append(time.process_time() - t0)
        return out

    return call


def measure(case: dict, device: str, repeats: int) -> dict:
    from steplaw.models import param_counts
    from steplaw.train import run
    from steplaw.train.stacked import run_stack

    configs = run_configs(case, device)
    last: dict[str, list] = {}
    cpu: dict[str, list[float]] = {"stacked": [], "one_at_a_time": []}

    def stacked():
        last["stacked"] = run_stack(configs)

    def one_at_a_time():
        last["one_at_a_time"] = [run(c) for c in configs]

    contenders = {"stacked": timed_cpu(stacked, cpu["stacked"]), "one_at_a_time": timed_cpu(one_at_a_time, cpu["one_at_a_time"])}
    median_s = time_interleaved(contenders, device=device, warmup=1, repeats=repeats)
    cpu_s = {name: statistics.median(values[1:] or values) for name, values in cpu.items()}  # less the warm-up call
    diffs = [abs(a.final_train_loss - b.final_train_loss) / abs(b.final_train_loss)
             for a, b in zip(last["stacked"], last["one_at_a_time"]) if a.final_train_loss and b.final_train_loss]
    counts = param_counts(case["model"])
    return {
        "case": case["name"],
        "median_s": median_s,
        "speedup": speedups(median_s, "stacked"),
        "runs_per_hour": {name: case["members"] * 3600 / s for name, s in median_s.items()},
        "cpu_s": cpu_s,
        "speedup_cpu_time": cpu_s["one_at_a_time"] / cpu_s["stacked"],
        "members": case["members"],
        "steps": case["steps"],
        "batch_tokens": case["batch_tokens"],
        "params_non_embedding": counts.non_embedding,
        "params_total": counts.total,
        "statuses_equal": [a.status for a in last["stacked"]] == [b.status for b in last["one_at_a_time"]],
        "max_rel_loss_diff": max(diffs) if diffs else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny case, one round (seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a sweep runs one process per core)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    out = []
    for case in cases(args.device, args.quick):
        if args.only and args.only not in case["name"]:
            continue
        log(f"bench sweep: {case['name']}")
        result = measure(case, args.device, repeats)
        log(f"  speedup {result['speedup']['vs_one_at_a_time']:.2f}x wall, {result['speedup_cpu_time']:.2f}x cpu time")
        out.append(result)
    report("sweep", args.device, out, quick=args.quick, repeats=repeats)


if __name__ == "__main__":
    main()
