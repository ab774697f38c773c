"""Runs saved by the adaptive planner, and what they cost the fitted law, by replay.

Each case is a dense LR x batch grid over many (N, D) cells, replayed twice through the
sweep driver (steplaw.sweep.replay): with the grid planner (every run) and with the
adaptive planner (the runs it chooses). Reported per case:
- runs used by each planner, and the adaptive planner's fraction of the grid's runs;
- the exponents of the laws fitted to each (steplaw.laws.fit_hparams), the adaptive
  fit's error against the full-grid fit and whether it lies in the full grid's 95%
  bootstrap interval;
- the mean over cells of the relative loss gap of each law's prediction: the loss of the
  grid run nearest the predicted (lr, B) (in log space) over the cell's best grid loss,
  minus 1 (the full grid is the ground truth the replay has);
- the adaptive planner's cell states (bracketed / edge / unbracketed).
Targets (issue 9): <= 20% of the runs (stretch 10%), exponents within +-0.05 of the
full-grid fit and inside its interval, mean loss gap <= 0.3%.

Synthetic landscapes: loss = base(N, D) + a convex bowl in (ln lr, ln B) with a tilt
(the optimal LR grows with the batch), steeper above the optimal LR than below, noise,
and a divergence cliff at high LR; the optimum follows a known power law. Curvatures:
around 0.02-0.04 nats per (ln lr)^2 and 0.01 per (ln B)^2, the range of the quadratic
fits of steplaw.laws.fit on Step-Law-like sweeps. Cases place the optimum at the
Step Law (the planner's prior) and far from it (8x in LR, 4x in batch, other exponents).

    python bench/planner.py [--quick]                          # the synthetic cases
    python bench/planner.py --branch [--quick]                 # WSD: trunks vs every run alone
    python bench/planner.py --replay TABLE [--col-N ... --bs-unit sequences --seq-len L]
                                                               # also a table of yours
One JSON object on stdout (the shared bench shape; no timings: the measure is runs).

--branch (issue 22): the same WSD sweep searched by the adaptive planner twice, every run
alone and with trunks (a point one cell wants is run at its column's shorter budgets
too: steplaw.sweep.planner, "Branches"), on a synthetic WSD landscape whose LR optimum
falls with D (the WSD law of arXiv:2601.05049, lr* = 38.5 N^-0.222 D^-0.351, with the Step
Law's batch law). Compute is counted in tokens by the trunk cost model
(steplaw.sweep.cost.trunk_tokens, per batch of runs the planner proposed together) against
Σ D alone. Reported: the compute ratio, and the lr and B each fitted law predicts at every
cell and at 10x the largest N and D, relative to the law fitted without branches. Targets:
ratio <= 0.6, predictions within 2%.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.harness import log, report
from steplaw.laws.fit import fit_hparams
from steplaw.laws.published import STEP_BS_COEF, STEP_BS_EXP_D, STEP_LR_COEF, STEP_LR_EXP_D, STEP_LR_EXP_N
from steplaw.laws.table import read_runs, table_from_arrays
from steplaw.sweep.driver import run_sweep
from steplaw.sweep.planner import AdaptivePlanner, AdaptiveSettings
from steplaw.sweep.replay import replay_executor, replay_table
from steplaw.sweep.store import export_rows

TARGET_FRACTION, STRETCH_FRACTION, TARGET_EXP, TARGET_GAP = 0.20, 0.10, 0.05, 0.003


@dataclass(frozen=True)
class Landscape:
    """Optimum lr* = lr_coef N^lr_exp_N D^lr_exp_D, B* = bs_coef D^bs_exp_D; bowl around it."""

    name: str
    lr_coef: float = STEP_LR_COEF
    lr_exp_N: float = STEP_LR_EXP_N
    lr_exp_D: float = STEP_LR_EXP_D
    bs_coef: float = STEP_BS_COEF
    bs_exp_D: float = STEP_BS_EXP_D
    k_lr: float = 0.02  # nats per (ln lr)^2 below the optimum
    k_lr_high: float = 0.03  # ... above it (loss rises faster towards divergence)
    k_bs: float = 0.01  # nats per (ln B)^2
    tilt: float = 0.3  # d ln lr* / d ln B at fixed N, D
    noise_rel: float = 3e-4
    diverge_factor: float = 6.0  # runs above this x the optimal LR (at their B) diverge

    def optimum(self, n, d):
        """The true (lr*, B*) at (N, D): the power laws the landscape is built around."""
        return self.lr_coef * n**self.lr_exp_N * d**self.lr_exp_D, self.bs_coef * d**self.bs_exp_D

    def loss(self, n, d, lr, bs):
        lr_star, bs_star = self.optimum(n, d)
        x_b = np.log(bs / bs_star)
        x_lr = np.log(lr / lr_star) - self.tilt * x_b
        k = np.where(x_lr > 0, self.k_lr_high, self.k_lr)
        base = 1.7 + 400.0 / n**0.34 + 900.0 / d**0.28
        return base + k * x_lr**2 + self.k_bs * x_b**2, x_lr > math.log(self.diverge_factor)

    def add_cell(self, cols: dict, status: list, n, d, lrs, bss, rng) -> None:
        """Append the runs of cell (n, d) on the lr x batch lattice to `cols` and `status`:
        the landscape's loss with its relative noise, NaN where a run diverges."""
        lr, bs = (g.ravel() for g in np.meshgrid(lrs, bss, indexing="ij"))
        loss, diverged = self.loss(n, d, lr, bs)
        loss = loss * (1 + self.noise_rel * rng.standard_normal(loss.size))
        loss[diverged] = np.nan
        for key, values in (("N", np.full(lr.size, n)), ("D", np.full(lr.size, d)), ("lr", lr),
                            ("batch_tokens", bs), ("loss", loss)):
            cols[key].append(values)
        status += ["diverged" if x else "ok" for x in diverged]

    def grid(self, n_values, d_values, lr_points=13, bs_points=8, seed=0, offset=(0.0, 0.0)):
        """A dense grid per cell: LRs a factor sqrt(2) apart and batch sizes a factor 2 apart,
        around the true optimum moved by `offset` steps and a random fraction of a step."""
        rng = np.random.default_rng(seed)
        cols = {k: [] for k in ("N", "D", "lr", "batch_tokens", "loss")}
        status = []
        for n in n_values:
            for d in d_values:
                lr_star = self.lr_coef * n**self.lr_exp_N * d**self.lr_exp_D
                bs_star = self.bs_coef * d**self.bs_exp_D
                shift = rng.uniform(-0.5, 0.5, size=2) + np.asarray(offset)
                lrs = lr_star * 2.0 ** ((np.arange(lr_points) - lr_points // 2 + shift[0]) / 2)
                bss = np.round(bs_star * 2.0 ** (np.arange(bs_points) - bs_points // 2 + shift[1]))
                self.add_cell(cols, status, n, d, lrs, bss, rng)
        return table_from_arrays(**{k: np.concatenate(v) for k, v in cols.items()}, status=status)


N_VALUES = (6e7, 1.2e8, 2.4e8, 4.8e8, 9.6e8, 1.9e9)
D_VALUES = (2e9, 4e9, 8e9, 1.6e10, 3.2e10, 6.4e10)


def synthetic_cases(quick: bool):
    n_values, d_values = (N_VALUES[::2] + N_VALUES[-1:], D_VALUES[::2] + D_VALUES[-1:]) if quick else (N_VALUES, D_VALUES)
    at_prior = Landscape("optimum at the Step Law prior")
    far = Landscape("optimum far from the prior (8x lower LR, 4x larger batch, other exponents)",
                    lr_coef=STEP_LR_COEF / 8 * 6e7**0.1, lr_exp_N=STEP_LR_EXP_N - 0.1, lr_exp_D=STEP_LR_EXP_D,
                    bs_coef=STEP_BS_COEF * 4 * 2e9**-0.07, bs_exp_D=STEP_BS_EXP_D + 0.07)
    sharp = Landscape("sharper LR bowl, strong tilt, cliff at 3x", k_lr=0.04, k_lr_high=0.08, tilt=0.5,
                      diverge_factor=3.0, noise_rel=5e-4)
    cases = []
    for landscape, offset in ((at_prior, (0, 0)), (far, (0, 0)), (sharp, (1.5, -1.0))):
        table = landscape.grid(n_values, d_values, lr_points=13, bs_points=8, seed=1, offset=offset)
        cases.append((f"synthetic {len(n_values) * len(d_values)} cells x 104 runs: {landscape.name}", table))
    return cases


def replay(table, planner_kind: str, out: Path):
    data = replay_table(table, "bench.csv")
    planner = AdaptivePlanner(data.cells, AdaptiveSettings(cell_budget=None)) if planner_kind == "adaptive" else None
    summary = run_sweep(data.runs if planner is None else [], out, lambda: replay_executor(data.outcomes),
                        progress=False, planner=planner)
    return summary, read_runs(export_rows(out))


def loss_gaps(full, fit) -> list[float]:
    """Per cell of the full grid: loss of the grid run nearest fit's prediction / best - 1."""
    gaps = []
    keys = np.column_stack([full.N, full.D])
    for key in np.unique(keys, axis=0):
        rows = np.flatnonzero((keys == key).all(axis=1) & full.valid)
        if rows.size == 0:
            continue
        lr, bs = fit.predict(key[0], key[1])
        dist = (np.log(full.lr[rows]) - np.log(lr)) ** 2 + (np.log(full.batch_tokens[rows]) - np.log(bs)) ** 2
        gaps.append(float(full.loss[rows[np.argmin(dist)]] / full.loss[rows].min() - 1))
    return gaps


def measure(name: str, table, n_boot: int) -> dict:
    log(f"{name}: replaying {len(table)} runs")
    with tempfile.TemporaryDirectory() as tmp:
        _, grid_table = replay(table, "grid", Path(tmp) / "grid")
        summary, adaptive_table = replay(table, "adaptive", Path(tmp) / "adaptive")
    full = fit_hparams(grid_table, n_boot=n_boot)
    adaptive = fit_hparams(adaptive_table, n_boot=n_boot)
    exps, errors, inside = {}, {}, {}
    for law, key in (("lr_law", "N"), ("lr_law", "D"), ("bs_law", "D")):
        name_key = f"{law.split('_')[0]}_exp_{key}"
        ours, theirs = getattr(adaptive, law).exps[key], getattr(full, law).exps[key]
        low, high = getattr(full, law).ci[f"exp_{key}"]
        exps[name_key] = {"grid": theirs, "adaptive": ours, "grid_ci": [low, high]}
        errors[name_key] = abs(ours - theirs)
        inside[name_key] = bool(low <= ours <= high)
    states: dict[str, int] = {}
    for cell in summary.cells:
        states[cell["state"]] = states.get(cell["state"], 0) + 1
    gap = {"grid": float(np.mean(loss_gaps(grid_table, full))), "adaptive": float(np.mean(loss_gaps(grid_table, adaptive)))}
    fraction = len(adaptive_table) / len(grid_table)
    per_cell = [cell["runs"] for cell in summary.cells]
    return {
        "case": name,
        "cells": len(summary.cells),
        "runs": {"grid": len(grid_table), "adaptive": len(adaptive_table)},
        "runs_fraction": fraction,
        "runs_per_cell": {"min": min(per_cell), "mean": float(np.mean(per_cell)), "max": max(per_cell)},
        "cell_states": states,
        "exponents": exps,
        "exp_abs_error": errors,
        "exp_inside_grid_ci": inside,
        "mean_relative_loss_gap": gap,
        "targets": {"runs_fraction": TARGET_FRACTION, "stretch_runs_fraction": STRETCH_FRACTION,
                    "exp_abs_error": TARGET_EXP, "mean_relative_loss_gap": TARGET_GAP},
        "meets_target": bool(fraction <= TARGET_FRACTION and max(errors.values()) <= TARGET_EXP
                             and all(inside.values()) and gap["adaptive"] <= TARGET_GAP),
        "meets_stretch": bool(fraction <= STRETCH_FRACTION),
    }


# -- --branch: WSD trunks against every run alone ------------------------------------------

TARGET_BRANCH_RATIO, TARGET_PREDICTION = 0.6, 0.02
# A WSD law (arXiv:2601.05049, MoE under WSD): lr* = 38.5 N^-0.222 D^-0.351.
WSD_LANDSCAPE = Landscape("WSD law (lr* falls with D)", lr_coef=38.5, lr_exp_N=-0.222, lr_exp_D=-0.351)
DECAY_FRACTION = 0.2


def column_grid(landscape: Landscape, n_values, d_values, seed=0, lr_points=21):
    """A grid whose (lr, B) lattice is the same at every D of a model (a trunk's runs share
    lr and B): LRs sqrt(2) apart around the model's optimum at the middle D, batch sizes
    powers of two from B*(smallest D)/8 to B*(largest D)x8, each model's lattice moved by a
    random fraction of a step."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("N", "D", "lr", "batch_tokens", "loss")}
    status = []
    d_mid = math.exp(np.mean(np.log(d_values)))
    b_low = landscape.bs_coef * min(d_values) ** landscape.bs_exp_D / 8
    b_high = landscape.bs_coef * max(d_values) ** landscape.bs_exp_D * 8
    bss = 2.0 ** np.arange(math.floor(math.log2(b_low)), math.ceil(math.log2(b_high)) + 1)
    for n in n_values:
        shift = rng.uniform(-0.5, 0.5)
        lrs = landscape.lr_coef * n**landscape.lr_exp_N * d_mid**landscape.lr_exp_D * 2.0 ** (
            (np.arange(lr_points) - lr_points // 2 + shift) / 2)
        for d in d_values:
            landscape.add_cell(cols, status, n, d, lrs, bss, rng)
    return table_from_arrays(**{k: np.concatenate(v) for k, v in cols.items()}, status=status)


def with_columns(cells, decay_fraction: float):
    """Replay cells as a WSD sweep that branches: each cell's column is its N."""
    return [dataclasses.replace(c, column=f"N={c.N:.6g}", decay_fraction=decay_fraction) for c in cells]


def replay_counted(table, branch: bool, out: Path, branch_up: bool = False):
    """Replay with the adaptive planner; tokens used (trunk cost model per proposed batch)
    and tokens alone (Σ D) of the runs it proposed."""
    data = replay_table(table, "bench.csv")
    cells = with_columns(data.cells, DECAY_FRACTION) if branch else data.cells
    planner = AdaptivePlanner(cells, AdaptiveSettings(cell_budget=None, branch_up=branch_up))
    seen, spent = set(), [0.0, 0.0]
    propose = planner.propose

    def counted(views):
        runs = propose(views)
        new = [r for r in runs if r.run_id() not in seen and r.run_id() not in views]
        seen.update(r.run_id() for r in new)
        used, alone = planner.batch_cost(new)
        spent[0] += used
        spent[1] += alone
        return runs

    planner.propose = counted
    summary = run_sweep([], out, lambda: replay_executor(data.outcomes), progress=False, planner=planner)
    return summary, read_runs(export_rows(out)), spent


def measure_branch(name: str, table, targets, branch_up: bool = False) -> dict:
    log(f"{name}: replaying {len(table)} runs, alone and as trunks")
    with tempfile.TemporaryDirectory() as tmp:
        alone_summary, alone_table, alone_cost = replay_counted(table, False, Path(tmp) / "alone")
        branch_summary, branch_table, branch_cost = replay_counted(table, True, Path(tmp) / "branch", branch_up)
    alone_fit, branch_fit = fit_hparams(alone_table, n_boot=0), fit_hparams(branch_table, n_boot=0)
    diffs = []
    for n, d in targets:
        (lr_a, bs_a), (lr_b, bs_b) = alone_fit.predict(n, d), branch_fit.predict(n, d)
        lr_true, bs_true = WSD_LANDSCAPE.optimum(n, d)
        diffs.append({"N": n, "D": d, "lr_alone": float(lr_a), "lr_branch": float(lr_b),
                      "lr_rel_diff": float(lr_b / lr_a - 1), "B_alone": float(bs_a), "B_branch": float(bs_b),
                      "B_rel_diff": float(bs_b / bs_a - 1),
                      # each fit against the landscape's true optimum: how far sampling alone moves a law
                      "lr_alone_vs_true": float(lr_a / lr_true - 1), "lr_branch_vs_true": float(lr_b / lr_true - 1),
                      "B_alone_vs_true": float(bs_a / bs_true - 1), "B_branch_vs_true": float(bs_b / bs_true - 1)})
    inside = diffs[:-1]  # the sweep's cells; the last target is the extrapolation
    worst = {k: max(abs(x[f"{k}_rel_diff"]) for x in diffs) for k in ("lr", "B")}
    worst_cells = {k: max(abs(x[f"{k}_rel_diff"]) for x in inside) for k in ("lr", "B")}
    worst_true = {f"{k}_{mode}_vs_true": max(abs(x[f"{k}_{mode}_vs_true"]) for x in inside)
                  for k in ("lr", "B") for mode in ("alone", "branch")}
    ratio = branch_cost[0] / alone_cost[0]
    states = {}
    for cell in branch_summary.cells:
        states[cell["state"]] = states.get(cell["state"], 0) + 1
    exps = {f"{law}_exp_{key}": {"alone": getattr(alone_fit, f"{law}_law").exps[key],
                                 "branch": getattr(branch_fit, f"{law}_law").exps[key]}
            for law, key in (("lr", "N"), ("lr", "D"), ("bs", "D"))}
    return {
        "case": name, "branch_up": branch_up, "cells": len(branch_summary.cells),
        "runs": {"alone": len(alone_table), "branch": len(branch_table)},
        "tokens": {"alone_sweep": alone_cost[0], "branch_sweep_trained": branch_cost[0],
                   "branch_sweep_if_alone": branch_cost[1]},
        "compute_ratio": ratio,
        "cell_states": {"alone": dict(_states(alone_summary)), "branch": states},
        "exponents": exps,
        "predictions": diffs,
        "max_abs_rel_diff": worst,
        "max_abs_rel_diff_at_cells": worst_cells,
        "extrapolation_10x": diffs[-1],
        "max_abs_rel_error_vs_true_law_at_cells": worst_true,
        "targets": {"compute_ratio": TARGET_BRANCH_RATIO, "prediction_rel_diff": TARGET_PREDICTION},
        "meets_compute": bool(ratio <= TARGET_BRANCH_RATIO),
        "meets_predictions": bool(max(worst.values()) <= TARGET_PREDICTION),
    }


def _states(summary):
    out: dict[str, int] = {}
    for cell in summary.cells:
        out[cell["state"]] = out.get(cell["state"], 0) + 1
    return out


def branch_cases(quick: bool):
    n_values = N_VALUES[::2] if quick else N_VALUES
    layouts = {"6 budgets x2 apart": D_VALUES,
               "11 budgets sqrt(2) apart": tuple(2e9 * 2 ** (k / 2) for k in range(11)),
               # the example of a sweep laid out for trunks: 0.38 of the runs alone at best
               "8 budgets evenly spaced": tuple(8e9 * k for k in range(1, 9))}
    if quick:
        layouts = {"4 budgets x2 apart": D_VALUES[:4]}
    for layout, d_values in layouts.items():
        table = column_grid(WSD_LANDSCAPE, n_values, d_values, seed=2)
        targets = [(n, d) for n in n_values for d in d_values] + [(10 * max(n_values), 10 * max(d_values))]
        yield f"WSD {len(n_values)} models x {layout}", table, targets


def main(argv=None) -> int:
    from steplaw.cli.args import add_table_args
    from steplaw.cli.laws import load_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 cells per landscape and 100 resamples")
    parser.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples of each fit (default 1000)")
    parser.add_argument("--replay", metavar="TABLE", help="also replay this table or sweep directory")
    parser.add_argument("--branch", action="store_true", help="WSD trunks against every run alone (issue 22)")
    args, rest = parser.parse_known_args(argv)
    if args.branch:
        results = [measure_branch(name, table, targets, branch_up)
                   for name, table, targets in branch_cases(args.quick) for branch_up in (False, True)]
        report("planner_branch", "cpu", results, quick=args.quick, decay_fraction=DECAY_FRACTION)
        return 0
    cases = synthetic_cases(args.quick)
    if args.replay:
        table_parser = argparse.ArgumentParser(add_help=False)
        add_table_args(table_parser)
        table_args = table_parser.parse_args([args.replay, *rest])
        cases.append((f"replay {args.replay}", load_table(table_args)))
    n_boot = args.n_boot if args.n_boot is not None else (100 if args.quick else 1000)
    results = [measure(name, table, n_boot) for name, table in cases]
    report("planner", "cpu", results, quick=args.quick, n_boot=n_boot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
