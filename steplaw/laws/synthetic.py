"""Synthetic sweeps with a known answer, for tests and benchmarks of the fitters.

The loss of a run with N parameters, D tokens, peak LR lr and batch B tokens is

    L = E + A/N^alpha + B_/D^beta + k_lr (ln lr - ln lr*)^2 + k_bs (ln B - ln B*)^2 + noise

with lr* = lr_coef N^lr_exp_N D^lr_exp_D and B* = bs_coef D^bs_exp_D, so the optimum
follows a known law. Runs with lr above `diverge_factor` * lr* diverge (status
'diverged', loss NaN), and a fraction `fail_rate` fail at random.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steplaw.laws.published import STEP_BS_COEF, STEP_BS_EXP_D, STEP_LR_COEF, STEP_LR_EXP_D, STEP_LR_EXP_N
from steplaw.laws.table import RunTable, table_from_arrays


@dataclass(frozen=True)
class SyntheticTruth:
    """The optimum follows the Step Law unless told otherwise."""

    lr_coef: float = STEP_LR_COEF
    lr_exp_N: float = STEP_LR_EXP_N
    lr_exp_D: float = STEP_LR_EXP_D
    bs_coef: float = STEP_BS_COEF
    bs_exp_D: float = STEP_BS_EXP_D
    E: float = 1.7
    A: float = 400.0
    B: float = 900.0
    alpha: float = 0.34
    beta: float = 0.28
    k_lr: float = 0.02  # loss per (ln lr distance)^2
    k_bs: float = 0.01

    def lr_opt(self, N, D):
        return self.lr_coef * np.asarray(N, float) ** self.lr_exp_N * np.asarray(D, float) ** self.lr_exp_D

    def bs_opt(self, D):
        return self.bs_coef * np.asarray(D, float) ** self.bs_exp_D

    def base_loss(self, N, D):
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta


def synthetic_runs(
    truth: SyntheticTruth = SyntheticTruth(),
    n_values=(6e7, 1.2e8, 2.4e8, 4.8e8, 9.6e8, 1.9e9),
    d_values=(2e9, 4e9, 8e9, 1.6e10, 3.2e10, 6.4e10),
    lr_steps: int = 13,
    bs_steps: int = 8,
    noise_rel: float = 3e-4,
    diverge_factor: float = 6.0,
    fail_rate: float = 0.01,
    seed: int = 0,
) -> RunTable:
    """A sweep over N x D cells, each with an LR grid (steps of sqrt 2) by a batch grid
    (steps of 2) around the true optimum, shifted by a random fraction of a step so the
    optimum does not sit on a grid point. 6 x 6 cells x 13 x 8 = 3,744 runs by default."""
    rng = np.random.default_rng(seed)
    columns = {key: [] for key in ("N", "D", "lr", "batch_tokens", "loss")}
    status = []
    for n in n_values:
        for d in d_values:
            lr_star, bs_star = float(truth.lr_opt(n, d)), float(truth.bs_opt(d))
            lr_shift, bs_shift = rng.uniform(-0.5, 0.5, size=2)
            lr_grid = lr_star * 2.0 ** ((np.arange(lr_steps) - lr_steps // 2 + lr_shift) / 2)
            bs_grid = np.round(bs_star * 2.0 ** (np.arange(bs_steps) - bs_steps // 2 + bs_shift))
            lr, bs = (grid.ravel() for grid in np.meshgrid(lr_grid, bs_grid, indexing="ij"))
            loss = (
                truth.base_loss(n, d)
                + truth.k_lr * np.log(lr / lr_star) ** 2
                + truth.k_bs * np.log(bs / bs_star) ** 2
            )
            loss = loss * (1 + noise_rel * rng.standard_normal(loss.size))
            cell_status = np.full(loss.size, "ok", dtype=object)
            cell_status[lr > diverge_factor * lr_star] = "diverged"
            cell_status[rng.random(loss.size) < fail_rate] = "failed"
            loss[cell_status != "ok"] = np.nan
            columns["N"].append(np.full(loss.size, n))
            columns["D"].append(np.full(loss.size, d))
            columns["lr"].append(lr)
            columns["batch_tokens"].append(bs)
            columns["loss"].append(loss)
            status.extend(cell_status)
    return table_from_arrays(**{key: np.concatenate(value) for key, value in columns.items()}, status=status)
