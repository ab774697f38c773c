"""Fit the loss law L(N, D) = E + A / N^alpha + B / D^beta.

The fit is the robust one of Hoffmann et al. 2022 (Chinchilla, arXiv:2203.15556,
Approach 3) as replicated by Besiroglu et al. 2024 (arXiv:2404.10102): in log space,
log L_hat = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e,
minimizing the Huber loss (delta = 1e-3) of log L_hat - log L with a quasi-Newton
(BFGS) method, started from the best points of a grid of initial values. The data are,
per (N, D) cell, the best finished run's loss (the loss at the best hyperparameters).

Intervals: bootstrap over cells. Every resample starts from the point estimate and all
resamples are solved at once by BFGS vectorized over the resamples (same objective, same
method as the point fit), so 1,000 resamples cost a few dozen array steps instead of
1,000 scipy BFGS runs.

The N and D exponents must be identifiable (steplaw.laws.identify: at least 3 distinct
values spanning a factor 2). When one of them is not, that term is refused with one
sentence naming the variable and its range, and the law is fitted without it: with N
unidentifiable L = E' + B/D^beta (A/N^alpha folded into the constant E'; A and alpha
reported as 0), and likewise for D. Such a law has no compute-optimal split (it needs
both terms), so compute_optimal refuses it. When neither is identifiable the fit is refused.

Compute-optimal allocation under C = k N D (k = 6 FLOPs per parameter and token, or
the median of compute / (N D) when the table has a FLOP column):
N_opt(C) = G (C/k)^(beta/(alpha+beta)), D_opt(C) = G^-1 (C/k)^(alpha/(alpha+beta)),
G = (alpha A / (beta B))^(1/(alpha+beta))  (Hoffmann et al. 2022, Eq. 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from steplaw.errors import UserError
from steplaw.laws import identify
from steplaw.laws.loss_forms import LossForm
from steplaw.laws.loss_solver import fit_batch as _fit_batch
from steplaw.laws.loss_solver import fit_once as _fit_once
from steplaw.laws.loss_solver import grid_objective, grid_starts, lse_terms
from steplaw.laws.stats import NO_INTERVALS, check_bootstrap, percentile_interval
from steplaw.laws.table import RunTable

HUBER_DELTA = 1e-3
_N_STARTS = 8  # quasi-Newton runs from the best grid points


class LossFormula:
    """L(N, D) = E + A/N^alpha + B/D^beta and its compute-optimal split (N parameters,
    D tokens, L nats); for classes with E, A, B, alpha, beta, flops_per_param_token."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    flops_per_param_token: float
    refused_terms: tuple[str, ...] = ()  # "N" / "D": terms fitted without (folded into E)

    def predict(self, N, D):
        """Predicted loss of N parameters trained on D tokens."""
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    def split_problem(self) -> str | None:
        """Why the law has no compute-optimal split, or None. The split takes powers and
        logs of alpha, beta, A and B: each must be a positive finite number."""
        if self.refused_terms:
            return no_split_reason(self.refused_terms)
        return degenerate_split_reason({"alpha": self.alpha, "beta": self.beta, "A": self.A, "B": self.B})

    def _checked_split(self) -> None:
        problem = self.split_problem()
        if problem:
            raise UserError(problem)

    @property
    def n_exponent(self) -> float:
        self._checked_split()
        return self.beta / (self.alpha + self.beta)

    @property
    def d_exponent(self) -> float:
        self._checked_split()
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        self._checked_split()
        return float((self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta)))

    def compute_optimal(self, compute_flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing the loss at a budget of `compute_flops` FLOPs."""
        if not (np.isfinite(compute_flops) and compute_flops > 0):
            raise UserError(f"compute budget must be a positive number of FLOPs, got {compute_flops!r}.")
        self._checked_split()
        scaled = compute_flops / self.flops_per_param_token
        return float(self.G * scaled**self.n_exponent), float(scaled**self.d_exponent / self.G)

    def formula_dict(self) -> dict:
        return {"law": "L = E + A / N^alpha + B / D^beta", "E": self.E, "A": self.A, "B": self.B,
                "alpha": self.alpha, "beta": self.beta, "flops_per_param_token": self.flops_per_param_token}


def degenerate_split_reason(values: dict) -> str | None:
    """One sentence naming the constants (alpha, beta, A, B) that are not positive finite
    numbers, which leave a loss law without a compute-optimal split; None when all are."""
    bad = [f"{name} = {value:.3g}" for name, value in values.items()
           if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0)]
    if not bad:
        return None
    return (f"the loss law's {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a positive finite number, so "
            "it has no compute-optimal N and D: the data do not show both terms falling with scale (fit it on "
            "cells whose loss falls with both N and D, or plan with a given --params and --tokens).")


def no_split_reason(refused_terms) -> str:
    """Why a loss law fitted without a term has no compute-optimal N and D."""
    return (f"the loss law was fitted without its {' and '.join(refused_terms)} term, so it has no compute-optimal "
            "N and D (the split needs both the N and the D term); fit it on cells that vary both.")


@dataclass
class LossLaw(LossFormula):
    """A loss law given by its constants (a published one, or one read back from a file)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    flops_per_param_token: float = 6.0


@dataclass
class LossFit(LossFormula):
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
    samples: np.ndarray | None = None  # bootstrap (a, b, e, alpha, beta) rows, a = ln A
    fitted_range: dict = field(default_factory=dict)
    refused_terms: tuple[str, ...] = ()
    form: LossForm = field(default_factory=LossForm)

    def optimal_interval(self, compute_flops: float) -> dict | None:
        """95% bootstrap intervals of N_opt and D_opt at `compute_flops`, or None without a bootstrap."""
        return optimal_interval(self.samples, compute_flops, self.flops_per_param_token)

    def loss_interval(self, n_params: float, tokens: float) -> list[float] | None:
        """95% prediction interval of the loss at (N, D) (see `loss_interval`)."""
        return loss_interval(self.samples, self.rms_log_residual, n_params, tokens)

    def to_dict(self) -> dict:
        return {
            **self.formula_dict(),
            "intervals": {k: [float(v[0]), float(v[1])] for k, v in self.intervals.items()},
            "n_column": self.n_column,
            "n_cells": self.n_cells,
            "n_boot": self.n_boot,
            "rms_log_residual": self.rms_log_residual,
            "fitted_range": self.fitted_range,
            "refused_terms": list(self.refused_terms),
            "form": self.form.to_dict(),
            "compute_optimal": self._split_dict(),
            "warnings": self._warnings_with_split(),
        }

    def _warnings_with_split(self) -> list[str]:
        """The fit's warnings, with the sentence saying why there is no compute-optimal split
        when the fit did not already say it (a law built or edited by hand, say)."""
        warnings = list(self.warnings)
        problem = self.split_problem()
        if problem and not self.refused_terms and problem not in warnings:
            warnings.append(problem)
        return warnings

    def _split_dict(self) -> dict:
        """The compute-optimal split's formulas, or why the law has none."""
        problem = self.split_problem()
        if problem:
            return {"refused": problem}
        return {
            "compute": f"C = {self.flops_per_param_token:.4g} * N * D",
            "flops_per_param_token": self.flops_per_param_token,
            "N_opt": f"G * (C / {self.flops_per_param_token:.4g})^{self.n_exponent:.4f}",
            "D_opt": f"G^-1 * (C / {self.flops_per_param_token:.4g})^{self.d_exponent:.4f}",
            "G": self.G,
            "N_exponent": self.n_exponent,
            "D_exponent": self.d_exponent,
            "exponent_intervals": {k: [float(v[0]), float(v[1])] for k, v in self.exponent_intervals.items()},
        }


def optimal_interval(samples, compute_flops: float, flops_per_param_token: float) -> dict | None:
    """95% intervals of N_opt and D_opt over bootstrap parameter rows (a, b, e, alpha, beta)."""
    if samples is None or len(samples) == 0:
        return None
    samples = np.asarray(samples, float)
    a, b, alpha, beta = samples[:, 0], samples[:, 1], samples[:, 3], samples[:, 4]
    with np.errstate(all="ignore"):
        ok = (alpha > 0) & (beta > 0)
        log_g = (np.log(alpha) + a - np.log(beta) - b) / (alpha + beta)
        scaled = np.log(compute_flops / flops_per_param_token)
        log_n = log_g + scaled * beta / (alpha + beta)
        log_d = scaled * alpha / (alpha + beta) - log_g
        ok &= np.isfinite(log_n) & np.isfinite(log_d)
    if not ok.any():  # no resample has a compute-optimal split: no interval, not (nan, nan)
        return None
    return {"N": tuple(np.exp(percentile_interval(log_n[ok]))), "D": tuple(np.exp(percentile_interval(log_d[ok])))}


def loss_interval(samples, rms_log_residual: float, n_params: float, tokens: float, draws: int = 20,
                  seed: int = 0) -> list[float] | None:
    """95% prediction interval of the loss at (N, D): the bootstrap over cells (parameter
    uncertainty) combined with the observed scatter of the runs about the fit (each
    resample's log prediction plus draws of N(0, rms_log_residual^2)); None without a bootstrap.
    `fit-loss` and `plan` (steplaw.laws.saved.SavedLossLaw) both give this one."""
    if samples is None or not len(samples):
        return None
    a, b, e, alpha, beta = np.asarray(samples, float).T
    with np.errstate(all="ignore"):
        log_pred = np.logaddexp(np.logaddexp(a - alpha * np.log(n_params), b - beta * np.log(tokens)), e)
    log_pred = log_pred[np.isfinite(log_pred)]
    if not log_pred.size:
        return None
    noise = np.random.default_rng(seed).standard_normal((log_pred.size, draws)) * rms_log_residual
    low, high = np.percentile(log_pred[:, None] + noise, [2.5, 97.5])
    return [float(np.exp(low)), float(np.exp(high))]


def cell_best_losses(table: RunTable, n_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = table.valid & np.isfinite(n_values)
    keys = np.column_stack([n_values[valid], table.D[valid]])
    cells, inverse = np.unique(keys, axis=0, return_inverse=True)
    best_loss = np.full(len(cells), np.inf)
    np.minimum.at(best_loss, inverse.reshape(-1), table.loss[valid])
    return cells, best_loss


_TERMS = {"N": "A/N^alpha", "D": "B/D^beta"}


def _refused_terms(cells: np.ndarray, form: LossForm) -> tuple[tuple[str, ...], list[str]]:
    """The terms the cells cannot identify, with one warning sentence each; a UserError
    when neither term is identifiable or there are fewer cells than parameters."""
    problems = {name: identify.exponent_problem(cells[:, column], name) for column, name in ((0, "N"), (1, "D"))}
    refused = tuple(name for name, problem in problems.items() if problem is not None)
    if len(refused) == 2:
        raise UserError(f"cannot fit the loss law: {problems['N']}, and {problems['D']}.")
    n_params = form.n_parameters(refused)
    if len(cells) < n_params:
        raise UserError(f"the loss law ({form.describe()}) has {n_params} parameters but the table has {len(cells)} "
                        f"(N, D) cell(s); need at least {n_params}.")
    warnings = []
    for name in refused:
        other = "D" if name == "N" else "N"
        warnings.append(f"the loss law's {name} term {_TERMS[name]} is not fitted because {problems[name]}, so the law "
                        f"is fitted without it (L = E + {_TERMS[other]}, E absorbing the {name} term) and gives no "
                        "compute-optimal N and D.")
    return refused, warnings


def fit_loss(
    table: RunTable, n_boot: int = 200, seed: int = 0, *, n_column: str = "N", delta: float = HUBER_DELTA,
    form: LossForm | None = None,
) -> LossFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to the per-cell best losses of `table`.

    n_column: which parameter count is N; n_boot: bootstrap resamples of the cells;
    form: the form and fitting choices (steplaw.laws.loss_forms; default chinchilla, E
    free, unweighted, symmetric). A term the cells cannot identify is left out (see the
    module docstring).
    """
    form = form or LossForm()
    check_bootstrap(n_boot, seed)
    n_values = table.param_counts(n_column)
    cells, best_loss = cell_best_losses(table, n_values)
    if len(cells) == 0:
        raise UserError(f"{table.source} has no finished run with a finite loss and {n_column}; the loss law needs "
                        "at least 5 (N, D) cells.")
    refused, refusals = _refused_terms(cells, form)
    basis = form.basis(refused)
    flops_per_param_token = _flops_per_param_token(table, n_values)
    weights = form.cell_weights(cells, flops_per_param_token)
    asym = form.underprediction_penalty

    log_n, log_d, log_loss = np.log(cells[:, 0]), np.log(cells[:, 1]), np.log(best_loss)
    starts = np.unique(form.place(grid_starts(), refused), axis=0)
    values = grid_objective(log_n, log_d, log_loss, delta, starts, weights, asym)
    theta = _fit_once(log_n, log_d, log_loss, weights, starts[np.argsort(values)[:_N_STARTS]], delta, basis, asym)

    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(cells), np.full(len(cells), 1.0 / len(cells)), size=n_boot).astype(float)
    samples = form.place(_fit_batch(log_n, log_d, log_loss, counts * weights, theta, delta, basis, asym), refused) \
        if n_boot else np.empty((0, 5))
    intervals, exponent_intervals = _intervals(samples, refused, form) if n_boot else ({}, {})

    a, b, e, alpha, beta = theta
    pred = np.logaddexp.reduce(lse_terms(theta, log_n, log_d), axis=0)
    warnings = list(table.warnings) + refusals + ([] if n_boot else [NO_INTERVALS])
    warnings += _exponent_warnings(theta, intervals, refused, log_n, log_d)
    return LossFit(
        E=float(np.exp(e)), A=0.0 if "N" in refused else float(np.exp(a)),
        B=0.0 if "D" in refused else float(np.exp(b)), alpha=float(alpha), beta=float(beta),
        intervals=intervals, flops_per_param_token=flops_per_param_token, n_cells=len(cells),
        n_column=n_column, rms_log_residual=float(np.sqrt(np.mean((pred - log_loss) ** 2))), n_boot=int(n_boot),
        exponent_intervals=exponent_intervals, warnings=warnings, samples=samples,
        fitted_range={"N": [float(cells[:, 0].min()), float(cells[:, 0].max())],
                      "D": [float(cells[:, 1].min()), float(cells[:, 1].max())]},
        refused_terms=refused, form=form,
    )


def _exponent_warnings(theta, intervals: dict, refused, log_n, log_d) -> list[str]:
    """Exponents that do not fall with scale or that the data barely constrain; collinear cells."""
    warnings = []
    a, b, _, alpha, beta = (float(v) for v in theta)
    if not refused:
        problem = degenerate_split_reason({"alpha": alpha, "beta": beta, "A": math.exp(min(a, 700.0)),
                                           "B": math.exp(min(b, 700.0))})
        if problem:
            warnings.append(problem)
    for name, variable in (("alpha", "N"), ("beta", "D")):
        message = identify.wide_interval("loss", variable, intervals.get(name, (np.nan, np.nan)))
        if message and variable not in refused:
            warnings.append(message)
    collinear = identify.collinearity(log_n, log_d) if not refused else None
    if collinear:
        warnings.append(collinear)
    return warnings


def _intervals(samples: np.ndarray, refused=(), form: LossForm | None = None) -> tuple[dict, dict]:
    """Percentile intervals of the constants and of the split's exponents. What the form holds
    fixed has none: a fixed E, and a tied law's exponents of the split (0.5 by construction)."""
    # A wild resample can put ln A or ln B past exp's range (overflow to inf): such a
    # sample is left out of the percentiles like any non-finite one, so the warning is noise.
    with np.errstate(over="ignore"):
        intervals = {
            "A": percentile_interval(np.exp(samples[:, 0])), "B": percentile_interval(np.exp(samples[:, 1])),
            "E": percentile_interval(np.exp(samples[:, 2])), "alpha": percentile_interval(samples[:, 3]),
            "beta": percentile_interval(samples[:, 4]),
        }
    for name in refused:
        for key in ("A", "alpha") if name == "N" else ("B", "beta"):
            del intervals[key]
    if form is not None and form.E is not None:
        del intervals["E"]
    if refused or (form is not None and form.name == "tied"):
        return intervals, {}
    total = samples[:, 3] + samples[:, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        exponents = {"N_exponent": percentile_interval(samples[:, 4] / total),
                     "D_exponent": percentile_interval(samples[:, 3] / total)}
    return intervals, exponents


def _flops_per_param_token(table: RunTable, n_values: np.ndarray) -> float:
    """6, or the median compute / (N D) of the valid runs when the table has a FLOP column."""
    if table.compute is None:
        return 6.0
    valid = table.valid & np.isfinite(n_values)
    ratio = table.compute[valid] / (n_values[valid] * table.D[valid])
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    return float(np.median(ratio)) if ratio.size else 6.0
