"""Checkpoints and results of a run in its directory.

checkpoint.pt: model and optimizer state, the step reached (which is the data position:
a step's batch depends only on (seed, step)), the step losses so far, torch's RNG
states, and the time spent. Written to a temporary file and renamed, so a run killed
while saving keeps its previous checkpoint (fsync before the rename: a power loss too). result.json: the RunResult once finished.
Both carry the run id; files of another run are ignored (a checkpoint) or refused (a
result, which would otherwise be overwritten). A file damaged on disk is renamed to
NAME.unreadable with a warning, and the run starts over.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import torch

from steplaw.errors import UserError
from steplaw.fileio import write_atomic
from steplaw.train.config import RunResult

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, run_id: str, model, optimizer, step: int, losses: list[float], wall_s: float, train_s: float) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    torch.save(
        {
            "run_id": run_id,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "losses": list(losses),
            "rng": rng_state(),
            "wall_s": wall_s,
            "train_s": train_s,
        },
        tmp,
    )
    _sync(tmp)
    os.replace(tmp, path)
    return path


def _sync(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place, so that a crash
    leaves either the old file or the whole new one."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _set_aside(path: Path, reason: str) -> None:
    """Keep an unreadable file under another name (nothing is deleted) and say so."""
    kept = path.with_name(path.name + ".unreadable")
    os.replace(path, kept)
    warnings.warn(f"{path} cannot be read ({reason}); kept as {kept.name}, and the run starts over", stacklevel=3)


def load_checkpoint(run_dir: Path, run_id: str, device: torch.device) -> dict | None:
    """The checkpoint of this run in run_dir, or None if there is none (or another run's).
    An unreadable one (damaged on disk) is set aside with a warning: the run starts over."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        _set_aside(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    if not isinstance(state, dict) or state.get("run_id") != run_id:
        return None
    state["rng"]["torch"] = state["rng"]["torch"].cpu()
    return state


def load_result(run_dir: Path, run_id: str) -> RunResult | None:
    """The finished result of this run in run_dir, if there is one. An unreadable one
    is set aside with a warning (the run trains again); another run's is refused."""
    path = run_dir / RESULT
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _set_aside(path, f"not JSON: {exc}")
        return None
    if not isinstance(data, dict):
        _set_aside(path, "not a JSON object")
        return None
    if data.get("run_id") != run_id:
        raise UserError(f"run directory {str(run_dir)!r} holds the result of another run ({data.get('run_id')}): use a new directory")
    return RunResult.from_dict(data)


def result_json(result: RunResult, indent: int | None = None) -> str:
    """A RunResult as strict JSON: the runner stores no NaN or infinity (None instead),
    and allow_nan=False makes a slip raise here rather than write what JSON readers refuse."""
    return json.dumps(result.to_dict(), indent=indent, allow_nan=False)


def save_result(run_dir: Path, result: RunResult) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = write_atomic(run_dir / RESULT, result_json(result, indent=2) + "\n")
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():
        checkpoint.unlink()  # finished: the result replaces it
    return path
