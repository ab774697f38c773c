"""Extrapolation you can check: fit a loss law on part of a table and score it on the rest.

    rule = parse_holdout("N>=1e9,D>=2e10")     # or "largest", "C>=1e20"; comma = and
    holdout_loss(table, rule, n_boot=...)      # fit on the rest, predict the held-out cells
    rollout_loss(table, "N")                   # expanding window: fit on the k smallest N, predict the next

A rule term is VARIABLE>=VALUE with VARIABLE one of N (the fit's parameter count), D
(tokens) and C (compute: the table's compute column, else 6 N D), or `largest` (the
cells of the largest N). A run is held out when it meets every term. Scores are per
held-out (N, D) cell, on its best finished run's loss (the loss the law is fitted to):
rel_error = predicted / observed - 1, and their mean absolute value. (OLMo-core's
ScalingLawRollout does the expanding-window form; the rule form is Hoffmann et al.
2022's and Besiroglu et al. 2024's check of a law on its largest models.)
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from steplaw.errors import UserError
from steplaw.laws import identify
from steplaw.laws.table import RunTable
from steplaw.units import parse_count

_TERM = re.compile(r"^\s*([NDC])\s*>=\s*(\S+)\s*$")
_EXPECTED = "expected terms N>=X, D>=Y, C>=Z or largest, joined by commas (e.g. 'N>=1e9,D>=2e10')"


@dataclasses.dataclass(frozen=True)
class HoldoutRule:
    text: str
    bounds: tuple[tuple[str, float], ...]  # (variable, lower bound), all must hold
    largest: bool = False


def parse_holdout(text: str) -> HoldoutRule:
    """The rule of `--holdout TEXT`; a UserError naming the bad term otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--holdout {text!r} is empty; {_EXPECTED}.")
    bounds, largest = [], False
    for term in text.split(","):
        if term.strip() == "largest":
            largest = True
            continue
        match = _TERM.match(term)
        if not match:
            raise UserError(f"--holdout term {term.strip()!r} is not a rule; {_EXPECTED}.")
        try:
            value = parse_count(match.group(2), f"--holdout {match.group(1)}")
        except UserError:
            raise UserError(f"--holdout term {term.strip()!r} has no positive number after '>='; {_EXPECTED}.") from None
        bounds.append((match.group(1), float(value)))
    return HoldoutRule(text=text.strip(), bounds=tuple(bounds), largest=largest)


def subset(table: RunTable, keep: np.ndarray) -> RunTable:
    """The table's rows where `keep` is true (every per-row column sliced alike)."""
    sliced = {f.name: getattr(table, f.name)[keep] for f in dataclasses.fields(table)
              if isinstance(getattr(table, f.name), np.ndarray)}
    return dataclasses.replace(table, **sliced, warnings=list(table.warnings))


def held_out_rows(table: RunTable, rule: HoldoutRule, n_values: np.ndarray) -> np.ndarray:
    """Boolean mask of the runs the rule holds out."""
    compute = table.compute if table.compute is not None else 6.0 * n_values * table.D
    values = {"N": n_values, "D": table.D, "C": compute}
    mask = np.ones(len(table), dtype=bool)
    for variable, bound in rule.bounds:
        mask &= values[variable] >= bound * (1 - 1e-9)
    if rule.largest:
        finite = n_values[table.valid & np.isfinite(n_values)]
        if finite.size:
            mask &= np.isclose(n_values, finite.max(), rtol=1e-9)
    return mask


def _score_rows(law, cells: np.ndarray, observed: np.ndarray) -> tuple[list[dict], float]:
    predicted = np.asarray(law.predict(cells[:, 0], cells[:, 1]), float)
    rel = predicted / observed - 1
    rows = [{"N": float(n), "D": float(d), "loss": float(o), "predicted": float(p), "rel_error": float(r)}
            for (n, d), o, p, r in zip(cells, observed, predicted, rel)]
    return rows, float(np.mean(np.abs(rel)))


def _range(cells: np.ndarray) -> dict:
    return {"N": [float(cells[:, 0].min()), float(cells[:, 0].max())],
            "D": [float(cells[:, 1].min()), float(cells[:, 1].max())]}


