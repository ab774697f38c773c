"""Reading and checking tables of training runs.

A run table has one row per run. The columns the fitters use (names as in the shared
runs table; others are kept but ignored):

  N             non-embedding parameters (for MoE, the total non-embedding count)
  N_active      activated non-embedding parameters per token (MoE; optional)
  N_total       all parameters, embeddings included (optional)
  D             training tokens
  lr            peak learning rate
  batch_tokens  batch size in tokens (or in sequences with bs_unit="sequences")
  loss          final smoothed training loss
  status        ok / diverged / failed / pending (optional; rows without it count as ok)
  compute       training FLOPs (optional; gives D = C / (6 N) when there is no D column)
  seq_len       tokens per sequence (optional; converts a batch in sequences)

`read_runs` accepts a CSV, JSONL or Parquet file (Parquet needs pyarrow), a sweep
directory (one holding runs.sqlite; read with steplaw.sweep.store.export_rows) or a list
of dicts, and maps differently named columns with col_N=..., col_D=..., and so on.
Rows that did not finish (status not ok) or whose loss is NaN are kept for the grid
bounds but marked invalid and counted; bad numbers in N, D, lr or batch size are a
UserError naming the row.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from steplaw.errors import UserError

OK_STATUSES = {"ok", "done", "success", "completed", ""}
# Batch sizes in tokens below this look like sequence counts (a single 1024-token
# sequence per step is already far below any pretraining batch).
_SEQUENCES_SUSPECT_MAX = 4096


@dataclass
class RunTable:
    """Columns of runs as float arrays (one entry per run); see the module docstring."""

    N: np.ndarray
    D: np.ndarray
    lr: np.ndarray
    batch_tokens: np.ndarray
    loss: np.ndarray
    valid: np.ndarray  # bool: finished ok with a finite loss
    status: np.ndarray  # object array of strings
    run_id: np.ndarray  # object array of strings
    N_active: np.ndarray | None = None
    N_total: np.ndarray | None = None
    compute: np.ndarray | None = None
    source: str = "the table"
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.N.shape[0])

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def param_counts(self, which: str) -> np.ndarray:
        """The N column a fit uses: 'N' (non-embedding; total for MoE), 'N_active' or 'N_total'."""
        if which == "N":
            return self.N
        column = getattr(self, which, None) if which in ("N_active", "N_total") else None
        if column is None:
            raise UserError(
                f"the table has no {which!r} column; expected one of the present parameter columns {self.param_columns()}."
            )
        return column

    def param_columns(self) -> list[str]:
        return ["N"] + [name for name in ("N_active", "N_total") if getattr(self, name) is not None]


def _load_rows(source) -> tuple[list[dict], str]:
    if isinstance(source, (list, tuple)):
        return list(source), "the table"
    path = Path(source)
    if not path.exists():
        raise UserError(f"no such file or directory: {str(path)!r}; expected a CSV, JSONL, Parquet file or a sweep directory.")
    if path.is_dir():
        if not (path / "runs.sqlite").exists():
            raise UserError(f"directory {str(path)!r} holds no runs.sqlite; expected a sweep directory or a table file.")
        try:
            from steplaw.sweep.store import export_rows
        except ImportError as exc:
            raise UserError(f"cannot read sweep directory {str(path)!r}: the sweep store is unavailable ({exc}).") from None
        return list(export_rows(path)), str(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="") as handle:
            delimiter = "\t" if suffix == ".tsv" else ","
            rows = list(csv.DictReader(handle, delimiter=delimiter))
        return rows, str(path)
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows = []
        with path.open() as handle:
            text = handle.read()
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
            return rows, str(path)
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{str(path)!r} line {lineno} is not valid JSON ({exc.msg}).") from None
            if not isinstance(row, dict):
                raise UserError(f"{str(path)!r} line {lineno} is not a JSON object; expected one run per line.")
            rows.append(row)
        return rows, str(path)
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(
                f"reading {str(path)!r} needs pyarrow; install it (pip install 'steplaw[parquet]') or export the table as CSV."
            ) from None
        return pq.read_table(path).to_pylist(), str(path)
    raise UserError(f"cannot tell the format of {str(path)!r}; expected a .csv, .jsonl or .parquet file or a sweep directory.")


def _to_float(value) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        value = value.strip()
        if value == "" or value.lower() in ("nan", "none", "null", "na"):
            return math.nan
    if isinstance(value, bool):
        raise ValueError(value)
    try:
        return float(value)
    except TypeError:
        raise ValueError(value) from None


def _column(rows: list[dict], name: str, source: str, what: str, required: bool = True) -> np.ndarray | None:
    if not rows or not any(name in row for row in rows[:50]):
        if not required:
            return None
        present = sorted(rows[0]) if rows else []
        raise UserError(
            f"{source} has no column {name!r} for {what}; columns present: {', '.join(present) or '(none)'}"
            f" (map yours with --col-... / col_...=)."
        )
    values = np.empty(len(rows), dtype=np.float64)
    for index, row in enumerate(rows):
        try:
            values[index] = _to_float(row.get(name))
        except ValueError:
            raise UserError(
                f"{source} row {index + 1}: column {name!r} holds {row.get(name)!r}; expected a number."
            ) from None
    return values


def read_runs(
    source,
    *,
    col_N: str = "N",
    col_D: str | None = None,
    col_lr: str = "lr",
    col_bs: str = "batch_tokens",
    col_loss: str = "loss",
    col_C: str | None = None,
    col_N_active: str = "N_active",
    col_N_total: str = "N_total",
    col_status: str = "status",
    bs_unit: str = "tokens",
    seq_len: int | None = None,
) -> RunTable:
    """Read runs from a file, sweep directory or list of dicts into a checked RunTable.

    col_*: the source's names of the columns (defaults: the shared runs-table names).
    col_D=None means 'D' when present, else D = C/(6N) from col_C (default 'compute').
    bs_unit: 'tokens' or 'sequences' (then batch_tokens = batch * seq_len, with seq_len
    from the argument or a 'seq_len' column).
    """
    if bs_unit not in ("tokens", "sequences"):
        raise UserError(f"bs_unit must be 'tokens' or 'sequences', got {bs_unit!r}.")
    rows, name = _load_rows(source)
    if not rows:
        raise UserError(f"{name} holds no runs; expected at least one row.")
    if not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{name} rows must be mappings of column name to value.")
    warnings: list[str] = []

    n = _column(rows, col_N, name, "parameters N")
    lr = _column(rows, col_lr, name, "the peak learning rate")
    bs = _column(rows, col_bs, name, "the batch size")
    loss = _column(rows, col_loss, name, "the final loss")
    compute = _column(rows, col_C or "compute", name, "compute", required=col_C is not None)
    has_d = col_D is not None or any("D" in row for row in rows[:50])
    if has_d:
        d = _column(rows, col_D or "D", name, "training tokens D")
    elif compute is not None and not np.all(np.isnan(compute)):
        d = compute / (6.0 * n)
        warnings.append(f"no token column: D derived as C/(6N) from column {col_C or 'compute'!r}.")
    else:
        raise UserError(
            f"{name} has no column 'D' (training tokens) and no compute column to derive it from; "
            f"map yours with --col-D or --col-C."
        )
    n_active = _column(rows, col_N_active, name, "activated parameters", required=False)
    n_total = _column(rows, col_N_total, name, "total parameters", required=False)
    if n_active is not None and np.all(np.isnan(n_active)):
        n_active = None
    if n_total is not None and np.all(np.isnan(n_total)):
        n_total = None

    if bs_unit == "sequences":
        if seq_len is None:
            seq_col = _column(rows, "seq_len", name, "sequence length", required=False)
            if seq_col is None or np.any(~np.isfinite(seq_col)):
                raise UserError("bs_unit='sequences' needs a sequence length: give --seq-len L or a 'seq_len' column.")
            bs = bs * seq_col
        else:
            if not (isinstance(seq_len, (int, np.integer)) and seq_len > 0):
                raise UserError(f"seq_len must be a positive integer, got {seq_len!r}.")
            bs = bs * seq_len

    status = np.array([str(row.get(col_status, "ok") or "ok").strip().lower() for row in rows], dtype=object)
    run_id = np.array([str(row.get("run_id", index)) for index, row in enumerate(rows)], dtype=object)
    finished = np.array([s in OK_STATUSES for s in status])

    # A run that never finished may lack its configuration numbers: leave it out, counted.
    design_ok = np.ones(len(rows), dtype=bool)
    for values in (n, d, lr, bs):
        design_ok &= np.isfinite(values) & (values > 0)
    incomplete = ~finished & ~design_ok
    skipped_unfinished: dict[str, int] = {}
    if incomplete.any():
        for reason in status[incomplete]:
            skipped_unfinished[str(reason)] = skipped_unfinished.get(str(reason), 0) + 1
        keep = ~incomplete
        n, d, lr, bs, loss = n[keep], d[keep], lr[keep], bs[keep], loss[keep]
        n_active = n_active[keep] if n_active is not None else None
        n_total = n_total[keep] if n_total is not None else None
        compute = compute[keep] if compute is not None else None
        status, run_id, finished = status[keep], run_id[keep], finished[keep]
        rows = [row for row, k in zip(rows, keep) if k]
        if not rows:
            raise UserError(f"{name} has no finished run with a finite loss (unfinished: {skipped_unfinished}).")

    # Bad numbers in the design columns of finished runs are user mistakes.
    for label, values in (("N", n), ("D", d), ("lr", lr), ("batch size", bs)):
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if bad.size:
            row = int(bad[0])
            raise UserError(
                f"{name} row {row + 1}: {label} is {float(values[row]):g}; expected a positive finite number "
                f"({bad.size} row(s) affected)."
            )
    if n_active is not None:
        bad = np.flatnonzero(np.isfinite(n_active) & (n_active > n * (1 + 1e-9)))
        if bad.size:
            raise UserError(
                f"{name} row {int(bad[0]) + 1}: N_active={n_active[bad[0]]:.4g} exceeds N={n[bad[0]]:.4g}; "
                "activated parameters are a part of the non-embedding total."
            )

    finite_loss = np.isfinite(loss) & (loss > 0)
    valid = finished & finite_loss
    dropped: dict[str, int] = dict(skipped_unfinished)
    for reason in sorted(set(status[~finished])):
        dropped[str(reason)] = dropped.get(str(reason), 0) + int(np.sum(status == reason))
    nan_ok = int(np.sum(finished & ~finite_loss))
    if nan_ok:
        dropped["nan_loss"] = nan_ok
    if not valid.any():
        raise UserError(f"{name} has no finished run with a finite loss ({len(rows)} rows; dropped: {dropped}).")

    # A table that carries its sequence length settles the unit: token batches are whole
    # multiples of it. Only a table without one gets the small-numbers heuristic.
    seq_lens = _column(rows, "seq_len", name, "sequence length", required=False) if bs_unit == "tokens" else None
    tokens_evident = False
    if seq_lens is not None:
        seq_arr = np.asarray(seq_lens, dtype=float)
        usable = np.isfinite(seq_arr) & (seq_arr > 0) & np.isfinite(bs)
        tokens_evident = bool(usable.any()) and bool(np.all(bs[usable] >= seq_arr[usable])) and bool(
            np.all(np.mod(bs[usable], seq_arr[usable]) == 0)
        )
    if bs_unit == "tokens" and not tokens_evident and np.nanmax(bs) <= _SEQUENCES_SUSPECT_MAX:
        warnings.append(
            f"batch sizes are at most {np.nanmax(bs):.0f}, which looks like sequences, not tokens; "
            "if so pass --bs-unit sequences --seq-len L."
        )
    if np.nanmax(lr) > 1.0:
        warnings.append(f"learning rates up to {np.nanmax(lr):.3g} look too large for a peak LR; check the lr column.")

    return RunTable(
        N=n, D=d, lr=lr, batch_tokens=bs, loss=loss, valid=valid, status=status, run_id=run_id,
        N_active=n_active, N_total=n_total, compute=compute, source=name, dropped=dropped, warnings=warnings,
    )


def table_from_arrays(
    N: Iterable[float], D: Iterable[float], lr: Iterable[float], batch_tokens: Iterable[float],
    loss: Iterable[float], status: Iterable[str] | None = None, **extra,
) -> RunTable:
    """A RunTable from columns (used by the synthetic generator and tests)."""
    n = np.asarray(N, dtype=float)
    rows_status = list(status) if status is not None else ["ok"] * len(n)
    rows = []
    columns = {"N": n, "D": np.asarray(D, float), "lr": np.asarray(lr, float),
               "batch_tokens": np.asarray(batch_tokens, float), "loss": np.asarray(loss, float)}
    columns.update({key: np.asarray(value, float) for key, value in extra.items()})
    for index in range(len(n)):
        row = {key: float(values[index]) for key, values in columns.items()}
        row["status"] = rows_status[index]
        row["run_id"] = str(index)
        rows.append(row)
    return read_runs(rows)
