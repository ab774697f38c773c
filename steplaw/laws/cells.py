"""Per (N, D) cell: where the optimum is, located three ways.

`cell_optima` groups a table's runs into cells (N, D and the MoE sparsity) and gives each
cell's best run, the geometric mean of its near-optimal runs (the Step Law's optimum),
whether the best run sits on the edge of the cell's grid (`grid_edge`, the one definition
for fit and report) and the minimum of a quadratic fitted to loss over (log lr, log B)
near the best runs (`quadratic_optimum`: the paper reports a convex landscape; the scores
use it as the cell's "bowl"). steplaw.laws.fit fits the laws to these cells.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplaw.errors import UserError
from steplaw.laws.table import RunTable


@dataclass
class CellOptimum:
    N: float  # the fit's parameter count (n_column)
    D: float
    n_runs: int  # all runs in the cell, diverged included
    n_valid: int
    best_loss: float
    best_lr: float
    best_bs: float
    opt_lr: float  # geometric mean over the near-optimal runs
    opt_bs: float
    n_near: int
    lr_edge: str | None  # 'low' / 'high' / 'single' when the best run sits on the grid's edge
    bs_edge: str | None
    quadratic: dict | None = None
    params: dict = field(default_factory=dict)  # the cell's N, N_active, N_total as in the table
    sparsity: float = 1.0  # N_active / N (1 for dense)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def grid_edge(value: float, grid: np.ndarray) -> str | None:
    """Where `value` sits on a cell's grid of tried values: 'single' when the grid has one
    value (nothing locates the optimum), 'low' / 'high' when it is the smallest / largest
    (the optimum may lie outside), None inside. The one definition for fit and report."""
    grid = np.asarray(grid, float)
    if grid.size < 2 or np.isclose(grid.min(), grid.max()):
        return "single"
    if np.isclose(value, grid.min(), rtol=1e-9):
        return "low"
    if np.isclose(value, grid.max(), rtol=1e-9):
        return "high"
    return None


def quadratic_optimum(log_lr: np.ndarray, log_bs: np.ndarray, loss: np.ndarray, window: float) -> dict | None:
    """Minimum and curvature of loss ~ quadratic in (log lr, log B) over runs near the best.

    'coef' holds (c0, c_lr, c_bs, c_lr2, c_lr_bs, c_bs2) of
    loss = c0 + c_lr x + c_bs y + c_lr2 x^2 + c_lr_bs x y + c_bs2 y^2, x = ln lr, y = ln B.
    """
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
    coef_list = [float(c) for c in coef]
    eig = np.linalg.eigvalsh(hessian)
    if eig.min() <= 0:
        return {"convex": False, "curvature": curvature, "lr": None, "bs": None, "loss": None, "inside_grid": False,
                "coef": coef_list}
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
        "coef": coef_list,
    }


def cell_optima(table: RunTable, n_values, s_values, gap: float, quad_window: float):
    """Per (N, D, sparsity) cell: its optimum, or why it was skipped; and its valid rows by loss."""
    keys = np.column_stack([n_values, table.D, s_values])
    cell_keys, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    cells, skipped, run_rows = [], [], []
    for cell_index, (cell_n, cell_d, cell_s) in enumerate(cell_keys):
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
        near = valid_rows[loss <= loss[0] * (1 + gap)]
        best_row = valid_rows[0]
        params = {name: float(getattr(table, name)[best_row]) for name in table.param_columns()}
        cells.append(CellOptimum(
            N=float(cell_n), D=float(cell_d), n_runs=int(rows.size), n_valid=int(valid_rows.size),
            best_loss=float(loss[0]), best_lr=float(table.lr[best_row]), best_bs=float(table.batch_tokens[best_row]),
            opt_lr=float(np.exp(np.mean(np.log(table.lr[near])))),
            opt_bs=float(np.exp(np.mean(np.log(table.batch_tokens[near])))),
            n_near=int(near.size),
            lr_edge=grid_edge(table.lr[best_row], np.unique(table.lr[rows])),
            bs_edge=grid_edge(table.batch_tokens[best_row], np.unique(table.batch_tokens[rows])),
            quadratic=quadratic_optimum(np.log(table.lr[valid_rows]), np.log(table.batch_tokens[valid_rows]), loss,
                                        quad_window),
            params=params, sparsity=float(cell_s),
        ))
        run_rows.append(valid_rows)
    if not cells:
        raise UserError("no (N, D) cell has two or more finished runs; nothing to fit.")
    return cells, skipped, run_rows
