"""IsoFLOP analysis (Hoffmann et al. 2022, Chinchilla, arXiv:2203.15556, Approach 2).

    isoflop_fit(table, n_boot=200, seed=0, n_column="N") -> IsoflopFit

Per compute budget, the (N, D) cells trained on it (a `compute` column, else C = 6 N D
bucketed: cells within a factor BUCKET_RATIO of a bucket's smallest budget share it), each
with its best finished run's loss. In each budget a parabola of loss in ln N is fitted
robustly (Huber IRLS, delta = HUBER_DELTA nats); its vertex is that budget's N_opt, and
D_opt = C / (k N_opt) with k = C / (N D) (6 without a compute column). Then
ln N_opt = ln G_N + a ln C and ln D_opt = ln G_D + b ln C by least squares.

Intervals: bootstrap of the cells within each budget (every budget keeps its count of
cells); a resample whose parabola has no interior minimum, or fewer than 3 distinct
sizes, leaves that budget out of that resample's power law; a resample with fewer than
3 budgets left is dropped, and the number kept is reported.

Refused, in one sentence each: fewer than 3 budgets, a budget with fewer than 3 sizes,
a budget whose parabola has no interior minimum (it is named, with where the loss is lowest).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplaw.errors import UserError
from steplaw.laws.identify import distinct_values
from steplaw.laws.stats import check_bootstrap, percentile_interval
from steplaw.laws.table import RunTable

BUCKET_RATIO = 1.1  # 6ND of one IsoFLOP budget varies by rounding of N and D, not by 10%
HUBER_DELTA = 0.01  # nats: a parabola point further off than this counts linearly
MIN_BUDGETS, MIN_SIZES = 3, 3


@dataclass
class IsoflopFit:
    budgets: list[dict]  # per budget: compute, sizes, N_opt, D_opt, loss_opt
    N_exponent: float
    D_exponent: float
    N_coef: float
    D_coef: float
    exponent_intervals: dict = field(default_factory=dict)
    n_boot: int = 0
    n_boot_kept: int = 0
    flops_per_param_token: float = 6.0
    n_column: str = "N"
    warnings: list[str] = field(default_factory=list)

    def compute_optimal(self, compute_flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) at `compute_flops` from the fitted power laws."""
        return (float(self.N_coef * compute_flops**self.N_exponent),
                float(self.D_coef * compute_flops**self.D_exponent))

    def to_dict(self) -> dict:
        return {"method": "isoflop", "n_column": self.n_column, "budgets": self.budgets,
                "compute_optimal": {
                    "method": "isoflop (Hoffmann et al. 2022, Approach 2)",
                    "N_opt": f"{self.N_coef:.4g} * C^{self.N_exponent:.4f}",
                    "D_opt": f"{self.D_coef:.4g} * C^{self.D_exponent:.4f}",
                    "N_exponent": self.N_exponent, "D_exponent": self.D_exponent,
                    "N_coef": self.N_coef, "D_coef": self.D_coef,
                    "flops_per_param_token": self.flops_per_param_token,
                    "exponent_intervals": {k: list(v) for k, v in self.exponent_intervals.items()},
                    "n_boot": self.n_boot, "n_boot_kept": self.n_boot_kept},
                "warnings": list(self.warnings)}


