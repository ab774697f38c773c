"""Reading and checking tables of training runs.

A run table has one row per run. The columns the fitters use (names as in the shared
runs table; others are kept but ignored):

  N             non-embedding parameters (for MoE, the total non-embedding count)
  N_active      activated non-embedding parameters per token (MoE; optional)
  N_total       all parameters, embeddings included (optional)
  D             training tokens
  lr            peak learning rate
  batch_tokens  batch size in tokens (a column named batch_seqs / batch_sequences counts sequences)
  loss          final smoothed training loss (nats per token)
  status        ok / diverged / failed / pending (optional; rows without it count as ok)
  compute       training FLOPs (optional; gives D = C / (6 N) when there is no D column)
  seq_len       tokens per sequence (optional; converts a batch counted in sequences)
  schedule      the LR schedule the run trained under, e.g. cosine or wsd (optional;
                steplaw.laws.schedules: a law records it, a fit refuses a mixture)
  curve         the run's loss curve [[tokens, loss], ...] as JSON text or a list
                (optional; the critical batch size, steplaw.laws.critical, needs it)

`read_runs` accepts a CSV, JSONL or Parquet file (Parquet needs pyarrow) or a list of
dicts (e.g. `steplaw.sweep.store.export_rows(sweep_dir)`: the CLI and the report resolve
sweep directories, so this package needs nothing from the sweep code), and maps
differently named columns with col_N=..., col_D=..., and so on. What a command needs
decides what must be there: `needs="hparams"` (steplaw fit) requires N, D, lr, batch
size and loss; `needs="loss"` (steplaw fit-loss) only N, D (or compute) and loss.

The unit of the batch size is never guessed from its numbers: it is the explicit
`bs_unit`, or else the column's name (`..._tokens` counts tokens, `..._seqs` /
`..._sequences` sequences); a generic name (bs, batch_size) without `bs_unit` is refused.

Rows that did not finish (status not ok) or whose loss is NaN are kept for the grid
bounds but marked invalid and counted; bad numbers in N, D, lr, batch size or a finished
run's loss are a UserError naming the row.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steplaw.errors import UserError

OK_STATUSES = {"ok", "done", "success", "completed", ""}
BS_UNITS = ("tokens", "sequences")
NEEDS = ("hparams", "loss")
# Batch columns looked for when none is named, in order, with the unit their name says.
_DEFAULT_BATCH_COLUMNS = ("batch_tokens", "batch_seqs", "batch_sequences")


@dataclass
class RunTable:
    """Columns of runs as float arrays (one entry per run); see the module docstring.

    lr and batch_tokens are NaN throughout when the table was read for the loss law
    without those columns (has_hparams False).
    """

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
    has_hparams: bool = True
    loss_column: str = "loss"  # the column `loss` was read from (e.g. val_loss)
    schedule: np.ndarray | None = None  # object array of LR-schedule labels ('' unknown); None: no such column
    curve: np.ndarray | None = None  # object array of (k, 2) [tokens, loss] arrays (None: no curve); None: no column

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


# ------------------------------------------------------------------------------ files
def _read_text(path: Path) -> str:
    """The file as text: UTF-8 with or without a byte-order mark, else one clear error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8."
        ) from None


def _read_csv(path: Path, delimiter: str) -> list[dict]:
    """Rows as dicts keyed by the stripped header names ("N, D, lr" maps like "N,D,lr").
    A name given twice or a row with more fields than the header is refused: either would
    silently read some value from the wrong column. Short rows leave their last columns empty."""
    reader = csv.reader(_read_text(path).splitlines(), delimiter=delimiter)
    names = [name.strip() for name in next(reader, [])]
    named = [name for name in names if name]
    for name in named:
        if named.count(name) > 1:
            raise UserError(f"{str(path)!r}: column {name!r} appears twice in the header; expected each column once.")
    rows = []
    for values in reader:
        if not values:  # a blank line is no run
            continue
        if len(values) > len(names):
            raise UserError(f"{str(path)!r} row {len(rows) + 1} has {len(values)} fields; the header has {len(names)} "
                            "(a stray delimiter or an unquoted comma?).")
        row = dict.fromkeys(names)
        row.update(zip(names, values))
        rows.append(row)
    return rows


