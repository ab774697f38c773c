"""Sweep throughput: runs per hour of K runs differing only in LR, trained as one stack
(steplaw.train.stacked.run_stack) vs one at a time (steplaw.train.run), same runs, same
machine, timed interleaved in one process (bench/harness.py).

One call of a contender trains all K runs of its case from scratch (set-up, training,
evaluation). `speedup.vs_one_at_a_time` = one-at-a-time time / stacked time, so it is
also the ratio of runs per hour. Each case also reports the process CPU seconds of each
contender (`cpu_s`, `speedup_cpu_time`: on a machine shared with other jobs the CPU time
is the steadier measure of the work done) and the largest relative difference between a
stacked member's final training loss and its run alone (`max_rel_loss_diff`, which must
stay below 1e-3). A run alone computes with the stack's own layer code as a stack of one
(steplaw.models.layers), so on a CPU, in float32 as in float64, it is 0: a member ends
with its run alone's losses to the last bit (tests/train/test_stacked.py checks it). The
rounding floor it would otherwise be read against is in `alone_rounding_rel_diff`: how
far that same run's final loss moves when it is trained alone once more with its batch
split into smaller micro-batches (mathematically the same run; only the rounding of the
accumulated gradients differs; null where the batch is a single sequence and cannot be
split). High-LR runs of the demo move by percents there: a stack that rounded even
slightly differently from its runs alone would show differences of that size.

Mixed cases ("mixed" in the name, CPU): runs that differ in token budget and batch size
too, as an adaptive sweep proposes them: a demo cell's round (3 LRs at batch B, one run
at B/2 and one at 2B) and a grid column (3 LRs x the demo's 3 token budgets at one batch
size). Three contenders, each training every run of the case on one thread:
`stacked` (plan_stacks' groups, as `--stack auto` forms them: members of different
lengths, and a small dense model's different batch sizes, share a stack),
`stacked_same_shape` (only runs of equal tokens and batch size stacked: the rule before
2026-12-05) and `one_at_a_time`.

Cases: CPU at the demo's shapes (names contain "demo": steplaw.sweep.presets.demo_spec's
models, 8-token sequences, eval tokens and schedule; batches of 32-128 tokens at its
middle token budget; LRs spread over the cell's grid, centre/4 .. centre*4), an MoE model
at the demo's sequence length, and about 1M and 10M parameters; CUDA (only when a GPU is
visible): about 1M, 10M and 100M parameters in bf16, K = 16 (K = 8 at 100M).

`--scan` (CPU): where stacking stops paying. For each demo case's shape, the time of one
member-step (a stack's step time / K) at K = 1, 2, 4, 8 against one step of a run alone,
each stack trained SCAN_STEPS steps, all timed interleaved; and, from one profiled
K = 8 stack, the share of its time spent in matmuls (aten::bmm's self time): what is
left when every per-op overhead is shared, and what no stack can remove.

    python bench/sweep.py [--quick] [--device cpu|cuda] [--threads N] [--repeats N] [--only TEXT] [--scan]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from harness import log, report, speedups, time_interleaved

DEMO_LRS = [0.0015, 0.003, 0.006, 0.012, 0.002, 0.004, 0.008, 0.001, 0.0025, 0.005, 0.01, 0.0035, 0.0045, 0.007, 0.0055, 0.009]
# The demo cases: (d_model, batch tokens, K), each at the demo's middle budget D (its cells'
# budgets are steplaw.sweep.presets.demo_spec().tokens). Steps = D / batch.
DEMO_CASES = [(16, 32, 4), (32, 64, 8), (64, 128, 8), (64, 64, 4)]
WARMUP_STEPS = 4  # each contender trains its runs this many steps once before the timed rounds


def demo_lrs(center: float, members: int) -> list[float]:
    """`members` LRs evenly spaced in log over the demo grid's span, center/4 .. center*4."""
    if members == 1:
        return [center]
    return [center * 4.0 ** (2 * i / (members - 1) - 1) for i in range(members)]


