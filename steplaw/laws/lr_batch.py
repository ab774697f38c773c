"""The batch-aware learning-rate law: eta = a * N^alpha * D^beta * B^delta ("given my batch, what LR?").

The Step Law's eta(N, D) is the LR at each cell's optimal batch. A team whose batch is set
by its hardware needs the LR *for that batch*: marin fits lr ~ tokens^-a * dim^-b * B^0.5
per optimizer (marin #5951, #7856). Here the law is fitted to the optimum in LR of every
(N, D, B) row of the sweep (the runs of one cell at one batch size), not only to each
cell's overall optimum:

- a row's optimum is the geometric mean LR of its runs within `gap` of the row's best loss
  (the Step Law's near-optimal set, taken per batch size);
- a row with fewer than two learning rates has no optimum, and a row whose best LR is the
  smallest or largest it ran is left out (its optimum may lie outside the grid; counted);
- delta is identified by the batch sizes *within* cells: a table where every cell ran one
  batch size is refused by name (the wording of steplaw.laws.fit's batch-law refusal), as is
  one whose usable rows hold too few batch sizes (steplaw.laws.identify's rule: 3 distinct,
  a factor 2); N and D exponents follow the same rule over the cells;
- intervals: a bootstrap resampling runs within each row (the row optima recomputed), and a
  verdict on delta: supported when its 95% interval excludes 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplaw.errors import UserError
from steplaw.laws import identify
from steplaw.laws.cells import grid_edge
from steplaw.laws.powerlaw import LR_VARIABLES, PowerLaw, law_variables, one_value_words
from steplaw.laws.stats import percentile_interval
from steplaw.laws.table import RunTable

LAW_NAME = "batch-aware learning-rate"


@dataclass
class BatchRow:
    """One (N, D, B) row: the runs of one cell at one batch size, sorted by loss."""

    N: float
    D: float
    B: float
    cell: int
    runs: np.ndarray  # table rows
    opt_lr: float | None  # None: fewer than two learning rates
    lr_edge: str | None

    def to_dict(self) -> dict:
        return {"N": self.N, "D": self.D, "B": self.B, "n_runs": int(self.runs.size), "opt_lr": self.opt_lr,
                "lr_edge": self.lr_edge, "used": self.used}

    @property
    def used(self) -> bool:
        return self.opt_lr is not None and self.lr_edge is None


@dataclass
class BatchLRFit:
    law: PowerLaw
    delta: dict
    rows: list[BatchRow]
    refused: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fitted_range: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"law": self.law.to_dict(), "formula": self.law.formula("lr"), "delta": self.delta,
                "fitted_range": self.fitted_range, "refused_exponents": list(self.refused),
                "rows": [row.to_dict() for row in self.rows], "warnings": list(self.warnings)}


def _rows(table: RunTable, n_values: np.ndarray, run_rows: list[np.ndarray], gap: float) -> list[BatchRow]:
    out = []
    for cell, rows in enumerate(run_rows):
        batches = table.batch_tokens[rows]
        for batch in identify.distinct_values(batches):
            runs = rows[np.isclose(batches, batch, rtol=1e-9)]  # still sorted by loss
            lrs = table.lr[runs]
            opt, edge = None, None
            if identify.distinct_values(lrs).size >= 2:
                loss = table.loss[runs]
                near = loss <= loss[0] * (1 + gap)
                opt = float(np.exp(np.mean(np.log(lrs[near]))))
                edge = grid_edge(lrs[0], np.unique(lrs))
            out.append(BatchRow(N=float(n_values[runs[0]]), D=float(table.D[runs[0]]), B=float(batch), cell=cell,
                                runs=runs, opt_lr=opt, lr_edge=edge))
    return out


def _check_identified(table: RunTable, run_rows: list[np.ndarray], used: list[BatchRow], n_rows: int) -> None:
    """One-sentence refusals: every cell one batch size; no cell with optima at two batch sizes; too few B."""
    per_cell = [identify.distinct_values(table.batch_tokens[rows]) for rows in run_rows]
    if all(v.size == 1 for v in per_cell):
        raise UserError(f"the {LAW_NAME} law is not fitted because every cell was run at "
                        f"{one_value_words(per_cell, 'batch size', ' tokens')}, so no cell has an optimum in learning "
                        "rate at more than one batch size and its batch exponent would only restate the grid (sweep "
                        "batch sizes within each cell to fit it).")
    per_cell_used: dict[int, int] = {}
    for row in used:
        per_cell_used[row.cell] = per_cell_used.get(row.cell, 0) + 1
    if not any(count >= 2 for count in per_cell_used.values()):
        raise UserError(f"the {LAW_NAME} law is not fitted because no cell has an optimum in learning rate inside its "
                        f"grid at two or more batch sizes ({len(used)} of {n_rows} (N, D, B) rows have one; a row needs "
                        "two or more learning rates and its best not on their edge), so nothing separates the batch's "
                        "effect from N's and D's.")
    problem = identify.exponent_problem(np.array([row.B for row in used]), "B")
    if problem is not None:
        raise UserError(f"the {LAW_NAME} law is not fitted because the rows with an LR optimum hold too few batch "
                        f"sizes: {problem.replace('the cells have', 'they have')}.")


def _bootstrap_logs(table: RunTable, used: list[BatchRow], gap: float, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, rows) log optimal LR of each row, its runs resampled with replacement."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(used)))
    for j, row in enumerate(used):
        k = row.runs.size
        loss, log_lr = table.loss[row.runs], np.log(table.lr[row.runs])
        draws = rng.integers(0, k, size=(n_boot, k)) + (np.arange(n_boot) * k)[:, None]
        counts = np.bincount(draws.ravel(), minlength=n_boot * k).reshape(n_boot, k).astype(float)
        first = np.argmax(counts > 0, axis=1)  # lowest-loss run present in each resample
        weights = counts * (loss[None, :] <= (loss[first] * (1 + gap))[:, None])
        out[:, j] = (weights @ log_lr) / weights.sum(axis=1)
    return out


def _delta_verdict(law: PowerLaw, used: list[BatchRow]) -> dict:
    per_cell: dict[int, int] = {}
    for row in used:
        per_cell[row.cell] = per_cell.get(row.cell, 0) + 1
    data = {"cells_with_2_or_more_batches": sum(c >= 2 for c in per_cell.values()),
            "cells_with_3_or_more_batches": sum(c >= 3 for c in per_cell.values()),
            "cells": len(per_cell), "distinct_batches": int(identify.distinct_values([r.B for r in used]).size)}
    low, high = law.ci.get("exp_B", (float("nan"), float("nan")))
    if not (np.isfinite(low) and np.isfinite(high)):
        supported, verdict = None, "no verdict: no bootstrap interval (n_boot = 0)"
    elif low > 0 or high < 0:
        supported, verdict = True, (f"the data show the optimal LR depends on the batch: the 95% interval of delta "
                                    f"[{low:.3g}, {high:.3g}] excludes 0")
    else:
        supported, verdict = False, (f"the data show no dependence of the optimal LR on the batch: the 95% interval of "
                                     f"delta [{low:.3g}, {high:.3g}] contains 0")
    return {"exponent": law.exps["B"], "ci": [low, high] if supported is not None else None, "supported": supported,
            "verdict": verdict, **data}


def fit_lr_batch(table: RunTable, n_values: np.ndarray, run_rows: list[np.ndarray], gap: float, n_boot: int,
                 seed: int, n_column: str = "N") -> BatchLRFit:
    """The batch-aware LR law from the cells' valid runs (`run_rows`, each sorted by loss, as
    steplaw.laws.cells.cell_optima gives them); N in `n_column` units, B in tokens."""
    rows = _rows(table, n_values, run_rows, gap)
    used = [row for row in rows if row.used]
    _check_identified(table, run_rows, used, len(rows))
    cells = sorted({row.cell for row in used})
    cell_logs = {"N": np.log([n_values[run_rows[c][0]] for c in cells]),
                 "D": np.log([table.D[run_rows[c][0]] for c in cells])}
    names, refused = law_variables(cell_logs, LR_VARIABLES, LAW_NAME, n_column)
    names = names + ["B"]
    logs = {"N": np.log([r.N for r in used]), "D": np.log([r.D for r in used]), "B": np.log([r.B for r in used])}
    means = [float(logs[name].mean()) for name in names]
    X = np.column_stack([np.ones(len(used))] + [logs[name] - m for name, m in zip(names, means)])
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise UserError(f"the {LAW_NAME} law is not fitted because across its rows the batch size is a function of "
                        f"{' and '.join(names[:-1]) or 'nothing'} in log space; run several batch sizes per cell.")
    y = np.log([r.opt_lr for r in used])
    Y = np.vstack([y[None, :], _bootstrap_logs(table, used, gap, n_boot, seed)]) if n_boot else y[None, :]
    coefs = np.linalg.lstsq(X, Y.T, rcond=None)[0].T  # (1 + n_boot, p)
    intercepts = coefs[:, 0] - sum(coefs[:, j + 1] * means[j] for j in range(len(names)))
    law = PowerLaw(coef=float(np.exp(intercepts[0])), exps={name: float(coefs[0, j + 1]) for j, name in enumerate(names)})
    if n_boot:
        law.ci["coef"] = tuple(float(v) for v in np.exp(percentile_interval(intercepts[1:])))
        for j, name in enumerate(names):
            law.ci[f"exp_{name}"] = percentile_interval(coefs[1:, j + 1])
    warnings = [r["reason"] for r in refused]
    edge = sum(1 for row in rows if row.opt_lr is not None and row.lr_edge is not None)
    if edge:
        warnings.append(f"{edge} of {len(rows)} (N, D, B) rows have their best LR on the edge of their LR grid and are "
                        f"left out of the {LAW_NAME} law (their optimum may lie outside; see lr_batch.rows).")
    for name in names:
        message = identify.wide_interval(LAW_NAME, name, law.ci.get(f"exp_{name}", (float("nan"),) * 2))
        if message:
            warnings.append(message)
    delta = _delta_verdict(law, used)
    if delta["cells_with_3_or_more_batches"] == 0:
        warnings.append("no cell has an LR optimum at three or more batch sizes, so delta rests on pairs of batch "
                        "sizes per cell and the form B^delta is not tested.")
    fitted_range = {key: [float(np.exp(v.min())), float(np.exp(v.max()))] for key, v in logs.items()}
    return BatchLRFit(law=law, delta=delta, rows=rows, refused=refused, warnings=warnings, fitted_range=fitted_range)


def batch_law_lines(fit: BatchLRFit) -> list[str]:
    """The batch-aware law as text lines for `steplaw fit --lr-form batch`."""
    ci = fit.law.ci
    lines = [f"batch-aware learning-rate law ({sum(r.used for r in fit.rows)} of {len(fit.rows)} (N, D, B) rows "
             f"with an LR optimum inside their grid):", f"  {fit.law.formula('lr')}  (B in tokens)"]
    for name, exp in fit.law.exps.items():
        low, high = ci.get(f"exp_{name}", (float("nan"),) * 2)
        span = f" [{low:+.3f}, {high:+.3f}]" if np.isfinite(low) and np.isfinite(high) else ""
        lines.append(f"  exponent of {name}: {exp:+.4f}{span}")
    d = fit.delta
    lines.append(f"  delta: {d['verdict']} ({d['cells_with_2_or_more_batches']} of {d['cells']} cells locate their LR "
                 f"optimum at 2+ batch sizes, {d['cells_with_3_or_more_batches']} at 3+; {d['distinct_batches']} "
                 "distinct batch sizes)")
    return lines