def _read_json_lines(path: Path, suffix: str) -> list[dict]:
    text = _read_text(path)
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
        return rows
    rows = []
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
    return rows


def _load_rows(source) -> tuple[list[dict], str]:
    if isinstance(source, (list, tuple)):
        return list(source), "the table"
    path = Path(source)
    if not path.exists():
        raise UserError(f"no such file or directory: {str(path)!r}; expected a CSV, JSONL or Parquet file.")
    if path.is_dir():
        raise UserError(
            f"{str(path)!r} is a directory; read_runs takes a table file or rows "
            "(for a sweep directory pass steplaw.sweep.store.export_rows(DIR))."
        )
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ","), str(path)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _read_json_lines(path, suffix), str(path)
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(
                f"reading {str(path)!r} needs pyarrow; install it (pip install 'steplaw[parquet]') or export the table as CSV."
            ) from None
        return pq.read_table(path).to_pylist(), str(path)
    raise UserError(f"cannot tell the format of {str(path)!r}; expected a .csv, .jsonl or .parquet file.")


# ---------------------------------------------------------------------------- columns
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


def _has_column(rows: list[dict], name: str) -> bool:
    return any(name in row for row in rows[:50])


def _column(rows: list[dict], name: str, source: str, what: str, required: bool = True) -> np.ndarray | None:
    if not rows or not _has_column(rows, name):
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


def batch_unit_of(column: str) -> str | None:
    """'tokens' or 'sequences' when a batch column's name says its unit, else None."""
    name = column.strip().lower()
    if name.endswith("tokens"):
        return "tokens"
    if name.endswith(("seqs", "sequences")):
        return "sequences"
    return None


def _batch_column(rows: list[dict], col_bs: str | None, bs_unit: str | None, name: str) -> tuple[str, str]:
    """(batch column, its unit) decided from bs_unit or the column's name, never from numbers."""
    if col_bs is None:
        col_bs = next((c for c in _DEFAULT_BATCH_COLUMNS if _has_column(rows, c)), "batch_tokens")
    if not _has_column(rows, col_bs):
        _column(rows, col_bs, name, "the batch size")  # raises, listing the columns present
    named = batch_unit_of(col_bs)
    if bs_unit is None:
        if named is None:
            raise UserError(
                f"the batch-size column {col_bs!r} does not say whether it counts tokens or sequences; "
                "pass --bs-unit tokens or --bs-unit sequences (bs_unit= in read_runs)."
            )
        return col_bs, named
    if named is not None and named != bs_unit:
        raise UserError(
            f"the batch-size column {col_bs!r} counts {named} by its name but --bs-unit {bs_unit} was given; "
            "map the right column with --col-bs or drop --bs-unit."
        )
    return col_bs, bs_unit


def _tokens_column(rows, col_D, col_C, n, compute, name, warnings) -> np.ndarray:
    if col_D is not None or _has_column(rows, "D"):
        return _column(rows, col_D or "D", name, "training tokens D")
    if compute is not None and not np.all(np.isnan(compute)):
        warnings.append(f"no token column: D derived as C/(6N) from column {col_C or 'compute'!r}.")
        return compute / (6.0 * n)
    raise UserError(
        f"{name} has no column 'D' (training tokens) and no compute column to derive it from; "
        f"map yours with --col-D or --col-C."
    )


def _optional_counts(rows, column, name, what) -> np.ndarray | None:
    values = _column(rows, column, name, what, required=False)
    if values is not None and np.all(np.isnan(values)):
        return None
    return values