def demo_cases(quick: bool = False) -> list[dict]:
    """The demo's own cells (steplaw.sweep.presets.demo_spec): its shapes, sequence
    length, eval tokens and schedule, and LRs around the cell's centre."""
    from steplaw.sweep.presets import demo_spec

    spec = demo_spec()
    cells = {(cell.model.d_model, cell.tokens): cell for cell in spec.cells()}
    fixed = {k: v for k, v in spec.fixed.items() if k != "device"}
    picks = [(32, 128, 4)] if quick else DEMO_CASES
    budget = sorted(spec.tokens)[len(spec.tokens) // 2]
    out = []
    for d_model, batch_tokens, members in picks:
        cell = cells[(d_model, budget)]
        steps = 4 if quick else budget // batch_tokens
        model = cell.model
        out.append(dict(
            name=f"dense demo d={d_model} K={members} B={batch_tokens} D={budget // 1024}K" + (" (quick)" if quick else ""),
            model=model, members=members, batch_tokens=batch_tokens, steps=steps, lrs=demo_lrs(cell.lr_center, members),
            **fixed))
    return out


def cases(device: str, quick: bool) -> list[dict]:
    """(name, model, K, batch_tokens, seq_len, steps, precision, ...) of each case; other
    keys are RunConfig fields."""
    from steplaw.models import ModelConfig, MoEConfig, model_for_params
    from steplaw.sweep.presets import DEMO_SEQ_LEN

    if quick:
        return demo_cases(quick=True)
    if device.startswith("cuda"):
        out = []
        for n, members, seq_len, batch_tokens, steps in ((1e6, 16, 256, 8192, 40), (1e7, 16, 512, 8192, 30), (1e8, 8, 1024, 4096, 12)):
            vocab = 50304 if n >= 1e8 else 256
            model = model_for_params(n, vocab_size=vocab, max_seq_len=seq_len)
            out.append(dict(name=f"dense ~{n / 1e6:.0f}M K={members} B={batch_tokens} bf16", model=model, members=members,
                            batch_tokens=batch_tokens, seq_len=seq_len, steps=steps, eval_tokens=8 * seq_len, precision="bf16"))
        return out
    moe = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=96, max_seq_len=DEMO_SEQ_LEN,
                      moe=MoEConfig(n_experts=4, top_k=2, d_expert=32))
    return demo_cases() + [
        dict(name="moe d=32 E=4 K=8 B=64 seq 8", model=moe, members=8, batch_tokens=64, seq_len=DEMO_SEQ_LEN, steps=128,
             eval_tokens=1024),
        dict(name="dense ~1M K=8 B=2048", model=model_for_params(1e6, max_seq_len=128), members=8, batch_tokens=2048,
             seq_len=128, steps=12),
        dict(name="dense ~10M K=4 B=4096", model=model_for_params(1e7, max_seq_len=256), members=4, batch_tokens=4096,
             seq_len=256, steps=2, eval_tokens=1024),
    ]


_CASE_KEYS = {"name", "model", "members", "steps", "lrs"}


def run_configs(case: dict, device: str):
    from steplaw.train import RunConfig

    fields = {k: v for k, v in case.items() if k not in _CASE_KEYS}
    fields.setdefault("eval_tokens", 4096)
    return [
        RunConfig(model=case["model"], tokens=case["steps"] * case["batch_tokens"], lr=lr, device=device, **fields)
        for lr in case.get("lrs") or DEMO_LRS[:case["members"]]
    ]


def rounding_twin(config):
    """`config` with each batch split into smaller micro-batches (gradients accumulated):
    mathematically the same run, rounded differently. None when its micro-batch is a
    single sequence already."""
    from steplaw.train.batching import auto_micro_batch_tokens, plan_batches
    from steplaw.train.runner import resolve_device

    auto = auto_micro_batch_tokens(config.model, resolve_device(config.device).type)
    plan = plan_batches(config.tokens, config.batch_tokens, config.seq_len, config.micro_batch_tokens, auto_micro_tokens=auto)
    smaller = [n for n in range(1, plan.micro_seqs) if plan.rank_seqs % n == 0]
    if not smaller:
        return None
    return dataclasses.replace(config, micro_batch_tokens=smaller[-1] * config.seq_len)


