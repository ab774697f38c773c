"""Fit hyperparameter scaling laws eta(N, D) and B(D[, N]) from a table of runs.

The method follows the Step Law paper (Li et al. 2025, arXiv:2503.04715): in each
(N, D) cell, every run whose smoothed final loss is within a relative `gap` (default
0.25%) of the cell's best loss counts as optimal, and the laws are least-squares fits in
log space over those near-optimal runs:

    log eta = log a + alpha log N + beta log D
    log B   = log c + gamma log D [+ delta log N]

Confidence intervals come from a bootstrap that resamples runs within each cell (so
the best loss and the near-optimal set are recomputed per resample); it is vectorized:
one resample is a vector of run weights, and all weighted least-squares problems are
solved at once.

Validation is leave-one-cell-out: each cell is predicted from a fit without it, giving
the LR and batch-size error as a factor (>= 1) and the relative loss gap: the loss of
the cell's finished run nearest the predicted (eta, B) (Euclidean distance in
(ln lr, ln B)), over the cell's best loss, minus 1. The observed optimum of a cell is
the geometric mean of its near-optimal runs. The Step Law's own predictions for the
same cells are scored the same way, beside the fit.

As an alternative optimum per cell we fit a quadratic to loss over (log lr, log B)
near the best runs (the paper reports a convex landscape) and report its minimum and
curvature.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplaw.errors import UserError
from steplaw.laws.published import step_law
from steplaw.laws.table import RunTable

_MIN_DISTINCT = 3  # fewer distinct values of a variable cannot identify its exponent


@dataclass
class PowerLaw:
    """y = coef * prod(x_k ** exps[k]); ci: 95% bootstrap percentile intervals."""

    coef: float
    exps: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __call__(self, N, D):
        values = {"N": np.asarray(N, float), "D": np.asarray(D, float)}
        out = self.coef * np.ones(np.broadcast(values["N"], values["D"]).shape)
        for name, exp in self.exps.items():
            out = out * values[name] ** exp
        return out

    def to_dict(self) -> dict:
        out = {"coef": self.coef}
        for name, exp in self.exps.items():
            out[f"exp_{name}"] = exp
        out["ci"] = {key: [float(low), float(high)] for key, (low, high) in self.ci.items()}
        return out

    def formula(self, name: str) -> str:
        terms = " * ".join(f"{var}^{exp:+.4f}" for var, exp in self.exps.items())
        return f"{name} = {self.coef:.4g} * {terms}"


@dataclass
class CellOptimum:
    N: float
    D: float
    n_runs: int  # all runs in the cell, diverged included
    n_valid: int
    best_loss: float
    best_lr: float
    best_bs: float
    opt_lr: float  # geometric mean over the near-optimal runs
    opt_bs: float
    n_near: int
    lr_edge: str | None  # 'low' / 'high' when the best run sits on the grid's edge
    bs_edge: str | None
    quadratic: dict | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class HparamFit:
    lr_law: PowerLaw
    bs_law: PowerLaw
    cells: list[CellOptimum]
    validation: dict
    counts: dict
    n_column: str
    gap: float
    n_boot: int
    seed: int
    skipped_cells: list[dict]
    warnings: list[str]

    def to_dict(self) -> dict:
        return {
            "n_column": self.n_column,
            "gap": self.gap,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "lr_law": self.lr_law.to_dict(),
            "bs_law": self.bs_law.to_dict(),
            "validation": self.validation,
            "counts": self.counts,
            "cells": [cell.to_dict() for cell in self.cells],
            "skipped_cells": self.skipped_cells,
            "warnings": list(self.warnings),
        }

    def predict(self, N, D) -> tuple[np.ndarray, np.ndarray]:
        """(peak lr, batch tokens) from the fitted laws; N in this fit's n_column units."""
        return self.lr_law(N, D), self.bs_law(N, D)


