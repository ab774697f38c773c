"""Replay a table of finished runs as a sweep: measure a search strategy on someone's real sweep.

    steplaw sweep --replay TABLE [--col-N ... --bs-unit sequences --seq-len L] --planner adaptive --out DIR

The table is read as `steplaw fit` reads it (steplaw.cli.laws.load_table: same flags,
same units). Its (N, D) cells become the sweep's cells; a planner may propose only the
(lr, B) points the table holds for a cell, and a "run" returns that row's loss and
status at once (`replay_executor`). The sweep directory that results is an ordinary one:
`steplaw runs`, `fit` and `report` read it, and it holds only the runs the planner chose.

The table's loss is replayed under its own run-table column: a table read with
`--col-loss val_loss` (or a sweep directory whose objective is val_loss) gives runs with
a val_loss, and the replay sweep's objective is val_loss. A row that finished with a
non-finite loss is replayed as diverged (the usual way a blown-up run is logged); rows
that did not finish as failed. A cell the planner cannot
search is left out with one sentence saying why: fewer than 3 runs, two rows at the same
(lr, B), or no finite loss.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from steplaw.laws.published import step_law
from steplaw.laws.table import OK_STATUSES
from steplaw.runtable import OBJECTIVES, finite_or_none, result_from_row
from steplaw.sweep.execution import as_result
from steplaw.sweep.executors import InlineExecutor
from steplaw.sweep.planner import SearchCell, cell_key

MIN_CELL_RUNS = 3


@dataclass(frozen=True)
class ReplayRun:
    """One replayed row: the config a planner proposes (the store keeps `to_dict()`)."""

    replay: str  # the table's file name: runs of different tables never share an id
    N: float
    D: float
    lr: float
    batch_tokens: float
    N_active: float | None = None
    N_total: float | None = None

    @property
    def tokens(self) -> int:
        return int(round(self.D))

    def to_dict(self) -> dict:
        # the store's columns: tokens, lr, batch_tokens (integer tokens)
        return {**asdict(self), "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict) -> ReplayRun:
        return cls(**{k: v for k, v in data.items() if k != "tokens"})

    def run_id(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def counts(self) -> dict:
        return {"non_embedding": _int(self.N), "active": _int(self.N_active if self.N_active is not None else self.N),
                "total": _int(self.N_total)}


def _int(value):
    return None if value is None or not math.isfinite(value) else int(round(value))


@dataclass
class ReplayTable:
    """A table split into searchable cells, the outcome of every point, and the problems found."""

    cells: list[SearchCell]
    outcomes: dict[str, dict]  # run id -> the RunResult dict its "run" returns
    runs: list[ReplayRun]  # every replayable row (the grid planner runs them all)
    problems: list[str]
    objective: str = "loss"  # the run-table column the table's loss stands for (its spec's objective)


def _loss_name(table) -> str:
    """The run-table column of the loss the table was read from: val_loss when it was
    read from a val_loss column, else the training loss."""
    return table.loss_column if table.loss_column in OBJECTIVES else "loss"


def replay_table(table, source: str) -> ReplayTable:
    """Cells, outcomes and problems of a RunTable (steplaw.laws.table) read from `source`."""
    name = Path(source).name
    keys = np.column_stack([table.N, table.D])
    cell_keys, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    cells, outcomes, runs, problems = [], {}, [], []
    for index, (n, d) in enumerate(cell_keys):
        rows = np.flatnonzero(inverse == index)
        where = f"replay cell N={n:.4g} D={d:.4g}"
        if rows.size < MIN_CELL_RUNS:
            problems.append(f"{where} has {rows.size} run(s): expected at least {MIN_CELL_RUNS} to locate an optimum; "
                            "the cell is left out.")
            continue
        pairs = [(float(table.lr[r]), float(table.batch_tokens[r])) for r in rows]
        seen = {}
        for pair in pairs:
            seen[pair] = seen.get(pair, 0) + 1
        duplicates = [pair for pair, count in seen.items() if count > 1]
        if duplicates:
            lr, bs = duplicates[0]
            problems.append(f"{where} has {seen[duplicates[0]]} rows at lr={lr:.4g}, B={bs:.6g} tokens"
                            f"{f' (and {len(duplicates) - 1} more repeated points)' if len(duplicates) > 1 else ''}: "
                            "expected one run per (lr, B) point; the cell is left out.")
            continue
        if not np.any(table.valid[rows]):
            problems.append(f"{where} has no finished run with a finite loss ({rows.size} rows); the cell is left out.")
            continue
        cells.append(_cell(table, rows, float(n), float(d), name, outcomes, runs))
    return ReplayTable(cells, outcomes, runs, problems, _loss_name(table))


def _cell(table, rows, n, d, name, outcomes, runs) -> SearchCell:
    lrs = sorted({float(table.lr[r]) for r in rows})
    batch_sizes = sorted({float(table.batch_tokens[r]) for r in rows})
    lr_index = {lr: i for i, lr in enumerate(lrs)}
    bs_index = {bs: j for j, bs in enumerate(batch_sizes)}
    points = {}
    for r in rows:
        run = ReplayRun(name, n, d, float(table.lr[r]), float(table.batch_tokens[r]),
                        _column(table.N_active, r), _column(table.N_total, r))
        points[(lr_index[run.lr], bs_index[run.batch_tokens])] = run
        outcomes[run.run_id()] = _outcome(table, r, run)
        runs.append(run)
    template = next(iter(points.values()))

    def make(i, j):
        return points[(i, j)]

    def locate(config):
        i, j = lr_index.get(config.get("lr")), bs_index.get(config.get("batch_tokens"))
        return (i, j) if (i, j) in points else None

    return SearchCell(
        key=cell_key(template.to_dict()), label=f"N={n:.4g} D={d:.4g}", N=n, D=d, lrs=lrs, batch_sizes=batch_sizes,
        prior=step_law(n, d), make=make, locate=locate, points=frozenset(points),
    )


def _column(column, index):
    """One entry of an optional count column of the table (finite or None)."""
    return None if column is None else finite_or_none(column[index])


def _outcome(table, row, run: ReplayRun) -> dict:
    """The RunResult dict a replayed row returns: the row, read back as a run-table row
    (runtable.result_from_row), so that its loss lands in the column it came from."""
    loss = float(table.loss[row])
    status = str(table.status[row])
    counts = run.counts()
    fields = {"N": counts["non_embedding"], "N_active": counts["active"], "N_total": counts["total"]}
    if table.valid[row]:
        fields.update(status="ok", **{_loss_name(table): loss})
    elif status in OK_STATUSES or status == "diverged":
        fields.update(status="diverged", reason=f"replayed: status {status!r}, loss {loss}")
    else:
        fields.update(status="failed", reason=f"replayed: status {status!r}")
    return {**result_from_row(fields), "tokens": run.tokens, "wall_s": 0.0}


def replay_spec(source, replay: ReplayTable) -> dict:
    """The spec a replay sweep records: the table, its problems, and the objective when
    the table's loss is not the training loss (so fit and report read that column; left
    out otherwise, so replays made before it keep their spec id)."""
    spec = {"replay": str(source), "problems": replay.problems}
    if replay.objective != "loss":
        spec["objective"] = replay.objective
    return spec


def replay_executor(outcomes: dict[str, dict]) -> InlineExecutor:
    """The executor of a replay: an InlineExecutor whose run returns, at once, the table
    row of the run's (lr, B) (`outcomes`, by run id)."""

    def run_row(config: ReplayRun, run_dir=None):
        result = outcomes.get(config.run_id())
        if result is None:
            result = {"status": "failed", "reason": "replay: no row of the table has this run's (lr, B)"}
        return as_result(result)

    return InlineExecutor(run_row, capacity=1 << 20, run_dirs=False)
