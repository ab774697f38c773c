"""The critical batch size from stored loss curves (McCandlish et al. 2018, arXiv:1812.06162).

The optimal batch B_opt (steplaw.laws.fit) is the batch with the lowest loss after D tokens.
The critical batch B_crit is a different quantity: the batch beyond which a larger batch
buys few fewer steps for many more tokens. Zhang et al. 2024 ("How Does Critical Batch Size
Scale in Pre-training?", arXiv:2410.21676) report the two apart: B_crit grows mainly with
the data size, and B_opt is not B_crit. Both are reported here side by side.

Per (N, D) cell and target loss L, for every batch size B of the cell:

    E(B) = the fewest tokens any of the cell's runs at batch B took to reach L
           (the first crossing of the run's running-minimum curve, linear between points),
    S(B) = E(B) / B, the optimizer steps.

McCandlish et al.'s trade-off (S/S_min - 1)(E/E_min - 1) = 1 is the same as the line
E(B) = E_min + S_min * B, fitted by least squares in relative error over the batch sizes
that reach L (at least MIN_BATCHES); B_crit = E_min / S_min. A target needs E_min > 0 and
S_min > 0 (tokens that grow with B, steps that fall), else it has no B_crit and says why.

Targets (unless given): the lowest loss every batch size of the cell reaches, and losses a
quarter and a half of the way from it up to the highest loss all curves have fallen below
after their first point. B_crit(D) is fitted as a power law over the cells' B_crit at the
lowest target, with a bootstrap over cells, when the cells span D enough
(steplaw.laws.identify's rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplaw.errors import UserError
from steplaw.laws import identify
from steplaw.laws.stats import percentile_interval
from steplaw.laws.table import RunTable

MIN_BATCHES = 3  # a line through 2 points fits exactly: nothing tests the trade-off
MIN_POINTS = 3  # a curve needs a few points to say when a loss was reached
TARGET_FRACTIONS = (0.0, 0.25, 0.5)
CITATION = ("McCandlish et al. 2018, arXiv:1812.06162 (the trade-off); Zhang et al. 2024, arXiv:2410.21676 "
            "(critical vs optimal batch)")


def tokens_to_reach(curve: np.ndarray, target: float) -> float | None:
    """Tokens at which a curve's running minimum first reaches `target` (linear between
    points); None when it never does or already did at its first point (no crossing seen)."""
    tokens, loss = curve[:, 0], np.minimum.accumulate(np.where(np.isfinite(curve[:, 1]), curve[:, 1], np.inf))
    hit = np.flatnonzero(loss <= target)
    if hit.size == 0 or hit[0] == 0:
        return None
    i = int(hit[0])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], loss[i - 1], loss[i]
    return float(t0 + (l0 - target) / (l0 - l1) * (t1 - t0)) if np.isfinite(l0) else float(t1)


def fit_tradeoff(batches: np.ndarray, tokens: np.ndarray) -> dict:
    """E = E_min + S_min * B by least squares in relative error: {E_min, S_min, B_crit,
    rms_rel_error} or {"refused": why}."""
    weights = 1.0 / tokens
    X = np.column_stack([np.ones_like(batches), batches]) * weights[:, None]
    (e_min, s_min), *_ = np.linalg.lstsq(X, tokens * weights, rcond=None)
    if s_min <= 0:
        return {"refused": "the tokens to reach it do not grow with the batch size (S_min <= 0): every batch size is "
                           "below the critical one or the curves are too noisy"}
    if e_min <= 0:
        return {"refused": "the steps to reach it do not fall with the batch size (E_min <= 0): every batch size is "
                           "above the critical one"}
    rel = (e_min + s_min * batches) / tokens - 1
    return {"E_min": float(e_min), "S_min": float(s_min), "B_crit": float(e_min / s_min),
            "rms_rel_error": float(np.sqrt(np.mean(rel**2)))}


@dataclass
class CellCritical:
    N: float
    D: float
    batches: list[float]  # batch sizes with a usable curve
    targets: list[dict] = field(default_factory=list)  # per target: loss, points, fit or refusal
    problem: str | None = None  # why the cell has no B_crit at all

    @property
    def B_crit(self) -> float | None:
        """B_crit at the lowest target loss (the end of training), or None."""
        fitted = [t for t in self.targets if "B_crit" in t]
        return min(fitted, key=lambda t: t["loss"])["B_crit"] if fitted else None

    def to_dict(self) -> dict:
        return {"N": self.N, "D": self.D, "batches": self.batches, "B_crit": self.B_crit, "targets": self.targets,
                "problem": self.problem}


@dataclass
class CriticalBatch:
    cells: list[CellCritical]
    law: dict | None  # B_crit = coef * D^exp_D with intervals, or None
    law_refused: str | None
    warnings: list[str]
    n_column: str = "N"

    def to_dict(self) -> dict:
        return {"method": "McCandlish et al. 2018: E(B) = E_min + S_min B per target loss, B_crit = E_min / S_min",
                "citation": CITATION, "n_column": self.n_column, "cells": [c.to_dict() for c in self.cells],
                "law": self.law, "law_refused": self.law_refused, "warnings": list(self.warnings)}


def _curves(table: RunTable, rows: np.ndarray) -> tuple[dict[float, list[np.ndarray]], int]:
    """The cell's usable curves by batch size, and how many were too short."""
    by_batch: dict[float, list[np.ndarray]] = {}
    short = 0
    for row in rows:
        curve = table.curve[row]
        if curve is None:
            continue
        if len(curve) < MIN_POINTS:
            short += 1
            continue
        by_batch.setdefault(float(table.batch_tokens[row]), []).append(curve[np.argsort(curve[:, 0], kind="stable")])
    return by_batch, short


