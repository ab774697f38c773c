"""Plans you can score later: `steplaw plan ... --save PLAN.json` pre-registers a prediction,
`steplaw score PLAN.json --loss L | --runs TABLE` says how far the outcome fell from it.

A plan file is one JSON object, "kind": "steplaw.plan", "version": PLAN_VERSION, holding the
prediction (N, D, peak LR, batch, predicted loss with its interval), the laws used (their
keys, and for law files their SHA-256, so a later edit of a law file shows), the assumptions
(schedule, N convention, the warnings: extrapolation among them) and the UTC date.

Scoring: rel_error = observed / predicted - 1; inside_interval = the observed loss lies in
the plan's 95% interval (None when the plan has none: published loss laws give none); with
--lr / --batch-tokens the ratio of what was run to what was planned.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import numpy as np

from steplaw.errors import UserError

PLAN_KIND = "steplaw.plan"
PLAN_VERSION = 1
MATCH_TOLERANCE = 0.10  # a run scores a plan when its N and D are within 10% of the plan's


def _file_hash(key: str) -> str | None:
    path = Path(key)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def plan_record(plan: dict) -> dict:
    """The plan file's object for a plan from steplaw.laws.plan.make_plan."""
    laws = {}
    for role in ("loss_law", "hparam_law"):
        info = plan[role]
        laws[role] = {"key": info["key"], "name": info.get("name", ""), "sha256": _file_hash(info["key"])}
    return {
        "kind": PLAN_KIND, "version": PLAN_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "prediction": {key: plan[key] for key in ("mode", "N", "D", "compute", "lr", "batch_tokens", "seq_len",
                                                  "predicted_loss", "predicted_loss_interval", "N_interval",
                                                  "D_interval")},
        "laws": laws,
        "assumptions": {"schedule": plan.get("schedule", ""),
                        "n_column": plan["loss_law"].get("n_column", "N (all parameters, embeddings included)"),
                        "warnings": list(plan.get("warnings", [])), "notes": list(plan.get("notes", []))},
    }


def read_plan(path) -> dict:
    """A plan file; a UserError in one sentence when it is none or from another version."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no plan file {str(path)!r}; expected a JSON file written by `steplaw plan --save`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{str(path)!r} is not a JSON plan file ({exc}).") from None
    if not isinstance(data, dict) or data.get("kind") != PLAN_KIND:
        kind = data.get("kind") if isinstance(data, dict) else None
        raise UserError(f"{str(path)!r} is not a steplaw plan file (kind {kind!r}); expected one written by "
                        "`steplaw plan --save`.")
    if data.get("version") != PLAN_VERSION:
        raise UserError(f"{str(path)!r} is a plan file of version {data.get('version')!r}; this steplaw reads "
                        f"version {PLAN_VERSION}.")
    prediction = data.get("prediction")
    if not isinstance(prediction, dict) or not isinstance(prediction.get("predicted_loss"), (int, float)):
        raise UserError(f"{str(path)!r} is a damaged plan file (no predicted_loss).")
    return data


def _check_positive(name: str, value) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
        raise UserError(f"{name} {value!r} must be a positive finite number.")
    return float(value)


def score_plan(plan: dict, loss: float, lr: float | None = None, batch_tokens: float | None = None) -> dict:
    """How far an observed final loss (and the LR / batch it ran with) fell from the plan."""
    loss = _check_positive("--loss", loss)
    lr, batch_tokens = _check_positive("--lr", lr), _check_positive("--batch-tokens", batch_tokens)
    prediction = plan["prediction"]
    predicted = float(prediction["predicted_loss"])
    interval = prediction.get("predicted_loss_interval")
    out = {"loss": loss, "predicted_loss": predicted, "rel_error": loss / predicted - 1,
           "interval": interval, "inside_interval": (bool(interval[0] <= loss <= interval[1]) if interval else None)}
    for key, value in (("lr", lr), ("batch_tokens", batch_tokens)):
        planned = prediction.get(key)
        if value is not None:
            out[f"{key}_ratio"] = value / planned if planned else None
            out[key] = value
    return out


def score_runs(plan: dict, table) -> dict:
    """Score the plan on the best finished run of `table` at the plan's N and D (each within
    MATCH_TOLERANCE), with that run's LR and batch."""
    prediction = plan["prediction"]
    n, d = float(prediction["N"]), float(prediction["D"])
    valid = table.valid & (np.abs(table.N / n - 1) <= MATCH_TOLERANCE) & (np.abs(table.D / d - 1) <= MATCH_TOLERANCE)
    if not valid.any():
        finished = np.flatnonzero(table.valid)
        near = ""
        if finished.size:
            index = finished[np.argmin(np.abs(np.log(table.N[finished] / n)) + np.abs(np.log(table.D[finished] / d)))]
            near = f"; the nearest finished run has N = {table.N[index]:.4g}, D = {table.D[index]:.4g}"
        raise UserError(f"{table.source} has no finished run within {MATCH_TOLERANCE:.0%} of the plan's "
                        f"N = {n:.4g} and D = {d:.4g}{near}.")
    index = np.flatnonzero(valid)[np.argmin(table.loss[valid])]
    lr = float(table.lr[index]) if np.isfinite(table.lr[index]) else None
    bs = float(table.batch_tokens[index]) if np.isfinite(table.batch_tokens[index]) else None
    out = score_plan(plan, float(table.loss[index]), lr, bs)
    out["run"] = {"run_id": str(table.run_id[index]), "N": float(table.N[index]), "D": float(table.D[index]),
                  "runs_matched": int(valid.sum())}
    return out


def score_lines(plan: dict, score: dict) -> list[str]:
    p = plan["prediction"]
    span = (f", 95% interval {score['interval'][0]:.4f} to {score['interval'][1]:.4f}: "
            f"{'inside' if score['inside_interval'] else 'OUTSIDE'}") if score["interval"] else ", no interval"
    lines = [f"plan of {plan.get('created', '?')}: N = {p['N']:.4g}, D = {p['D']:.4g}, predicted loss "
             f"{score['predicted_loss']:.4f}",
             f"  observed {score['loss']:.4f}: rel_error {score['rel_error']:+.2%}{span}"]
    for key, word in (("lr", "peak LR"), ("batch_tokens", "batch")):
        if score.get(f"{key}_ratio") is not None:
            lines.append(f"  {word} run {score[key]:.4g} = {score[f'{key}_ratio']:.3f} x planned {p[key]:.4g}")
    if "run" in score:
        lines.append(f"  scored on run {score['run']['run_id']} (N = {score['run']['N']:.4g}, "
                     f"D = {score['run']['D']:.4g}; best of {score['run']['runs_matched']} matching run(s))")
    return lines