def _batch_in_tokens(rows, bs, unit, seq_len, name) -> np.ndarray:
    if unit != "sequences":
        return bs
    if seq_len is None:
        seq_col = _column(rows, "seq_len", name, "sequence length", required=False)
        if seq_col is None or np.any(~np.isfinite(seq_col)):
            raise UserError("a batch size in sequences needs a sequence length: give --seq-len L or a 'seq_len' column.")
        return bs * seq_col
    if not (isinstance(seq_len, (int, np.integer)) and seq_len > 0):
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}.")
    return bs * seq_len


# ------------------------------------------------------------------------- row checks
def _drop_incomplete(cols: dict, finished: np.ndarray, design: tuple[str, ...], name: str) -> dict[str, int]:
    """Leave out (counted by status) runs that never finished and lack their design numbers."""
    design_ok = np.ones(finished.size, dtype=bool)
    for key in design:
        design_ok &= np.isfinite(cols[key]) & (cols[key] > 0)
    incomplete = ~finished & ~design_ok
    skipped: dict[str, int] = {}
    if not incomplete.any():
        return skipped
    for reason in cols["status"][incomplete]:
        skipped[str(reason)] = skipped.get(str(reason), 0) + 1
    keep = ~incomplete
    if not keep.any():
        raise UserError(f"{name} has no finished run with a finite loss (unfinished: {skipped}).")
    for key, values in cols.items():
        if values is not None:
            cols[key] = values[keep]
    return skipped


_LABELS = {"N": "N", "D": "D", "lr": "lr", "batch_tokens": "batch size"}


def _check_design(cols: dict, design: tuple[str, ...], name: str) -> None:
    """Bad numbers in the design columns of finished runs are user mistakes."""
    for key in design:
        values = cols[key]
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if bad.size:
            row = int(bad[0])
            raise UserError(
                f"{name} row {row + 1}: {_LABELS[key]} is {float(values[row]):g}; expected a positive finite number "
                f"({bad.size} row(s) affected)."
            )
    n, n_active = cols["N"], cols["N_active"]
    if n_active is not None:
        bad = np.flatnonzero(np.isfinite(n_active) & (n_active > n * (1 + 1e-9)))
        if bad.size:
            raise UserError(
                f"{name} row {int(bad[0]) + 1}: N_active={n_active[bad[0]]:.4g} exceeds N={n[bad[0]]:.4g}; "
                "activated parameters are a part of the non-embedding total."
            )


def _validity(cols: dict, finished: np.ndarray, skipped: dict[str, int], name: str) -> tuple[np.ndarray, dict]:
    """Which runs count (finished with a finite positive loss) and why the others do not."""
    loss, status = cols["loss"], cols["status"]
    negative = np.flatnonzero(finished & np.isfinite(loss) & (loss <= 0))
    if negative.size:
        row = int(negative[0])
        raise UserError(
            f"{name} row {row + 1}: a finished run's loss is {loss[row]:g}; expected a positive cross-entropy "
            f"in nats ({negative.size} row(s) affected)."
        )
    valid = finished & np.isfinite(loss)
    dropped: dict[str, int] = dict(skipped)
    for reason in sorted(set(status[~finished])):
        dropped[str(reason)] = dropped.get(str(reason), 0) + int(np.sum(status == reason))
    nan_ok = int(np.sum(finished & ~np.isfinite(loss)))
    if nan_ok:
        dropped["nan_loss"] = nan_ok
    if not valid.any():
        raise UserError(f"{name} has no finished run with a finite loss ({loss.size} rows; dropped: {dropped}).")
    return valid, dropped


