"""Time of the law fits on a synthetic sweep of Step-Law size.

Cases:
- fit_hparams on 3,744 runs (36 (N, D) cells x 13 LRs x 8 batch sizes, with diverged
  and failed runs) with 1,000 bootstrap resamples, against a plain per-resample loop
  (what the vectorized bootstrap replaces: resample runs within cells, recompute each
  cell's near-optimal set, least squares). Target: under 2 s on 2 cores.
- fit_loss on the same sweep's 36 cells with 200 bootstrap resamples.

`--quick` uses 100 resamples and fewer repeats. One JSON object on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.harness import log, report, time_interleaved  # noqa: E402
from steplaw.laws.fit import fit_hparams  # noqa: E402
from steplaw.laws.loss import fit_loss  # noqa: E402
from steplaw.laws.synthetic import synthetic_runs  # noqa: E402


def loop_bootstrap(table, gap: float, n_boot: int, seed: int) -> np.ndarray:
    """Reference: one least-squares fit of the LR law per resample, in a Python loop."""
    rng = np.random.default_rng(seed)
    keys = np.column_stack([table.N, table.D])
    cells = [np.flatnonzero((keys == key).all(axis=1) & table.valid) for key in np.unique(keys, axis=0)]
    cells = [c for c in cells if c.size >= 2]
    coefs = np.empty((n_boot, 3))
    for b in range(n_boot):
        chosen = []
        for rows in cells:
            sample = rows[rng.integers(0, rows.size, rows.size)]
            best = table.loss[sample].min()
            chosen.append(sample[table.loss[sample] <= best * (1 + gap)])
        rows = np.concatenate(chosen)
        design = np.column_stack([np.ones(rows.size), np.log(table.N[rows]), np.log(table.D[rows])])
        coefs[b] = np.linalg.lstsq(design, np.log(table.lr[rows]), rcond=None)[0]
    return coefs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    args = parser.parse_args()
    n_boot = 100 if args.quick else 1000
    repeats = 3 if args.quick else 7

    table = synthetic_runs(seed=0)
    log(f"synthetic sweep: {len(table)} runs, {table.n_valid} finished, dropped {table.dropped}")
    cases = []

    log(f"fit_hparams, {n_boot} resamples ...")
    median = time_interleaved(
        {
            "steplaw": lambda: fit_hparams(table, n_boot=n_boot, seed=0),
            "loop_bootstrap": lambda: loop_bootstrap(table, 0.0025, n_boot, 0),
        },
        warmup=1, repeats=repeats,
    )
    fit = fit_hparams(table, n_boot=n_boot, seed=0)
    cases.append({
        "case": f"fit_hparams {len(table)} runs / {n_boot} bootstrap",
        "median_s": median,
        "speedup": {"vs_loop_bootstrap": median["loop_bootstrap"] / median["steplaw"]},
        "target_s": 2.0,
        "meets_target": median["steplaw"] < 2.0,
        "lr_exp_N": fit.lr_law.exps["N"],
        "lr_exp_D": fit.lr_law.exps["D"],
        "bs_exp_D": fit.bs_law.exps["D"],
    })

    loss_boot = 20 if args.quick else 200
    log(f"fit_loss, {loss_boot} resamples ...")
    median = time_interleaved({"steplaw": lambda: fit_loss(table, n_boot=loss_boot, seed=0)},
                              warmup=1, repeats=2 if args.quick else 3)
    cases.append({"case": f"fit_loss 36 cells / {loss_boot} bootstrap", "median_s": median, "speedup": {}})

    report("fit", "cpu", cases, cpu_count=os.cpu_count(), quick=args.quick)


if __name__ == "__main__":
    main()
