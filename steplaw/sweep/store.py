"""The sweep result store: one SQLite database (WAL) in the sweep directory.

One row per run, keyed by the run id (a hash of its full config). Only the sweep driver
writes; readers (`steplaw runs`, `steplaw fit`, the report) may read while it runs.

Crash safety comes from SQLite: every state change is one transaction, committed with
synchronous=FULL, so a `kill -9` of the driver leaves either the old row or the new one.
A driver that starts on a store whose rows say `running` knows their runs were
interrupted (no driver is alive: the sweep lock is held for the driver's lifetime) and
runs them again; finished rows (ok / diverged, or failed with no retries left) are
never run twice.

Statuses: pending (not yet run), running, ok, diverged (a result: the loss blew up),
failed (the run crashed or its worker died; `reason` says why; retried up to a limit).
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import sqlite3
import time
from pathlib import Path

from steplaw.errors import UserError

DB_NAME = "runs.sqlite"
LOCK_NAME = "driver.lock"
SCHEMA_VERSION = 1
FINISHED = ("ok", "diverged")

# The runs-table columns shared with steplaw.laws (see the law reader), in order.
EXPORT_COLUMNS = [
    "run_id", "status", "N", "N_active", "N_total", "D", "lr", "batch_tokens", "seq_len",
    "loss", "val_loss", "compute", "n_experts", "top_k",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,              -- RunConfig.to_dict() as JSON
    status TEXT NOT NULL,              -- pending / running / ok / diverged / failed
    attempts INTEGER NOT NULL DEFAULT 0,  -- failed attempts so far
    reason TEXT,                       -- why, when not ok
    n_params INTEGER,                  -- non-embedding parameters (total for MoE)
    n_active INTEGER,                  -- activated non-embedding parameters per token
    n_total INTEGER,                   -- all parameters incl. embeddings
    tokens INTEGER NOT NULL,           -- D, as configured
    lr REAL NOT NULL,
    batch_tokens INTEGER NOT NULL,
    final_train_loss REAL,
    final_val_loss REAL,
    compute_flops REAL,
    tokens_trained INTEGER,
    steps INTEGER,
    tokens_per_s REAL,
    wall_s REAL,
    curve TEXT,                        -- JSON [[tokens, loss], ...]
    result TEXT,                       -- the full RunResult JSON (curve left out)
    host TEXT,
    versions TEXT,                     -- JSON {python, torch, steplaw}
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def db_path(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / DB_NAME


class ResultStore:
    """The SQLite store of one sweep directory."""

    def __init__(self, sweep_dir: str | Path, readonly: bool = False):
        self.sweep_dir = Path(sweep_dir)
        path = db_path(self.sweep_dir)
        if readonly:
            if not path.is_file():
                raise UserError(f"{str(self.sweep_dir)!r} holds no sweep store ({DB_NAME}): expected a directory written by `steplaw sweep`")
            self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        else:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
            self._set_meta_default("schema_version", json.dumps(SCHEMA_VERSION))
        self.conn.row_factory = sqlite3.Row
        self.readonly = readonly

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writes (driver only) ----------------------------------------------------------

    def _set_meta_default(self, key: str, value: str):
        self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def set_meta(self, key: str, value):
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def add_runs(self, configs: list[dict], counts: list[dict | None] | None = None) -> int:
        """Register runs as pending; runs already in the store are left as they are.

        `configs` are RunConfig dicts with their `run_id` under "run_id"; `counts`
        optional parameter counts per run. Returns how many were new.
        """
        now = time.time()
        rows = []
        for i, entry in enumerate(configs):
            config = dict(entry)
            run_id = config.pop("run_id")
            count = (counts[i] if counts else None) or {}
            rows.append((
                run_id, json.dumps(config, sort_keys=True), count.get("non_embedding"), count.get("active"),
                count.get("total"), int(config["tokens"]), float(config["lr"]), int(config["batch_tokens"]), now,
            ))
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            before = self.conn.total_changes
            self.conn.executemany(
                "INSERT OR IGNORE INTO runs(run_id, config, status, n_params, n_active, n_total, tokens, lr,"
                " batch_tokens, created_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return self.conn.total_changes - before

    def recover_interrupted(self) -> int:
        """Rows left `running` by a driver that died: back to pending. Returns how many."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            cursor = self.conn.execute("UPDATE runs SET status='pending', started_at=NULL WHERE status='running'")
            return cursor.rowcount

    def mark_running(self, run_id: str):
        with self.conn:
            self.conn.execute("UPDATE runs SET status='running', started_at=? WHERE run_id=?", (time.time(), run_id))

    def mark_pending(self, run_id: str):
        with self.conn:
            self.conn.execute("UPDATE runs SET status='pending', started_at=NULL WHERE run_id=?", (run_id,))

    def record_result(self, run_id: str, result: dict, host: str | None = None, versions: dict | None = None):
        """Store a finished attempt (a RunResult dict). `failed` increments `attempts`."""
        status = result.get("status")
        if status not in ("ok", "diverged", "failed"):
            status, result = "failed", {**result, "reason": f"run returned status {status!r}"}
        curve = result.get("curve") or []
        summary = {k: v for k, v in result.items() if k != "curve"}
        with self.conn:
            self.conn.execute(
                """UPDATE runs SET status=?, attempts=attempts+?, reason=?, final_train_loss=?, final_val_loss=?,
                   compute_flops=?, tokens_trained=?, steps=?, tokens_per_s=?, wall_s=?, curve=?, result=?,
                   host=?, versions=?, finished_at=?,
                   n_params=COALESCE(?, n_params), n_active=COALESCE(?, n_active), n_total=COALESCE(?, n_total)
                   WHERE run_id=?""",
                (
                    status, 1 if status == "failed" else 0, result.get("reason"),
                    _finite(result.get("final_train_loss")), _finite(result.get("final_val_loss")),
                    result.get("compute_flops"), result.get("tokens"), result.get("steps"),
                    result.get("tokens_per_s"), result.get("wall_s"),
                    json.dumps([[int(t), _finite(loss)] for t, loss in curve]),
                    json.dumps(_sanitize(summary), default=str, allow_nan=False),
                    host, json.dumps(versions) if versions else None, time.time(),
                    result.get("params_non_embedding"), result.get("params_active"), result.get("params_total"),
                    run_id,
                ),
            )

    def reset_failed(self) -> int:
        with self.conn:
            return self.conn.execute("UPDATE runs SET attempts=0 WHERE status='failed'").rowcount

    # -- reads --------------------------------------------------------------------------

    def meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else default

    def rows(self, run_ids: list[str] | None = None) -> list[sqlite3.Row]:
        rows = self.conn.execute("SELECT * FROM runs ORDER BY created_at, run_id").fetchall()
        if run_ids is not None:
            wanted = set(run_ids)
            rows = [r for r in rows if r["run_id"] in wanted]
        return rows

    def status_counts(self, run_ids: list[str] | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows(run_ids):
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts

    def todo(self, run_ids: list[str], max_attempts: int) -> list[str]:
        """Runs of `run_ids` still to run: pending, or failed with attempts left."""
        todo = []
        by_id = {r["run_id"]: r for r in self.rows(run_ids)}
        for run_id in run_ids:
            row = by_id.get(run_id)
            if row is None:
                continue
            if row["status"] in ("pending", "running") or (row["status"] == "failed" and row["attempts"] < max_attempts):
                todo.append(run_id)
        return todo

    def config(self, run_id: str) -> dict:
        row = self.conn.execute("SELECT config FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row[0])

    def curve(self, run_id: str) -> list[tuple[int, float | None]]:
        row = self.conn.execute("SELECT curve FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return [tuple(p) for p in json.loads(row[0] or "[]")] if row else []


class DriverLock:
    """An exclusive lock on a sweep directory for one driver's lifetime (flock: freed by
    the kernel when the process dies, however it dies)."""

    def __init__(self, sweep_dir: str | Path):
        self.path = Path(sweep_dir) / LOCK_NAME
        self.file = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise UserError(f"another `steplaw sweep` is running on {str(self.path.parent)!r}: expected one driver per sweep directory (wait for it or stop it)") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _finite(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _sanitize(data):
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _sanitize(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_sanitize(v) for v in data]
    return data


# -- export: the runs table ---------------------------------------------------------------

def export_rows(sweep_dir: str | Path) -> list[dict]:
    """Every run in a sweep store as a runs-table row (columns `EXPORT_COLUMNS`).

    N = non-embedding parameters (the total non-embedding count for MoE), N_active =
    activated non-embedding parameters per token (= N for dense), N_total = all
    parameters, D = configured training tokens, lr = peak LR, batch_tokens in tokens,
    loss = final smoothed training loss, val_loss = validation loss, compute = FLOPs.
    Runs that have not finished are `pending` (also those interrupted while running);
    missing or non-finite numbers are None. Rows are in run-id order.
    """
    with ResultStore(sweep_dir, readonly=True) as store:
        rows = store.rows()
    out = []
    for row in sorted(rows, key=lambda r: r["run_id"]):
        config = json.loads(row["config"])
        moe = (config.get("model") or {}).get("moe")
        status = row["status"] if row["status"] in ("ok", "diverged", "failed") else "pending"
        out.append({
            "run_id": row["run_id"],
            "status": status,
            "N": row["n_params"],
            "N_active": row["n_active"] if row["n_active"] is not None else row["n_params"],
            "N_total": row["n_total"],
            "D": row["tokens"],
            "lr": row["lr"],
            "batch_tokens": row["batch_tokens"],
            "seq_len": config.get("seq_len"),
            "loss": row["final_train_loss"],
            "val_loss": row["final_val_loss"],
            "compute": row["compute_flops"],
            "n_experts": moe.get("n_experts") if moe else None,
            "top_k": moe.get("top_k") if moe else None,
        })
    return out


def rows_to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else _csv_value(row[k])) for k in EXPORT_COLUMNS})
    return buffer.getvalue()


def _csv_value(value):
    # repr round-trips floats exactly, so CSV and JSON exports fit to the same numbers
    return repr(value) if isinstance(value, float) else value


def rows_to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