# ---------------------------------------------------------------------------- reading
def read_runs(
    source,
    *,
    col_N: str = "N",
    col_D: str | None = None,
    col_lr: str = "lr",
    col_bs: str | None = None,
    col_loss: str = "loss",
    col_C: str | None = None,
    col_N_active: str = "N_active",
    col_N_total: str = "N_total",
    col_status: str = "status",
    bs_unit: str | None = None,
    seq_len: int | None = None,
    needs: str = "hparams",
    source_name: str | None = None,
) -> RunTable:
    """Read runs from a table file or a list of dicts into a checked RunTable.

    col_*: the source's names of the columns (defaults: the shared runs-table names).
    col_D=None means 'D' when present, else D = C/(6N) from col_C (default 'compute').
    col_bs=None means the first of batch_tokens, batch_seqs, batch_sequences present.
    bs_unit: 'tokens', 'sequences' or None (then the batch column's name must say it);
    sequences become tokens with seq_len from the argument or a 'seq_len' column.
    needs: 'hparams' (N, D, lr, batch, loss required) or 'loss' (N, D, loss required).
    source_name: how errors name rows given as a list (e.g. the sweep directory).
    """
    if bs_unit not in (None,) + BS_UNITS:
        raise UserError(f"bs_unit must be 'tokens' or 'sequences', got {bs_unit!r}.")
    if needs not in NEEDS:
        raise UserError(f"needs must be one of {', '.join(NEEDS)}, got {needs!r}.")
    rows, name = _load_rows(source)
    name = source_name or name
    if not rows:
        raise UserError(f"{name} holds no runs; expected at least one row.")
    if not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{name} rows must be mappings of column name to value.")
    columns = ColumnMap(N=col_N, D=col_D, lr=col_lr, bs=col_bs, loss=col_loss, C=col_C, N_active=col_N_active,
                        N_total=col_N_total, bs_unit=bs_unit, seq_len=seq_len)
    has_hparams = needs == "hparams"
    cols, warnings = _read_columns(rows, name, has_hparams, columns)
    cols["status"] = np.array([str(row.get(col_status, "ok") or "ok").strip().lower() for row in rows], dtype=object)
    cols["run_id"] = np.array([str(row.get("run_id", index)) for index, row in enumerate(rows)], dtype=object)
    cols["schedule"] = _schedule_column(rows)
    cols["curve"] = _curve_column(rows, name)
    finished = np.array([s in OK_STATUSES for s in cols["status"]])
    design = ("N", "D", "lr", "batch_tokens") if has_hparams else ("N", "D")
    skipped = _drop_incomplete(cols, finished, design, name)
    finished = np.array([s in OK_STATUSES for s in cols["status"]])
    _check_design(cols, design, name)
    valid, dropped = _validity(cols, finished, skipped, name)
    if has_hparams and np.nanmax(cols["lr"]) > 1.0:
        warnings.append(f"learning rates up to {np.nanmax(cols['lr']):.3g} look too large for a peak LR; check the lr column.")
    return RunTable(
        N=cols["N"], D=cols["D"], lr=cols["lr"], batch_tokens=cols["batch_tokens"], loss=cols["loss"], valid=valid,
        status=cols["status"], run_id=cols["run_id"], N_active=cols["N_active"], N_total=cols["N_total"],
        compute=cols["compute"], source=name, dropped=dropped, warnings=warnings, has_hparams=has_hparams,
        loss_column=col_loss, schedule=cols["schedule"], curve=cols["curve"],
    )


def _schedule_column(rows: list[dict]) -> np.ndarray | None:
    """The schedule labels (stripped, lower case; '' where a row names none), or None without the column."""
    if not _has_column(rows, "schedule"):
        return None
    return np.array([str(row.get("schedule") or "").strip().lower() for row in rows], dtype=object)


def _curve_column(rows: list[dict], name: str) -> np.ndarray | None:
    """Each row's loss curve as a (k, 2) float array of [tokens, loss] (None where empty), or None without the column."""
    if not _has_column(rows, "curve"):
        return None
    out = np.empty(len(rows), dtype=object)
    for index, row in enumerate(rows):
        value = row.get("curve")
        if isinstance(value, str):
            value = value.strip()
            try:
                value = json.loads(value) if value else None
            except json.JSONDecodeError:
                raise UserError(f"{name} row {index + 1}: column 'curve' is not JSON; expected [[tokens, loss], ...].") from None
        try:
            points = np.asarray(value if value else [], dtype=float).reshape(-1, 2) if value is not None else None
        except (TypeError, ValueError):
            raise UserError(f"{name} row {index + 1}: column 'curve' holds {str(value)[:40]!r}; expected "
                            "[[tokens, loss], ...].") from None
        out[index] = points if points is not None and len(points) else None
    return out


