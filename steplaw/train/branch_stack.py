"""Stacked WSD trunks: K learning rates x M token budgets as one trunk of K members.

The K members (steplaw.train.stacked: one model with a member dimension, per-member
learning rates) train their stable phase together; at each budget's branch point one
durable checkpoint holds the stacked weights and optimizer state, and the budget's K
cooldowns train as one stack from it (`stack_loop`, each member to its own last step and
evaluated there). Every run's result is its result alone, to the last bit on a CPU (the
stack's own guarantee, steplaw.train.stacked, composed with the trunk's, steplaw.train.branch).

    train_stacked_trunk(configs, trunk_dir, done=(), on_result=None, progress=None)

takes runs equal but for lr and tokens, every lr at every budget (a full grid), and
returns their RunResults in order (None for a run in `done`). Directory, crash safety,
disk bound and `tokens_trained` are those of steplaw.train.branch, per learning rate: the
longest run of each lr is charged its member's stable phase. A member whose stable phase
diverges leaves the trunk (as it would leave a stack), its runs diverged as alone.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from steplaw.errors import UserError
from steplaw.runtable import finite_or_none
from steplaw.train import checkpoint as ckpt
from steplaw.train.config import RunConfig, RunResult
from steplaw.train.runner import new_result, prepare, record_training
from steplaw.train.stacked import _check_stack, _member_step, build_stack, drop_frozen, member_setup, stack_loop, stack_step
from steplaw.train.tracking import LossTracker, ProgressFn, ProgressReporter
from steplaw.train.trunk import MAX_CHECKPOINTS, OnResult, TrunkDir, _check_disk, branch_points, trunk_id


def _grid(configs: list[RunConfig]) -> tuple[list[float], list[int], dict[tuple[float, int], int]]:
    """The distinct lrs and budgets, and each (lr, tokens)'s index; refuses a partial grid."""
    lrs, budgets = sorted({c.lr for c in configs}), sorted({c.tokens for c in configs})
    index = {(c.lr, c.tokens): i for i, c in enumerate(configs)}
    if len(index) != len(configs):
        raise UserError("a run appears twice in one stacked trunk: expected each (lr, tokens) once")
    if len(index) != len(lrs) * len(budgets):
        raise UserError(f"a stacked trunk needs every lr at every budget ({len(lrs)} lrs x {len(budgets)} budgets), "
                        f"got {len(configs)} runs: train the others as trunks of their own")
    return lrs, budgets, index


