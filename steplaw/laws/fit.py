"""Fit hyperparameter scaling laws eta(N, D) and B(D[, N]) from a table of runs.

The method follows the Step Law paper (Li et al. 2025, arXiv:2503.04715): in each
(N, D) cell, every run whose smoothed final loss is within a relative `gap` (default
0.25%) of the cell's best loss counts as optimal, and the laws are least-squares fits in
log space over those near-optimal runs:

    log eta = log a + alpha log N + beta log D [+ gamma log S]
    log B   = log c + gamma log D [+ delta log N] [+ epsilon log S]

S = N_active / N is the MoE sparsity (1 for dense models), fitted on request
(`sparsity=True`) so that dense and MoE runs can be fitted together; its exponent's
interval says whether the data show a sparsity effect at all. Which parameter count is
N (non-embedding total, activated, or all) is the caller's choice (`n_column`).

An exponent is fitted only where the cells can identify it (steplaw.laws.identify):
otherwise the law is fitted without that variable and the refusal is in `warnings`.

Confidence intervals come from a bootstrap that resamples runs within each cell (so
the best loss and the near-optimal set are recomputed per resample); it is vectorized:
one resample is a vector of run weights, and the weighted least-squares problems are
solved in blocks of resamples at once (~64 MB of weights per block, whatever n_boot).
Validation is leave-one-cell-out (one more weight vector per cell), scored with every
published law beside it (steplaw.laws.scores).

The cells' optima (best run, near-optimal set, grid edges, the quadratic "bowl") come
from steplaw.laws.cells.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplaw.errors import UserError
from steplaw.laws import identify
from steplaw.laws.cells import CellOptimum, cell_optima
from steplaw.laws.lr_batch import fit_lr_batch
from steplaw.laws.powerlaw import LR_VARIABLES, PowerLaw, law_variables, one_value_words
from steplaw.laws.schedules import schedule_of_runs
from steplaw.laws.scores import CellRuns, score_cells, summary_of
from steplaw.laws.stats import NO_INTERVALS, check_bootstrap, percentile_interval
from steplaw.laws.table import RunTable

BS_VARIABLES = ("D",)
LR_FORMS = ("cells", "batch")


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
    law_scores: list[dict] = field(default_factory=list)
    scoring: str = ""
    refused: list[dict] = field(default_factory=list)
    sparsity: dict | None = None
    fitted_range: dict = field(default_factory=dict)
    law_cells: dict = field(default_factory=dict)  # law -> per-cell scores (not in to_dict: large)
    loss_column: str = "loss"  # the table column each cell's best and near-optimal runs were judged by
    lr_batch: object | None = None  # steplaw.laws.lr_batch.BatchLRFit with lr_form="batch"
    schedule: str = "unknown"  # the runs' LR schedule label (steplaw.laws.schedules)

    def to_dict(self) -> dict:
        return {
            "schedule": self.schedule,
            "lr_batch": self.lr_batch.to_dict() if self.lr_batch is not None else None,
            "n_column": self.n_column,
            "loss_column": self.loss_column,
            "gap": self.gap,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "lr_law": self.lr_law.to_dict(),
            "bs_law": self.bs_law.to_dict(),
            "sparsity": self.sparsity,
            "refused_exponents": list(self.refused),
            "fitted_range": self.fitted_range,
            "validation": self.validation,
            "law_scores": self.law_scores,
            "scoring": self.scoring,
            "counts": self.counts,
            "cells": [cell.to_dict() for cell in self.cells],
            "skipped_cells": self.skipped_cells,
            "warnings": list(self.warnings),
        }

    def predict(self, N, D, S=None) -> tuple[np.ndarray, np.ndarray]:
        """(peak lr, batch tokens) from the fitted laws; N in this fit's n_column units,
        S = N_active / N for MoE (None: dense)."""
        return self.lr_law(N, D, S), self.bs_law(N, D, S)


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


# ------------------------------------------------------------------------ the steps
def _check_args(table: RunTable, gap, n_boot, seed, n_column: str, sparsity: bool) -> tuple[np.ndarray, np.ndarray]:
    """(parameter counts of n_column, sparsity N_active/N per run) after checking the arguments."""
    if not table.has_hparams:
        raise UserError("the table was read without learning rates and batch sizes; fit needs both (needs='hparams').")
    if not (isinstance(gap, (int, float)) and np.isfinite(gap) and 0 <= gap < 1):
        raise UserError(f"gap must be a relative loss gap in [0, 1), got {gap!r}.")
    check_bootstrap(n_boot, seed)
    n_values = table.param_counts(n_column)
    if np.any(~np.isfinite(n_values) | (n_values <= 0)):
        raise UserError(f"column {n_column!r} has missing or non-positive values; expected a positive count in every row.")
    s_values = np.ones(len(table))
    if table.N_active is not None:
        s_values = np.where(np.isfinite(table.N_active), table.N_active / table.N, 1.0)
    elif sparsity:
        raise UserError("a sparsity term needs an N_active column (activated parameters per token); the table has none.")
    return n_values, s_values


def _unswept_laws(table: RunTable, run_rows: list[np.ndarray]) -> dict[str, dict]:
    """A refusal record for the LR law ("lr") when every cell ran one learning rate, and for
    the batch-size law ("bs") when every cell ran one batch size: such a cell's "optimum" in
    that variable is the one value it ran, so its exponents would fit the grid, not the data
    (printed with an interval of zero width). One batch size makes the LR law conditional on it."""
    out = {}
    for key, values, law, unit in (("lr", table.lr, "learning-rate", ""), ("bs", table.batch_tokens, "batch-size",
                                                                          " tokens")):
        per_cell = [identify.distinct_values(values[rows]) for rows in run_rows]
        if not per_cell or any(v.size > 1 for v in per_cell):
            continue
        ran = identify.distinct_values(np.concatenate(per_cell))
        what = "learning rate" if key == "lr" else "batch size"
        reason = (f"the {law} law is not fitted because every cell was run at {one_value_words(per_cell, what, unit)}, "
                  f"so no cell has an optimum in {what} and its exponents would only restate the grid")
        if key == "bs":
            reason += (f"; the learning-rate law is conditional on that batch size, B = {ran[0]:.4g} tokens"
                       if ran.size == 1 else "; the learning-rate law is conditional on each cell's batch size")
        reason += f" (sweep {what}s within each cell to fit it)."
        out[key] = {"law": law, "variable": "all", "reason": reason}
    return out


# Weight rows solved at a time: as many as fit in ~64 MB of weights (all of them for a
# few thousand runs, where fewer, larger products are faster), so memory stays bounded
# for sweeps of 50,000 runs whatever n_boot.
_BLOCK_VALUES = 8_000_000


def _weight_blocks(table: RunTable, run_rows: list[np.ndarray], gap: float, n_boot: int, seed: int):
    """Run weights, in blocks of rows: first the near-optimal set (one row), then n_boot
    resamples, then one leave-one-cell-out fold per cell."""
    w_point = np.concatenate([(table.loss[r] <= table.loss[r[0]] * (1 + gap)).astype(float) for r in run_rows])
    yield w_point[None, :]
    block_rows = max(16, _BLOCK_VALUES // w_point.size)
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, block_rows):
        size = min(block_rows, n_boot - start)
        block = np.zeros((size, w_point.size))
        offset = 0
        for rows in run_rows:
            k = rows.size
            loss = table.loss[rows]  # sorted ascending
            # Resample k runs with replacement per bootstrap row; counts via one bincount
            # (an order of magnitude faster than Generator.multinomial here).
            draws = rng.integers(0, k, size=(size, k)) + (np.arange(size) * k)[:, None]
            counts = np.bincount(draws.ravel(), minlength=size * k).reshape(size, k).astype(float)
            first = np.argmax(counts > 0, axis=1)  # lowest-loss run present in each resample
            block[:, offset:offset + k] = counts * (loss[None, :] <= (loss[first] * (1 + gap))[:, None])
            offset += k
        yield block
    # Leave-one-cell-out: fold c zeroes the weights of cell c.
    cell_of_run = np.concatenate([np.full(r.size, i) for i, r in enumerate(run_rows)])
    for start in range(0, len(run_rows), block_rows):
        folds = np.arange(start, min(start + block_rows, len(run_rows)))
        block = np.repeat(w_point[None, :], folds.size, axis=0)
        block[cell_of_run[None, :] == folds[:, None]] = 0.0
        yield block


def _centred_design(names: list[str], run_logs: dict, size: int) -> tuple[np.ndarray, list[float]]:
    """Design matrix [1, log x_k - mean_k] (centering keeps the normal equations well conditioned)."""
    means = [float(run_logs[name].mean()) for name in names]
    return np.column_stack([np.ones(size)] + [run_logs[name] - m for name, m in zip(names, means)]), means


def _solve_blocks(problems: dict[str, tuple[np.ndarray, np.ndarray]], blocks) -> tuple[dict[str, np.ndarray], float]:
    """Weighted least squares of every (X, y) problem for every weight row, block by block;
    also the number of near-optimal runs (the weight of the first row)."""
    coefs: dict[str, list[np.ndarray]] = {key: [] for key in problems}
    near = None
    for block in blocks:
        if near is None:
            near = float(block[0].sum())
        for key, (X, y) in problems.items():
            coefs[key].append(_wls_batched(X, y, block))
    return {key: np.vstack(parts) for key, parts in coefs.items()}, near


def _law_from_coefs(names: list[str], means: list[float], coefs: np.ndarray, cell_logs: dict,
                    n_boot: int) -> tuple[PowerLaw, np.ndarray]:
    """The law over `names` (point fit and bootstrap intervals) and its leave-one-cell-out predictions."""
    # Undo the centering: log y = b0 + sum b_k (log x_k - m_k).
    intercepts = coefs[:, 0] - sum(coefs[:, j + 1] * means[j] for j in range(len(names)))
    if np.isnan(intercepts[0]):
        raise UserError("the near-optimal runs do not identify the laws (singular fit); add cells with other N and D.")
    law = PowerLaw(coef=float(np.exp(intercepts[0])), exps={name: float(coefs[0, j + 1]) for j, name in enumerate(names)})
    if n_boot:
        boot = slice(1, 1 + n_boot)
        law.ci["coef"] = tuple(float(v) for v in np.exp(percentile_interval(intercepts[boot])))
        for j, name in enumerate(names):
            law.ci[f"exp_{name}"] = percentile_interval(coefs[boot, j + 1])
    loco = slice(1 + n_boot, None)
    fold_log = intercepts[loco] + sum(coefs[loco, j + 1] * cell_logs[name] for j, name in enumerate(names))
    return law, np.exp(fold_log)


def _sparsity_verdict(laws: dict[str, PowerLaw], refused: list[dict]) -> dict:
    """Does each law need the sparsity term? Yes when its 95% interval excludes 0."""
    out = {"variable": "S = N_active / N", "laws": {}}
    for key, law in laws.items():
        if "S" not in law.exps:
            reason = next((r["reason"] for r in refused if r["law"] == key and r["variable"] == "S"), "not fitted")
            out["laws"][key] = {"exponent": None, "ci": None, "supported": None, "verdict": reason}
            continue
        low, high = law.ci.get("exp_S", (float("nan"), float("nan")))
        if not (np.isfinite(low) and np.isfinite(high)):
            supported, verdict = None, "no verdict: no bootstrap interval (n_boot = 0)"
        elif low > 0 or high < 0:
            supported, verdict = True, f"the data show a sparsity effect: the 95% interval [{low:.3g}, {high:.3g}] excludes 0"
        else:
            supported, verdict = False, (f"the data show no sparsity effect: the 95% interval [{low:.3g}, {high:.3g}] "
                                         "contains 0")
        out["laws"][key] = {"exponent": law.exps["S"], "ci": [low, high], "supported": supported, "verdict": verdict}
    return out


def _fit_warnings(table, cells, skipped, refused, laws: dict[str, PowerLaw], cell_logs, n_boot: int) -> list[str]:
    warnings = list(table.warnings) + [r["reason"] for r in refused]
    if n_boot == 0:
        warnings.append(NO_INTERVALS)
    for key, law in laws.items():
        for name in law.exps:
            message = identify.wide_interval(key, name, law.ci.get(f"exp_{name}", (float("nan"), float("nan"))))
            if message:
                warnings.append(message)
    if "N" in laws["learning-rate"].exps and "D" in laws["learning-rate"].exps:
        message = identify.collinearity(cell_logs["N"], cell_logs["D"])
        if message:
            warnings.append(message)
    edge_cells = [c for c in cells if c.lr_edge or c.bs_edge]
    if edge_cells:
        warnings.append(
            f"{len(edge_cells)} of {len(cells)} cells have their best run on the edge of the LR or batch grid; "
            "the true optimum may lie outside (see cells[].lr_edge / bs_edge)."
        )
    if skipped:
        warnings.append(f"{len(skipped)} cell(s) skipped: fewer than two finished runs (see skipped_cells).")
    return warnings


def _validation(cells, cell_runs, fold_lr, fold_bs, score_laws: bool):
    """Leave-one-cell-out validation of the fit and the published laws' scores on the same cells."""
    scored = score_cells(cell_runs, fold_lr, fold_bs, published=score_laws)
    fit_cells, step_cells = scored.per_law["fit_loco"], scored.per_law.get("step_law", [])
    per_cell = []
    for index, cell in enumerate(cells):
        item = {"N": cell.N, "D": cell.D, "pred_lr": float(fold_lr[index]), "pred_bs": float(fold_bs[index]),
                "obs_lr": cell.opt_lr, "obs_bs": cell.opt_bs, "lr_factor": fit_cells[index]["lr_factor"],
                "bs_factor": fit_cells[index]["bs_factor"], "loss_gap": fit_cells[index]["gap"],
                "bowl_gap": fit_cells[index]["bowl_gap"]}
        if step_cells:
            step = step_cells[index]
            item.update({"step_law_lr": step["lr"], "step_law_bs": step["bs"], "step_law_lr_factor": step["lr_factor"],
                         "step_law_bs_factor": step["bs_factor"], "step_law_loss_gap": step["gap"]})
        per_cell.append(item)
    validation = {
        "method": "leave-one-cell-out",
        "lr_factor": summary_of(fit_cells, "lr_factor"),
        "bs_factor": summary_of(fit_cells, "bs_factor"),
        "relative_loss_gap": summary_of(fit_cells, "gap"),
        "per_cell": per_cell,
    }
    if step_cells:
        validation["step_law"] = {"lr_factor": summary_of(step_cells, "lr_factor"),
                                  "bs_factor": summary_of(step_cells, "bs_factor"),
                                  "relative_loss_gap": summary_of(step_cells, "gap")}
    return validation, scored