def rel_diff(a: float | None, b: float | None) -> float | None:
    return abs(a - b) / abs(b) if a and b else None


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

    # Warm-up (code paths, allocator, data) on short runs rather than one more round of the case.
    short = [dataclasses.replace(c, tokens=min(c.tokens, WARMUP_STEPS * c.batch_tokens)) for c in configs]
    run_stack(short)
    for config in short:
        run(config)
    contenders = {"stacked": timed_cpu(stacked, cpu["stacked"]), "one_at_a_time": timed_cpu(one_at_a_time, cpu["one_at_a_time"])}
    median_s = time_interleaved(contenders, device=device, warmup=0, repeats=repeats)
    cpu_s = {name: statistics.median(values) for name, values in cpu.items()}
    diffs = [rel_diff(a.final_train_loss, b.final_train_loss) for a, b in zip(last["stacked"], last["one_at_a_time"])]
    known = [(d, i) for i, d in enumerate(diffs) if d is not None]
    worst = max(known)[1] if known else None
    floor = None
    if worst is not None and (twin := rounding_twin(configs[worst])) is not None:
        floor = rel_diff(run(twin).final_train_loss, last["one_at_a_time"][worst].final_train_loss)
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
        "max_rel_loss_diff": diffs[worst] if worst is not None else None,
        "max_rel_loss_diff_lr": configs[worst].lr if worst is not None else None,
        "alone_rounding_rel_diff": floor,
    }


SCAN_STEPS = 64
SCAN_MEMBERS = (1, 2, 4, 8)


def measure_scan(case: dict, repeats: int) -> dict:
    """Per member-step seconds of stacks of K members vs a run alone (see the docstring)."""
    from torch.profiler import ProfilerActivity, profile

    from steplaw.train import run
    from steplaw.train.stacked import run_stack

    name = case["name"].replace(f"K={case['members']} ", "") + " scan"
    # LRs from the cell's centre down to half of it, where no member diverges: a diverged
    # member leaves the stack and would make a larger stack look cheaper per member.
    center = statistics.geometric_mean(case["lrs"])
    members = max(SCAN_MEMBERS)
    case = dict(case, members=members, lrs=[center * 2 ** (-i / (members - 1)) for i in range(members)])
    configs = [dataclasses.replace(c, tokens=SCAN_STEPS * c.batch_tokens, eval_tokens=c.seq_len * 8)
               for c in run_configs(case, "cpu")]
    contenders = {"alone": lambda: run(configs[0])}
    contenders.update({f"K={k}": (lambda k=k: run_stack(configs[:k])) for k in SCAN_MEMBERS})
    median_s = time_interleaved(contenders, device="cpu", warmup=1, repeats=repeats)
    alone = median_s["alone"] / SCAN_STEPS
    member_step = {k: median_s[f"K={k}"] / SCAN_STEPS / k for k in SCAN_MEMBERS}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        statuses = [r.status for r in run_stack(configs)]
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::bmm", "aten::mm", "aten::addmm"))
    return {
        "case": name,
        "steps": SCAN_STEPS,
        "median_s": median_s,  # of the whole call: SCAN_STEPS steps of a run alone or of a stack of K
        "alone_s_per_step": alone,
        "member_step_s": {str(k): v for k, v in member_step.items()},
        "speedup": {f"K={k}": alone / v for k, v in member_step.items()},
        "matmul_share_at_K8": matmul / total,
        "matmul_s_per_member_step_at_K8": member_step[max(SCAN_MEMBERS)] * matmul / total,
        "lrs": [c.lr for c in configs],
        "statuses_at_K8": statuses,
    }


