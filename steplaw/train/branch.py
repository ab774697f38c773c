"""WSD trunks: runs that differ only in their token budget D train their stable phase once.

A WSD run of S steps is at the peak LR from its warmup's end to its branch point, the
first step of its cooldown (steplaw.optim.schedule.wsd_branch_point: S - round(f * S)).
Runs with the same model, lr, batch, seed (so data order: a step's batch depends only on
(seed, step)), warmup_tokens, decay fraction and shape share every step before their own
branch points. `train_trunk` trains that stable phase once, as the trunk; at each run's
branch point it writes a durable checkpoint (weights, optimizer state, step = data
position, step losses, RNG state) and trains that run's cooldown from it to its own D.
Each result is the run's result alone to the last bit on a CPU: the same ops in the same
order on the same machine (the trunk's LR at each step is the run's own float, its
batches are the run's, and a checkpoint restores exactly, as a resumed run does).

    from steplaw.train.branch import plan_trunks, train_trunk
    for group in plan_trunks(configs):           # lists of configs, one trunk each (or alone)
        results = train_trunk(group, trunk_dir, done={run ids already stored},
                              on_result=lambda config, result: store(config, result))

train_trunk(configs, trunk_dir, done=(), on_result=None, progress=None, checkpoint_every=None)
  configs: RunConfigs equal but for `tokens` (`trunk_key`), schedule "wsd", warmup_tokens
    set, 0 < decay_fraction < 1, every branch point after the warmup; any other input is
    refused in one sentence (UserError) before anything trains.
  trunk_dir: the trunk's own directory (e.g. SWEEP/trunks/<trunk_id>): trunk.json (its id,
    runs and disk figures), trunk-<step>.pt checkpoints, branch-<run_id>.json results.
  done: run ids not to train (finished elsewhere, e.g. in the sweep's store).
  on_result(config, result): called as each run finishes (its result already durable in
    trunk_dir), shortest first, so a caller can store it before the trunk goes on.
  Returns one RunResult per config, in order (None for a run in `done`).

Tokens trained (`RunResult.tokens_trained`): the longest run trained in a call is charged
the whole trunk (its stable phase) and its own cooldown, so its tokens_trained is its
`tokens`, as alone; every shorter run is charged its cooldown only. The sum over a
trunk's results is the tokens it trained (recomputation after a crash is not counted, as
for a resumed run alone). `wall_s` follows the same split. `trunk` names the trunk
(`trunk_id`, 16 hex digits).

Crash safety: checkpoints and results are written to a temporary file, fsynced, renamed
and the directory fsynced. A killed trunk, called again with the same directory, loads
the finished branches' results (never retrained) and resumes from its last checkpoint at
or before the next branch point. Branches run in branch-point order as the trunk reaches
them, so a checkpoint is deleted once a later one is durable and its branch has finished:
at most 2 checkpoints are on disk at once (the last durable one and the one being
written), also with `checkpoint_every`, which writes one every that many trunk steps too. `checkpoint_bytes` estimates one before the trunk
starts and a trunk that would not fit the free disk is refused; trunk.json records the
estimate and the largest disk use seen.

A divergence in the stable phase (the run alone's rule, steplaw.train.tracking) ends every
run not yet branched as diverged at that step, as each would alone. One process only
(no torchrun); the optimizer may be "steplaw" or "torch".
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from steplaw.errors import UserError
from steplaw.train import checkpoint as ckpt
from steplaw.train.config import RunConfig, RunResult
from steplaw.train.runner import (
    LoopOptions,
    Setup,
    TrainState,
    _Distributed,
    build_state,
    failure_reason,
    mean_moe_load,
    new_result,
    plan_steps,
    prepare,
    record_training,
    train_and_evaluate,
    train_loop,
)
from steplaw.train.tracking import LossTracker, ProgressFn
from steplaw.train.trunk import (  # noqa: F401  (the API of trunks is here: see the module doc)
    MAX_CHECKPOINTS,
    OnResult,
    TrunkDir,
    _check_disk,
    branch_points,
    branches,
    checkpoint_bytes,
    plan_trunks,
    trunk_id,
    trunk_key,
)

# ---------------------------------------------------------------- training

@dataclasses.dataclass
class _Branch:
    config: RunConfig
    point: int  # its branch point (step)
    setup: Setup | None = None


def train_trunk(
    configs: list[RunConfig],
    trunk_dir: str | Path,
    done: set[str] | frozenset[str] = frozenset(),
    on_result: OnResult | None = None,
    progress: bool | ProgressFn | None = None,
    checkpoint_every: int | None = None,
) -> list[RunResult | None]:
    """Train `configs` as one trunk with a cooldown branch per run (see the module doc).
    Runs of several lrs (every lr at every budget) train as a stacked trunk
    (steplaw.train.branch_stack), without `checkpoint_every`."""
    configs = list(configs)
    if len({c.lr for c in configs}) > 1:
        if checkpoint_every is not None:
            raise UserError("checkpoint_every: a stacked trunk checkpoints at its branch points only")
        from steplaw.train.branch_stack import train_stacked_trunk  # a stacked trunk builds on the stacks

        return train_stacked_trunk(configs, trunk_dir, done, on_result, progress)
    points = branch_points(configs)
    if _Distributed().active:
        raise UserError("a trunk trains in one process: run it without torchrun")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise UserError(f"checkpoint_every={checkpoint_every!r}: expected a positive number of steps")
    ident = trunk_id(configs)
    folder = TrunkDir(Path(trunk_dir), ident, configs)
    results: list[RunResult | None] = [None] * len(configs)
    todo = []
    for i, (config, point) in enumerate(zip(configs, points)):
        if config.run_id() in done:
            continue
        results[i] = folder.load_result(config)
        if results[i] is None:
            todo.append((point, i))
    if not todo:
        return results
    todo.sort()
    longest = configs[todo[-1][1]]
    need = _check_disk(folder.path, longest)
    folder.write_info(checkpoint_bytes_estimate=need // MAX_CHECKPOINTS, max_checkpoints=MAX_CHECKPOINTS)
    setup = prepare(longest)  # validated, data loaded: every branch reads it
    runs = [_Branch(configs[i], point, dataclasses.replace(setup, config=configs[i], plan=plan_steps(configs[i], setup.device)[0]))
            for point, i in todo]
    for (_, i), result in zip(todo, _train(folder, setup, runs, on_result, progress, checkpoint_every)):
        results[i] = result
    return results


def _resume(folder: TrunkDir, setup: Setup, first_point: int) -> tuple[TrainState, float]:
    """The trunk's state at its last checkpoint at or before `first_point` (from the
    seed's initialisation when there is none) and the training seconds it had taken."""
    dist = _Distributed()
    state = build_state(setup, None, dist)
    for step in sorted((s for s in folder.checkpoints() if s <= first_point), reverse=True):
        saved = folder.load_checkpoint(step)
        if saved is not None:
            _restore(state, saved)
            return state, saved["train_s"]
    return state, 0.0