def train_stacked_trunk(
    configs: list[RunConfig],
    trunk_dir: str | Path,
    done: set[str] | frozenset[str] = frozenset(),
    on_result: OnResult | None = None,
    progress: bool | ProgressFn | None = None,
) -> list[RunResult | None]:
    configs = list(configs)
    lrs, budgets, index = _grid(configs)
    _check_stack(configs)
    by_lr = {lr: [configs[index[lr, d]] for d in budgets] for lr in lrs}
    points = branch_points(by_lr[lrs[0]])  # the same for every lr: only lr differs
    for lr in lrs[1:]:
        branch_points(by_lr[lr])
    folder = TrunkDir(Path(trunk_dir), trunk_id(configs), configs)
    results: list[RunResult | None] = [None] * len(configs)
    for i, config in enumerate(configs):
        if config.run_id() not in done:
            results[i] = folder.load_result(config)
    todo = {i for i, c in enumerate(configs) if c.run_id() not in done and results[i] is None}
    if not todo:
        return results
    need = _check_disk(folder.path, by_lr[lrs[0]][-1], len(lrs))
    folder.write_info(checkpoint_bytes_estimate=need // MAX_CHECKPOINTS, max_checkpoints=MAX_CHECKPOINTS)
    trunk = _Trunk(folder, configs, index, lrs, budgets, points, todo, on_result, progress)
    for i, result in trunk.train().items():
        results[i] = result
    return results


class _Trunk:
    """One stacked trunk being trained: its state at the last branch point reached."""

    def __init__(self, folder, configs, index, lrs, budgets, points, todo, on_result, progress):
        self.folder, self.configs, self.index = folder, configs, index
        self.lrs, self.budgets, self.points, self.todo = lrs, budgets, points, todo
        self.on_result, self.progress = on_result, progress
        self.out: dict[int, RunResult] = {}
        self.longest = {lr: max((i for i in todo if configs[i].lr == lr), key=lambda i: configs[i].tokens, default=None)
                        for lr in lrs}
        self.setup = prepare(configs[index[lrs[0], budgets[-1]]])
        self.train_s = {lr: 0.0 for lr in lrs}

    def needed(self, lr: float, after: int) -> bool:
        """Whether a run of this lr still to train branches at or after budget `after`."""
        return any(self.index[lr, d] in self.todo for d in self.budgets[after:])

    def build(self, lrs: list[float], budget: int, saved: dict | None):
        """A stack of these lrs' runs at `budget`, at `saved`'s state (None: the seed's)."""
        members = [self.configs[self.index[lr, budget]] for lr in lrs]
        setups = [member_setup(self.setup, c) for c in members]
        state = build_stack(setups[-1], members, setups)
        if saved is not None:
            state.model.load_state_dict(saved["model"])
            state.optimizer.load_state_dict(saved["optimizer"])
            ckpt.restore_rng(saved["rng"])
            state.step = saved["step"]
            for member, lr in zip(state.members, lrs):
                member.tracker, member.steps = LossTracker(list(saved["losses"][str(lr)])), saved["step"]
        return state

    def resume(self, first: int):
        """The trunk at its last checkpoint at or before branch point index `first`."""
        for step in sorted((s for s in self.folder.checkpoints() if s <= self.points[first]), reverse=True):
            saved = self.folder.load_checkpoint(step)
            if saved is not None:
                state = self.build([float(lr) for lr in saved["lrs"]], self.budgets[-1], saved)
                for lr, seconds in json.loads(saved["train_s"]).items():
                    self.train_s[float(lr)] = seconds
                return state
        return self.build(self.lrs, self.budgets[-1], None)

    def train(self) -> dict[int, RunResult]:
        first = min(self.budgets.index(self.configs[i].tokens) for i in self.todo)
        trunk = self.resume(first)
        self.leave(trunk, first)
        for j in range(first, len(self.budgets)):
            if not trunk.slots:
                break
            if not self.stable(trunk, j):
                continue
            live = [trunk.members[k].config.lr for k in trunk.slots]
            self.branch(j, [lr for lr in live if self.index[lr, self.budgets[j]] in self.todo])
            self.leave(trunk, j + 1)
        self.folder.drop_checkpoints_before(self.points[-1] + 1)
        return self.out

    def leave(self, trunk, after: int) -> None:
        """Members with nothing left to branch at or after budget index `after` leave."""
        for k in trunk.slots:
            if not self.needed(trunk.members[k].config.lr, after):
                trunk.members[k].finished = True
        drop_frozen(trunk)

    def stable(self, trunk, j: int) -> bool:
        """The trunk to branch point j and a checkpoint there (False: no member left)."""
        point = self.points[j]
        reporter = ProgressReporter(self.progress, trunk.members[trunk.slots[0]].setup.plan)
        t0 = time.perf_counter()
        while trunk.step < point and trunk.slots:
            losses = stack_step(trunk).tolist()
            reporter.step_done()
            for slot, k in enumerate(trunk.slots):
                member = trunk.members[k]
                _member_step(trunk, slot, member, losses[slot], trunk.step)
                if member.status == "diverged":
                    self.diverged(member, j)
            reporter.maybe_report(trunk.step, min(losses))
            drop_frozen(trunk)
        seconds = (time.perf_counter() - t0) / max(1, len(trunk.slots))
        for k in trunk.slots:
            self.train_s[trunk.members[k].config.lr] += seconds
        if not trunk.slots:
            return False
        lrs = [trunk.members[k].config.lr for k in trunk.slots]
        self.folder.save_payload(point, {
            "model": trunk.model.state_dict(), "optimizer": trunk.optimizer.state_dict(), "lrs": lrs,
            "losses": {str(lr): list(trunk.members[k].tracker.losses) for lr, k in zip(lrs, trunk.slots)},
            "train_s": json.dumps({str(lr): s for lr, s in self.train_s.items()})})
        self.folder.drop_checkpoints_before(point)
        return True

    def diverged(self, member, j: int) -> None:
        """A member's stable phase diverged: each of its runs still to train ends so, as alone."""
        for d in self.budgets[j:]:
            i = self.index[member.config.lr, d]
            if i in self.todo:
                result = new_result(self.configs[i])
                result.status, result.reason, result.trunk = "diverged", member.reason, self.folder.ident
                record_training(result, member.tracker, member.steps, member.setup.plan, member.train_s)
                result.moe_max_mean_load = member.moe_load  # of its last training batch, as alone
                result.tokens_trained = result.tokens if i == self.longest[member.config.lr] else 0
                self.finish(i, result)

    def branch(self, j: int, lrs: list[float]) -> None:
        """Budget j's cooldowns of these lrs, as one stack from the checkpoint at its point."""
        if not lrs:
            return
        saved = self.folder.load_checkpoint(self.points[j])
        if saved is None:
            raise RuntimeError(f"the trunk's checkpoint at step {self.points[j]} could not be read back")
        keep = [saved["lrs"].index(lr) for lr in lrs]
        state = self.build([float(lr) for lr in saved["lrs"]], self.budgets[j], saved)
        for slot, member in enumerate(state.members):
            member.finished = slot not in keep
        drop_frozen(state)
        t0 = time.perf_counter()
        stack_loop(state, None)
        ckpt.restore_rng(saved["rng"])  # the trunk goes on as if the branch had not drawn from it
        seconds = time.perf_counter() - t0
        for slot in keep:
            member = state.members[slot]
            i = self.index[member.config.lr, self.budgets[j]]
            result = new_result(member.config)
            result.status, result.reason, result.trunk = member.status, member.reason, self.folder.ident
            record_training(result, member.tracker, member.steps, member.setup.plan, member.train_s)
            result.final_val_loss, result.moe_max_mean_load = finite_or_none(member.val_loss), member.moe_load
            result.wall_s = seconds / len(keep)
            if i == self.longest[member.config.lr]:
                result.wall_s += self.train_s[member.config.lr]
            else:
                result.tokens_trained = result.tokens - self.points[j] * member.setup.plan.batch_tokens
            self.finish(i, result)

    def finish(self, i: int, result: RunResult) -> None:
        self.folder.save_result(self.configs[i], result)
        self.todo.discard(i)
        self.out[i] = result
        if self.on_result is not None:
            self.on_result(self.configs[i], result)

