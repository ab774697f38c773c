"""The trial contract: what a sweep hands any trainer, and what the trainer hands back.

Version 1 (`CONTRACT_VERSION`). A trial is plain data under the run table's names
(steplaw.runtable), written as JSON for a command trainer (`{trial_json}`):

    run_id, run_dir      where this run's files go (run_dir exists and is the trainer's)
    model, args          the model's name and its own table from the spec, untouched
    N, N_active          parameters as the run table counts them (non-embedding; activated
                         per token for MoE, = N for dense), as the user gave them
    D                    training tokens
    lr                   peak learning rate of the schedule
    batch_tokens, batch_seqs, seq_len
                         tokens per optimizer step, the same in sequences, sequence length
    schedule, warmup_tokens, min_lr_ratio, decay_fraction
                         "cosine" / "wsd" / "constant", linear warmup over warmup_tokens,
                         decay to min_lr_ratio x lr (WSD: over the last decay_fraction)
    seed, objective      the run's seed; the loss column the sweep minimises
    trainer, settings    which trainer; the spec's other fixed settings (data, ...)
    contract             this version

The result a trainer returns (a dict, or result.json in run_dir):

    loss                 final training loss (required unless status is not "ok")
    val_loss, status ("ok" / "diverged" / "failed"), reason, tokens, steps, wall_s,
    curve [[tokens, loss], ...]      all optional
    trunk, tokens_trained            a branch of a trunk (steplaw.trainers: "branch"): the
                                     trunk's id (16 hex) and the tokens this result trained

`parse_result` checks a result and turns it into the fields the sweep stores; anything
wrong (malformed JSON, a NaN or negative loss, "ok" without a loss) becomes a failed
result whose reason says what was wrong, never an exception. A trial's run id is a hash
of the trial without run_id and run_dir, so the same trial is the same run everywhere.
This module is neutral: no torch, no training code; the sweep and every trainer use it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

CONTRACT_VERSION = 1
STATUSES = ("ok", "diverged", "failed")
RESULT_NAME = "result.json"
PROGRESS_NAME = "progress.jsonl"
TRIAL_NAME = "trial.json"
# A reported loss above this factor x the first reported loss, or not finite, is a
# divergence: the same factor as steplaw's own trainer (steplaw.train.tracking).
DIVERGENCE_FACTOR = 1.5


@dataclass(frozen=True)
class Trial:
    model: str
    N: int
    D: int
    lr: float
    batch_tokens: int
    seq_len: int
    args: dict = field(default_factory=dict)
    N_active: int | None = None
    schedule: str = "cosine"
    warmup_tokens: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    seed: int = 0
    objective: str = "loss"
    trainer: str = "command"
    settings: dict = field(default_factory=dict)
    contract: int = CONTRACT_VERSION

    @property
    def batch_seqs(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def tokens(self) -> int:  # the name the sweep's cost and budget use for D
        return self.D

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["batch_seqs"] = self.batch_seqs
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Trial:
        known = {f.name for f in dataclasses.fields(cls)}  # run_id, run_dir, batch_seqs: derived
        return cls(**{k: v for k, v in data.items() if k in known})

    def run_id(self) -> str:
        """16 hex digits of a hash of the trial (its run_id and run_dir are not part of it)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def placed(self, run_dir: str | None) -> dict:
        """The whole trial as a trainer gets it (a dict: the JSON of {trial_json})."""
        return {**self.to_dict(), "run_id": self.run_id(), "run_dir": run_dir}

    def counts(self) -> dict:
        """The run table's parameter counts ({"non_embedding", "active", "total"})."""
        return {"non_embedding": self.N, "active": self.N_active if self.N_active is not None else self.N, "total": None}

    def problems(self) -> list[str]:
        """One sentence per mistake (empty when the trial can run)."""
        found = []
        for name in ("N", "D", "batch_tokens", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                found.append(f"{name}={value!r}: expected a whole number >= 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            found.append(f"lr={self.lr!r}: expected a finite number above 0")
        if found:
            return found
        if self.batch_tokens % self.seq_len:
            found.append(f"batch_tokens={self.batch_tokens} is not a multiple of seq_len={self.seq_len}")
        if self.D < self.batch_tokens:
            found.append(f"D={self.D} is less than one batch of batch_tokens={self.batch_tokens}")
        return found


def trunk_id(run_ids) -> str:
    """16 hex digits naming the trunk of these runs: a hash of their run ids (the name of
    the trunk's directory under SWEEP/trunks/ and its results' `trunk` for steplaw's own
    trainer; the sweep and steplaw.train.trunk both call this one)."""
    ids = ",".join(sorted(run_ids))
    return hashlib.sha256(f"trunk:{ids}".encode()).hexdigest()[:16]


def parse_result(data, where: str = "the trainer") -> dict:
    """A trainer's result (a dict under the contract's names) as the sweep's result fields
    (status, reason, final_train_loss, final_val_loss, tokens, steps, wall_s, curve). A
    result that breaks the contract is a failed one saying why."""
    if not isinstance(data, dict):
        return failed(f"{where} returned {type(data).__name__}: expected a result table with 'loss'")
    status = data.get("status", "ok")
    if status not in STATUSES:
        return failed(f"{where} returned status {status!r}: expected one of {', '.join(STATUSES)}")
    reason = data.get("reason")
    reason = None if reason is None else str(reason)
    loss, problem = _loss(data, "loss", required=status == "ok", where=where)
    val_loss, val_problem = _loss(data, "val_loss", required=False, where=where)
    if problem or val_problem:
        return failed(problem or val_problem)
    if status != "ok" and not reason:
        reason = f"{where} reported status {status!r} without a reason"
    curve = []
    for point in data.get("curve") or []:
        if isinstance(point, (list, tuple)) and len(point) == 2 and all(_number(v) for v in point):
            curve.append((int(point[0]), float(point[1])))
    out = {"status": status, "reason": reason, "final_train_loss": loss, "final_val_loss": val_loss, "curve": curve}
    for name in ("tokens", "steps"):
        if _number(data.get(name)) and data[name] >= 0:
            out[name] = int(data[name])
    if _number(data.get("wall_s")) and data["wall_s"] >= 0:
        out["wall_s"] = float(data["wall_s"])
    # A branch of a trunk (a trainer with the "branch" capability): which trunk, and the
    # tokens this result trained (its cooldown; the longest run also the stable phase).
    trunk = data.get("trunk")
    if isinstance(trunk, str) and len(trunk) == 16 and all(c in "0123456789abcdef" for c in trunk):
        out["trunk"] = trunk
    if _number(data.get("tokens_trained")) and data["tokens_trained"] >= 0:
        out["tokens_trained"] = int(data["tokens_trained"])
    return out


def read_result(path, where: str = "the trainer") -> dict:
    """parse_result of a result.json; a missing, unreadable or malformed file is failed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return failed(f"{where} wrote no {RESULT_NAME}")
    except (OSError, UnicodeDecodeError) as exc:
        return failed(f"{where}'s {RESULT_NAME} cannot be read ({exc})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return failed(f"{where}'s {RESULT_NAME} is not JSON ({exc.msg} at line {exc.lineno}): expected a table with 'loss'")
    return parse_result(data, where)


def failed(reason: str) -> dict:
    return {"status": "failed", "reason": reason}


def diverging(first: float | None, loss) -> str | None:
    """Why a run reporting `loss` (after a first reported loss `first`) has diverged, or None."""
    if not _number(loss):
        return f"reported loss {loss!r} is not a finite number"
    if first is not None and loss > DIVERGENCE_FACTOR * first:
        return f"reported loss {loss:.4g} rose above {DIVERGENCE_FACTOR} x the first reported loss {first:.4g}"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _loss(data: dict, name: str, required: bool, where: str):
    value = data.get(name)
    if value is None:
        return None, (f"{where} reported status 'ok' with no {name!r}: expected the final loss" if required else None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"{where} reported {name}={value!r}: expected a finite number"
    if value < 0:
        return None, f"{where} reported {name}={value!r}: expected a loss >= 0 (nats per token)"
    return float(value), None
