"""Time the sweep store and the commands that read it, on a sweep of 50,000 runs.

The store is filled through the real driver (`run_sweep`: register, mark running, record
results, in batches) with an instant stand-in run function whose loss is a bowl in
(log lr, log B) around a known optimum per (N, D) cell, plus a little noise and a
divergence cliff at high LR. Then the user-facing commands run as subprocesses, as a user
would run them:

- `steplaw runs DIR --csv`  target < 5 s
- `steplaw fit DIR`         target < 10 s
- `steplaw report DIR`      target < 60 s
  (fit and report also with --no-plots: figures are most of their time)

and in-process: `export_rows` (the read every command starts with) and the driver's
rerun of a finished sweep (finds all 50,000 runs done, runs nothing). Each case reports
the median of `--repeats` calls; there is one contender per case (the targets are
absolute), so `speedup` is empty and the target is given beside the time.

    python bench/store.py [--runs 50000] [--repeats 3] [--keep DIR] [--quick]
    python bench/store.py --store DIR   # time the commands on a store built before with --keep

With --store the driver cases (build, rerun) are left out: only the commands that read
the store are timed.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import log, report  # noqa: E402
from steplaw.models.config import ModelConfig  # noqa: E402
from steplaw.sweep.driver import run_sweep  # noqa: E402
from steplaw.sweep.executors import InlineExecutor  # noqa: E402
from steplaw.sweep.spec import count_params  # noqa: E402
from steplaw.sweep.store import export_rows  # noqa: E402
from steplaw.train.config import RunConfig, RunResult  # noqa: E402
from steplaw.trainers.steplaw import SteplawTrainer  # noqa: E402

SEQ_LEN = 64


def grid(total: int) -> list[RunConfig]:
    """About `total` runs: models x budgets x 20 LRs x 25 batch sizes (at least 3 x 3 cells:
    the fitters need 3 distinct N and D)."""
    per_cell = 20 * 25
    cells = max(9, round(total / per_cell))
    n_tokens = max(3, round(math.sqrt(cells / 6)))
    n_models = max(3, math.ceil(cells / n_tokens))
    models = [ModelConfig(d_model=32 * (i + 1), n_layers=2, n_heads=4, d_ff=128 * (i + 1), max_seq_len=SEQ_LEN)
              for i in range(n_models)]
    budgets = [2 ** (24 + j) for j in range(n_tokens)]
    lrs = [round(1e-4 * 2 ** (k / 2), 8) for k in range(20)]
    seqs = [1]
    for k in range(1, 25):  # 25 distinct batch sizes, about x1.4 apart
        seqs.append(max(seqs[-1] + 1, round(1.4**k)))
    return [RunConfig(model=m, tokens=d, lr=lr, batch_tokens=SEQ_LEN * s, seq_len=SEQ_LEN)
            for m in models for d in budgets for lr in lrs for s in seqs]


_N_CACHE: dict = {}


def bowl_run(config: RunConfig, run_dir=None) -> RunResult:
    """Instant stand-in: loss = L(N, D) + bowl around lr* = 0.3 N^-0.5 D^0.1, B* = 0.5 D^0.5."""
    n = _N_CACHE.get(config.model)
    if n is None:
        n = _N_CACHE.setdefault(config.model, count_params(config.model)["non_embedding"])
    d = config.tokens
    lr_opt, b_opt = 0.3 * n**-0.5 * d**0.1, 0.5 * d**0.5
    if config.lr > 8 * lr_opt:
        return RunResult(status="diverged", reason="loss is nan", final_train_loss=float("nan"))
    key = repr((config.lr, config.batch_tokens, d, config.model.d_model)).encode()
    noise = int(hashlib.blake2b(key, digest_size=4).hexdigest(), 16) / 2**32 - 0.5
    loss = (1.7 + 400 / n**0.35 + 300 / d**0.3 + 0.08 * math.log(config.lr / lr_opt) ** 2
            + 0.03 * math.log(config.batch_tokens / b_opt) ** 2 + 0.002 * noise)
    return RunResult(status="ok", final_train_loss=loss, final_val_loss=loss + 0.01, curve=[(0, 6.0), (d, loss)],
                     tokens=d, steps=d // config.batch_tokens, compute_flops=6.0 * n * d, wall_s=0.0)


def build(sweep_dir: Path, runs: list[RunConfig]) -> float:
    started = time.perf_counter()
    summary = run_sweep(runs, sweep_dir, lambda: InlineExecutor(bowl_run, capacity=256, run_dirs=False), progress=False,
                        trainer=SteplawTrainer())
    elapsed = time.perf_counter() - started
    log(f"built {summary.total} runs ({summary.counts}) in {elapsed:.1f} s")
    return elapsed


def time_command(argv: list[str], repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "steplaw", *argv], capture_output=True, text=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SystemExit(f"steplaw {' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return statistics.median(times)


def time_call(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def case(name: str, seconds: float, target_s: float | None = None, **extra) -> dict:
    out = {"case": name, "median_s": {"steplaw": seconds}, "speedup": {}, **extra}
    if target_s is not None:
        out["target_s"] = target_s
        out["meets_target"] = seconds < target_s
    log(f"{name}: {seconds:.2f} s" + (f" (target < {target_s} s)" if target_s else ""))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", help="build the store in this directory and keep it")
    parser.add_argument("--quick", action="store_true", help="2,000 runs, one repeat (a smoke test)")
    parser.add_argument("--store", help="time the reading commands on this store (built before with --keep); "
                                        "the driver cases are left out")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.repeats = 2_000, 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            sweep_dir = Path(args.store)
            n = len(export_rows(sweep_dir))
            cases = []
        else:
            sweep_dir = Path(args.keep) if args.keep else Path(tmp) / "sweep"
            runs = grid(args.runs)
            n = len(runs)
            build_s = build(sweep_dir, runs)
            cases = [case(f"driver: run {n} instant runs into a new store", build_s, runs_per_s=n / build_s)]
            rerun_s = time_call(lambda: run_sweep(runs, sweep_dir, lambda: None, progress=False,
                        trainer=SteplawTrainer()), args.repeats)
            cases.append(case(f"driver: rerun of the finished {n}-run sweep (nothing to run)", rerun_s))
        cases.append(case(f"export_rows of {n} runs (in-process)", time_call(lambda: export_rows(sweep_dir), args.repeats)))
        d = str(sweep_dir)
        cases.append(case(f"steplaw runs --csv, {n} runs", time_command(["runs", d, "--csv", "-o", str(Path(tmp) / "runs.csv")],
                                                                         args.repeats), target_s=5.0))
        fit_out = str(Path(tmp) / "fit")
        cases.append(case(f"steplaw fit, {n} runs", time_command(["fit", d, "--out", fit_out], args.repeats), target_s=10.0))
        cases.append(case(f"steplaw fit --no-plots, {n} runs", time_command(["fit", d, "--no-plots"], args.repeats)))
        report_out = str(Path(tmp) / "report")
        cases.append(case(f"steplaw report, {n} runs", time_command(["report", d, "--out", report_out], args.repeats),
                          target_s=60.0))
        cases.append(case(f"steplaw report --no-plots, {n} runs",
                          time_command(["report", d, "--out", report_out, "--no-plots"], args.repeats)))
    # the machine's load average before and after: numbers taken under load are not final
    report("store", "cpu", cases, runs=n, cpus=os.cpu_count(), loadavg_1min=[load_before[0], os.getloadavg()[0]],
           note="wall time of subprocesses as a user runs them, Python start and imports included"
           + ("; store built before (grid() through the driver, --keep), driver cases left out" if args.store else ""))


if __name__ == "__main__":
    main()