def _auto_targets(by_batch: dict[float, list[np.ndarray]]) -> list[float]:
    """The lowest loss every batch size reaches, and 1/4 and 1/2 of the way up to the lowest
    first point of any curve (above it a curve may have crossed before its first point)."""
    lowest = max(min(float(np.nanmin(c[:, 1])) for c in curves) for curves in by_batch.values())
    highest = min(float(c[0, 1]) for curves in by_batch.values() for c in curves)
    span = max(highest - lowest, 0.0)
    return sorted({lowest + f * span for f in TARGET_FRACTIONS}) if span > 0 else [lowest]


def _cell(table: RunTable, n: float, d: float, rows: np.ndarray, targets) -> tuple[CellCritical, int]:
    by_batch, short = _curves(table, rows)
    cell = CellCritical(N=float(n), D=float(d), batches=sorted(by_batch))
    if len(by_batch) < MIN_BATCHES:
        cell.problem = (f"curves at {len(by_batch)} batch size(s); the trade-off needs at least {MIN_BATCHES}")
        return cell, short
    for target in (targets if targets else _auto_targets(by_batch)):
        points = []
        for batch, curves in sorted(by_batch.items()):
            reached = [t for t in (tokens_to_reach(c, target) for c in curves) if t is not None]
            if reached:
                points.append({"B": batch, "tokens": min(reached), "steps": min(reached) / batch})
        item = {"loss": float(target), "points": points}
        if len(points) < MIN_BATCHES:
            item["refused"] = (f"{len(points)} batch size(s) reach it inside their curves; the trade-off needs "
                               f"at least {MIN_BATCHES}")
        else:
            item.update(fit_tradeoff(np.array([p["B"] for p in points]), np.array([p["tokens"] for p in points])))
        cell.targets.append(item)
    if cell.B_crit is None:
        cell.problem = "no target loss gave a critical batch: " + "; ".join(
            f"loss {t['loss']:.4g}: {t['refused']}" for t in cell.targets)
    return cell, short


def _law(cells: list[CellCritical], n_boot: int, seed: int) -> tuple[dict | None, str | None]:
    """B_crit = coef * D^exp_D over the cells with a B_crit, or why not."""
    have = [c for c in cells if c.B_crit is not None]
    if not have:
        return None, "no cell has a critical batch size"
    d = np.array([c.D for c in have])
    problem = identify.exponent_problem(d, "D")
    if problem is not None:
        return None, f"the B_crit(D) law is not fitted because {problem}"
    x, y = np.log(d), np.log([c.B_crit for c in have])
    slope, intercept = np.polyfit(x, y, 1)
    law = {"coef": float(np.exp(intercept)), "exp_D": float(slope), "cells": len(have), "ci": {}}
    if n_boot:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, x.size, size=(n_boot, x.size))
        xs, ys = x[picks], y[picks]
        xm, ym = xs.mean(axis=1, keepdims=True), ys.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            slopes = ((xs - xm) * (ys - ym)).sum(axis=1) / ((xs - xm) ** 2).sum(axis=1)
        law["ci"]["exp_D"] = list(percentile_interval(slopes))
    law["formula"] = f"B_crit = {law['coef']:.4g} * D^{law['exp_D']:+.4f} tokens"
    return law, None


