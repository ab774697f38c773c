"""The store file itself: is it usable, and what becomes of one that is old or damaged.

- `damage(path)`: why a runs.sqlite cannot be used (empty, not SQLite, failing its
  integrity check), or None.
- `readable(path)`: turns SQLite errors met while reading a damaged file into one
  sentence (a UserError) naming the file.
- `move_aside(path)`: keeps a damaged file (and its -wal/-shm) beside the new store as
  runs.sqlite.broken-<UTC time>: nothing is deleted.
- `migrate_v1(conn, ...)`: schema 1 (before the run-table names) to schema 2, in place,
  in one transaction.
- `export_select(version)`: the SELECT list of the run-table columns for a store of
  either schema.
- `finished_results(runs_dir)`: the results kept in run directories (result.json), from
  which the driver rebuilds a lost store.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

from steplaw.errors import UserError
from steplaw.runtable import FINISHED, NAMES

SQLITE_HEADER = b"SQLite format 3\x00"
# Schema 1 column -> its run-table name, and the columns schema 2 added.
V1_RENAMES = {"n_params": "N", "n_active": "N_active", "n_total": "N_total", "tokens": "D",
              "final_train_loss": "loss", "final_val_loss": "val_loss", "compute_flops": "compute"}
V1_ADDED = {"spec_id": "TEXT", "seq_len": "INTEGER", "n_experts": "INTEGER", "top_k": "INTEGER", "traceback": "TEXT"}

_STATUS_SQL = "CASE WHEN status IN ('ok', 'diverged', 'failed') THEN status ELSE 'pending' END"
# How each schema gives the run-table columns (steplaw.runtable.NAMES) that are not a
# plain column of that name; `export_select` reads every other column by its name, so a
# column added to the run table can never be paired with another's values.
# What trained a run (the run table's `trainer`): a trial names its trainer; a stored
# RunConfig is steplaw's, a replayed row a replay.
_TRAINER_SQL = ("COALESCE(json_extract(config, '$.trainer'), "
                "CASE WHEN json_extract(config, '$.replay') IS NOT NULL THEN 'replay' ELSE 'steplaw' END)")
EXPORT_EXPRESSIONS = {
    2: {"status": _STATUS_SQL, "N_active": "COALESCE(N_active, N)",
        # stack: from the result, where stores made before the column have it
        "stack": "json_extract(result, '$.stack')", "trainer": _TRAINER_SQL,
        # trunk: from the result too (stores made before the column); tokens_trained: the
        # column, which stores made before branching filled with the run's tokens
        "trunk": "json_extract(result, '$.trunk')"},
    1: {**{name: old for old, name in V1_RENAMES.items()}, "status": _STATUS_SQL, "spec_id": "NULL",
        "N_active": "COALESCE(n_active, n_params)", "seq_len": "json_extract(config, '$.seq_len')",
        "n_experts": "json_extract(config, '$.model.moe.n_experts')", "top_k": "json_extract(config, '$.model.moe.top_k')",
        "stack": "NULL", "trainer": _TRAINER_SQL, "trunk": "NULL"},
}


def export_select(version: int) -> str:
    """The SELECT list of the run-table columns, in order, of a store of schema `version`."""
    special = EXPORT_EXPRESSIONS[version]
    return ", ".join(f"{special[name]} AS {name}" if name in special else name for name in NAMES)


@contextlib.contextmanager
def readable(path: Path):
    """SQLite errors of a damaged file as one sentence naming the file."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{str(path)!r} is not a readable sweep store ({exc}); rerun `steplaw sweep` on its "
                        f"directory to rebuild it from the run directories") from None


def damage(path: Path, thorough: bool = True) -> str | None:
    """Why the file at `path` is not a usable store, or None when it looks fine. Without
    `thorough` only the size and header are checked (readers meet the rest as errors)."""
    if not path.is_file():
        return "not a file"
    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if header != SQLITE_HEADER:
        return "not an SQLite database"
    if not thorough:
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
            conn.execute("SELECT count(*) FROM runs").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"unreadable ({exc})"
    return None if verdict == "ok" else f"damaged ({verdict})"


def move_aside(path: Path) -> Path:
    """Rename a damaged store (and its -wal/-shm files) to <name>.broken-<UTC time>."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.broken-{stamp}")
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    return target


def migrate_v1(conn: sqlite3.Connection, spec_id_of, schema_version: int) -> None:
    """Rename schema 1's columns to the run-table names, add the new columns (filled from
    each run's config), and keep the stored spec as the first of the spec history."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        for old, new in V1_RENAMES.items():
            conn.execute(f"ALTER TABLE runs RENAME COLUMN {old} TO {new}")
        for name, kind in V1_ADDED.items():
            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
        conn.execute("UPDATE runs SET seq_len=json_extract(config, '$.seq_len'),"
                     " n_experts=json_extract(config, '$.model.moe.n_experts'),"
                     " top_k=json_extract(config, '$.model.moe.top_k')")
        conn.execute("CREATE TABLE IF NOT EXISTS specs (spec_id TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at REAL NOT NULL)")
        spec = conn.execute("SELECT value FROM meta WHERE key='spec'").fetchone()
        if spec and spec[0]:
            data = json.loads(spec[0])
            spec_id = spec_id_of(data)
            conn.execute("INSERT OR IGNORE INTO specs VALUES (?, ?, ?)", (spec_id, json.dumps(data, sort_keys=True), time.time()))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('spec_id', ?)", (json.dumps(spec_id),))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (json.dumps(schema_version),))


def finished_results(runs_dir: Path) -> list[tuple[str, dict, dict]]:
    """(run_id, config, result) of every run directory holding a finished result.json
    that names its own run (ok or diverged; failed attempts are not kept)."""
    found = []
    for entry in sorted(os.scandir(runs_dir), key=lambda e: e.name):
        try:
            with open(os.path.join(entry.path, "result.json"), encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            continue
        config = data.get("config") if isinstance(data, dict) else None
        if (isinstance(config, dict) and data.get("run_id") == entry.name and data.get("status") in FINISHED
                and all(key in config for key in ("tokens", "lr", "batch_tokens"))):
            found.append((entry.name, config, data))
    return found