def holdout_loss(table: RunTable, rule: HoldoutRule, *, n_column: str = "N", fit=None, **fit_args) -> tuple:
    """(fit on the rest, holdout dict) for a loss law; `fit` is the fitter (steplaw.laws.loss.fit_loss)."""
    from steplaw.laws.loss import cell_best_losses, fit_loss

    fit = fit or fit_loss
    n_values = table.param_counts(n_column)
    held = held_out_rows(table, rule, n_values) & table.valid
    if not held.any():
        raise UserError(f"--holdout {rule.text!r} holds out no finished run of {table.source}; loosen the rule "
                        "(the fitted range is in the output of a fit without --holdout).")
    rest = subset(table, ~held)
    try:
        fitted = fit(rest, n_column=n_column, **fit_args)
    except UserError as exc:
        raise UserError(f"--holdout {rule.text!r} leaves too little to fit on: {exc}") from None
    if fitted.refused_terms:  # a law without its N (or D) term cannot be scored on larger N (D)
        raise UserError(f"--holdout {rule.text!r} leaves too little to fit on: {_refusal(fitted)}")
    cells, observed = cell_best_losses(subset(table, held), n_values[held])
    rows, mean_abs = _score_rows(fitted, cells, observed)
    return fitted, {"rule": rule.text, "fitted_on": fitted.fitted_range, "predicted_range": _range(cells),
                    "rows": rows, "mean_abs_rel_error": mean_abs}


def rollout_loss(table: RunTable, variable: str, *, n_column: str = "N", fit=None, **fit_args) -> dict:
    """Expanding window by N or D: fit on the k smallest values (k from 3, the fewest that
    identify an exponent) and predict the cells of the next; a step whose fit is refused
    records why. The fits are point fits (n_boot = 0): the score is the prediction's error."""
    from steplaw.laws.loss import cell_best_losses, fit_loss

    if variable not in ("N", "D"):
        raise UserError(f"--rollout {variable!r} is not a variable; expected N or D.")
    fit = fit or fit_loss
    n_values = table.param_counts(n_column)
    column = n_values if variable == "N" else table.D
    levels = identify.distinct_values(column[table.valid & np.isfinite(column)])
    need = identify.MIN_DISTINCT[variable]
    if levels.size < need + 1:
        raise UserError(f"--rollout {variable} needs at least {need + 1} distinct values of {variable} (fit on "
                        f"{need}, predict the next); the table has {levels.size}.")
    steps, errors = [], []
    for k in range(need, levels.size):
        upto, target = levels[k - 1], levels[k]
        train = table.valid & (column <= upto * (1 + 1e-9))
        test = table.valid & np.isclose(column, target, rtol=1e-9)
        step = {"fitted_on": {variable: [float(levels[0]), float(upto)]}, "predicted": {variable: float(target)}}
        try:
            fitted = fit(subset(table, train), n_column=n_column, **{**fit_args, "n_boot": 0})
        except UserError as exc:
            steps.append({**step, "refused": str(exc)})
            continue
        if fitted.refused_terms:
            steps.append({**step, "refused": _refusal(fitted)})
            continue
        cells, observed = cell_best_losses(subset(table, test), n_values[test])
        step["rows"], step["mean_abs_rel_error"] = _score_rows(fitted, cells, observed)
        step["fitted_on"] = fitted.fitted_range
        errors.append(step["mean_abs_rel_error"])
        steps.append(step)
    return {"variable": variable, "steps": steps,
            "mean_abs_rel_error": float(np.mean(errors)) if errors else None}


def _refusal(fitted) -> str:
    """The fit's own sentence about the term it could not fit."""
    terms = " and ".join(fitted.refused_terms)
    return next((w for w in fitted.warnings if f"{terms} term" in w), f"the law was fitted without its {terms} term.")


def holdout_lines(holdout: dict, label: str = "holdout") -> list[str]:
    """The holdout (or one rollout step) as text: per held-out cell, then the mean."""
    on = holdout["fitted_on"]
    rule = f" {holdout['rule']}" if holdout.get("rule") else ""
    lines = [f"{label}{rule}: fitted on N {on['N'][0]:.3g} to {on['N'][1]:.3g}, "
             f"D {on['D'][0]:.3g} to {on['D'][1]:.3g}; predicted:"]
    for row in holdout["rows"]:
        span = "" if not row.get("interval") else \
            f" [{row['interval'][0]:.4f}, {row['interval'][1]:.4f}]{'' if row['inside_interval'] else ' (outside)'}"
        lines.append(f"    N={row['N']:.4g} D={row['D']:.4g}: observed {row['loss']:.4f}, predicted "
                     f"{row['predicted']:.4f}{span}, rel_error {row['rel_error']:+.2%}")
    line = f"  mean |rel_error| {holdout['mean_abs_rel_error']:.2%} over {len(holdout['rows'])} held-out cell(s)"
    inside = holdout.get("inside_interval")
    if inside:
        line += f"; {inside['count']} of {inside['of']} inside their 95% prediction interval"
    return lines + [line]