def critical_batch(table: RunTable, *, n_column: str = "N", targets=None, n_boot: int = 1000,
                   seed: int = 0) -> CriticalBatch:
    """B_crit per (N, D) cell from the runs' loss curves (table.curve), and B_crit(D).
    targets: losses (nats) to reach, or None for the automatic ones (module doc)."""
    if table.curve is None or not any(c is not None for c in table.curve[table.valid]):
        raise UserError(f"the critical batch size needs loss curves, and the finished runs of {table.source} have none "
                        "(a sweep directory's runs store them; a table needs a 'curve' column of [[tokens, loss], ...]).")
    if targets is not None:
        targets = [float(t) for t in targets]
        if not targets or any(not (np.isfinite(t) and t > 0) for t in targets):
            raise UserError(f"target losses must be positive numbers of nats, got {targets!r}.")
    n_values = table.param_counts(n_column)
    keys = np.column_stack([n_values, table.D])
    cells, short_total = [], 0
    for n, d in np.unique(keys[table.valid], axis=0):
        rows = np.flatnonzero(table.valid & (n_values == n) & (table.D == d))
        cell, short = _cell(table, n, d, rows, targets)
        cells.append(cell)
        short_total += short
    warnings = []
    few = [c for c in cells if c.problem and c.problem.startswith("curves at")]
    if few:
        warnings.append(f"{len(few)} of {len(cells)} cells have curves at fewer than {MIN_BATCHES} batch sizes, too "
                        "few for the trade-off, and give no critical batch size.")
    if short_total:
        warnings.append(f"{short_total} curves have fewer than {MIN_POINTS} points, too short to say when a loss was "
                        "reached, and are left out.")
    failed = [c for c in cells if c.problem and not c.problem.startswith("curves at")]
    if failed:
        warnings.append(f"{len(failed)} of {len(cells)} cells give no critical batch size at any target loss "
                        "(the curves are too short to reach a common loss, or the trade-off does not hold; see "
                        "critical_batch.cells[].problem).")
    law, refused = _law(cells, n_boot, seed)
    if law is None and not any(c.B_crit is not None for c in cells):
        raise UserError(f"no cell gives a critical batch size: {'; '.join(warnings) or refused}")
    if refused:
        warnings.append(refused + ".")
    return CriticalBatch(cells=cells, law=law, law_refused=refused, warnings=warnings, n_column=n_column)


def critical_record(result: CriticalBatch, bs_law=None) -> dict:
    """The JSON of `fit --critical-batch`: the result with the fit's B_opt beside each cell's B_crit."""
    out = result.to_dict()
    if bs_law is not None:
        out["B_opt_law"] = bs_law.formula("B_opt")
        for cell, item in zip(result.cells, out["cells"]):
            item["B_opt"] = float(bs_law(cell.N, cell.D))
    return out


def critical_lines(result: CriticalBatch, bs_law=None) -> list[str]:
    """Text lines: B_crit per cell, the B_crit(D) law and the fit's B_opt(D) beside it."""
    lines = [f"critical batch size ({CITATION}):"]
    for cell in result.cells:
        opt = f", B_opt {float(bs_law(cell.N, cell.D)):.4g}" if bs_law is not None else ""
        what = f"B_crit = {cell.B_crit:.4g} tokens" if cell.B_crit is not None else f"none ({cell.problem})"
        lines.append(f"  N = {cell.N:.4g}, D = {cell.D:.4g}: {what}{opt}")
    if result.law is not None:
        ci = result.law["ci"].get("exp_D")
        span = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and all(np.isfinite(ci)) else ""
        lines.append(f"  {result.law['formula']}{span}")
    else:
        lines.append(f"  B_crit(D): not fitted ({result.law_refused})")
    if bs_law is not None:
        lines.append(f"  beside the optimal batch {bs_law.formula('B_opt')}")
    return lines