def _restore(state: TrainState, saved: dict) -> None:
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    ckpt.restore_rng(saved["rng"])
    state.tracker = LossTracker(list(saved["losses"]))
    state.step = saved["step"]


def _options(progress, stop: int | None) -> LoopOptions:
    return LoopOptions(run_path=None, checkpoint_every=None, stop_after_steps=stop, progress=progress,
                       started=time.perf_counter())


def _train(folder: TrunkDir, setup: Setup, runs: list[_Branch], on_result, progress, every) -> list[RunResult]:
    """The trunk to each branch point in turn, a checkpoint there, and the branch from it."""
    started = time.perf_counter()
    dist = _Distributed()
    trunk, trunk_train_s = _resume(folder, setup, runs[0].point)
    out: list[RunResult] = []
    others_s = 0.0  # wall seconds of the shorter branches (the rest is the longest run's)
    for index, branch in enumerate(runs):
        while trunk.step < branch.point:  # the stable phase, in segments of `every` steps
            stop = branch.point if every is None else min(branch.point, (trunk.step // every + 1) * every)
            t0 = time.perf_counter()
            try:
                outcome = train_loop(setup, trunk, dist, _options(progress, stop))
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # not stored: a rerun resumes the trunk
                for rest in runs[index:]:
                    result = new_result(rest.config)
                    result.status, result.reason, result.trunk = "failed", failure_reason(exc), folder.ident
                    out.append(result)
                    if on_result is not None:
                        on_result(rest.config, result)
                return out
            trunk_train_s += time.perf_counter() - t0
            if outcome.status == "diverged":  # every run not yet branched diverges here, as alone
                for rest in runs[index:]:
                    last = rest is runs[-1]
                    result = _diverged(rest, trunk, outcome, folder.ident, last)
                    result.wall_s = time.perf_counter() - started - others_s if last else 0.0
                    _finish(folder, rest.config, result, on_result, out)
                return out
            folder.save_checkpoint(trunk, trunk_train_s)
            # The earlier checkpoints' branches have finished (they ran as the trunk passed).
            folder.drop_checkpoints_before(trunk.step)
        t0 = time.perf_counter()
        result = _cooldown(folder, branch)
        result.trunk, seconds = folder.ident, time.perf_counter() - t0
        train_s = seconds
        if branch is runs[-1]:  # charged the whole stable phase (module doc): its tokens_trained is its tokens
            result.wall_s = time.perf_counter() - started - others_s
            train_s += trunk_train_s
        else:
            result.tokens_trained = result.tokens - branch.point * setup.plan.batch_tokens
            result.wall_s = seconds
            others_s += seconds
        result.tokens_per_s = result.tokens_trained / train_s if train_s > 0 else None
        _finish(folder, branch.config, result, on_result, out)
    folder.drop_checkpoints_before(runs[-1].point + 1)
    return out


def _finish(folder: TrunkDir, config: RunConfig, result: RunResult, on_result, out: list) -> None:
    folder.save_result(config, result)  # durable before anyone hears of it
    out.append(result)
    if on_result is not None:
        on_result(config, result)


def _diverged(branch: _Branch, trunk: TrainState, outcome, ident: str, last: bool) -> RunResult:
    """The result of a run whose stable phase diverged: its result alone (which stops at
    the same step, with the same reason)."""
    result = new_result(branch.config)
    result.status, result.reason, result.trunk = "diverged", outcome.reason, ident
    record_training(result, trunk.tracker, outcome.steps, branch.setup.plan, outcome.train_s)
    result.moe_max_mean_load = mean_moe_load(trunk.model.moe_layers())
    result.tokens_trained = result.tokens if last else 0
    return result


def _cooldown(folder: TrunkDir, branch: _Branch) -> RunResult:
    """Branch `branch` off the trunk at its branch point: a fresh model and optimizer
    restored from the durable checkpoint there (exactly as a resumed run alone), trained
    to the run's own last step and evaluated. The trunk's RNG state is put back after."""
    saved = folder.load_checkpoint(branch.point)
    if saved is None:
        raise RuntimeError(f"the trunk's checkpoint at step {branch.point} could not be read back")
    dist = _Distributed()
    setup = branch.setup
    result = new_result(branch.config)
    state = build_state(setup, None, dist)
    _restore(state, saved)
    try:
        train_and_evaluate(setup, state, dist, _options(None, None), result)
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        result.status, result.reason = "failed", failure_reason(exc)
    ckpt.restore_rng(saved["rng"])  # the trunk goes on as if the branch had not drawn from it
    return result
