"""Time of the law fits on synthetic tables, each against a plain Python loop doing the same work.

Cases:
- fit_hparams on 3,744 runs (36 (N, D) cells x 13 LRs x 8 batch sizes, with diverged
  and failed runs) with 1,000 bootstrap resamples (law scoring off: the loop does not
  score), against `loop_fit_hparams`: per resample, resample runs within cells,
  recompute each cell's near-optimal set, least squares of the LR law and of the batch
  law; then the leave-one-cell-out folds of both laws and each cell's quadratic bowl.
  Target: under 2 s on 2 cores.
- the loss-law bootstrap: 1,000 resamples of a 250-row Chinchilla-style table (25 N x
  10 D, 1% noise), batched BFGS (steplaw) against one scipy BFGS fit per resample (the
  loop it replaced), both started from the same point estimate. Target: under 1 s on 2 cores.
- fit_loss end to end (point fit from the start grid + that bootstrap).

`--quick` uses 100 (loss: 20) resamples and fewer repeats. One JSON object on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.harness import log, report, time_interleaved
from steplaw.laws.cells import quadratic_optimum
from steplaw.laws.fit import fit_hparams
from steplaw.laws.loss import _fit_batch, _fit_once, cell_best_losses, fit_loss
from steplaw.laws.synthetic import synthetic_runs
from steplaw.laws.table import read_runs


def _lstsq(rows, table, target) -> np.ndarray:
    design = np.column_stack([np.ones(rows.size), np.log(table.N[rows]), np.log(table.D[rows])])
    return np.linalg.lstsq(design, np.log(target[rows]), rcond=None)[0]


def _bs_lstsq(rows, table) -> np.ndarray:
    design = np.column_stack([np.ones(rows.size), np.log(table.D[rows])])
    return np.linalg.lstsq(design, np.log(table.batch_tokens[rows]), rcond=None)[0]


def loop_fit_hparams(table, gap: float, n_boot: int, seed: int):
    """Reference: the work of fit_hparams (score_laws=False), one least-squares fit at a time."""
    rng = np.random.default_rng(seed)
    keys = np.column_stack([table.N, table.D])
    cells = [np.flatnonzero((keys == key).all(axis=1) & table.valid) for key in np.unique(keys, axis=0)]
    cells = [c for c in cells if c.size >= 2]
    near = [c[table.loss[c] <= table.loss[c].min() * (1 + gap)] for c in cells]
    boot_lr, boot_bs = np.empty((n_boot, 3)), np.empty((n_boot, 2))
    for b in range(n_boot):
        chosen = []
        for rows in cells:
            sample = rows[rng.integers(0, rows.size, rows.size)]
            chosen.append(sample[table.loss[sample] <= table.loss[sample].min() * (1 + gap)])
        rows = np.concatenate(chosen)
        boot_lr[b], boot_bs[b] = _lstsq(rows, table, table.lr), _bs_lstsq(rows, table)
    folds = []
    for held in range(len(cells)):
        rows = np.concatenate([n for i, n in enumerate(near) if i != held])
        folds.append((_lstsq(rows, table, table.lr), _bs_lstsq(rows, table)))
    bowls = [quadratic_optimum(np.log(table.lr[c]), np.log(table.batch_tokens[c]), table.loss[c], 0.03) for c in cells]
    return boot_lr, boot_bs, folds, bowls


def chinchilla_table(seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in np.geomspace(3e7, 3e9, 25):
        for d in np.geomspace(1e9, 3e11, 10):
            loss = 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28
            rows.append({"N": n, "D": d, "loss": loss * (1 + 0.01 * rng.standard_normal())})
    return read_runs(rows, needs="loss")


def loss_bootstrap_contenders(table, n_boot: int):
    point = fit_loss(table, n_boot=0)
    cells, best = cell_best_losses(table, table.N)
    log_n, log_d, log_loss = np.log(cells[:, 0]), np.log(cells[:, 1]), np.log(best)
    counts = np.random.default_rng(0).multinomial(len(cells), np.full(len(cells), 1 / len(cells)), size=n_boot)
    counts = counts.astype(float)
    theta = np.array([np.log(point.A), np.log(point.B), np.log(point.E), point.alpha, point.beta])
    batched = lambda: _fit_batch(log_n, log_d, log_loss, counts, theta, 1e-3)  # noqa: E731
    loop = lambda: np.array([_fit_once(log_n, log_d, log_loss, w, [theta], 1e-3) for w in counts])  # noqa: E731
    return batched, loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    args = parser.parse_args()
    n_boot = 100 if args.quick else 1000
    repeats = 3 if args.quick else 7
    cases = []

    table = synthetic_runs(seed=0)
    log(f"synthetic sweep: {len(table)} runs, {table.n_valid} finished, dropped {table.dropped}")
    log(f"fit_hparams, {n_boot} resamples ...")
    median = time_interleaved(
        {
            "steplaw": lambda: fit_hparams(table, n_boot=n_boot, seed=0, score_laws=False),
            "loop_fit_hparams": lambda: loop_fit_hparams(table, 0.0025, n_boot, 0),
        },
        warmup=1, repeats=repeats,
    )
    fit = fit_hparams(table, n_boot=n_boot, seed=0)
    cases.append({
        "case": f"fit_hparams {len(table)} runs / {n_boot} bootstrap (LR and batch laws, folds, bowls)",
        "median_s": median,
        "speedup": {"vs_loop_fit_hparams": median["loop_fit_hparams"] / median["steplaw"]},
        "target_s": 2.0, "meets_target": median["steplaw"] < 2.0,
        "lr_exp_N": fit.lr_law.exps["N"], "lr_exp_D": fit.lr_law.exps["D"], "bs_exp_D": fit.bs_law.exps["D"],
    })

    loss_table = chinchilla_table()
    loss_boot = 20 if args.quick else 1000
    log(f"loss-law bootstrap, {loss_boot} resamples of {len(loss_table)} rows ...")
    batched, loop = loss_bootstrap_contenders(loss_table, loss_boot)
    median = time_interleaved({"steplaw": batched, "loop_scipy_bfgs": loop}, warmup=0, repeats=2 if args.quick else 3)
    cases.append({
        "case": f"loss-law bootstrap {len(loss_table)} rows / {loss_boot} resamples",
        "median_s": median,
        "speedup": {"vs_loop_scipy_bfgs": median["loop_scipy_bfgs"] / median["steplaw"]},
        "target_s": 1.0, "meets_target": median["steplaw"] < 1.0,
    })
    median = time_interleaved({"steplaw": lambda: fit_loss(loss_table, n_boot=loss_boot, seed=0)},
                              warmup=0, repeats=2 if args.quick else 3)
    cases.append({"case": f"fit_loss {len(loss_table)} rows / {loss_boot} bootstrap (point fit included)",
                  "median_s": median, "speedup": {}})

    report("fit", "cpu", cases, cpu_count=os.cpu_count(), quick=args.quick)


if __name__ == "__main__":
    main()
