"""The run table: one row per training run, under one set of names from spec to report.

A run is described three times on its way: its `RunConfig` (what to train), its
`RunResult` (what came out) and its parameter counts (from the model shape). This module
is the one place that turns those into a row of the run table, so the sweep store,
`steplaw runs`, `steplaw fit`, the loss-law fit and the report all see the same columns
under the same names and units (`COLUMNS`). It is plain data: no torch, no training code,
so the law fitters can use it without importing a trainer.

    row = to_row(run_id, config_dict, result_dict, counts, spec_id)
    result_dict = result_from_row(row)       # and back (a replayed table row's result)

`config_dict` is `RunConfig.to_dict()` (or a trial's, steplaw.trial: another trainer's run), `result_dict` is `RunResult.to_dict()` (or None
for a run not yet finished), `counts` is {"non_embedding", "active", "total"} from the
model accounting. Numbers that are missing or not finite are None. `rows_to_csv` and
`rows_to_json` write rows with exactly these columns (what `steplaw runs` prints).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Column:
    name: str
    unit: str
    description: str


COLUMNS: tuple[Column, ...] = (
    Column("run_id", "", "the run's id: a hash of its full RunConfig"),
    Column("status", "", "ok, diverged (the loss blew up: a result), failed (see reason) or pending"),
    Column("spec_id", "", "the sweep spec the run came from (a hash; `steplaw runs` and the store keep the history)"),
    Column("N", "parameters", "non-embedding parameters (for MoE the total non-embedding count)"),
    Column("N_active", "parameters", "activated non-embedding parameters per token (= N for dense models)"),
    Column("N_total", "parameters", "all parameters, embeddings included"),
    Column("D", "tokens", "training tokens, as configured"),
    Column("lr", "", "peak learning rate of the schedule"),
    Column("batch_tokens", "tokens", "batch size per optimizer step"),
    Column("seq_len", "tokens", "sequence length"),
    Column("loss", "nats/token", "final smoothed (EMA) training loss"),
    Column("val_loss", "nats/token", "validation loss at the end of the run"),
    Column("compute", "FLOPs", "training compute, C = FLOPs per token x tokens trained"),
    Column("n_experts", "", "routed experts per MoE layer (empty for dense models)"),
    Column("top_k", "", "experts per token (empty for dense models)"),
    Column("reason", "", "why the run is not ok (failed or diverged); empty otherwise"),
    Column("stack", "", "the stack (16 hex) that trained this run together with other runs of its model shape; empty: alone"),
    Column("trainer", "", "what trained the run: steplaw, hf, MODULE:FUNCTION, command (steplaw.trial), or replay"),
    Column("trunk", "", "the WSD trunk (16 hex) whose stable phase this run branched off; empty: trained alone"),
    Column("tokens_trained", "tokens", "tokens this run actually trained: its tokens when alone; a trunk's shorter "
                                       "branches only their cooldown (a sweep's sum is what it trained)"),
)
NAMES: list[str] = [column.name for column in COLUMNS]
# The loss columns a sweep may minimise (a spec's `objective`): "loss", the smoothed final
# training loss (the Step Law's measure: at real batch sizes it is the lowest-noise
# estimate), or "val_loss", the loss on the held-out tokens every run is evaluated on.
# At batches of a few dozen sequences the training loss's last steps see different tokens
# at each batch size and average only a few hundred of them; the validation loss is one
# fixed set for every run, so it compares batch sizes on equal terms.
OBJECTIVES: tuple[str, ...] = ("loss", "val_loss")
BY_NAME: dict[str, Column] = {column.name: column for column in COLUMNS}

STATUSES = ("ok", "diverged", "failed", "pending")
FINISHED = ("ok", "diverged")  # results: never run again


def finite_or_none(value):
    """A finite float, or None for missing, NaN and infinite values."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def json_safe(obj):
    """obj with NaN / inf floats (numpy ones too) replaced by None, recursively."""
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return [json_safe(item) for item in obj.tolist()]
    if isinstance(obj, dict):
        return {key: json_safe(item) for key, item in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(item) for item in obj]
    return obj


def _int_or_none(value):
    return None if value is None else int(value)


