"""Fit the loss law L(N, D) = E + A / N^alpha + B / D^beta.

The fit is the robust one of Hoffmann et al. 2022 (Chinchilla, arXiv:2203.15556,
Approach 3) as replicated by Besiroglu et al. 2024 (arXiv:2404.10102): in log space,
log L_hat = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e,
minimizing the Huber loss (delta = 1e-3) of log L_hat - log L with a quasi-Newton
(BFGS) method, started from the best points of a grid of initial values. The data are, per (N, D) cell, the best
finished run's loss (the loss at the best hyperparameters). Intervals: bootstrap over
cells.

Compute-optimal allocation under C = k N D (k = 6 FLOPs per parameter and token, or
the median of compute / (N D) when the table has a FLOP column):
N_opt(C) = G (C/k)^(beta/(alpha+beta)), D_opt(C) = G^-1 (C/k)^(alpha/(alpha+beta)),
G = (alpha A / (beta B))^(1/(alpha+beta))  (Hoffmann et al. 2022, Eq. 4).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from steplaw.errors import UserError
from steplaw.laws.table import RunTable

HUBER_DELTA = 1e-3
# Grid of starting points (Hoffmann et al. 2022 App. D.2 use a similar grid).
_GRID = {
    "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "e": [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5],
    "alpha": [0.0, 0.5, 1.0, 1.5, 2.0],
    "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
}
_N_STARTS = 8  # quasi-Newton runs from the best grid points


def _lse_terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])


def _objective(theta, log_n, log_d, log_loss, weights, delta):
    terms = _lse_terms(theta, log_n, log_d)
    top = terms.max(axis=0)
    exp = np.exp(terms - top)
    total = exp.sum(axis=0)
    pred = top + np.log(total)
    soft = exp / total
    resid = pred - log_loss
    small = np.abs(resid) <= delta
    # Scaled by 1/delta^2 so the objective is O(1) for the optimizer tolerances.
    huber = np.where(small, 0.5 * resid**2, delta * (np.abs(resid) - 0.5 * delta)) / delta**2
    dres = np.where(small, resid, delta * np.sign(resid)) / delta**2 * weights
    grad = np.array([
        np.sum(dres * soft[0]),
        np.sum(dres * soft[1]),
        np.sum(dres * soft[2]),
        -np.sum(dres * soft[0] * log_n),
        -np.sum(dres * soft[1] * log_d),
    ])
    return float(np.sum(weights * huber)), grad


def _grid_objective(log_n, log_d, log_loss, delta) -> tuple[np.ndarray, np.ndarray]:
    starts = np.array(list(itertools.product(*_GRID.values())))  # (S, 5)
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n[None], b - beta * log_d[None], np.broadcast_to(e, (len(starts), log_n.size))])
    pred = np.logaddexp.reduce(terms, axis=0)
    resid = np.abs(pred - log_loss[None])
    huber = np.where(resid <= delta, 0.5 * resid**2, delta * (resid - 0.5 * delta)).sum(axis=1)
    return starts, huber


def _fit_once(log_n, log_d, log_loss, weights, starts, delta) -> np.ndarray:
    best, best_value = None, np.inf
    for start in starts:
        # Quasi-Newton with full BFGS: with 5 parameters it is what L-BFGS computes, and
        # scipy's L-BFGS-B driver was 10-30x slower here (it spends its time in threaded
        # BLAS calls on tiny vectors when the cores are busy).
        result = minimize(
            _objective, start, args=(log_n, log_d, log_loss, weights, delta), jac=True, method="BFGS",
            options={"maxiter": 2000, "gtol": 1e-9},
        )
        if result.fun < best_value:
            best, best_value = result.x, result.fun
    return best


@dataclass
class LossFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict[str, tuple[float, float]]
    flops_per_param_token: float
    n_cells: int
    n_column: str
    rms_log_residual: float
    n_boot: int
    exponent_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def predict(self, N, D):
        """Predicted loss of N parameters (this fit's n_column) trained on D tokens."""
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    @property
    def n_exponent(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def d_exponent(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def compute_optimal(self, compute_flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing the loss at a budget of `compute_flops` FLOPs."""
        if not (np.isfinite(compute_flops) and compute_flops > 0):
            raise UserError(f"compute budget must be a positive number of FLOPs, got {compute_flops!r}.")
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        scaled = compute_flops / self.flops_per_param_token
        return float(g * scaled**self.n_exponent), float(scaled**self.d_exponent / g)

    def to_dict(self) -> dict:
        return {
            "law": "L = E + A / N^alpha + B / D^beta",
            "E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
            "intervals": {k: [float(v[0]), float(v[1])] for k, v in self.intervals.items()},
            "n_column": self.n_column,
            "n_cells": self.n_cells,
            "n_boot": self.n_boot,
            "rms_log_residual": self.rms_log_residual,
            "compute_optimal": {
                "compute": f"C = {self.flops_per_param_token:.4g} * N * D",
                "flops_per_param_token": self.flops_per_param_token,
                "N_opt": f"G * (C / {self.flops_per_param_token:.4g})^{self.n_exponent:.4f}",
                "D_opt": f"G^-1 * (C / {self.flops_per_param_token:.4g})^{self.d_exponent:.4f}",
                "G": float((self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))),
                "N_exponent": self.n_exponent,
                "D_exponent": self.d_exponent,
                "exponent_intervals": {k: [float(v[0]), float(v[1])] for k, v in self.exponent_intervals.items()},
            },
            "warnings": list(self.warnings),
        }


def fit_loss(
    table: RunTable, n_boot: int = 200, seed: int = 0, *, n_column: str = "N", delta: float = HUBER_DELTA,
) -> LossFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to the per-cell best losses of `table`.

    n_column: which parameter count is N; n_boot: bootstrap resamples of the cells.
    """
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 0):
        raise UserError(f"n_boot must be a non-negative integer, got {n_boot!r}.")
    n_values = table.param_counts(n_column)
    valid = table.valid & np.isfinite(n_values)
    keys = np.column_stack([n_values[valid], table.D[valid]])
    cells, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    best_loss = np.full(len(cells), np.inf)
    np.minimum.at(best_loss, inverse, table.loss[valid])
    if len(cells) < 5:
        raise UserError(f"the loss law has 5 parameters but the table has {len(cells)} (N, D) cell(s); need at least 5.")
    for name, values in (("N", cells[:, 0]), ("D", cells[:, 1])):
        if np.unique(values).size < 2:
            raise UserError(f"cannot fit the loss law's {name} term: all cells share one {name} value; need at least 2.")

    log_n, log_d, log_loss = np.log(cells[:, 0]), np.log(cells[:, 1]), np.log(best_loss)
    starts, values = _grid_objective(log_n, log_d, log_loss, delta)
    top_starts = starts[np.argsort(values)[:_N_STARTS]]
    ones = np.ones_like(log_n)
    theta = _fit_once(log_n, log_d, log_loss, ones, top_starts, delta)

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        counts = rng.multinomial(len(cells), np.full(len(cells), 1.0 / len(cells))).astype(float)
        samples.append(_fit_once(log_n, log_d, log_loss, counts, [theta], delta))
    samples = np.array(samples).reshape(-1, 5)

    def interval(values: np.ndarray) -> tuple[float, float]:
        values = values[np.isfinite(values)]
        if values.size == 0:
            return (float("nan"), float("nan"))
        low, high = np.percentile(values, [2.5, 97.5])
        return (float(low), float(high))

    intervals, exponent_intervals = {}, {}
    if n_boot:
        intervals = {
            "A": interval(np.exp(samples[:, 0])), "B": interval(np.exp(samples[:, 1])),
            "E": interval(np.exp(samples[:, 2])), "alpha": interval(samples[:, 3]), "beta": interval(samples[:, 4]),
        }
        total = samples[:, 3] + samples[:, 4]
        with np.errstate(divide="ignore", invalid="ignore"):
            exponent_intervals = {"N_exponent": interval(samples[:, 4] / total), "D_exponent": interval(samples[:, 3] / total)}

    flops_per = 6.0
    warnings = list(table.warnings)
    if table.compute is not None:
        ratio = table.compute[valid] / (n_values[valid] * table.D[valid])
        ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        if ratio.size:
            flops_per = float(np.median(ratio))
    a, b, e, alpha, beta = theta
    pred = np.logaddexp.reduce(_lse_terms(theta, log_n, log_d), axis=0)
    if alpha <= 0 or beta <= 0:
        warnings.append(
            f"fitted exponent alpha={alpha:.3g} / beta={beta:.3g} is not positive: the data do not show that term "
            "falling with scale, so the compute-optimal split is meaningless."
        )
    return LossFit(
        E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta),
        intervals=intervals, flops_per_param_token=flops_per, n_cells=len(cells), n_column=n_column,
        rms_log_residual=float(np.sqrt(np.mean((pred - log_loss) ** 2))), n_boot=int(n_boot),
        exponent_intervals=exponent_intervals, warnings=warnings,
    )
