"""Sweep planners: which runs to train next, given the runs that have finished.

The driver asks `planner.propose(views)` for runs whenever a run finishes; `views` are
the stored runs (`RunView`). Two planners:

- `GridPlanner` (`--planner grid`): every run of the fixed LR x batch grid at once.
- `AdaptivePlanner` (`--planner adaptive`): per (N, D) cell, a search for the optimum
  (steplaw.sweep.search) from a prior, ending when the cell's near-optimal set is
  bracketed on all sides, at a hard limit, or at the cell's run budget.

Determinism: proposals are a function of the finished runs only, so a killed and
restarted sweep proposes the same runs. Two rules make it so despite workers finishing
in any order: a cell proposes its next batch of runs only when none of its runs is open
(pending, running or to be retried: the driver re-runs open runs of an interrupted batch
before asking again), and the prior of a cell never depends on timing. The first wave of
cells (`first_wave`, spread over N and D and not on one line, so that they identify the
LR law's two exponents) starts from the Step Law (times the spec's centre scales); the
other cells wait for the first wave to end and start from the law fitted to it
(steplaw.laws.fit_hparams), so they start close to their optimum. Several cells search
at once, which keeps the workers busy. A total run budget is split evenly over the cells
(a shared pool would make a cell's share depend on timing).

Branches: under a WSD schedule that branches (`branching`), runs that differ only in D
train as one trunk, and a shorter budget costs only its cooldown (steplaw.sweep.cost). The
cells of one model (its column: every D) then share their runs: an (lr, B) point that one
cell wants is proposed at once for every shorter cell of its column holding that point
(with `branch_up`, for the whole column), so the driver trains it as one trunk, and each
of those cells finds the point among its own results: a bracket found at one D is
evidence at its neighbours, whose searches start from it. A column proposes only when
none of its runs is open.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from steplaw.errors import UserError
from steplaw.sweep.cost import alone_tokens, trunk_tokens
from steplaw.sweep.search import TERMINAL, AdaptiveSettings, CellPlan, SearchCell, plan_cell
from steplaw.trial import Trial

__all__ = ["RunView", "GridPlanner", "AdaptivePlanner", "AdaptiveSettings", "SearchCell", "CellPlan", "plan_cell",
           "cell_key", "first_wave", "fitted_prior", "spec_cells"]

PRIOR_TRUST = 4.0  # the fitted law may move a cell's start this far (a factor) from the shifted prior


@dataclass(frozen=True)
class RunView:
    """What the planner knows of one stored run."""

    run_id: str
    config: dict  # the stored config (RunConfig.to_dict() or a replay config)
    state: str  # "ok", "diverged", "failed" (no attempts left) or "open" (pending, running, to retry)
    loss: float | None = None


def cell_key(config: dict, drop=("lr", "batch_tokens", "batch_seqs")) -> str:
    """Identity of a run's cell: its config without the searched fields."""
    return json.dumps({k: v for k, v in config.items() if k not in drop}, sort_keys=True, separators=(",", ":"))


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

    def __init__(self, cells: list[SearchCell], settings: AdaptiveSettings | None = None,
                 law_fitter: Callable | None = None):
        if not cells:
            raise UserError("the adaptive planner got no cells: expected at least one (N, D) cell")
        self.cells = cells
        self.settings = settings = settings or AdaptiveSettings()
        self.by_key = {cell.key: cell for cell in cells}
        if len(self.by_key) != len(cells):
            raise UserError("two sweep cells have the same configuration: expected distinct (N, D) cells")
        columns: dict[str, list[SearchCell]] = {}
        for cell in cells:
            if cell.column is not None:
                columns.setdefault(cell.column, []).append(cell)
        # the columns of WSD trunks, each ascending in D (the order proposals are made)
        self.columns = [sorted(column, key=lambda c: c.D) for column in columns.values()]
        self._longer = {c.key: column[k + 1:] for column in self.columns for k, c in enumerate(column)}
        # With trunks the first wave is the same (its cells at the smallest D search where
        # runs are cheapest; one at the largest D leads its column's trunks), and its law is
        # fitted to their whole columns, which the trunks gave results too.
        self.first_wave = first_wave(cells, settings.first_wave)
        wave_columns = {cell.column for cell in self.first_wave if cell.column is not None}
        self.law_cells = self.first_wave + [c for c in cells if c.column in wave_columns and c not in self.first_wave]
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
        for cell in sorted(self.cells, key=lambda c: -c.D):  # a column's longer cells first
            if cell.key in plans:
                continue
            longer_busy = any(plans[c.key].state not in TERMINAL for c in self._longer.get(cell.key, ()))
            if law is None or longer_busy:  # with trunks a cell searches once its longer neighbours are done
                plans[cell.key] = CellPlan("waiting", runs=len(results[cell.key]) + open_runs[cell.key])
            else:
                plans[cell.key] = self._plan(cell, results, open_runs, law(cell))
        return {cell.key: plans[cell.key] for cell in self.cells}

    def _plan(self, cell, results, open_runs, prior) -> CellPlan:
        if open_runs[cell.key]:
            return CellPlan("running", runs=len(results[cell.key]) + open_runs[cell.key])
        return plan_cell(cell, results[cell.key], prior, self.settings, self.budget)

    def _law(self, results):
        cache_key = tuple(sorted((c.key, tuple(sorted(results[c.key].items(), key=str))) for c in self.law_cells))
        cache_key = hash(repr(cache_key))
        if cache_key not in self._law_cache:
            self._law_cache[cache_key] = self.law_fitter(self.law_cells, results, self.settings.gap)
        return self._law_cache[cache_key]

    def propose(self, views: dict[str, RunView]) -> list:
        plans = self.plans(views)
        if not self.columns:
            return [cell.make(i, j) for cell in self.cells for i, j in plans[cell.key].points]
        results, _ = self._gather(views)
        return [cell.make(i, j) for cell, (i, j) in self._trunk_points(plans, results)]

    def _trunk_points(self, plans: dict[str, CellPlan], results: dict) -> list[tuple[SearchCell, tuple[int, int]]]:
        """Branches (module doc): each point a cell wants, proposed at once for the cells
        of its column it reaches (the shorter budgets; with `branch_up` every budget) that
        hold the same (lr, B) and have not run it, so the driver trains it as one trunk. A
        column waits while any of its runs is open (the rule that keeps proposals a
        function of the finished runs, for the column's shared runs)."""
        out = []
        for column in self.columns:
            if any(plans[cell.key].state == "running" for cell in column):
                continue
            added: dict[str, set] = {cell.key: set() for cell in column}
            for cell in column:
                for i, j in plans[cell.key].points:
                    lr, bs = cell.lrs[i], cell.batch_sizes[j]
                    for other in column:
                        point = other.index_of(lr, bs) if other is not cell else (i, j)
                        if (point is None or point in results[other.key] or point in added[other.key]
                                or (other.D > cell.D and not self.settings.branch_up)):
                            continue
                        if (other is not cell and self.budget is not None
                                and len(results[other.key]) + len(added[other.key]) >= self.budget):
                            continue
                        added[other.key].add(point)
                        out.append((other, point))
        return out

    def batch_cost(self, runs: list) -> tuple[float, float]:
        """(tokens as trunks, tokens alone) of runs proposed together: runs of one column
        at the same (lr, B) train as one trunk (steplaw.sweep.cost.trunk_tokens); every
        other run alone."""
        trunks: dict[tuple, list[float]] = {}
        alone = []
        for run in runs:
            config = run.to_dict() if hasattr(run, "to_dict") else dict(run)
            cell = self.by_key.get(cell_key(config))
            d = float(config.get("tokens", config.get("D")))
            if cell is None or cell.column is None:
                alone.append(d)
            else:
                trunks.setdefault((cell.column, config.get("lr"), config.get("batch_tokens")), []).append(d)
        fraction = {cell.column: cell.decay_fraction for cell in self.cells if cell.column is not None}
        used = sum(trunk_tokens(budgets, fraction[key[0]]) for key, budgets in trunks.items()) + alone_tokens(alone)
        return used, alone_tokens(alone) + sum(alone_tokens(b) for b in trunks.values())

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
    """`count` cells spread over the (rank N, rank D) square. The first three are the
    triple with the most distinct N and D values that is not on one line, then the
    largest triangle: three such cells identify both exponents of the LR law. More are
    added farthest-point first. Ties go to the earlier cells (by N, then D)."""
    ordered = sorted(cells, key=lambda c: (c.N, c.D))
    if count < 3 or len(ordered) <= 3:
        return ordered[:max(count, 0)]
    n_rank = {n: r for r, n in enumerate(sorted({c.N for c in cells}))}
    d_rank = {d: r for r, d in enumerate(sorted({c.D for c in cells}))}
    scale_n, scale_d = max(len(n_rank) - 1, 1), max(len(d_rank) - 1, 1)
    xy = {c.key: (n_rank[c.N] / scale_n, d_rank[c.D] / scale_d) for c in cells}
    pool = ordered
    if len(pool) > 60:  # corners and middles of the square are enough candidates
        keep_n = {0, scale_n // 2, scale_n}
        keep_d = {0, scale_d // 2, scale_d}
        pool = [c for c in ordered if n_rank[c.N] in keep_n and d_rank[c.D] in keep_d]

    def score(triple):
        (x1, y1), (x2, y2), (x3, y3) = (xy[c.key] for c in triple)
        area = abs((x2 - x1) * (y3 - y1) - (x3 - x1) * (y2 - y1))
        return (area > 1e-9, len({c.N for c in triple}) + len({c.D for c in triple}), area)

    chosen = list(max(itertools.combinations(pool, 3), key=score))  # max keeps the first of equals
    while len(chosen) < min(count, len(cells)):
        rest = [c for c in ordered if c not in chosen]
        chosen.append(max(rest, key=lambda c: min((xy[c.key][0] - xy[o.key][0]) ** 2 + (xy[c.key][1] - xy[o.key][1]) ** 2
                                                  for o in chosen)))
    return chosen


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

_COLUMN_DROP = ("lr", "batch_tokens", "batch_seqs", "tokens", "D")  # a column: its cells differ only in D
LR_STEPS_PER_OCTAVE = 2  # the LR lattice: 2^(k/2), a factor sqrt(2) between neighbours
LR_LATTICE = (-46, 6)  # k range: 1.2e-7 .. 8


def _sig(value: float) -> float:
    return float(f"{value:.4g}")  # ids must not depend on float noise


def branching(spec) -> float | None:
    """The decay fraction of a spec whose runs branch off WSD trunks (schedule wsd with an
    absolute warmup_tokens, as the driver requires, and its `branch` not "off"), or None
    when every run trains alone. Defaults are the contract's (steplaw.trial.Trial)."""
    fixed, defaults = getattr(spec, "fixed", {}) or {}, Trial.__dataclass_fields__
    if (fixed.get("schedule", defaults["schedule"].default) != "wsd" or fixed.get("warmup_tokens") is None
            or getattr(spec, "branch", None) == "off"):
        return None
    return float(fixed.get("decay_fraction", defaults["decay_fraction"].default))


def spec_cells(spec, max_batch_tokens: int | None = None, branch: bool | None = None) -> list[SearchCell]:
    """The adaptive planner's cells of a SweepSpec: each cell's model and D, the LR lattice
    (2^(k/2), shared by all cells) and the batch lattice: seq_len x 2^j tokens from one
    sequence up to tokens / min_steps (and `max_batch_tokens`). The spec's explicit LR and
    batch lists do not bound the search; its centre scales set the Step Law prior.
    A WSD spec that branches (`branching`; `branch=False`: a trainer that cannot) gives
    each cell its column: the cells of its model at every D, searched as trunks."""
    seq_len = spec.seq_len
    decay_fraction = branching(spec) if branch is not False else None
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

        def make(i, j, grid_cell=grid_cell, lrs=lrs, batch_sizes=batch_sizes):
            return spec.run_of(grid_cell, lrs[i], int(batch_sizes[j]))

        lr_index = {lr: i for i, lr in enumerate(lrs)}
        bs_index = {int(bs): j for j, bs in enumerate(batch_sizes)}

        def locate(config, lr_index=lr_index, bs_index=bs_index):
            i, j = lr_index.get(config.get("lr")), bs_index.get(config.get("batch_tokens"))
            return None if i is None or j is None else (i, j)

        cells.append(SearchCell(
            key=cell_key(make(0, 0).to_dict()), label=grid_cell.label, N=float(grid_cell.n_params),
            D=float(grid_cell.tokens), lrs=lrs, batch_sizes=[float(b) for b in batch_sizes],
            prior=(grid_cell.lr_center, grid_cell.batch_center), make=make, locate=locate,
            column=None if decay_fraction is None else cell_key(make(0, 0).to_dict(), drop=_COLUMN_DROP),
            decay_fraction=decay_fraction,
        ))
    return cells