def config_fields(config: dict, counts: dict | None = None) -> dict:
    """The run-table columns known before a run: from a RunConfig dict and the model's
    parameter counts ({"non_embedding", "active", "total"}, optional)."""
    model = config.get("model")
    moe = model.get("moe") if isinstance(model, dict) else None
    counts = counts or {}
    return {
        "trainer": config.get("trainer") or ("replay" if "replay" in config else "steplaw"),
        "N": _int_or_none(counts.get("non_embedding")),
        "N_active": _int_or_none(counts.get("active")),
        "N_total": _int_or_none(counts.get("total")),
        "D": int(config["tokens"] if "tokens" in config else config["D"]),  # a trial (steplaw.trial) names it D
        "lr": float(config["lr"]),
        "batch_tokens": int(config["batch_tokens"]),
        "seq_len": _int_or_none(config.get("seq_len")),
        "n_experts": _int_or_none(moe.get("n_experts")) if moe else None,
        "top_k": _int_or_none(moe.get("top_k")) if moe else None,
    }


# (run-table column, RunResult field) of what a run measures and the parameters it counted:
# result_fields reads them one way, result_from_row the other.
_MEASURED = (("loss", "final_train_loss"), ("val_loss", "final_val_loss"), ("compute", "compute_flops"))
_COUNTED = (("N", "params_non_embedding"), ("N_active", "params_active"), ("N_total", "params_total"))


def result_fields(result: dict) -> dict:
    """The run-table columns a finished attempt fills in, from a RunResult dict. Parameter
    counts the run measured are None when it did not report them (keep the config's)."""
    status = result.get("status")
    return {
        "status": status if status in ("ok", "diverged", "failed") else "failed",
        "reason": result.get("reason") if status in ("ok", "diverged", "failed") else f"run returned status {status!r}",
        **{column: finite_or_none(result.get(key)) for column, key in _MEASURED},
        **{column: _int_or_none(result.get(key)) for column, key in _COUNTED},
        "stack": result.get("stack") if isinstance(result.get("stack"), str) else None,
        "trunk": result.get("trunk") if isinstance(result.get("trunk"), str) else None,
        "tokens_trained": tokens_trained(result),
    }


def tokens_trained(result: dict) -> int | None:
    """What a result trained: its `tokens_trained`, or for a run alone (and results stored
    before the field existed) its `tokens`; None when it reports neither."""
    value = result.get("tokens_trained")
    return _whole_or_none(result.get("tokens") if value is None else value)


def _whole_or_none(value):
    value = finite_or_none(value)
    return None if value is None else int(round(value))


def result_from_row(row: dict) -> dict:
    """The RunResult dict of a run-table row: the inverse of `result_fields`, so that
    `to_row(run_id, config, result_from_row(row), ...)` gives back `row`'s result
    columns (each loss under its own name: `loss` is the training loss, `val_loss` the
    validation loss). What the table does not hold (wall time, curve) is left out."""
    return {
        "status": row.get("status"),
        "reason": row.get("reason"),
        **{key: finite_or_none(row.get(column)) for column, key in _MEASURED},
        **{key: _whole_or_none(row.get(column)) for column, key in _COUNTED},
        "stack": row.get("stack") if isinstance(row.get("stack"), str) else None,
        "trunk": row.get("trunk") if isinstance(row.get("trunk"), str) else None,
        "tokens_trained": _whole_or_none(row.get("tokens_trained")),
    }


def to_row(run_id: str, config: dict, result: dict | None = None, counts: dict | None = None,
           spec_id: str | None = None) -> dict:
    """One run-table row (keys `NAMES`, in order) from a run's config, result and counts."""
    row = dict.fromkeys(NAMES)
    row.update(run_id=run_id, status="pending", spec_id=spec_id)
    row.update(config_fields(config, counts))
    if result is not None:
        for key, value in result_fields(result).items():
            if value is not None or key not in ("N", "N_active", "N_total"):
                row[key] = value
    if row["N_active"] is None:
        row["N_active"] = row["N"]
    return row


def describe() -> str:
    """The columns as a short text table (for `steplaw runs --columns` and the docs)."""
    width = max(len(c.name) for c in COLUMNS)
    return "\n".join(f"{c.name.ljust(width)}  {(c.unit or '-').ljust(10)}  {c.description}" for c in COLUMNS) + "\n"


def rows_to_csv(rows: list[dict]) -> str:
    """Rows as CSV with the run-table columns (floats written to round-trip exactly)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(NAMES)
    for row in rows:
        writer.writerow(["" if row.get(k) is None else (repr(row[k]) if isinstance(row[k], float) else row[k])
                         for k in NAMES])
    return buffer.getvalue()


def rows_to_json(rows: list[dict]) -> str:
    return json.dumps([{k: row.get(k) for k in NAMES} for row in rows], indent=1)
