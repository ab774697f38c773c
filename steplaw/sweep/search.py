"""The search of one (N, D) cell for its optimum, on a lattice in (log lr, log B).

`plan_cell(cell, results, prior, settings, budget)` looks at a cell's finished runs and
says what to run next. It walks along the LR line and the batch line through the best
run so far, and on each of the four sides (lower/higher LR, smaller/larger batch) either
  * extends past the last near-optimal run by a coarse step (x/÷ `lr_coarse` in LR,
    `bs_coarse` in batch, growing while the line keeps improving) while no worse run
    bounds that side: the search is never stopped by where it started, only by hard
    limits (one sequence per batch, the `min_steps` cap on the batch, the lattice's LR
    range, a replayed table's extent);
  * or bisects between the last near-optimal run and the first run beyond the
    near-optimal gap (the fitter's 0.25% of the best loss, `gap`) down to `lr_resolution`
    / `bs_resolution` (or the lattice's spacing).
A diverged run counts as beyond the gap ("too high"); a failed one carries no
information and is stepped over. When the best run changes, the lines through the new
best are searched. Once both lines are bounded, the near-optimal stretch of the LR line
of every near-optimal batch size is covered at the resolution (`fill`), because the
fitter takes the geometric mean of the near-optimal runs: a lopsided sample would move
it, and the near-optimal set is a tilted ellipse (the optimal LR grows with the batch),
not a cross. The cell is then `bracketed`, or `edge` where a side ends at a hard limit;
a cell that reaches its run budget first is `unbracketed`.

The first batch of a cell is three LRs at the prior's batch size and its two batch
neighbours; a line's LRs at one batch size are proposed together, so that they train as
one stack (a small dense model's batch neighbours join it: steplaw.train.stacked).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from steplaw.errors import UserError

TERMINAL = ("bracketed", "edge", "unbracketed", "no_result")

@dataclass(frozen=True)
class AdaptiveSettings:
    """Knobs of the adaptive planner (the CLI's --cell-budget / --total-budget)."""

    gap: float = 0.0025  # near-optimal gap, as in steplaw.laws.fit_hparams
    cell_budget: int | None = 32  # runs per cell at most (None: no limit)
    total_budget: int | None = None  # runs in all; split evenly over the cells
    lr_coarse: float = 2.0  # first and extension step in LR (a factor)
    bs_coarse: float = 2.0  # first and extension step in batch size (a factor)
    lr_resolution: float = 2.0  # bisect no finer than this factor in LR (nor the lattice's spacing)
    bs_resolution: float = 2.0  # ... in batch size
    first_wave: int = 3  # cells that start from the Step Law; the others from their fit
    # 0: bracket only; 1: also run the near-optimal stretch of both lines;
    # 2: and the LR lines of every near-optimal batch size
    fill: int = 2
    # WSD trunks (steplaw.sweep.planner): a point one cell wants is also run at the
    # shorter budgets of its column (their cooldowns cost decay_fraction x D each); with
    # branch_up also at the longer ones (each then costs its whole run).
    branch_up: bool = False

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
    # WSD trunks (steplaw.sweep.planner, "Branches"): the cells of one column (the same
    # model and settings, another D) train an (lr, B) point as one trunk; None: every run
    # of this cell trains alone. decay_fraction: the cooldown's share of each run's D.
    column: str | None = None
    decay_fraction: float | None = None

    def available(self, i: int, j: int) -> bool:
        return self.points is None or (i, j) in self.points

    def index_of(self, lr: float, batch_tokens: float) -> tuple[int, int] | None:
        """The runnable lattice point at exactly (lr, batch_tokens), or None."""
        try:
            point = self.lrs.index(lr), self.batch_sizes.index(batch_tokens)
        except ValueError:
            return None
        return point if self.available(*point) else None


@dataclass
class CellPlan:
    """The planner's verdict on a cell: its state and the points to run next."""

    state: str  # searching / waiting / running / bracketed / edge / unbracketed / no_result
    points: list[tuple[int, int]] = field(default_factory=list)
    best: tuple[int, int] | None = None
    sides: dict = field(default_factory=dict)  # lr_low / lr_high / bs_low / bs_high -> bracketed / limit / open
    runs: int = 0


# -- the search ------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class _Line:
    """The search state of one line through an anchor point: what `_side` and `_walk` read.

    line: lattice indices of the runnable points on the line (ascending); values: the
    lattice values (lrs or batch sizes) those indices point into; at: the anchor's
    position in `line`; results: the cell's finished runs {(i, j): (state, loss)};
    make_point: lattice index -> (i, j); threshold: the near-optimal loss; coarse,
    resolution: the line's extension and bisection factors; accelerate: extensions may
    grow with the distance walked (LR lines only)."""

    line: list[int]
    values: list[float]
    at: int
    results: dict
    make_point: Callable[[int], tuple[int, int]]
    threshold: float
    coarse: float
    resolution: float
    accelerate: bool = True

    def tried(self, position: int) -> bool:
        return self.make_point(self.line[position]) in self.results


def _side(ln: _Line, step: int) -> tuple[str, int | None, int, bool]:
    """One side of the anchor along its line: (verdict, position to run, bound, extends).

    verdict: 'bracketed' (a run beyond the gap is the lattice neighbour of the last
    near-optimal run), 'limit' (no runnable point is left beyond the near-optimal runs) or
    'want' (run `position` next: an extension or a bisection). bound: the position of the
    bounding run ('bracketed'), or of the last point on this side. step: +1 or -1.
    extends: the position is an extension (no run bounds this side yet); it steps
    `coarse`, or with `accelerate` the geometric mean of `coarse` and the distance walked
    from the far side when longer (a prior far off is left at a growing pace; not for
    batch sizes, where a jump to a small batch is a jump to many optimizer steps).
    """
    line, at = ln.line, ln.at
    inside, outside = at, None
    q = at + step
    while 0 <= q < len(line):
        result = ln.results.get(ln.make_point(line[q]))
        if result is not None:
            kind = _classify(result, ln.threshold)
            if kind == _OUTSIDE:
                outside = q
                break
            if kind == _INSIDE:
                inside = q
        q += step
    logs = [ln.values[i] for i in line]
    if outside is None:
        end = len(line) - 1 if step > 0 else 0
        beyond = [p for p in range(inside + step, end + step, step) if not ln.tried(p)]
        if not beyond:
            return "limit", None, end, False
        walked = 0.0
        if ln.accelerate:
            behind = [p for p in range(0, len(line)) if (p - at) * step < 0 and ln.tried(p)]
            walked = max((abs(math.log(logs[at] / logs[p])) for p in behind), default=0.0)
        target = math.log(logs[inside]) + step * max(math.log(ln.coarse), 0.5 * (math.log(ln.coarse) + walked))
        return "want", _nearest(beyond, logs, target, inside), end, True
    lo, hi = sorted((inside, outside))
    between = [p for p in range(lo + 1, hi) if not ln.tried(p)]
    if not between or math.log(logs[hi] / logs[lo]) <= math.log(ln.resolution) * 1.01:
        return "bracketed", None, outside, False
    target = 0.5 * (math.log(logs[inside]) + math.log(logs[outside]))
    return "want", _nearest(between, logs, target, inside), outside, False


def _walk(ln: _Line, fill: bool):
    """Wants and side verdicts of one line through an anchor; with `fill`, once both
    sides are bounded, also the points between the bounds not yet run, `resolution`
    apart (the line's near-optimal stretch evenly covered, so that its geometric mean is
    not lopsided)."""
    line, values = ln.line, ln.values
    wants, verdicts, bounds, sides = [], {}, [], []
    for label, step in (("low", -1), ("high", 1)):
        side = _side(ln, step)
        verdicts[label] = "open" if side[0] == "want" else side[0]
        bounds.append(side[2])
        sides.append(side)
    walking = [side[0] == "want" and side[3] for side in sides]
    for side, other_walks in zip(sides, walking[::-1]):
        # While the line still walks downhill one way, the other side is not refined yet.
        if side[0] == "want" and (side[3] or not other_walks):
            wants.append(ln.make_point(line[side[1]]))
    if fill and not wants:
        kept = [math.log(values[line[p]]) for p in range(bounds[0], bounds[1] + 1) if ln.tried(p)]
        for step in (-1, 1):
            p = ln.at + step
            while bounds[0] < p < bounds[1]:
                point, here = ln.make_point(line[p]), math.log(values[line[p]])
                if point not in ln.results and min(abs(here - k) for k in kept) >= math.log(ln.resolution) * 0.99:
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
        line_wants, verdicts = _walk(_Line(line, values, at, results, make_point, threshold, coarse, resolution,
                                           accelerate=name == "lr"), settings.fill >= 1)
        sides.update({f"{name}_{label}": verdict for label, verdict in verdicts.items()})
        wants += [p for p in line_wants if p not in wants]
    if not wants and settings.fill >= 2:
        # The LR lines of the other near-optimal batch sizes too: the near-optimal set is a
        # tilted ellipse (the optimal LR grows with the batch), not a cross.
        for j in bs_line:
            if j == jb or _classify(results.get((ib, j), ("open", None)), threshold) != _INSIDE:
                continue
            row = [i for i in range(len(cell.lrs)) if cell.available(i, j)]
            line_wants, _ = _walk(_Line(row, cell.lrs, row.index(ib), results, lambda i, j=j: (i, j), threshold,
                                        settings.lr_coarse, settings.lr_resolution), fill=True)
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
