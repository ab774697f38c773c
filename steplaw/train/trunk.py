"""Trunk planning and the trunk's directory, shared by steplaw.train.branch (a trunk of
one lr) and steplaw.train.branch_stack (a stacked trunk of several): which runs share a
trunk (`trunk_key`, `plan_trunks`), their branch points, the trunk's id, a checkpoint's
estimated size, and `TrunkDir`, whose files are written durably (temporary file, fsync,
rename, directory fsync). See steplaw.train.branch for the whole story.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from steplaw.errors import UserError
from steplaw.fileio import fsync_dir, write_atomic
from steplaw.models.accounting import param_counts
from steplaw.optim.schedule import check_branching
from steplaw.train import checkpoint as ckpt
from steplaw.train.config import RunConfig, RunResult
from steplaw.train.runner import TrainState, failure_reason, plan_steps
from steplaw.trial import trunk_id as run_ids_trunk_id

MANIFEST = "trunk.json"
MAX_CHECKPOINTS = 2  # on disk at once: the last durable one and the one being written
OnResult = Callable[[RunConfig, RunResult], None]


def trunk_key(config: RunConfig) -> str:
    """Runs with equal keys share a trunk: the whole config but the token budget."""
    fields = config.to_dict()
    fields.pop("tokens")
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def trunk_id(configs: list[RunConfig]) -> str:
    """16 hex digits naming the trunk of these runs (a hash of their run ids)."""
    return run_ids_trunk_id(c.run_id() for c in configs)


def branches(config: RunConfig) -> bool:
    """Whether `config` may branch off a trunk at all: WSD with an absolute warmup and a
    cooldown fraction in (0, 1) (the rest, e.g. a branch point inside the warmup, is
    checked by `branch_points`)."""
    return config.schedule == "wsd" and config.warmup_tokens is not None and 0 < config.decay_fraction < 1


def plan_trunks(configs: list[RunConfig], stack: bool = False) -> list[list[RunConfig]]:
    """Group `configs` by `trunk_key` (runs that may not branch: groups of one, to run
    alone), in the order in which each key first appears. stack=True: runs that differ in
    lr too share a (stacked) trunk where they form a full lr x budget grid with the
    "steplaw" optimizer; the others fall back to a trunk per lr."""
    groups: dict[str, list[RunConfig]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(trunk_key(config) if branches(config) else f"alone:{i}", []).append(config)
    if not stack:
        return list(groups.values())
    stacked: dict[str, list[RunConfig]] = {}
    for key, group in groups.items():
        fields = json.loads(key) if not key.startswith("alone:") else None
        if fields is not None and fields["optimizer"] == "steplaw":
            fields.pop("lr")
            key = json.dumps(fields, sort_keys=True)
        stacked.setdefault(key, []).extend(group)
    out = []
    position = {id(c): i for i, c in enumerate(configs)}
    for group in stacked.values():
        group.sort(key=lambda c: position[id(c)])  # in the given order
        lrs, budgets = {c.lr for c in group}, {c.tokens for c in group}
        if len(lrs) > 1 and len(group) != len(lrs) * len(budgets):
            out.extend(plan_trunks(group))  # not a full grid: a trunk per lr
        else:
            out.append(group)
    return out


def branch_points(configs: list[RunConfig]) -> list[int]:
    """Each run's branch point (the step its cooldown starts), after checking that the
    runs form one trunk; a UserError in one sentence when they do not."""
    if not configs:
        raise UserError("an empty trunk: expected at least one run")
    first = trunk_key(configs[0])
    seen: dict[int, str] = {}
    for config in configs:
        if trunk_key(config) != first:
            a, b = config.to_dict(), configs[0].to_dict()
            differ = sorted(k for k in a if k != "tokens" and a[k] != b[k])
            raise UserError(f"run {config.run_id()} differs from run {configs[0].run_id()} in {', '.join(differ)}: "
                            "the runs of a trunk may differ only in tokens")
        if config.tokens in seen:
            raise UserError(f"tokens={config.tokens} appears twice in one trunk: expected each budget once")
        seen[config.tokens] = config.run_id()
    points = []
    device = torch.device("cpu")  # the step count does not depend on the device
    for config in configs:
        config.validate()
        plan, warmup = plan_steps(config, device)
        points.append(check_branching(plan.steps, None if config.warmup_tokens is None else warmup,
                                      config.decay_fraction, config.schedule))
    return points


def checkpoint_bytes(config: RunConfig) -> int:
    """Estimated size of one trunk checkpoint: weights and AdamW's two moments in the
    default float dtype, plus the step losses and a margin for pickling."""
    element = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    steps = config.tokens // config.batch_tokens
    return 3 * param_counts(config.model).total * element + 16 * steps + 64 * 1024


# ---------------------------------------------------------------- the trunk directory

class TrunkDir:
    """The files of one trunk (see the module doc), written durably."""

    def __init__(self, path: Path, ident: str, configs: list[RunConfig]):
        self.path, self.ident = path, ident
        path.mkdir(parents=True, exist_ok=True)
        manifest = path / MANIFEST
        self.info = {"trunk": ident, "runs": sorted(c.run_id() for c in configs), "peak_disk_bytes": 0}
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = {}
            if isinstance(old, dict) and old.get("trunk") not in (None, ident):
                raise UserError(f"trunk directory {str(path)!r} holds trunk {old.get('trunk')}, not {ident}: use a new directory")
            if isinstance(old, dict):
                self.info["peak_disk_bytes"] = int(old.get("peak_disk_bytes") or 0)

    def write_info(self, **fields) -> None:
        self.info.update(fields)
        write_atomic(self.path / MANIFEST, json.dumps(self.info, indent=2) + "\n")

    def checkpoints(self) -> dict[int, Path]:
        found = {}
        for p in self.path.glob("trunk-*.pt"):
            try:
                found[int(p.stem.removeprefix("trunk-"))] = p
            except ValueError:
                continue
        return found

    def save_checkpoint(self, state: TrainState, train_s: float) -> Path:
        return self.save_payload(state.step, {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                                              "losses": list(state.tracker.losses), "train_s": train_s})

    def save_payload(self, step: int, payload: dict) -> Path:
        """Write the checkpoint at `step` durably (with the trunk's id, the step and torch's
        RNG state added) and record the disk its checkpoints now use."""
        path = self.path / f"trunk-{step:09d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"trunk": self.ident, "step": step, "rng": ckpt.rng_state(), **payload}, tmp)
        ckpt._sync(tmp)
        os.replace(tmp, path)
        fsync_dir(self.path)
        used = sum(p.stat().st_size for p in self.checkpoints().values())
        if used > self.info["peak_disk_bytes"]:
            self.write_info(peak_disk_bytes=used)
        return path

    def load_checkpoint(self, step: int) -> dict | None:
        """The checkpoint at `step`, or None (a damaged one is set aside with a warning)."""
        path = self.path / f"trunk-{step:09d}.pt"
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            kept = path.with_name(path.name + ".unreadable")
            os.replace(path, kept)
            warnings.warn(f"{path} cannot be read ({failure_reason(exc)}); kept as {kept.name}", stacklevel=2)
            return None
        if not isinstance(saved, dict) or saved.get("trunk") != self.ident or saved.get("step") != step:
            return None
        return saved

    def drop_checkpoints_before(self, step: int) -> None:
        """Delete every checkpoint before `step` (called once a later one is durable and
        every branch of the earlier ones has finished)."""
        for at, path in self.checkpoints().items():
            if at < step:
                path.unlink(missing_ok=True)
        fsync_dir(self.path)

    def result_path(self, config: RunConfig) -> Path:
        return self.path / f"branch-{config.run_id()}.json"

    def load_result(self, config: RunConfig) -> RunResult | None:
        path = self.result_path(config)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("run_id") != config.run_id():
                raise ValueError("not this run's result")
            return RunResult.from_dict(data)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as exc:
            kept = path.with_name(path.name + ".unreadable")
            os.replace(path, kept)
            warnings.warn(f"{path} cannot be read ({exc}); kept as {kept.name}, and the branch trains again", stacklevel=2)
            return None

    def save_result(self, config: RunConfig, result: RunResult) -> None:
        write_atomic(self.result_path(config), ckpt.result_json(result, indent=2) + "\n")


def _check_disk(directory: Path, config: RunConfig, members: int = 1) -> int:
    """Refuse (one sentence) a trunk (of `members` stacked runs) whose checkpoints would
    not fit the free disk; the bytes they may take."""
    one = members * checkpoint_bytes(config)
    need = MAX_CHECKPOINTS * one
    free = shutil.disk_usage(directory).free
    if need > free:
        raise UserError(f"the trunk's checkpoints need about {need / 2**20:.1f} MiB ({MAX_CHECKPOINTS} of "
                        f"{one / 2**20:.1f} MiB) but {str(directory)!r} has {free / 2**20:.1f} MiB free")
    return need
