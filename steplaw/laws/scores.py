"""Every law scored on your own runs: the Step Law paper's Table 1, on any sweep or table.

For each (N, D) cell a law predicts a peak LR and a batch size; the prediction is scored
against the cell's runs by

- lr_factor, bs_factor: exp|ln(predicted / observed optimum)| (>= 1), the observed
  optimum being the geometric mean of the cell's near-optimal runs;
- gap: the relative loss gap loss(run) / best loss - 1 of the cell's finished run
  nearest the prediction in (ln lr, ln B) (Euclidean; a tie goes to the lower-loss run).
  This is what the sweep measured, but a prediction between grid points takes the loss
  of a neighbour;
- bowl_gap: the cell's quadratic fit of loss over (ln lr, ln B) (steplaw.laws.cells.
  quadratic_optimum), evaluated at the prediction clamped to the cell's grid, relative to
  the bowl's lowest point in the grid. Smooth between grid points, but a model of the
  runs, not a run; only where the fit is convex. Both are reported; they differ when
  the grid is coarse against the bowl.

Per law: lr_factor / bs_factor are medians over the cells (with their maxima),
gap / bowl_gap means and maxima. Published laws are evaluated as `steplaw predict`
evaluates them, from the cell's N (non-embedding, total for MoE; MoE cells also give
N_active) and D; for MoE the Step Law is scored with both counts. The fitted law is
scored leave-one-cell-out (law "fit_loco"): each cell predicted by a fit without it.
Laws are ranked by mean gap, then max gap (equal to 1e-9 keeps published before fitted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steplaw.errors import UserError
from steplaw.laws.published import predict_all

FIT_NAME = "fit_loco"
DEFINITION = (
    "lr_factor / bs_factor: exp|ln(predicted / observed optimum)|, median over cells; gap: relative loss gap of "
    "the run nearest the prediction in (ln lr, ln B), mean / max over cells; bowl_gap: the cell's quadratic bowl "
    "at the prediction (clamped to the grid) over its lowest point in the grid; published laws from the cell's N "
    "and D as `steplaw predict` gives them; fit_loco: the fitted law, leave-one-cell-out; ranked by mean gap."
)


@dataclass
class CellRuns:
    """What scoring needs of one cell: its finished runs (sorted by loss) and its optimum."""

    N: float
    D: float
    params: dict
    lr: np.ndarray
    bs: np.ndarray
    loss: np.ndarray
    opt_lr: float
    opt_bs: float
    quadratic: dict | None

    @classmethod
    def of(cls, cell, lr, bs, loss) -> CellRuns:
        return cls(N=cell.N, D=cell.D, params=dict(cell.params), lr=np.asarray(lr, float), bs=np.asarray(bs, float),
                   loss=np.asarray(loss, float), opt_lr=cell.opt_lr, opt_bs=cell.opt_bs, quadratic=cell.quadratic)


def _factor(predicted: float, observed: float) -> float:
    return float(np.exp(abs(np.log(predicted / observed))))


def nearest_gap(cell: CellRuns, lr: float, bs: float) -> float:
    """Relative loss gap of the run nearest (lr, bs) in (ln lr, ln B) (ties: lower loss)."""
    dist = (np.log(cell.lr) - np.log(lr)) ** 2 + (np.log(cell.bs) - np.log(bs)) ** 2
    return float(cell.loss[np.argmin(dist)] / cell.loss.min() - 1)


def bowl_gap(cell: CellRuns, lr: float, bs: float) -> float | None:
    """The quadratic bowl at (lr, bs) clamped to the grid, over its lowest point in the grid."""
    quad = cell.quadratic
    if not quad or not quad.get("convex") or "coef" not in quad:
        return None
    c = quad["coef"]
    x_lo, x_hi = np.log(cell.lr).min(), np.log(cell.lr).max()
    y_lo, y_hi = np.log(cell.bs).min(), np.log(cell.bs).max()

    def bowl(x, y):
        x, y = min(max(x, x_lo), x_hi), min(max(y, y_lo), y_hi)
        return c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * x * y + c[5] * y * y

    lowest = bowl(np.log(quad["lr"]), np.log(quad["bs"]))
    if not lowest > 0:
        return None
    return float(max(0.0, bowl(np.log(lr), np.log(bs)) - lowest) / lowest)


def score_one(cell: CellRuns, lr: float | None, bs: float | None) -> dict:
    """The four numbers of one prediction in one cell (None where the law gives no value)."""
    ok_lr = lr is not None and np.isfinite(lr) and lr > 0
    ok_bs = bs is not None and np.isfinite(bs) and bs > 0
    both = ok_lr and ok_bs
    return {
        "N": cell.N, "D": cell.D,
        "lr": float(lr) if ok_lr else None, "bs": float(bs) if ok_bs else None,
        "lr_factor": _factor(lr, cell.opt_lr) if ok_lr else None,
        "bs_factor": _factor(bs, cell.opt_bs) if ok_bs else None,
        "gap": nearest_gap(cell, lr, bs) if both else None,
        "bowl_gap": bowl_gap(cell, lr, bs) if both else None,
    }


def summary_of(per_cell: list[dict], key: str) -> dict:
    """median / mean / max of one score over the cells that have it."""
    values = np.array([item[key] for item in per_cell if item.get(key) is not None], float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"median": None, "mean": None, "max": None}
    return {"median": float(np.median(values)), "mean": float(np.mean(values)), "max": float(np.max(values))}


def _law_summary(law: str, per_cell: list[dict], extrapolated: int) -> dict:
    lr, bs = summary_of(per_cell, "lr_factor"), summary_of(per_cell, "bs_factor")
    gap, bowl = summary_of(per_cell, "gap"), summary_of(per_cell, "bowl_gap")
    return {
        "law": law,
        "lr_factor": lr["median"], "lr_factor_max": lr["max"],
        "bs_factor": bs["median"], "bs_factor_max": bs["max"],
        "gap_mean": gap["mean"], "gap_max": gap["max"],
        "bowl_gap_mean": bowl["mean"], "bowl_gap_max": bowl["max"],
        "cells_scored": sum(1 for item in per_cell if item["gap"] is not None),
        "cells_extrapolated": extrapolated,
    }


def _published(cell: CellRuns) -> list[tuple[str, float | None, float | None, bool]]:
    """(law name, lr, batch tokens, extrapolated) of every published law for one cell."""
    n = cell.params.get("N", cell.N)
    n_active = cell.params.get("N_active")
    if n_active is not None and (not np.isfinite(n_active) or np.isclose(n_active, n, rtol=1e-9)):
        n_active = None
    out, seen = [], set()
    for pred in predict_all(n, cell.D, n_active=n_active):
        name = pred.law if pred.law not in seen else f"{pred.law} (N_active)"
        seen.add(pred.law)
        out.append((name, pred.lr, pred.batch_tokens, any("outside the range" in w for w in pred.warnings)))
    return out


@dataclass
class Scored:
    per_law: dict[str, list[dict]]
    ranking: list[dict]
    definition: str = DEFINITION


def score_cells(cells: list[CellRuns], fit_lr, fit_bs, published: bool = True) -> Scored:
    """Score the fitted law's leave-one-cell-out predictions and (published=True) every
    published law on the cells; the ranking lists one summary per law, best first."""
    per_law: dict[str, list[dict]] = {FIT_NAME: [score_one(c, a, b) for c, a, b in zip(cells, fit_lr, fit_bs)]}
    extrapolated: dict[str, int] = {FIT_NAME: 0}
    if published:
        for cell in cells:
            try:
                predictions = _published(cell)
            except UserError:  # a cell no published law can take (e.g. non-positive counts)
                continue
            for name, lr, bs, outside in predictions:
                per_law.setdefault(name, []).append(score_one(cell, lr, bs))
                extrapolated[name] = extrapolated.get(name, 0) + int(outside)
    summaries = [_law_summary(name, items, extrapolated.get(name, 0)) for name, items in per_law.items()]

    def key(item):
        if item["gap_mean"] is None:
            return (1, 0.0, 0.0, 0)
        return (0, round(item["gap_mean"], 9), round(item["gap_max"], 9), int(item["law"] == FIT_NAME))

    ranking = sorted(summaries, key=key)
    for rank, item in enumerate(ranking, 1):
        item["rank"] = rank
    return Scored(per_law=per_law, ranking=ranking)