@dataclass(frozen=True)
class ColumnMap:
    """The source's names of the columns read_runs reads (see its col_* arguments) and how
    to read the batch size (bs_unit, seq_len); built once per read."""

    N: str = "N"
    D: str | None = None
    lr: str = "lr"
    bs: str | None = None
    loss: str = "loss"
    C: str | None = None
    N_active: str = "N_active"
    N_total: str = "N_total"
    bs_unit: str | None = None
    seq_len: int | None = None


def _read_columns(rows, name, hparams: bool, columns: ColumnMap) -> tuple[dict, list[str]]:
    """The numeric columns as arrays (batch in tokens) and the warnings; lr and batch only
    when `hparams` (else NaN)."""
    warnings: list[str] = []
    n = _column(rows, columns.N, name, "parameters N")
    loss = _column(rows, columns.loss, name, "the final loss")
    compute = _column(rows, columns.C or "compute", name, "compute", required=columns.C is not None)
    d = _tokens_column(rows, columns.D, columns.C, n, compute, name, warnings)
    if hparams:
        lr = _column(rows, columns.lr, name, "the peak learning rate")
        bs_col, unit = _batch_column(rows, columns.bs, columns.bs_unit, name)
        bs = _batch_in_tokens(rows, _column(rows, bs_col, name, "the batch size"), unit, columns.seq_len, name)
    else:  # the loss law reads neither, so neither can stop it
        lr = np.full(len(rows), np.nan)
        bs = np.full(len(rows), np.nan)
    cols = {
        "N": n, "D": d, "lr": lr, "batch_tokens": bs, "loss": loss, "compute": compute,
        "N_active": _optional_counts(rows, columns.N_active, name, "activated parameters"),
        "N_total": _optional_counts(rows, columns.N_total, name, "total parameters"),
    }
    return cols, warnings


def select_spec(rows: list[dict], spec: str | None = None, all_specs: bool = False,
                source: str = "the sweep") -> tuple[list[dict], str | None]:
    """The rows of one sweep spec, and a warning when several are fitted together.

    A sweep directory keeps the runs of every spec it was swept with (`steplaw sweep
    --new-spec`; each row names its `spec_id`). Specs may differ in what changes a run's
    result (weight decay, schedule), so a law fitted to their mixture is wrong without a
    word: several specs need `spec` (an id or its unique prefix) or `all_specs` (fit them
    together, with the warning returned).
    """
    counts: dict = {}
    for row in rows:
        counts[row.get("spec_id")] = counts.get(row.get("spec_id"), 0) + 1
    listing = ", ".join(f"{spec_id or '(no spec id)'}: {count} runs"
                        for spec_id, count in sorted(counts.items(), key=lambda item: str(item[0] or "")))
    if spec is not None:
        matches = [spec_id for spec_id in counts if spec_id and str(spec_id).startswith(spec)]
        if len(matches) != 1:
            how = "matches no spec" if not matches else f"matches {len(matches)} specs"
            raise UserError(f"--spec {spec!r} {how} of {source}; expected one of its spec ids ({listing}).")
        return [row for row in rows if row.get("spec_id") == matches[0]], None
    if len(counts) < 2:
        return rows, None
    if not all_specs:
        raise UserError(f"{source} holds the runs of {len(counts)} specs ({listing}), which may differ in settings that "
                        "change a run's result; choose one with --spec ID, or fit them together with --all-specs.")
    return rows, (f"the runs of {len(counts)} specs are fitted together ({listing}); a law of their mixture is right "
                  "only if the specs differ in nothing that changes a run's result.")


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