def fit_hparams(
    table: RunTable,
    gap: float = 0.0025,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    n_column: str = "N",
    fit_bs_N: bool = False,
    quad_window: float = 0.03,
    sparsity: bool = False,
    score_laws: bool = True,
    lr_form: str = "cells",
    allow_mixed_schedules: bool = False,
) -> HparamFit:
    """Fit eta = a N^alpha D^beta [S^g] and B = c D^gamma [N^delta] [S^e] to the near-optimal runs.

    table: runs (see steplaw.laws.table); gap: relative loss gap of the near-optimal set;
    n_boot: bootstrap resamples (runs resampled within cells), seeded by `seed`;
    n_column: which parameter count is N ('N' non-embedding, 'N_active', 'N_total');
    fit_bs_N: also fit an exponent of N in the batch-size law;
    sparsity: also fit an exponent of S = N_active / N in both laws (MoE with dense);
    quad_window: runs within this relative loss of the best feed the quadratic optimum;
    score_laws: score every published law on the cells (law_scores);
    lr_form: 'cells' (eta(N, D) from each cell's optimum) or 'batch' (also the batch-aware law
    eta(N, D, B) from each (N, D, B) row's optimum in LR, steplaw.laws.lr_batch);
    allow_mixed_schedules: fit runs of several LR schedules together (with a warning) instead of refusing.
    """
    if lr_form not in LR_FORMS:
        raise UserError(f"lr_form must be one of {', '.join(LR_FORMS)}, got {lr_form!r}.")
    n_values, s_values = _check_args(table, gap, n_boot, seed, n_column, sparsity)
    cells, skipped, run_rows = cell_optima(table, n_values, s_values, gap, quad_window)
    schedule, schedule_warnings = schedule_of_runs(table.schedule, table.valid, allow_mixed_schedules)
    lr_batch = None
    if lr_form == "batch":
        lr_batch = fit_lr_batch(table, n_values, run_rows, gap, n_boot, seed, n_column)
    cell_logs = {"N": np.log([c.N for c in cells]), "D": np.log([c.D for c in cells]),
                 "S": np.log([c.sparsity for c in cells])}
    extra = ("S",) if sparsity else ()
    lr_names, refused = law_variables(cell_logs, LR_VARIABLES + extra, "learning-rate", n_column)
    bs_names, bs_refused = law_variables(cell_logs, BS_VARIABLES + (("N",) if fit_bs_N else ()) + extra, "batch-size",
                                          n_column)
    refused += bs_refused
    unswept = _unswept_laws(table, run_rows)
    if "lr" in unswept:
        lr_names, refused = [], [r for r in refused if r["law"] != "learning-rate"] + [unswept["lr"]]
    if "bs" in unswept:
        bs_names, refused = [], [r for r in refused if r["law"] != "batch-size"] + [unswept["bs"]]

    rows_all = np.concatenate(run_rows)
    run_logs = {"N": np.log(n_values[rows_all]), "D": np.log(table.D[rows_all]), "S": np.log(s_values[rows_all])}
    x_lr, lr_means = _centred_design(lr_names, run_logs, rows_all.size)
    x_bs, bs_means = _centred_design(bs_names, run_logs, rows_all.size)
    coefs, near_optimal = _solve_blocks(
        {"lr": (x_lr, np.log(table.lr[rows_all])), "bs": (x_bs, np.log(table.batch_tokens[rows_all]))},
        _weight_blocks(table, run_rows, gap, n_boot, seed),
    )
    lr_law, fold_lr = _law_from_coefs(lr_names, lr_means, coefs["lr"], cell_logs, n_boot)
    bs_law, fold_bs = _law_from_coefs(bs_names, bs_means, coefs["bs"], cell_logs, n_boot)
    for key, law in (("lr", lr_law), ("bs", bs_law)):
        if key in unswept:  # the constant is the grid's one value: an interval of zero width would say nothing
            law.ci = {}
    laws = {"learning-rate": lr_law, "batch-size": bs_law}

    cell_runs = [CellRuns.of(cell, table.lr[rows], table.batch_tokens[rows], table.loss[rows])
                 for cell, rows in zip(cells, run_rows)]
    validation, scored = _validation(cells, cell_runs, fold_lr, fold_bs, score_laws)
    counts = {
        "runs": len(table),
        "valid": table.n_valid,
        "dropped": dict(table.dropped),
        "cells_used": len(cells),
        "cells_skipped": len(skipped),
        "near_optimal_runs": int(near_optimal),
    }
    fitted_range = {name: [float(np.exp(v.min())), float(np.exp(v.max()))] for name, v in cell_logs.items()
                    if name != "S" or sparsity}
    return HparamFit(
        lr_law=lr_law, bs_law=bs_law, cells=cells, validation=validation, counts=counts, n_column=n_column,
        gap=float(gap), n_boot=int(n_boot), seed=int(seed), skipped_cells=skipped,
        warnings=_fit_warnings(table, cells, skipped, refused, laws, cell_logs, n_boot) + schedule_warnings
        + (lr_batch.warnings if lr_batch is not None else []), lr_batch=lr_batch, schedule=schedule,
        law_scores=scored.ranking, scoring=scored.definition, law_cells=scored.per_law, refused=refused,
        sparsity=_sparsity_verdict(laws, refused) if sparsity else None, fitted_range=fitted_range,
        loss_column=table.loss_column,
    )
