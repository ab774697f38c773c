"""Sweep planners: which runs to train next, given the runs that have finished.

The driver asks `planner.propose(views)` for runs whenever a run finishes; `views` are
the stored runs (`RunView`). Two planners:

- `GridPlanner` (`--planner grid`): every run of the fixed LR x batch grid at once.
- `AdaptivePlanner` (`--planner adaptive`): per (N, D) cell, a search for the optimum on
  a lattice in (log lr, log B). It starts from a prior optimum, walks along the LR line
  and the batch line through the best run so far, and on each of the four sides
  (lower/higher LR, smaller/larger batch) either
    * extends past the last near-optimal run by a coarse step (x/÷ `lr_coarse` in LR,
      `bs_coarse` in batch) while no worse run bounds that side: the search is never
      stopped by where it started, only by hard limits (one sequence per batch, the
      `min_steps` cap on the batch, the lattice's LR range, or a replayed table's extent);
    * or bisects between the last near-optimal run and the first run beyond the
      near-optimal gap (the fitter's 0.25% of the best loss, `gap`) until the two are
      neighbours on the lattice.
  A diverged run is a run beyond the gap ("too high"); a failed one carries no
  information and is stepped over. When the best run changes, the lines through the new
  best are searched, so the search ends at a lattice point whose near-optimal set is
  bounded on all four sides (state `bracketed`, or `edge` where a side ends at a hard
  limit). A cell that reaches its run budget first is `unbracketed`.

Determinism: proposals are a function of the finished runs only, so a killed and
restarted sweep proposes the same runs. Two rules make it so despite workers finishing
in any order: a cell proposes its next batch of runs only when none of its runs is open
(pending, running or to be retried: the driver re-runs open runs of an interrupted batch
before asking again), and the prior of a cell never depends on timing. The first wave of
cells (`first_wave`, spread over N and D) starts from the Step Law (times the spec's
centre scales); the other cells wait for the first wave to end and start from the law
fitted to it (steplaw.laws.fit_hparams), so they start close to their optimum.

Several cells search at once and each proposes its LRs at one batch size together (the
first batch of a cell is three LRs at the prior's batch size plus its two batch
neighbours), which keeps the workers busy and lets runs that differ only in LR train as
one stack.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from steplaw.errors import UserError

TERMINAL = ("bracketed", "edge", "unbracketed", "no_result")
PRIOR_TRUST = 4.0  # the fitted law may move a cell's start this far (a factor) from the shifted prior


@dataclass(frozen=True)
class RunView:
    """What the planner knows of one stored run."""

    run_id: str
    config: dict  # the stored config (RunConfig.to_dict() or a replay config)
    state: str  # "ok", "diverged", "failed" (no attempts left) or "open" (pending, running, to retry)
    loss: float | None = None


@dataclass(frozen=True)
class AdaptiveSettings:
    """Knobs of the adaptive planner (the CLI's --cell-budget / --total-budget)."""

    gap: float = 0.0025  # near-optimal gap, as in steplaw.laws.fit_hparams
    cell_budget: int | None = 32  # runs per cell at most (None: no limit)
    total_budget: int | None = None  # runs in all; split evenly over the cells
    lr_coarse: float = 4.0  # first and extension step in LR (a factor)
    bs_coarse: float = 2.0  # first and extension step in batch size (a factor)
    lr_resolution: float = 2.0  # bisect no finer than this factor in LR (nor the lattice's spacing)
    bs_resolution: float = 2.0  # ... in batch size
    first_wave: int = 3  # cells that start from the Step Law; the others from their fit
    fill: int = 2  # 0: bracket only; 1: also run the near-optimal stretch of both lines; 2: and the LR lines of every near-optimal batch size

    def __post_init__(self):
        if not (0 <= self.gap < 1):
            raise UserError(f"gap {self.gap!r}: expected a relative loss gap in [0, 1)")
        for name in ("cell_budget", "total_budget"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise UserError(f"{name.replace('_', '-')} {value!r}: expected a positive number of runs")
        if not (self.lr_coarse > 1 and self.bs_coarse > 1):
            raise UserError(f"coarse steps lr x{self.lr_coarse}, batch x{self.bs_coarse}: expected factors above 1")


@dataclass
class SearchCell:
    """One (N, D) cell as the adaptive planner sees it: a lattice of (lr, B) points.

    `points` lists the lattice points that may be run (None: all of lrs x batch_sizes);
    `make(i, j)` builds the run of point (lrs[i], batch_sizes[j]); `locate(config)` maps a
    stored config back to its point (None when it is not one of this cell's points).
    """

    key: str
    label: str
    N: float
    D: float
    lrs: list[float]  # ascending
    batch_sizes: list[float]  # ascending, tokens
    prior: tuple[float, float]  # (lr, batch tokens) to start from when no fitted law is at hand
    make: Callable[[int, int], object]
    locate: Callable[[dict], tuple[int, int] | None]
    points: frozenset | None = None

    def available(self, i: int, j: int) -> bool:
        return self.points is None or (i, j) in self.points


@dataclass
class CellPlan:
    """The planner's verdict on a cell: its state and the points to run next."""

    state: str  # searching / waiting / running / bracketed / edge / unbracketed / no_result
    points: list[tuple[int, int]] = field(default_factory=list)
    best: tuple[int, int] | None = None
    sides: dict = field(default_factory=dict)  # lr_low / lr_high / bs_low / bs_high -> bracketed / limit / open
    runs: int = 0


def cell_key(config: dict, drop=("lr", "batch_tokens")) -> str:
    """Identity of a run's cell: its config without the searched fields."""
    return json.dumps({k: v for k, v in config.items() if k not in drop}, sort_keys=True, separators=(",", ":"))


# -- one cell ------------------------------------------------------------------------------

_OUTSIDE, _INSIDE, _NOINFO = "outside", "inside", "noinfo"


def _classify(result, threshold: float) -> str:
    state, loss = result
    if state == "diverged":
        return _OUTSIDE
    if state != "ok" or loss is None or not math.isfinite(loss):
        return _NOINFO
    return _INSIDE if loss <= threshold else _OUTSIDE


def _nearest(candidates: list[int], values: list[float], target: float, anchor: int) -> int:
    """The candidate index whose log value is nearest `target` (ties: nearest the anchor)."""
    return min(candidates, key=lambda q: (abs(math.log(values[q]) - target), abs(q - anchor), q))


def _side(line: list[int], values: list[float], at: int, step: int, results: dict, make_point, threshold: float,
          coarse: float, resolution: float) -> tuple[str, int | None, int, bool]:
    """One side of an anchor point along one line: (verdict, position to run, bound, extends).

    verdict: 'bracketed' (a run beyond the gap is the lattice neighbour of the last
    near-optimal run), 'limit' (no runnable point is left beyond the near-optimal runs) or
    'want' (run `position` next: an extension or a bisection). bound: the position of the
    bounding run ('bracketed'), or of the last point on this side. line: lattice indices
    of the runnable points on the line (ascending); at: the anchor's position in it;
    step: +1 or -1. extends: the position is an extension (no run bounds this side yet);
    it steps `coarse`, or the geometric mean of `coarse` and the distance walked from the
    far side when longer (a prior far off is left at a growing pace).
    """
    inside, outside = at, None
    q = at + step
    while 0 <= q < len(line):
        result = results.get(make_point(line[q]))
        if result is not None:
            kind = _classify(result, threshold)
            if kind == _OUTSIDE:
                outside = q
                break
            if kind == _INSIDE:
                inside = q
        q += step
    logs = [values[i] for i in line]
    if outside is None:
        end = len(line) - 1 if step > 0 else 0
        beyond = [p for p in range(inside + step, end + step, step) if make_point(line[p]) not in results]
        if not beyond:
            return "limit", None, end, False
        behind = [p for p in range(0, len(line)) if (p - at) * step < 0 and make_point(line[p]) in results]
        walked = max((abs(math.log(logs[at] / logs[p])) for p in behind), default=0.0)
        target = math.log(logs[inside]) + step * max(math.log(coarse), 0.5 * (math.log(coarse) + walked))
        return "want", _nearest(beyond, logs, target, inside), end, True
    lo, hi = sorted((inside, outside))
    between = [p for p in range(lo + 1, hi) if make_point(line[p]) not in results]
    if not between or math.log(logs[hi] / logs[lo]) <= math.log(resolution) * 1.01:
        return "bracketed", None, outside, False
    target = 0.5 * (math.log(logs[inside]) + math.log(logs[outside]))
    return "want", _nearest(between, logs, target, inside), outside, False


def _line(line, values, at, results, make_point, threshold, coarse, resolution, fill: bool):
    """Wants and side verdicts of one line through an anchor; with `fill`, once both
    sides are bounded, also the points between the bounds not yet run, `resolution`
    apart (the line's near-optimal stretch evenly covered, so that its geometric mean is
    not lopsided)."""
    wants, verdicts, bounds, sides = [], {}, [], []
    for label, step in (("low", -1), ("high", 1)):
        side = _side(line, values, at, step, results, make_point, threshold, coarse, resolution)
        verdicts[label] = "open" if side[0] == "want" else side[0]
        bounds.append(side[2])
        sides.append(side)
    walking = [side[0] == "want" and side[3] for side in sides]
    for side, other_walks in zip(sides, walking[::-1]):
        # While the line still walks downhill one way, the other side is not refined yet.
        if side[0] == "want" and (side[3] or not other_walks):
            wants.append(make_point(line[side[1]]))
    if fill and not wants:
        kept = [math.log(values[line[p]]) for p in range(bounds[0], bounds[1] + 1) if make_point(line[p]) in results]
        for step in (-1, 1):
            p = at + step
            while bounds[0] < p < bounds[1]:
                point, here = make_point(line[p]), math.log(values[line[p]])
                if point not in results and min(abs(here - k) for k in kept) >= math.log(resolution) * 0.99:
                    wants.append(point)
                    kept.append(here)
                p += step
    return wants, verdicts


def _snap(cell: SearchCell, lr: float, bs: float) -> tuple[int, int]:
    """The runnable lattice point nearest (lr, bs): nearest batch size first, then LR."""
    rows = [j for j in range(len(cell.batch_sizes)) if any(cell.available(i, j) for i in range(len(cell.lrs)))]
    if not rows:
        raise UserError(f"cell {cell.label}: no runnable (lr, batch) point")
    j = _nearest(rows, cell.batch_sizes, math.log(bs), 0)
    cols = [i for i in range(len(cell.lrs)) if cell.available(i, j)]
    return _nearest(cols, cell.lrs, math.log(lr), 0), j


def _first_points(cell: SearchCell, prior: tuple[float, float], settings: AdaptiveSettings) -> list[tuple[int, int]]:
    """Three LRs (x/÷ lr_coarse) at the prior's batch size, and its two batch neighbours."""
    i0, j0 = _snap(cell, *prior)
    cols = [i for i in range(len(cell.lrs)) if cell.available(i, j0)]
    rows = [j for j in range(len(cell.batch_sizes)) if cell.available(i0, j)]
    points = [(i0, j0)]
    for factor in (1 / settings.lr_coarse, settings.lr_coarse):
        others = [i for i in cols if i != i0 and (i - i0) * (factor - 1) > 0]
        if others:
            points.append((_nearest(others, cell.lrs, math.log(cell.lrs[i0] * factor), i0), j0))
    for factor in (1 / settings.bs_coarse, settings.bs_coarse):
        others = [j for j in rows if j != j0 and (j - j0) * (factor - 1) > 0]
        if others:
            points.append((i0, _nearest(others, cell.batch_sizes, math.log(cell.batch_sizes[j0] * factor), j0)))
    return points


def plan_cell(cell: SearchCell, results: dict, prior: tuple[float, float], settings: AdaptiveSettings,
              budget: int | None) -> CellPlan:
    """Next points of one cell from its finished runs `results` {(i, j): (state, loss)}."""
    runs = len(results)
    if not results:
        return _capped(CellPlan("searching", _first_points(cell, prior, settings), runs=0), budget)
    valid = {p: r[1] for p, r in results.items() if _classify(r, math.inf) == _INSIDE}
    if not valid:
        return _capped(_below_everything(cell, results, prior, settings), budget)
    best = min(valid, key=lambda p: (valid[p], p))
    threshold = valid[best] * (1 + settings.gap)
    ib, jb = best
    lr_line = [i for i in range(len(cell.lrs)) if cell.available(i, jb)]
    bs_line = [j for j in range(len(cell.batch_sizes)) if cell.available(ib, j)]
    wants, sides = [], {}
    for name, line, values, at, make_point, coarse, resolution in (
        ("lr", lr_line, cell.lrs, lr_line.index(ib), lambda i: (i, jb), settings.lr_coarse, settings.lr_resolution),
        ("bs", bs_line, cell.batch_sizes, bs_line.index(jb), lambda j: (ib, j), settings.bs_coarse, settings.bs_resolution),
    ):
        line_wants, verdicts = _line(line, values, at, results, make_point, threshold, coarse, resolution,
                                     settings.fill >= 1)
        sides.update({f"{name}_{label}": verdict for label, verdict in verdicts.items()})
        wants += [p for p in line_wants if p not in wants]
    if not wants and settings.fill >= 2:
        # The LR lines of the other near-optimal batch sizes too: the near-optimal set is a
        # tilted ellipse (the optimal LR grows with the batch), not a cross.
        for j in bs_line:
            if j == jb or _classify(results.get((ib, j), ("open", None)), threshold) != _INSIDE:
                continue
            row = [i for i in range(len(cell.lrs)) if cell.available(i, j)]
            line_wants, _ = _line(row, cell.lrs, row.index(ib), results, lambda i, j=j: (i, j), threshold,
                                  settings.lr_coarse, settings.lr_resolution, True)
            wants += [p for p in line_wants if p not in wants]
    if wants:
        return _capped(CellPlan("searching", wants, best, sides, runs), budget)
    state = "edge" if "limit" in sides.values() else "bracketed"
    return CellPlan(state, [], best, sides, runs)


def _below_everything(cell, results, prior, settings) -> CellPlan:
    """No finite loss yet: when runs diverged, try LRs far below the lowest tried; when
    they only failed (crashed), there is nothing to learn from: stop."""
    if not any(state == "diverged" for state, _ in results.values()):
        return CellPlan("no_result", [], None, {}, len(results))
    _, j0 = _snap(cell, *prior)
    tried = [i for (i, j) in results if j == j0] or [i for (i, _) in results]
    lowest = min(tried)
    below = [i for i in range(lowest) if cell.available(i, j0) and (i, j0) not in results]
    if not below:
        return CellPlan("no_result", [], None, {}, len(results))
    target = math.log(cell.lrs[lowest]) - 2 * math.log(settings.lr_coarse)
    return CellPlan("searching", [(_nearest(below, cell.lrs, target, lowest), j0)], None, {}, len(results))


def _capped(plan: CellPlan, budget: int | None) -> CellPlan:
    if budget is None:
        return plan
    left = budget - plan.runs
    if left <= 0:
        return CellPlan("unbracketed", [], plan.best, plan.sides, plan.runs)
    plan.points = plan.points[:left]
    return plan


# -- the planners --------------------------------------------------------------------------

class GridPlanner:
    """Today's behaviour: every run of the grid, at once."""

    name = "grid"

    def __init__(self, runs: list):
        self.runs = list(runs)
        self.ids = {run.run_id() for run in self.runs}

    def owns(self, view: RunView) -> bool:
        return view.run_id in self.ids

    def propose(self, views: dict[str, RunView]) -> list:
        return self.runs

    def cell_reports(self, views: dict[str, RunView]) -> list[dict]:
        return []


class AdaptivePlanner:
    """Per-cell optimum search; see the module docstring."""

    name = "adaptive"

    def __init__(self, cells: list[SearchCell], settings: AdaptiveSettings = AdaptiveSettings(),
                 law_fitter: Callable | None = None):
        if not cells:
            raise UserError("the adaptive planner got no cells: expected at least one (N, D) cell")
        self.cells = cells
        self.settings = settings
        self.by_key = {cell.key: cell for cell in cells}
        if len(self.by_key) != len(cells):
            raise UserError("two sweep cells have the same configuration: expected distinct (N, D) cells")
        self.first_wave = first_wave(cells, settings.first_wave)
        self.law_fitter = law_fitter or fitted_prior
        self._law_cache: dict = {}
        budget = settings.cell_budget
        if settings.total_budget is not None:
            share = settings.total_budget // len(cells)
            if share < 1:
                raise UserError(f"total budget {settings.total_budget} runs is less than one run per cell ({len(cells)} cells)")
            budget = share if budget is None else min(budget, share)
        self.budget = budget
        self._where: dict[str, tuple[str, tuple[int, int]] | None] = {}

    def _locate(self, view: RunView):
        if view.run_id not in self._where:
            cell = self.by_key.get(cell_key(view.config))
            point = cell.locate(view.config) if cell is not None else None
            self._where[view.run_id] = (cell.key, point) if point is not None else None
        return self._where[view.run_id]

    def owns(self, view: RunView) -> bool:
        return self._locate(view) is not None

    def _gather(self, views: dict[str, RunView]):
        results = {cell.key: {} for cell in self.cells}
        open_runs = {cell.key: 0 for cell in self.cells}
        for view in views.values():
            where = self._locate(view)
            if where is None:
                continue
            key, point = where
            if view.state == "open":
                open_runs[key] += 1
            else:
                results[key][point] = (view.state, view.loss)
        return results, open_runs

    def plans(self, views: dict[str, RunView]) -> dict[str, CellPlan]:
        results, open_runs = self._gather(views)
        plans = {}
        for cell in self.first_wave:
            plans[cell.key] = self._plan(cell, results, open_runs, cell.prior)
        wave_done = all(plans[c.key].state in TERMINAL for c in self.first_wave)
        law = self._law(results) if wave_done else None
        for cell in self.cells:
            if cell.key in plans:
                continue
            if law is None:
                plans[cell.key] = CellPlan("waiting", runs=len(results[cell.key]) + open_runs[cell.key])
            else:
                plans[cell.key] = self._plan(cell, results, open_runs, law(cell))
        return plans

    def _plan(self, cell, results, open_runs, prior) -> CellPlan:
        if open_runs[cell.key]:
            return CellPlan("running", runs=len(results[cell.key]) + open_runs[cell.key])
        return plan_cell(cell, results[cell.key], prior, self.settings, self.budget)

    def _law(self, results):
        cache_key = tuple(sorted((c.key, tuple(sorted(results[c.key].items(), key=str))) for c in self.first_wave))
        cache_key = hash(repr(cache_key))
        if cache_key not in self._law_cache:
            self._law_cache[cache_key] = self.law_fitter(self.first_wave, results, self.settings.gap)
        return self._law_cache[cache_key]

    def propose(self, views: dict[str, RunView]) -> list:
        proposals = []
        plans = self.plans(views)
        for cell in self.cells:
            proposals.extend(cell.make(i, j) for i, j in plans[cell.key].points)
        return proposals

    def cell_reports(self, views: dict[str, RunView]) -> list[dict]:
        """Per cell: label, N, D, runs used, state, best (lr, B) and the four sides."""
        plans = self.plans(views)
        reports = []
        for cell in self.cells:
            plan = plans[cell.key]
            best = plan.best
            reports.append({
                "cell": cell.label, "N": cell.N, "D": cell.D, "runs": plan.runs, "state": plan.state,
                "best_lr": cell.lrs[best[0]] if best else None,
                "best_batch_tokens": cell.batch_sizes[best[1]] if best else None,
                "sides": plan.sides,
            })
        return reports


def first_wave(cells: list[SearchCell], count: int) -> list[SearchCell]:
    """`count` cells spread over the (rank N, rank D) square: farthest-point from the
    smallest cell, so that three of them can identify both exponents of the LR law."""
    n_rank = {n: r for r, n in enumerate(sorted({c.N for c in cells}))}
    d_rank = {d: r for r, d in enumerate(sorted({c.D for c in cells}))}
    scale_n, scale_d = max(len(n_rank) - 1, 1), max(len(d_rank) - 1, 1)
    coords = {c.key: (n_rank[c.N] / scale_n, d_rank[c.D] / scale_d) for c in cells}
    ordered = sorted(cells, key=lambda c: (c.N, c.D))
    chosen = [ordered[0]]
    while len(chosen) < min(count, len(cells)):
        def spread(c):
            x, y = coords[c.key]
            near = min((x - coords[o.key][0]) ** 2 + (y - coords[o.key][1]) ** 2 for o in chosen)
            fresh = (c.N not in {o.N for o in chosen}) + (c.D not in {o.D for o in chosen})
            return (fresh, not _collinear([coords[o.key] for o in chosen] + [(x, y)]), near)
        rest = [c for c in ordered if c not in chosen]
        chosen.append(max(rest, key=spread))  # max keeps the first of equals: deterministic
    return chosen


def _collinear(points) -> bool:
    """True when 3 or more points lie on one line (their log N, log D cannot separate the exponents)."""
    if len(points) < 3:
        return False
    xy = np.asarray(points, float)
    return np.linalg.matrix_rank(np.column_stack([np.ones(len(xy)), xy]), tol=1e-9) < 3


def fitted_prior(cells: list[SearchCell], results: dict, gap: float):
    """prior(cell) -> (lr, B) from the first wave's runs: the law fitted to them
    (steplaw.laws.fit_hparams) where it is identifiable, else the cells' own priors moved
    by the mean log offset between the first wave's optima and their priors."""
    from steplaw.laws.fit import fit_hparams
    from steplaw.laws.table import table_from_arrays

    rows = [(c.N, c.D, c.lrs[i], c.batch_sizes[j], loss if state == "ok" else float("nan"), state)
            for c in cells for (i, j), (state, loss) in results[c.key].items() if state in ("ok", "diverged")]
    offsets = []
    for c in cells:
        valid = {p: r[1] for p, r in results[c.key].items() if r[0] == "ok" and r[1] is not None}
        if valid:
            i, j = min(valid, key=lambda p: (valid[p], p))
            offsets.append((math.log(c.lrs[i] / c.prior[0]), math.log(c.batch_sizes[j] / c.prior[1])))
    fit = None
    if rows:
        n, d, lr, bs, loss, status = (list(col) for col in zip(*rows))
        try:
            fit = fit_hparams(table_from_arrays(n, d, lr, bs, loss, status=status), gap=gap, n_boot=0)
        except UserError:
            fit = None
    shift = np.mean(offsets, axis=0) if offsets else np.zeros(2)

    def prior(cell: SearchCell) -> tuple[float, float]:
        moved = cell.prior[0] * math.exp(shift[0]), cell.prior[1] * math.exp(shift[1])
        if fit is None:
            return moved
        with np.errstate(over="ignore", invalid="ignore"):
            lr, bs = (float(x) for x in fit.predict(cell.N, cell.D))
        if not (np.isfinite(lr) and np.isfinite(bs) and lr > 0 and bs > 0):
            return moved
        # A law fitted to three cells extrapolates wildly when one of them is off: stay
        # within PRIOR_TRUST of the shifted prior.
        return (min(max(lr, moved[0] / PRIOR_TRUST), moved[0] * PRIOR_TRUST),
                min(max(bs, moved[1] / PRIOR_TRUST), moved[1] * PRIOR_TRUST))

    return prior


# -- cells of a live sweep -----------------------------------------------------------------

LR_STEPS_PER_OCTAVE = 2  # the LR lattice: 2^(k/2), a factor sqrt(2) between neighbours
LR_LATTICE = (-46, 6)  # k range: 1.2e-7 .. 8


def _sig(value: float) -> float:
    return float(f"{value:.4g}")  # ids must not depend on float noise


def spec_cells(spec, max_batch_tokens: int | None = None) -> list[SearchCell]:
    """The adaptive planner's cells of a SweepSpec: each cell's model and D, the LR lattice
    (2^(k/2), shared by all cells) and the batch lattice: seq_len x 2^j tokens from one
    sequence up to tokens / min_steps (and `max_batch_tokens`). The spec's explicit LR and
    batch lists do not bound the search; its centre scales set the Step Law prior."""
    from steplaw.train.config import RunConfig

    seq_len = spec.seq_len
    lrs = [_sig(2.0 ** (k / LR_STEPS_PER_OCTAVE)) for k in range(LR_LATTICE[0], LR_LATTICE[1] + 1)]
    cells = []
    for grid_cell in spec.cells():
        top = grid_cell.tokens / max(spec.min_steps, 1)
        if max_batch_tokens is not None:
            top = min(top, max_batch_tokens)
        batch_sizes = []
        while seq_len * 2 ** len(batch_sizes) <= top:
            batch_sizes.append(seq_len * 2 ** len(batch_sizes))
        if not batch_sizes:
            raise UserError(f"cell {grid_cell.label}: D={grid_cell.tokens} leaves no batch size between one sequence "
                            f"({seq_len} tokens) and D / min_steps: expected D >= seq_len x min_steps")

        def make(i, j, model=grid_cell.model, tokens=grid_cell.tokens, lrs=lrs, batch_sizes=batch_sizes):
            return RunConfig(model=model, tokens=tokens, lr=lrs[i], batch_tokens=int(batch_sizes[j]), **spec.fixed)

        lr_index = {lr: i for i, lr in enumerate(lrs)}
        bs_index = {int(bs): j for j, bs in enumerate(batch_sizes)}

        def locate(config, lr_index=lr_index, bs_index=bs_index):
            i, j = lr_index.get(config.get("lr")), bs_index.get(config.get("batch_tokens"))
            return None if i is None or j is None else (i, j)

        cells.append(SearchCell(
            key=cell_key(make(0, 0).to_dict()), label=grid_cell.label, N=float(grid_cell.n_params),
            D=float(grid_cell.tokens), lrs=lrs, batch_sizes=[float(b) for b in batch_sizes],
            prior=(grid_cell.lr_center, grid_cell.batch_center), make=make, locate=locate,
        ))
    return cells
