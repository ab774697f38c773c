"""The sweep result store: one SQLite database (WAL) in the sweep directory.

One row per run, keyed by the run id (a hash of its full config), with the run-table
columns of steplaw.runtable under the same names (N, D, lr, batch_tokens, loss, ...) plus
the store's own bookkeeping (attempts, curve, host, times). Only the sweep driver writes;
readers (`steplaw runs`, `steplaw fit`, the report) may read while it runs.

Crash safety comes from SQLite: every state change is one transaction, committed with
synchronous=FULL, so a `kill -9` of the driver leaves either the old rows or the new ones.
A driver that starts on a store whose rows say `running` knows their runs were
interrupted (no driver is alive: the sweep lock is held for the driver's lifetime) and
runs them again; finished rows (ok / diverged, or failed with no retries left) are
never run twice.

Specs: every spec a directory was swept with is kept (table `specs`, keyed by a hash of
the spec); each run row names the spec that first asked for it (`spec_id`). A changed
spec is refused unless the caller asks for it (`record_spec(..., allow_change=True)`); a spec
whose lists (grids) are only in another order is the same spec (`check_spec`).

A store file that is empty or not a readable SQLite database is never silently replaced:
readers refuse it with one sentence; the driver moves it aside, rebuilds the store from the
results kept in the run directories (runs/<run_id>/result.json) and says so (`notices`).

Statuses: pending (not yet run), running, ok, diverged (a result: the loss blew up),
failed (the run crashed or its worker died; `reason` says why; retried up to a limit).
Schema 1 stores (before the run-table names) are read as they are and migrated in place
when a driver opens them (steplaw.sweep.storefile: damage checks, migration, rebuild).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path

from steplaw import runtable
from steplaw.errors import UserError
from steplaw.fileio import write_atomic
from steplaw.runtable import finite_or_none, json_safe, rows_to_csv, rows_to_json
from steplaw.sweep import storefile
from steplaw.sweep.spec import spec_difference, spec_id_of
from steplaw.sweep.storefile import EXPORT_EXPRESSIONS, export_select, finished_results, migrate_v1, move_aside, readable

DB_NAME = "runs.sqlite"
LOCK_NAME = "driver.lock"
SPEC_NAME = "spec.json"
SCHEMA_VERSION = 2
FINISHED = runtable.FINISHED
EXPORT_COLUMNS = runtable.NAMES  # the run-table columns, in order

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,              -- RunConfig.to_dict() as JSON
    status TEXT NOT NULL,              -- pending / running / ok / diverged / failed
    attempts INTEGER NOT NULL DEFAULT 0,  -- failed attempts so far
    reason TEXT,                       -- why, when not ok
    spec_id TEXT,                      -- the spec that first asked for this run (table specs)
    N INTEGER,                         -- run-table columns: see steplaw.runtable
    N_active INTEGER,
    N_total INTEGER,
    D INTEGER NOT NULL,
    lr REAL NOT NULL,
    batch_tokens INTEGER NOT NULL,
    seq_len INTEGER,
    loss REAL,
    val_loss REAL,
    compute REAL,
    n_experts INTEGER,
    top_k INTEGER,
    stack TEXT,                        -- the stack that trained it with other runs of its model (RunResult.stack)
    trunk TEXT,                        -- the WSD trunk it branched off (RunResult.trunk); NULL: trained alone
    tokens_trained INTEGER,            -- tokens actually trained on (a shorter branch: its cooldown only)
    steps INTEGER,
    tokens_per_s REAL,
    wall_s REAL,
    curve TEXT,                        -- JSON [[tokens, loss], ...]
    result TEXT,                       -- the full RunResult JSON (curve left out)
    traceback TEXT,                    -- last lines of a crashed run's traceback
    host TEXT,
    versions TEXT,                     -- JSON {python, torch, steplaw}
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS specs (spec_id TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

_CHUNK = 500  # ids per `IN (...)` query (SQLite caps bound parameters)


def db_path(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / DB_NAME


class ResultStore:
    """The SQLite store of one sweep directory (see the module doc)."""

    def __init__(self, sweep_dir: str | Path, readonly: bool = False):
        self.sweep_dir = Path(sweep_dir)
        self.path = db_path(self.sweep_dir)
        self.readonly = readonly
        self.notices: list[str] = []  # what the driver must tell the user (a store rebuilt, ...)
        if readonly:
            self._open_readonly()
        else:
            self._open_for_driver()
        self.conn.row_factory = sqlite3.Row

    def _open_readonly(self):
        if self.sweep_dir.exists() and not self.sweep_dir.is_dir():
            raise UserError(f"{str(self.sweep_dir)!r} is a file: expected a sweep directory written by `steplaw sweep`")
        if not self.path.exists():
            raise UserError(f"{str(self.sweep_dir)!r} holds no sweep store ({DB_NAME}): expected a directory written by "
                            f"`steplaw sweep`")
        damage = storefile.damage(self.path, thorough=False)
        if damage:
            raise UserError(f"{str(self.path)!r} is {damage}: not a readable sweep store; rerun `steplaw sweep` on "
                            f"{str(self.sweep_dir)!r} to rebuild it from its run directories")
        self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        with readable(self.path):
            self.version = self._version()
        if self.version not in EXPORT_EXPRESSIONS:
            raise UserError(f"{str(self.path)!r} has store schema {self.version}: expected at most {SCHEMA_VERSION} (written by "
                            f"a newer steplaw?)")

    def _open_for_driver(self):
        if self.sweep_dir.exists() and not self.sweep_dir.is_dir():
            raise UserError(f"--out {str(self.sweep_dir)!r} is a file: expected a sweep directory (new or existing)")
        try:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create sweep directory {str(self.sweep_dir)!r} ({exc.strerror or exc}): expected a "
                            f"writable place") from None
        if not os.access(self.sweep_dir, os.W_OK):
            raise UserError(f"sweep directory {str(self.sweep_dir)!r} is not writable: expected a directory this user can write")
        existed = self.path.exists()
        damage = storefile.damage(self.path) if existed else None
        if damage:
            moved = move_aside(self.path)
            self.notices.append(f"{str(self.path)!r} was {damage}; moved it to {moved.name} and started a new store")
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        version = self._version() if existed and not damage else SCHEMA_VERSION
        if version == 1:
            migrate_v1(self.conn, spec_id_of, SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise UserError(f"{str(self.path)!r} has store schema {version}: expected at most {SCHEMA_VERSION} (written by a "
                            f"newer steplaw?)")
        self.conn.executescript(_SCHEMA)
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(runs)")}
        for column in ("stack", "trunk"):  # a store from before stacking / branching
            if column not in columns:
                self.conn.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
        self.set_meta("schema_version", SCHEMA_VERSION)
        self.version = SCHEMA_VERSION
        if not existed or damage:
            self._rebuild_from_run_dirs(bool(damage))

    def _version(self) -> int:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            return SCHEMA_VERSION
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(json.loads(row[0])) if row else SCHEMA_VERSION

    def _rebuild_from_run_dirs(self, replaced: bool):
        """A new store beside existing run directories: take back their finished results."""
        runs_dir = self.sweep_dir / "runs"
        if not runs_dir.is_dir():
            if replaced:
                self.notices.append("no run directories to recover results from: every run will train again")
            return
        results = finished_results(runs_dir)
        self.add_runs([{**config, "run_id": run_id} for run_id, config, _ in results])
        self.record_results([(run_id, result, None, None, None) for run_id, _, result in results])
        if results or replaced:
            self.notices.append(f"rebuilt the store of {str(self.sweep_dir)!r} from {len(results)} finished run "
                                f"director{'y' if len(results) == 1 else 'ies'} (runs/*/result.json); those runs are not "
                                f"trained again")

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writes (driver only) ----------------------------------------------------------

    def set_meta(self, key: str, value):
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def record_spec(self, spec: dict, allow_change: bool = False) -> str:
        """Make `spec` the directory's current spec and return its id. A spec that differs
        from the current one is refused (UserError) unless `allow_change`; one that differs
        only in the order of its lists is the current spec and keeps its id. Every spec is
        kept. spec.json beside the store is the current spec, written atomically."""
        current, spec_id = self.check_spec(spec, allow_change), spec_id_of(spec)
        if current is not None and current != spec_id:
            return current  # the same spec with its grid lists in another order: it keeps its id
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR IGNORE INTO specs(spec_id, spec, created_at) VALUES (?, ?, ?)",
                              (spec_id, json.dumps(spec, sort_keys=True, default=str), time.time()))
            self.set_meta("spec_id", spec_id)
            self.set_meta("spec", spec)
        write_atomic(self.sweep_dir / SPEC_NAME, json.dumps(spec, indent=1, default=str) + "\n")
        return spec_id

    def check_spec(self, spec: dict, allow_change: bool = False) -> str | None:
        """The current spec's id when `spec` is the same spec (its lists, the grids, in
        any order: the runs are the same); None when there is no current spec or `spec`
        differs and `allow_change`; a UserError when it differs and not `allow_change`."""
        current = self.meta("spec_id")
        if current is None:
            return None
        difference = None if current == spec_id_of(spec) else spec_difference(self.spec(current) or {}, spec)
        if difference is None:
            return current
        if allow_change:
            return None
        raise UserError(f"{str(self.sweep_dir)!r} was swept with a different spec ({difference}): "
                        f"expected the same settings, another --out directory, or --new-spec to add the changed "
                        f"spec's runs beside the old ones")

    def add_runs(self, configs: list[dict], counts: list[dict | None] | None = None, spec_id: str | None = None) -> int:
        """Register runs as pending; runs already in the store are left as they are
        (`adopt` labels old rows with a spec id). `configs` are RunConfig dicts with their
        `run_id` under "run_id"; `counts` optional parameter counts per run
        ({"non_embedding", "active", "total"}); `spec_id` the spec asking for them.
        Returns how many were new."""
        now = time.time()
        rows = []
        for i, entry in enumerate(configs):
            config = dict(entry)
            run_id = config.pop("run_id")
            f = runtable.config_fields(config, counts[i] if counts else None)
            rows.append((run_id, json.dumps(config, sort_keys=True), spec_id, f["N"], f["N_active"], f["N_total"],
                         f["D"], f["lr"], f["batch_tokens"], f["seq_len"], f["n_experts"], f["top_k"], now))
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            before = self.conn.total_changes
            self.conn.executemany(
                "INSERT OR IGNORE INTO runs(run_id, config, status, spec_id, N, N_active, N_total, D, lr, batch_tokens,"
                " seq_len, n_experts, top_k, created_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return self.conn.total_changes - before

    def adopt(self, run_ids: list[str], spec_id: str) -> int:
        """Give runs stored without a spec id (a rebuilt or pre-spec-id store) this spec's id."""
        if self.conn.execute("SELECT 1 FROM runs WHERE spec_id IS NULL LIMIT 1").fetchone() is None:
            return 0
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            before = self.conn.total_changes
            self.conn.executemany("UPDATE runs SET spec_id=? WHERE run_id=? AND spec_id IS NULL",
                                  [(spec_id, run_id) for run_id in run_ids])
            return self.conn.total_changes - before

    def recover_interrupted(self) -> int:
        """Rows left `running` by a driver that died: back to pending. Returns how many."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            cursor = self.conn.execute("UPDATE runs SET status='pending', started_at=NULL WHERE status='running'")
            return cursor.rowcount

    def mark_running(self, *run_ids: str):
        """These runs were handed to workers (one transaction for all of them)."""
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("UPDATE runs SET status='running', started_at=? WHERE run_id=?",
                                  [(now, run_id) for run_id in run_ids])

    def mark_pending(self, *run_ids: str):
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("UPDATE runs SET status='pending', started_at=NULL WHERE run_id=?",
                                  [(run_id,) for run_id in run_ids])

    def record_result(self, run_id: str, result, host: str | None = None, versions: dict | None = None,
                      traceback: str | None = None):
        """Store a finished attempt (a RunResult or its dict). `failed` increments `attempts`."""
        self.record_results([(run_id, result, host, versions, traceback)])

    def record_results(self, attempts: list[tuple]):
        """Store finished attempts, (run_id, RunResult or dict, host, versions, traceback)
        each, in one transaction."""
        rows = [self._result_row(*attempt) for attempt in attempts]
        if not rows:
            return
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                """UPDATE runs SET status=?, attempts=attempts+?, reason=?, loss=?, val_loss=?, compute=?,
                   tokens_trained=?, steps=?, tokens_per_s=?, wall_s=?, curve=?, result=?, traceback=?, host=?,
                   versions=?, finished_at=?, stack=?, trunk=?,
                   N=COALESCE(?, N), N_active=COALESCE(?, N_active), N_total=COALESCE(?, N_total)
                   WHERE run_id=?""",
                rows,
            )

    @staticmethod
    def _result_row(run_id, result, host, versions, traceback) -> tuple:
        data = dict(vars(result)) if dataclasses.is_dataclass(result) else dict(result)  # shallow: no deep copy
        f = runtable.result_fields(data)
        summary = {k: v for k, v in data.items() if k != "curve"}
        curve = data.get("curve") or []
        return (
            f["status"], 1 if f["status"] == "failed" else 0, f["reason"], f["loss"], f["val_loss"], f["compute"],
            f["tokens_trained"], data.get("steps"), finite_or_none(data.get("tokens_per_s")),
            finite_or_none(data.get("wall_s")),
            json.dumps([[int(t), finite_or_none(loss)] for t, loss in curve]),
            json.dumps(json_safe(summary), default=str, allow_nan=False), traceback,
            host, json.dumps(versions) if versions else None, time.time(), f["stack"], f["trunk"],
            f["N"], f["N_active"], f["N_total"], run_id,
        )

    def reset_failed(self) -> int:
        with self.conn:
            return self.conn.execute("UPDATE runs SET attempts=0 WHERE status='failed'").rowcount

    # -- reads --------------------------------------------------------------------------

    def meta(self, key: str, default=None):
        with readable(self.path):
            row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else default

    def objective(self) -> str:
        """The run-table column this sweep minimises: its current spec's `objective`
        ("loss", the smoothed training loss, unless the spec says otherwise)."""
        spec = self.meta("spec")
        objective = spec.get("objective", "loss") if isinstance(spec, dict) else "loss"
        return objective if objective in runtable.OBJECTIVES else "loss"

    def spec(self, spec_id: str) -> dict | None:
        if self.version < 2:
            return self.meta("spec")
        with readable(self.path):
            row = self.conn.execute("SELECT spec FROM specs WHERE spec_id=?", (spec_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def specs(self) -> list[tuple[str, dict]]:
        """Every spec this directory was swept with, oldest first, as (spec_id, spec)."""
        if self.version < 2:
            spec = self.meta("spec")
            return [(spec_id_of(spec), spec)] if spec else []
        with readable(self.path):
            rows = self.conn.execute("SELECT spec_id, spec FROM specs ORDER BY created_at").fetchall()
        return [(r[0], json.loads(r[1])) for r in rows]

    def _select(self, columns: str, run_ids: list[str] | None, order: str = "created_at, run_id") -> list:
        with readable(self.path):
            if run_ids is None:
                return self.conn.execute(f"SELECT {columns} FROM runs ORDER BY {order}").fetchall()
            out = []
            ids = list(run_ids)
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                out += self.conn.execute(f"SELECT {columns} FROM runs WHERE run_id IN ({marks})", chunk).fetchall()
            return out

    def rows(self, run_ids: list[str] | None = None) -> list[sqlite3.Row]:
        """Full store rows (every column), all of them or those of `run_ids`."""
        return self._select("*", run_ids)

    def outcome_counts(self, run_ids: list[str] | None = None) -> tuple[dict[str, int], tuple[int, int]]:
        """Among `run_ids` (None: all): runs per status, and (finished runs trained in a
        stack, stacks they came from); one read of the rows."""
        counts: dict[str, int] = {}
        stacks = []
        for status, stack in self._select("status, stack", run_ids):
            counts[status] = counts.get(status, 0) + 1
            if stack and status in ("ok", "diverged"):
                stacks.append(stack)
        return counts, (len(stacks), len(set(stacks)))

    def missing(self, run_ids: list[str]) -> list[str]:
        """The ids of `run_ids` the store does not hold, in the given order."""
        held = {r[0] for r in self._select("run_id", run_ids)}
        return [run_id for run_id in run_ids if run_id not in held]

    def attempts(self, run_ids: list[str]) -> dict[str, int]:
        """Failed attempts so far, per run."""
        return dict(tuple(r) for r in self._select("run_id, attempts", run_ids))

    def todo(self, run_ids: list[str], max_attempts: int) -> list[str]:
        """Runs of `run_ids` still to run, in the given order: pending (or interrupted), or
        failed with attempts left."""
        state = {r[0]: (r[1], r[2]) for r in self._select("run_id, status, attempts", run_ids)}
        todo = []
        for run_id in run_ids:
            status, attempts = state.get(run_id, (None, 0))
            if status in ("pending", "running") or (status == "failed" and attempts < max_attempts):
                todo.append(run_id)
        return todo

    def failure_reasons(self, run_ids: list[str] | None = None) -> dict[str, int]:
        """Distinct reasons of failed runs with how many runs gave each, most common first."""
        counts: dict[str, int] = {}
        for _, status, reason in self._select("run_id, status, reason", run_ids):
            if status == "failed":
                key = reason or "no reason recorded"
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def export(self) -> list[dict]:
        """Every run as a run-table row (see `export_rows`)."""
        with readable(self.path):
            cursor = self.conn.execute(f"SELECT {export_select(self.version)} FROM runs ORDER BY run_id")
            cursor.row_factory = None
            return [dict(zip(EXPORT_COLUMNS, row, strict=True)) for row in cursor.fetchall()]

    def config(self, run_id: str) -> dict:
        with readable(self.path):
            row = self.conn.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row[0])

    def curve(self, run_id: str) -> list[tuple[int, float | None]]:
        with readable(self.path):
            row = self.conn.execute("SELECT curve FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return [tuple(p) for p in json.loads(row[0] or "[]")] if row else []


class DriverLock:
    """An exclusive lock on a sweep directory for one driver's lifetime (flock: freed by
    the kernel when the process dies, however it dies)."""

    def __init__(self, sweep_dir: str | Path):
        self.path = Path(sweep_dir) / LOCK_NAME
        self.file = None

    def __enter__(self):
        directory = self.path.parent
        if directory.exists() and not directory.is_dir():
            raise UserError(f"--out {str(directory)!r} is a file: expected a sweep directory (new or existing)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as exc:
            raise UserError(f"cannot write in sweep directory {str(directory)!r} ({exc.strerror or exc}): expected a writable "
                            f"place") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise UserError(f"another `steplaw sweep` is running on {str(directory)!r}: expected one driver per sweep directory "
                            f"(wait for it or stop it)") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


# -- export: the runs table (rows_to_csv / rows_to_json come from steplaw.runtable) -------------

def export_rows(sweep_dir: str | Path) -> list[dict]:
    """Every run in a sweep store as a run-table row (columns `EXPORT_COLUMNS`, defined
    with their units in steplaw.runtable), in run-id order. Runs that have not finished
    are `pending` (also those interrupted while running); missing or non-finite numbers
    are None."""
    with ResultStore(sweep_dir, readonly=True) as store:
        return store.export()


def sweep_objective(sweep_dir: str | Path) -> str:
    """`ResultStore.objective()` of the sweep in `sweep_dir`."""
    with ResultStore(sweep_dir, readonly=True) as store:
        return store.objective()


__all__ = ["ResultStore", "sweep_objective", "DriverLock", "export_rows", "rows_to_csv", "rows_to_json", "EXPORT_COLUMNS", "db_path"]