def _robust_parabola(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(c0, c1, c2) of y ~ c0 + c1 x + c2 x^2 by Huber IRLS (a few reweightings suffice)."""
    weights = np.ones_like(x) if weights is None else weights
    design = np.column_stack([np.ones_like(x), x, x * x])
    robust = np.ones_like(x)
    for _ in range(20):
        w = np.sqrt(weights * robust)
        coef, *_ = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)
        resid = np.abs(y - design @ coef)
        new = np.minimum(1.0, HUBER_DELTA / np.maximum(resid, 1e-300))
        if np.allclose(new, robust):
            break
        robust = new
    return coef


def _vertex(x: np.ndarray, y: np.ndarray, weights=None) -> float | None:
    """ln N at the parabola's minimum, or None when it has none inside the sizes."""
    c0, c1, c2 = _robust_parabola(x, y, weights)
    if not c2 > 0:
        return None
    vertex = -c1 / (2 * c2)
    return float(vertex) if x.min() < vertex < x.max() else None


def budgets_of(table: RunTable, n_values: np.ndarray) -> tuple[list[tuple[float, np.ndarray, np.ndarray]], float]:
    """[(budget C, cell sizes N, cell best losses)] sorted by C, and k = C / (N D)."""
    valid = table.valid & np.isfinite(n_values)
    compute = table.compute if table.compute is not None else 6.0 * n_values * table.D
    keys = np.column_stack([n_values[valid], table.D[valid], compute[valid]])
    cells, inverse = np.unique(keys[:, :2], axis=0, return_inverse=True)
    best = np.full(len(cells), np.inf)
    np.minimum.at(best, inverse.reshape(-1), table.loss[valid])
    cell_c = np.zeros(len(cells))
    np.maximum.at(cell_c, inverse.reshape(-1), keys[:, 2])
    ratio = cell_c / (cells[:, 0] * cells[:, 1])
    k = float(np.median(ratio)) if ratio.size else 6.0
    order = np.argsort(cell_c)
    groups, start = [], None
    for index in order:
        if start is None or cell_c[index] > start * BUCKET_RATIO:
            groups.append([])
            start = cell_c[index]
        groups[-1].append(index)
    out = []
    for members in groups:
        members = np.array(members)
        budget = float(np.exp(np.mean(np.log(cell_c[members]))))
        out.append((budget, cells[members, 0], best[members]))
    return out, k


def _check_budgets(budgets) -> list[float]:
    """Each budget's ln N_opt; a UserError naming the first budget that cannot give one."""
    if len(budgets) < MIN_BUDGETS:
        raise UserError(f"the IsoFLOP method needs at least {MIN_BUDGETS} compute budgets; the table has "
                        f"{len(budgets)} ({', '.join(f'{c:.3g}' for c, _, _ in budgets) or 'none'} FLOPs).")
    vertices = []
    for budget, sizes, losses in budgets:
        if distinct_values(sizes).size < MIN_SIZES:
            raise UserError(f"budget C = {budget:.3g} FLOPs has {distinct_values(sizes).size} model size(s); the "
                            f"IsoFLOP method needs at least {MIN_SIZES} per budget for a parabola in log N.")
        vertex = _vertex(np.log(sizes), losses)
        if vertex is None:
            lowest = sizes[np.argmin(losses)]
            raise UserError(f"budget C = {budget:.3g} FLOPs has no interior minimum of loss in N (its lowest loss is "
                            f"at N = {lowest:.3g}, sizes {sizes.min():.3g} to {sizes.max():.3g}); add sizes beyond it.")
        vertices.append(vertex)
    return vertices


def _power_laws(log_c: np.ndarray, log_n: np.ndarray, log_k: float) -> tuple[float, float, float, float]:
    """(N exponent, ln N coef, D exponent, ln D coef) with ln D_opt = ln C - ln k - ln N_opt."""
    slope, intercept = np.polyfit(log_c, log_n, 1)
    log_d = log_c - log_k - log_n
    d_slope, d_intercept = np.polyfit(log_c, log_d, 1)
    return float(slope), float(intercept), float(d_slope), float(d_intercept)


def _bootstrap(budgets, log_k: float, n_boot: int, seed: int) -> np.ndarray:
    """(kept, 2) N and D exponents over resamples of the cells within each budget."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        log_c, log_n = [], []
        for budget, sizes, losses in budgets:
            pick = rng.integers(0, sizes.size, sizes.size)
            if distinct_values(sizes[pick]).size < MIN_SIZES:
                continue
            vertex = _vertex(np.log(sizes[pick]), losses[pick])
            if vertex is not None:
                log_c.append(np.log(budget))
                log_n.append(vertex)
        if len(log_c) >= MIN_BUDGETS:
            slope, _, d_slope, _ = _power_laws(np.array(log_c), np.array(log_n), log_k)
            out.append((slope, d_slope))
    return np.array(out).reshape(-1, 2)


def isoflop_fit(table: RunTable, n_boot: int = 200, seed: int = 0, *, n_column: str = "N") -> IsoflopFit:
    """The IsoFLOP fit of `table` (see the module docstring); N parameters, D tokens, C FLOPs."""
    check_bootstrap(n_boot, seed)
    n_values = table.param_counts(n_column)
    budgets, k = budgets_of(table, n_values)
    vertices = _check_budgets(budgets)
    log_c = np.log([c for c, _, _ in budgets])
    log_n = np.array(vertices)
    slope, intercept, d_slope, d_intercept = _power_laws(log_c, log_n, np.log(k))
    samples = _bootstrap(budgets, np.log(k), n_boot, seed) if n_boot else np.empty((0, 2))
    intervals = ({"N_exponent": percentile_interval(samples[:, 0]), "D_exponent": percentile_interval(samples[:, 1])}
                 if len(samples) else {})
    warnings = list(table.warnings)
    if n_boot and len(samples) < 0.9 * n_boot:
        warnings.append(f"only {len(samples)} of {n_boot} IsoFLOP bootstrap resamples kept 3 budgets with an interior "
                        "minimum: the budgets' optima are barely located, so the intervals understate the doubt.")
    rows = []
    for (budget, sizes, losses), vertex in zip(budgets, vertices):
        c0, c1, c2 = _robust_parabola(np.log(sizes), losses)
        rows.append({"compute": budget, "sizes": [float(s) for s in sizes], "N_opt": float(np.exp(vertex)),
                     "D_opt": float(budget / (k * np.exp(vertex))), "loss_opt": float(c0 + c1 * vertex + c2 * vertex**2)})
    return IsoflopFit(budgets=rows, N_exponent=slope, D_exponent=d_slope, N_coef=float(np.exp(intercept)),
                      D_coef=float(np.exp(d_intercept)), exponent_intervals=intervals, n_boot=int(n_boot),
                      n_boot_kept=len(samples), flops_per_param_token=k, n_column=n_column, warnings=warnings)


def isoflop_lines(fit: IsoflopFit) -> list[str]:
    """The IsoFLOP fit as text."""
    spans = fit.exponent_intervals

    def exponent(key):
        value = getattr(fit, key)
        low_high = spans.get(key)
        return f"{value:.3f}" + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")

    lines = [f"IsoFLOP (Approach 2; N = {fit.n_column}; {len(fit.budgets)} budgets, parabola of loss in ln N per budget):"]
    for row in fit.budgets:
        lines.append(f"  C = {row['compute']:.3g}: {len(row['sizes'])} sizes, N_opt = {row['N_opt']:.4g}, "
                     f"D_opt = {row['D_opt']:.4g}, loss there {row['loss_opt']:.4f}")
    lines.append(f"  N_opt ~ C^{exponent('N_exponent')}, D_opt ~ C^{exponent('D_exponent')}"
                 + (f"   (95% bootstrap intervals, {fit.n_boot_kept} of {fit.n_boot} resamples)" if spans else ""))
    return lines