def mixed_cases() -> list[dict]:
    """A demo cell's round and a grid column, at the demo's shapes (see the docstring)."""
    from steplaw.sweep.presets import demo_spec
    from steplaw.train import RunConfig

    spec = demo_spec()
    fixed = {k: v for k, v in spec.fixed.items() if k != "device"}
    cells = {(cell.model.d_model, cell.tokens): cell for cell in spec.cells()}
    budget = sorted(spec.tokens)[1]
    out = []
    for d_model, batch in ((16, 64), (32, 64), (64, 64), (64, 128)):
        cell = cells[(d_model, budget)]
        runs = [(cell.lr_center * f, batch, budget) for f in (0.5, 1, 2)] + [(cell.lr_center, batch // 2, budget),
                                                                           (cell.lr_center, batch * 2, budget)]
        out.append(dict(name=f"mixed demo round d={d_model} B={batch} (3 LRs at B, one at B/2 and 2B) D={budget // 1024}K",
                        configs=[RunConfig(model=cell.model, lr=lr, batch_tokens=b, tokens=d, device="cpu", **fixed)
                                 for lr, b, d in runs]))
    cell = cells[(32, budget)]
    out.append(dict(name="mixed demo grid column d=32 B=64 (3 LRs x 3 token budgets)",
                    configs=[RunConfig(model=cell.model, lr=cell.lr_center * f, batch_tokens=64, tokens=d, device="cpu", **fixed)
                             for d in spec.tokens for f in (0.5, 1, 2)]))
    return out


def measure_mixed(case: dict, repeats: int) -> dict:
    from steplaw.train.stacked import plan_stacks, run_group

    configs = case["configs"]
    by_shape: dict[tuple, list] = {}
    for config in configs:
        by_shape.setdefault((config.tokens, config.batch_tokens), []).append(config)
    plans = {"stacked": plan_stacks(configs, "auto"), "stacked_same_shape": list(by_shape.values()),
             "one_at_a_time": [[c] for c in configs]}
    last: dict[str, dict] = {}

    def contender(name):
        def call():
            last[name] = {r.run_id: r for group in plans[name] for r in run_group(group)}
        return call

    short = [dataclasses.replace(c, tokens=WARMUP_STEPS * c.batch_tokens) for c in configs]
    for group in plan_stacks(short, "auto"):
        run_group(group)
    median_s = time_interleaved({name: contender(name) for name in plans}, device="cpu", warmup=0, repeats=repeats)
    alone = last["one_at_a_time"]
    diffs = [rel_diff(r.final_train_loss, alone[run_id].final_train_loss) for run_id, r in last["stacked"].items()]
    return {
        "case": case["name"],
        "median_s": median_s,
        "speedup": speedups(median_s, "stacked"),
        "runs": len(configs),
        "stack_sizes": {name: sorted((len(g) for g in groups), reverse=True) for name, groups in plans.items()},
        "runs_per_hour": {name: len(configs) * 3600 / s for name, s in median_s.items()},
        "statuses_equal": all(r.status == alone[run_id].status for run_id, r in last["stacked"].items()),
        "max_rel_loss_diff": max((d for d in diffs if d is not None), default=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny case, one round (seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a sweep runs one process per core)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    parser.add_argument("--scan", action="store_true", help="CPU: per member-step cost of stacks of 1-8 at the demo's shapes")
    args = parser.parse_args()
    if args.scan:
        torch.set_num_threads(args.threads)
        out = []
        for case in demo_cases():
            if args.only and args.only not in case["name"]:
                continue
            log(f"bench sweep scan: {case['name']}")
            out.append(measure_scan(case, args.repeats or 5))
            log(f"  speedup by K {out[-1]['speedup']}; matmul share at K=8 {out[-1]['matmul_share_at_K8']:.2f}")
        report("sweep", "cpu", out, scan=True, repeats=args.repeats or 5)
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    out = []
    mixed = mixed_cases() if args.device == "cpu" and not args.quick else []
    for case in cases(args.device, args.quick) + mixed:
        if args.only and args.only not in case["name"]:
            continue
        log(f"bench sweep: {case['name']}")
        if "configs" in case:
            result = measure_mixed(case, repeats)
            log(f"  speedup {result['speedup']}; max stacked-vs-alone loss diff {result['max_rel_loss_diff']}")
            out.append(result)
            continue
        result = measure(case, args.device, repeats)
        log(f"  speedup {result['speedup']['vs_one_at_a_time']:.2f}x wall, {result['speedup_cpu_time']:.2f}x cpu time; "
            f"max stacked-vs-alone loss diff {result['max_rel_loss_diff']}, alone's rounding floor {result['alone_rounding_rel_diff']}")
        out.append(result)
    report("sweep", args.device, out, quick=args.quick, repeats=repeats)


if __name__ == "__main__":
    main()