def _wls_batched(X: np.ndarray, y: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Coefficients of weighted least squares for each weight row of W: (B, p)."""
    rows, p = X.shape
    outer = (X[:, :, None] * X[:, None, :]).reshape(rows, p * p)
    xtwx = (W @ outer).reshape(W.shape[0], p, p)
    xtwy = W @ (X * y[:, None])
    # A fold or resample that cannot identify the coefficients gives NaN, not a crash.
    cond = np.linalg.cond(xtwx)
    good = np.isfinite(cond) & (cond < 1e12)
    coefs = np.full((W.shape[0], p), np.nan)
    if good.any():
        coefs[good] = np.linalg.solve(xtwx[good], xtwy[good][..., None])[..., 0]
    return coefs


def grid_edge(value: float, grid: np.ndarray) -> str | None:
    if grid.size < 2 or np.isclose(grid.min(), grid.max()):
        return "single"
    if np.isclose(value, grid.min(), rtol=1e-9):
        return "low"
    if np.isclose(value, grid.max(), rtol=1e-9):
        return "high"
    return None


def quadratic_optimum(log_lr: np.ndarray, log_bs: np.ndarray, loss: np.ndarray, window: float) -> dict | None:
    """Minimum and curvature of loss ~ quadratic in (log lr, log B) over runs near the best."""
    keep = loss <= loss.min() * (1 + window)
    x, y, z = log_lr[keep], log_bs[keep], loss[keep]
    if x.size < 6 or np.unique(x).size < 3 or np.unique(y).size < 3:
        return None
    design = np.column_stack([np.ones_like(x), x, y, x * x, x * y, y * y])
    coef, *_ = np.linalg.lstsq(design, z, rcond=None)
    hessian = np.array([[2 * coef[3], coef[4]], [coef[4], 2 * coef[5]]])
    curvature = {
        "d2loss_dloglr2": float(hessian[0, 0]),
        "d2loss_dlogbs2": float(hessian[1, 1]),
        "d2loss_dloglr_dlogbs": float(hessian[0, 1]),
    }
    eig = np.linalg.eigvalsh(hessian)
    if eig.min() <= 0:
        return {"convex": False, "curvature": curvature, "lr": None, "bs": None, "loss": None, "inside_grid": False}
    center = np.linalg.solve(hessian, -coef[1:3])
    at_min = float(coef[0] + coef[1] * center[0] + coef[2] * center[1] + 0.5 * center @ hessian @ center)
    inside = bool(x.min() <= center[0] <= x.max() and y.min() <= center[1] <= y.max())
    return {
        "convex": True,
        "lr": float(np.exp(center[0])),
        "bs": float(np.exp(center[1])),
        "loss": at_min,
        "inside_grid": inside,
        "curvature": curvature,
        "n_runs": int(x.size),
    }


def _check_identifiable(values: np.ndarray, name: str, law: str) -> None:
    distinct = np.unique(values).size
    if distinct < _MIN_DISTINCT:
        raise UserError(
            f"cannot fit the {law} exponent of {name}: the usable cells have {distinct} distinct {name} value(s); "
            f"need at least {_MIN_DISTINCT} (add cells at other {name}, or fit without it)."
        )


def _percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (float("nan"), float("nan"))
    low, high = np.percentile(samples, [2.5, 97.5])
    return (float(low), float(high))


def _nearest_gap(cell_lr, cell_bs, cell_loss, best, lr, bs) -> float:
    """Relative loss gap of the run nearest (lr, bs) in log space."""
    if not (np.isfinite(lr) and np.isfinite(bs)):
        return float("nan")
    dist = (np.log(cell_lr) - np.log(lr)) ** 2 + (np.log(cell_bs) - np.log(bs)) ** 2
    return float(cell_loss[np.argmin(dist)] / best - 1)


def fit_hparams(
    table: RunTable,
    gap: float = 0.0025,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    n_column: str = "N",
    fit_bs_N: bool = False,
    quad_window: float = 0.03,
) -> HparamFit:
    """Fit eta = a N^alpha D^beta and B = c D^gamma [N^delta] to the near-optimal runs.

    table: runs (see steplaw.laws.table); gap: relative loss gap of the near-optimal set;
    n_boot: bootstrap resamples (runs resampled within cells), seeded by `seed`;
    n_column: which parameter count is N ('N' non-embedding, 'N_active', 'N_total');
    fit_bs_N: also fit an exponent of N in the batch-size law;
    quad_window: runs within this relative loss of the best feed the quadratic optimum.
    """
    if not (isinstance(gap, (int, float)) and np.isfinite(gap) and 0 <= gap < 1):
        raise UserError(f"gap must be a relative loss gap in [0, 1), got {gap!r}.")
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 0):
        raise UserError(f"n_boot must be a non-negative integer, got {n_boot!r}.")
    n_values = table.param_counts(n_column)
    if np.any(~np.isfinite(n_values) | (n_values <= 0)):
        raise UserError(f"column {n_column!r} has missing or non-positive values; expected a positive count in every row.")

    keys = np.column_stack([n_values, table.D])
    cell_keys, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)

    cells: list[CellOptimum] = []
    skipped: list[dict] = []
    run_rows: list[np.ndarray] = []  # per used cell: valid row indices sorted by loss
    for cell_index, (cell_n, cell_d) in enumerate(cell_keys):
        rows = np.flatnonzero(inverse == cell_index)
        valid_rows = rows[table.valid[rows]]
        if valid_rows.size < 2:
            skipped.append({
                "N": float(cell_n), "D": float(cell_d), "n_runs": int(rows.size), "n_valid": int(valid_rows.size),
                "reason": "no finished run" if valid_rows.size == 0 else "one finished run: no optimum to locate",
            })
            continue
        valid_rows = valid_rows[np.argsort(table.loss[valid_rows], kind="stable")]
        loss = table.loss[valid_rows]
        best = loss[0]
        near = valid_rows[loss <= best * (1 + gap)]
        lr_grid = np.unique(table.lr[rows])
        bs_grid = np.unique(table.batch_tokens[rows])
        best_row = valid_rows[0]
        quad = quadratic_optimum(np.log(table.lr[valid_rows]), np.log(table.batch_tokens[valid_rows]), loss, quad_window)
        cells.append(CellOptimum(
            N=float(cell_n), D=float(cell_d), n_runs=int(rows.size), n_valid=int(valid_rows.size),
            best_loss=float(best), best_lr=float(table.lr[best_row]), best_bs=float(table.batch_tokens[best_row]),
            opt_lr=float(np.exp(np.mean(np.log(table.lr[near])))),
            opt_bs=float(np.exp(np.mean(np.log(table.batch_tokens[near])))),
            n_near=int(near.size),
            lr_edge=grid_edge(table.lr[best_row], lr_grid), bs_edge=grid_edge(table.batch_tokens[best_row], bs_grid),
            quadratic=quad,
        ))
        run_rows.append(valid_rows)

    if not cells:
        raise UserError("no (N, D) cell has two or more finished runs; nothing to fit.")
    cell_n = np.array([cell.N for cell in cells])
    cell_d = np.array([cell.D for cell in cells])
    _check_identifiable(cell_n, "N", "learning-rate")
    _check_identifiable(cell_d, "D", "learning-rate")
    design_rank = np.linalg.matrix_rank(np.column_stack([np.ones_like(cell_n), np.log(cell_n), np.log(cell_d)]))
    if design_rank < 3:
        raise UserError(
            "cannot separate the effects of N and D: across the cells log D is a linear function of log N "
            "(e.g. a fixed tokens-per-parameter ratio); add cells off that line."
        )

    # Flatten the valid runs of the used cells; all fits are weighted least squares on them.
    rows_all = np.concatenate(run_rows)
    cell_of_run = np.concatenate([np.full(r.size, i) for i, r in enumerate(run_rows)])
    log_n = np.log(n_values[rows_all])
    log_d = np.log(table.D[rows_all])
    log_lr = np.log(table.lr[rows_all])
    log_bs = np.log(table.batch_tokens[rows_all])
    loss_all = table.loss[rows_all]
    mean_n, mean_d = log_n.mean(), log_d.mean()  # centering keeps the normal equations well conditioned
    x_lr = np.column_stack([np.ones_like(log_n), log_n - mean_n, log_d - mean_d])
    x_bs = np.column_stack([np.ones_like(log_n), log_d - mean_d] + ([log_n - mean_n] if fit_bs_N else []))

    w_point = np.concatenate([
        (table.loss[r] <= table.loss[r[0]] * (1 + gap)).astype(float) for r in run_rows
    ])[None, :]

    rng = np.random.default_rng(seed)
    w_boot = np.zeros((n_boot, rows_all.size))
    offset = 0
    for rows in run_rows:
        k = rows.size
        loss = table.loss[rows]  # sorted ascending
        # Resample k runs with replacement per bootstrap row; counts via one bincount
        # (an order of magnitude faster than Generator.multinomial here).
        draws = rng.integers(0, k, size=(n_boot, k)) + (np.arange(n_boot) * k)[:, None]
        counts = np.bincount(draws.ravel(), minlength=n_boot * k).reshape(n_boot, k).astype(float)
        first = np.argmax(counts > 0, axis=1)  # lowest-loss run present in each resample
        threshold = loss[first] * (1 + gap)
        w_boot[:, offset:offset + k] = counts * (loss[None, :] <= threshold[:, None])
        offset += k

    # Leave-one-cell-out: fold c zeroes the weights of cell c.
    n_cells = len(cells)
    w_loco = np.repeat(w_point, n_cells, axis=0)
    w_loco[cell_of_run[None, :] == np.arange(n_cells)[:, None]] = 0.0

    weights = np.vstack([w_point, w_boot, w_loco])
    coef_lr = _wls_batched(x_lr, log_lr, weights)
    if fit_bs_N:
        _check_identifiable(cell_n, "N", "batch-size")
    _check_identifiable(cell_d, "D", "batch-size")
    coef_bs = _wls_batched(x_bs, log_bs, weights)

    def to_law(coefs: np.ndarray, names: list[str], means: list[float]) -> tuple[PowerLaw, np.ndarray]:
        # Undo the centering: log y = b0 + sum b_k (log x_k - m_k).
        intercepts = coefs[:, 0] - sum(coefs[:, j + 1] * means[j] for j in range(len(names)))
        point, boot = 0, slice(1, 1 + n_boot)
        law = PowerLaw(
            coef=float(np.exp(intercepts[point])),
            exps={name: float(coefs[point, j + 1]) for j, name in enumerate(names)},
        )
        if n_boot:
            law.ci["coef"] = tuple(np.exp(_percentile_ci(intercepts[boot])))
            for j, name in enumerate(names):
                law.ci[f"exp_{name}"] = _percentile_ci(coefs[boot, j + 1])
        return law, intercepts

    lr_law, lr_intercepts = to_law(coef_lr, ["N", "D"], [mean_n, mean_d])
    bs_names = ["D", "N"] if fit_bs_N else ["D"]
    bs_law, bs_intercepts = to_law(coef_bs, bs_names, [mean_d, mean_n] if fit_bs_N else [mean_d])
    if np.isnan(lr_law.coef) or np.isnan(bs_law.coef):
        raise UserError("the near-optimal runs do not identify the laws (singular fit); add cells with other N and D.")

    # Validation from the leave-one-cell-out folds.
    loco = slice(1 + n_boot, 1 + n_boot + n_cells)
    fold_lr = np.exp(lr_intercepts[loco] + coef_lr[loco, 1] * np.log(cell_n) + coef_lr[loco, 2] * np.log(cell_d))
    fold_bs_log = bs_intercepts[loco] + coef_bs[loco, 1] * np.log(cell_d)
    if fit_bs_N:
        fold_bs_log = fold_bs_log + coef_bs[loco, 2] * np.log(cell_n)
    fold_bs = np.exp(fold_bs_log)
    step_lr, step_bs = zip(*(step_law(n, d) for n, d in zip(cell_n, cell_d)))

    per_cell = []
    for index, cell in enumerate(cells):
        rows = run_rows[index]
        c_lr, c_bs, c_loss = table.lr[rows], table.batch_tokens[rows], table.loss[rows]
        per_cell.append({
            "N": cell.N, "D": cell.D,
            "pred_lr": float(fold_lr[index]), "pred_bs": float(fold_bs[index]),
            "obs_lr": cell.opt_lr, "obs_bs": cell.opt_bs,
            "lr_factor": float(np.exp(abs(np.log(fold_lr[index] / cell.opt_lr)))),
            "bs_factor": float(np.exp(abs(np.log(fold_bs[index] / cell.opt_bs)))),
            "loss_gap": _nearest_gap(c_lr, c_bs, c_loss, cell.best_loss, fold_lr[index], fold_bs[index]),
            "step_law_lr": float(step_lr[index]), "step_law_bs": float(step_bs[index]),
            "step_law_lr_factor": float(np.exp(abs(np.log(step_lr[index] / cell.opt_lr)))),
            "step_law_bs_factor": float(np.exp(abs(np.log(step_bs[index] / cell.opt_bs)))),
            "step_law_loss_gap": _nearest_gap(c_lr, c_bs, c_loss, cell.best_loss, step_lr[index], step_bs[index]),
        })

    def summary(key: str) -> dict:
        values = np.array([item[key] for item in per_cell], float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return {"median": None, "mean": None, "max": None}
        return {"median": float(np.median(values)), "mean": float(np.mean(values)), "max": float(np.max(values))}

    validation = {
        "method": "leave-one-cell-out",
        "lr_factor": summary("lr_factor"),
        "bs_factor": summary("bs_factor"),
        "relative_loss_gap": summary("loss_gap"),
        "step_law": {
            "lr_factor": summary("step_law_lr_factor"),
            "bs_factor": summary("step_law_bs_factor"),
            "relative_loss_gap": summary("step_law_loss_gap"),
        },
        "per_cell": per_cell,
    }

    warnings = list(table.warnings)
    edge_cells = [c for c in cells if c.lr_edge or c.bs_edge]
    if edge_cells:
        warnings.append(
            f"{len(edge_cells)} of {len(cells)} cells have their best run on the edge of the LR or batch grid; "
            "the true optimum may lie outside (see cells[].lr_edge / bs_edge)."
        )
    if skipped:
        warnings.append(f"{len(skipped)} cell(s) skipped: fewer than two finished runs (see skipped_cells).")
    counts = {
        "runs": len(table),
        "valid": table.n_valid,
        "dropped": dict(table.dropped),
        "cells_used": len(cells),
        "cells_skipped": len(skipped),
        "near_optimal_runs": int(w_point.sum()),
    }
    return HparamFit(
        lr_law=lr_law, bs_law=bs_law, cells=cells, validation=validation, counts=counts, n_column=n_column,
        gap=float(gap), n_boot=int(n_boot), seed=int(seed), skipped_cells=skipped, warnings=warnings,
    )
