"""WSD branches: one model, 2 LRs, 4 token budgets x2 apart, trained as 2 trunks
(steplaw.train.branch.train_trunk: the stable phase once per LR, a cooldown branch per
budget) vs the same 8 runs alone (steplaw.train.run), same machine, timed interleaved
in one process (bench/harness.py).

One call of a contender trains all 8 runs from scratch (set-up, training, evaluation;
the trunk's durable checkpoints included, in a fresh temporary directory each call).
Reported per case:
  speedup.vs_alone   alone time / trunk time (target >= 1.3)
  tokens_ratio       tokens the trunks trained (sum of tokens_trained) / tokens of the
                     runs alone (sum of tokens); ideal for 20% cooldowns of budgets
                     1, 2, 4, 8: (0.8 * 8 + 0.2 * 15) / 15 = 0.627 (target <= 0.65)
  ideal_tokens_ratio (stable phase of the longest + sum of f * D) / sum of D, per trunk
  max_abs_loss_diff  largest |loss - loss alone| over final_train_loss and final_val_loss
                     of the 8 runs (must be 0: a branch ends as its run alone, to the bit)
  cpu_s              process CPU seconds per call of each contender (steadier than wall
                     time on a machine shared with other jobs)

    python bench/branch.py [--quick] [--threads N] [--repeats N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import log, report, speedups

from steplaw.models import ModelConfig
from steplaw.train import RunConfig, run
from steplaw.train.branch import train_trunk


def case(quick: bool) -> dict:
    if quick:
        model = ModelConfig(d_model=16, n_layers=1, n_heads=1, d_ff=48, max_seq_len=8)
        steps, name = (10, 20, 40, 80), "quick d16x1, seq 8, 4 budgets x2 (10..80 steps), 2 LRs"
    else:
        model = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=96, max_seq_len=8)
        steps, name = (100, 200, 400, 800), "d32x2, seq 8, batch 64, 4 budgets x2 (100..800 steps), 2 LRs, 20% 1-sqrt cooldown"
    configs = [RunConfig(model=model, tokens=s * 64, lr=lr, batch_tokens=64, seq_len=8, device="cpu", eval_tokens=1024,
                         schedule="wsd", warmup_tokens=(2 if quick else 10) * 64, decay_fraction=0.2, decay_shape="sqrt", min_lr_ratio=0.0)
               for lr in (0.003, 0.01) for s in steps]
    return {"name": name, "configs": configs}


def measure(spec: dict, repeats: int, warmup: int) -> dict:
    configs = spec["configs"]
    trunks = [[c for c in configs if c.lr == lr] for lr in sorted({c.lr for c in configs})]
    last: dict[str, dict] = {}

    def trunk() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            results = {}
            for i, group in enumerate(trunks):
                for config, result in zip(group, train_trunk(group, Path(tmp) / f"trunk{i}")):
                    results[config.run_id()] = result
            last["trunk"] = results

    def alone() -> None:
        last["alone"] = {c.run_id(): run(c) for c in configs}

    run(configs[0])  # first-call costs (kernel set-up, allocator) outside the timed rounds
    contenders = {"trunk": trunk, "alone": alone}
    names = list(contenders)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + repeats):
        order = names[round_ % 2:] + names[:round_ % 2]  # interleaved, rotating who goes first
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            contenders[name]()
            if round_ >= warmup:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        log(f"  round {round_ + 1}: " + ", ".join(f"{n} {wall[n][-1]:.2f} s" for n in names if wall[n]))
    median_s = {n: statistics.median(v) for n, v in wall.items()}
    cpu_s = {n: statistics.median(v) for n, v in cpu.items()}
    branched, alone_results = last["trunk"], last["alone"]
    diffs = [abs(getattr(branched[i], f) - getattr(r, f)) for i, r in alone_results.items()
             for f in ("final_train_loss", "final_val_loss")]
    # The continuous ideal: per trunk, the longest run's stable phase plus every cooldown.
    ideal = sum((1 - g[0].decay_fraction) * max(c.tokens for c in g) + g[0].decay_fraction * sum(c.tokens for c in g)
                for g in trunks)
    alone_tokens = sum(r.tokens for r in alone_results.values())
    return {
        "case": spec["name"], "median_s": median_s, "speedup": speedups(median_s, "trunk"),
        "cpu_s": cpu_s, "speedup_cpu_time": cpu_s["alone"] / cpu_s["trunk"],
        "tokens_trained": {"trunk": sum(r.tokens_trained for r in branched.values()), "alone": alone_tokens},
        "tokens_ratio": sum(r.tokens_trained for r in branched.values()) / alone_tokens,
        "ideal_tokens_ratio": ideal / alone_tokens,
        "max_abs_loss_diff": max(diffs),
        "statuses": sorted({r.status for r in branched.values()} | {r.status for r in alone_results.values()}),
        "runs": len(configs), "same_run_ids": sorted(branched) == sorted(alone_results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny case, one round (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a sweep runs one process per core)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--note", default=None, help="a note kept in the JSON (e.g. that the machine was busy)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = case(args.quick)
    repeats = args.repeats or (1 if args.quick else 3)
    log(f"bench branch: {spec['name']}")
    result = measure(spec, repeats, warmup=0 if args.quick else 1)
    log(f"  {result['speedup']['vs_alone']:.2f}x wall, {result['speedup_cpu_time']:.2f}x cpu; tokens ratio "
        f"{result['tokens_ratio']:.3f} (ideal {result['ideal_tokens_ratio']:.3f}); max |loss diff| {result['max_abs_loss_diff']}")
    extra = {"note": args.note} if args.note else {}
    report("branch", "cpu", [result], quick=args.quick, repeats=repeats, threads=args.threads, **extra)


if __name__ == "__main__":
    main()