def rollout_lines(rollout: dict) -> list[str]:
    lines = [f"rollout by {rollout['variable']} (fit on the k smallest values, predict the next):"]
    for step in rollout["steps"]:
        (name, target), = step["predicted"].items()
        if "refused" in step:
            lines.append(f"  predicting {name}={target:.4g}: no fit: {step['refused']}")
            continue
        lines += ["  " + line for line in holdout_lines(step, f"predicting {name}={target:.4g}")]
    if rollout["mean_abs_rel_error"] is not None:
        lines.append(f"  mean over steps: {rollout['mean_abs_rel_error']:.2%}")
    return lines


def holdout_hparams(table: RunTable, rule: HoldoutRule, *, n_column: str = "N", gap: float = 0.0025,
                    quad_window: float = 0.03, **fit_args) -> tuple:
    """(fit on the rest, holdout dict) for the LR and batch laws: per held-out (N, D) cell its
    optimum (as the fit locates it), the law's LR and batch there, their factors
    exp|ln(predicted / observed)| and the relative loss gap of the run nearest the prediction."""
    from steplaw.laws.cells import cell_optima
    from steplaw.laws.fit import fit_hparams
    from steplaw.laws.scores import CellRuns, score_one, summary_of

    n_values = table.param_counts(n_column)
    held = held_out_rows(table, rule, n_values) & table.valid
    if not held.any():
        raise UserError(f"--holdout {rule.text!r} holds out no finished run of {table.source}; loosen the rule.")
    try:
        fitted = fit_hparams(subset(table, ~held), gap=gap, quad_window=quad_window, n_column=n_column, **fit_args)
    except UserError as exc:
        raise UserError(f"--holdout {rule.text!r} leaves too little to fit on: {exc}") from None
    part = subset(table, held)
    sparsity = np.ones(len(part)) if part.N_active is None else \
        np.where(np.isfinite(part.N_active), part.N_active / part.N, 1.0)
    cells, _, run_rows = cell_optima(part, n_values[held], sparsity, gap, quad_window)
    if not cells:
        raise UserError(f"--holdout {rule.text!r} holds out no cell with two finished runs, so no optimum to "
                        "predict; hold out whole cells.")
    rows = []
    for cell, cell_rows in zip(cells, run_rows):
        lr, bs = (float(v) for v in fitted.predict(cell.N, cell.D, cell.sparsity if fitted.sparsity else None))
        score = score_one(CellRuns.of(cell, part.lr[cell_rows], part.batch_tokens[cell_rows], part.loss[cell_rows]),
                          lr, bs)
        rows.append({"N": cell.N, "D": cell.D, "lr": cell.opt_lr, "predicted_lr": lr, "lr_factor": score["lr_factor"],
                     "batch_tokens": cell.opt_bs, "predicted_batch_tokens": bs, "bs_factor": score["bs_factor"],
                     "loss_gap": score["gap"]})
    cell_range = np.array([[c.N, c.D] for c in cells])
    return fitted, {"rule": rule.text, "fitted_on": fitted.fitted_range, "predicted_range": _range(cell_range),
                    "rows": rows, "lr_factor": summary_of(rows, "lr_factor"), "bs_factor": summary_of(rows, "bs_factor"),
                    "loss_gap": summary_of(rows, "loss_gap")}


def holdout_hparam_lines(holdout: dict) -> list[str]:
    on = holdout["fitted_on"]
    lines = [f"holdout {holdout['rule']}: fitted on N {on['N'][0]:.3g} to {on['N'][1]:.3g}, "
             f"D {on['D'][0]:.3g} to {on['D'][1]:.3g}; predicted:"]
    for row in holdout["rows"]:
        gap = "-" if row["loss_gap"] is None else f"{row['loss_gap']:.2%}"
        lines.append(f"    N={row['N']:.4g} D={row['D']:.4g}: lr {row['lr']:.3g} observed, {row['predicted_lr']:.3g} "
                     f"predicted (x{row['lr_factor']:.3f}); batch {row['batch_tokens']:.4g} observed, "
                     f"{row['predicted_batch_tokens']:.4g} predicted (x{row['bs_factor']:.3f}); loss gap {gap}")
    def mean(key, scale=1.0, spec=".3f"):
        value = holdout[key]["mean"]
        return "-" if value is None else format(value * scale, spec)
    lines.append(f"  mean over {len(holdout['rows'])} held-out cell(s): LR factor {mean('lr_factor')}, batch factor "
                 f"{mean('bs_factor')}, loss gap {mean('loss_gap', 100, '.3f')}%")
    return lines
