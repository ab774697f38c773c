"""The sweep driver: the one process that hands runs to an executor and writes the store.

    run_sweep(runs, sweep_dir, make_executor, planner=None) -> SweepSummary

The planner (steplaw.sweep.planner) says which runs the sweep has: the grid's, all at
once, or the adaptive search's, a few at a time as earlier runs finish. The driver asks it
again after each completion, with every stored run (`RunView`); runs it proposes that the
store does not hold are registered `pending` before any of them runs, so an interrupted
batch is found again and finished first.

Order of events for a run, each one SQLite transaction: registered `pending` ->
`running` when handed to a worker -> `ok` / `diverged` / `failed` when its result comes
back. A driver killed at any point leaves at worst some rows `running`; the next driver
(same command) puts them back to pending and runs them, and skips every finished run. A
run is never recorded twice: the row is keyed by run id and a result overwrites only
that row's attempt.

The trainer (steplaw.trainers; chosen by the command line, handed in as `trainer`) is
all the driver knows of what trains the runs: it rebuilds a stored run (`from_dict`),
counts its parameters (`counts`), and what it may do is its `capabilities`.

Stacking (`stack`: "auto", a positive K or "off"): when the trainer declares "stack" and
the executor can train groups (it has a `group_fn`), the runs handed out at one time that
may stack (for steplaw's own trainer: one model shape, differing in lr, token budget
and, for small dense models, batch size) go to one worker slot as one group (the
trainer's `plan_stacks` says how many per group). Only runs ready now are grouped, never held back to wait for more; groups are
halved while workers would otherwise sit idle. A group's members are recorded one by
one like any run: a killed stack leaves them `running`, and the next driver runs them
again.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from steplaw.errors import warn
from steplaw.progress import ProgressLine, format_duration
from steplaw.runtable import result_fields
from steplaw.sweep.planner import GridPlanner, RunView
from steplaw.sweep.store import DriverLock, ResultStore
from steplaw.trial import Trial, trunk_id

PROG = "steplaw sweep"  # the name the driver's warnings go under
STACK_WINDOW = 32  # runs per stack the queue's window allows for under "auto", unless the trainer says


@dataclass
class SweepSummary:
    sweep_dir: Path
    total: int  # runs in this sweep
    counts: dict = field(default_factory=dict)  # status -> runs, over the whole sweep
    ran: int = 0  # attempts made by this invocation
    reused: int = 0  # runs found finished in the store
    wall_s: float = 0.0
    planner: str = "grid"
    cells: list = field(default_factory=list)  # adaptive: one report per cell (AdaptivePlanner.cell_reports)
    stacked: tuple[int, int] = (0, 0)  # (finished runs trained in a stack, stacks), over the whole sweep

    def line(self) -> str:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        runs, stacks = self.stacked
        stacked = f"; {runs} runs trained in {stacks} stacks" if runs else ""
        text = (f"sweep {self.sweep_dir}: {self.total} runs ({parts}); ran {self.ran}, reused {self.reused}, "
                f"{format_duration(self.wall_s)}{stacked}; planner {self.planner}")
        if self.cells:
            states: dict[str, int] = {}
            for cell in self.cells:
                states[cell["state"]] = states.get(cell["state"], 0) + 1
            text += " (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + " cells)"
            for cell in self.cells:
                best = ""
                if cell["best_lr"] is not None:
                    best = f"  best lr {cell['best_lr']:.4g}, batch {cell['best_batch_tokens']:.6g} tokens"
                limits = [side for side, verdict in cell["sides"].items() if verdict == "limit"]
                note = f" (at the hard limit: {', '.join(limits)})" if limits else ""
                text += f"\n  {cell['cell']}: {cell['runs']} runs, {cell['state']}{note}{best}"
        return text


def _counts(config, by_model: dict, trainer) -> dict | None:
    """Parameter counts of a proposed run, counted once per model shape (a large sweep
    proposes thousands of runs of a few shapes)."""
    if hasattr(config, "counts"):  # a trial, or a replayed run: it carries its counts
        return config.counts()
    if trainer is None or not hasattr(trainer, "counts"):
        return None
    model = getattr(config, "model", None)
    if model not in by_model:
        by_model[model] = trainer.counts(config)
    return by_model[model]


def _native(config) -> bool:
    """Whether `config` is the trainer's own run (not a trial, not a replayed row)."""
    return not hasattr(config, "counts")


def run_sweep(runs: list, sweep_dir: str | Path, make_executor, *, max_attempts: int = 2,
              spec: dict | None = None, progress: ProgressLine | bool = True, retry_failed: bool = False,
              planner=None, new_spec: bool = False, stack: str | int = "auto", trainer=None,
              branch: str = "auto") -> SweepSummary:
    """Run the sweep's runs not yet finished in the store of `sweep_dir`.

    `planner` (steplaw.sweep.planner) proposes the runs from the finished ones; None runs
    `runs`, all of them (the grid). `make_executor()` builds the executor (called only when
    there is something to run). Failed runs are tried at most `max_attempts` times over all
    invocations (`retry_failed` grants them `max_attempts` more); diverged runs are results.
    `spec` (a dict) is recorded as the directory's spec (ResultStore.record_spec): one that
    differs from the stored spec is refused unless `new_spec`. `stack`: how runs that
    may stack train together ("auto", at most K per stack, or "off"), when `trainer`
    (steplaw.trainers) declares "stack" and the executor has a `group_fn`. `trainer`
    also rebuilds stored runs of an interrupted batch and counts parameters; None: the
    runs are trials or replayed rows, which carry both. `branch` ("auto" or "off"): with
    "auto" and a trainer that declares "branch", runs that share a WSD trunk (equal but
    in D) train as one unit through its `run_trunk` (see `_trunks`).
    """
    if stack not in ("auto", "off") and "stack" in _capabilities(trainer):  # a bad `stack`: a UserError up front
        trainer.plan_stacks([], stack)
    sweep_dir = Path(sweep_dir)
    started = time.time()
    if planner is None:
        if len({config.run_id() for config in runs}) != len(runs):
            raise ValueError("run_sweep got duplicate configs")
        planner = GridPlanner(runs)
    with DriverLock(sweep_dir), ResultStore(sweep_dir) as store:
        for notice in store.notices:
            warn(notice, PROG)
        spec_id = store.record_spec(spec, allow_change=new_spec) if spec is not None else None
        store.recover_interrupted()
        store.set_meta("planner", planner.name)
        if retry_failed:
            store.reset_failed()
        objective = (spec or {}).get("objective", "loss")
        sweep = _Sweep(store, planner, max_attempts, spec_id, objective, trainer)
        sweep.register(planner.propose(sweep.views))
        summary = SweepSummary(sweep_dir, 0, planner=planner.name)
        summary.reused = sum(1 for view in sweep.views.values() if view.state != "open" and planner.owns(view))
        line = progress if isinstance(progress, ProgressLine) else ProgressLine(0, enabled=bool(progress))
        line.total = sweep.total()
        if sweep.queue():
            _drive(sweep, make_executor(), line, summary, sweep_dir, started, stack, branch)
        owned = sweep.owned_ids()
        summary.total = len(owned)
        summary.counts, summary.stacked = store.outcome_counts(owned)
        summary.cells = planner.cell_reports(sweep.views)
        if summary.cells:
            store.set_meta("planner_cells", summary.cells)
        summary.wall_s = time.time() - started
        line.finish(summary.line())
        return summary


class _Sweep:
    """The driver's view of the store: RunViews for the planner, configs and the queue."""

    def __init__(self, store: ResultStore, planner, max_attempts: int, spec_id: str | None = None,
                 objective: str = "loss", trainer=None):
        self.store, self.planner, self.max_attempts, self.spec_id = store, planner, max_attempts, spec_id
        self.trainer = trainer
        self.objective = objective  # the run-table column the planner sees as a run's loss
        self.by_model: dict = {}
        self.configs: dict[str, object] = {}
        self.costs: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self.views: dict[str, RunView] = {}
        for row in store.rows():
            self.attempts[row["run_id"]] = row["attempts"]
            self.views[row["run_id"]] = self._view(row["run_id"], json.loads(row["config"]), row["status"],
                                                   row[self.objective])
        self.in_flight: set[str] = set()

    def _view(self, run_id: str, config: dict, status: str, loss) -> RunView:
        if status == "failed" and self.attempts.get(run_id, 0) < self.max_attempts:
            status = "open"  # it will be tried again
        elif status not in ("ok", "diverged", "failed"):
            status = "open"
        return RunView(run_id, config, status, loss)

    def register(self, proposals: list) -> int:
        """Store the planner's proposals (new ones as pending); remember their configs."""
        new, counts = [], []
        for config in proposals:
            run_id = config.run_id()
            if run_id in self.configs:
                continue
            self.configs[run_id] = config
            count = _counts(config, self.by_model, self.trainer)
            self.costs[run_id] = _cost(config, count)
            if run_id not in self.views:
                new.append({**config.to_dict(), "run_id": run_id})
                counts.append(count)
        if self.spec_id is not None:
            self.store.adopt(list(self.configs), self.spec_id)
        if new:
            self.store.add_runs(new, counts, spec_id=self.spec_id)
            for entry in new:
                config = {k: v for k, v in entry.items() if k != "run_id"}
                self.views[entry["run_id"]] = self._view(entry["run_id"], config, "pending", None)
        return len(new)

    def owned_ids(self) -> list[str]:
        return [run_id for run_id, view in self.views.items() if self.planner.owns(view)]

    def total(self) -> int:
        return len(self.owned_ids())

    def queue(self) -> list[str]:
        """Open runs of this sweep not in flight; largest first, so that the pool's last
        minutes are not spent waiting on one big run (adaptive: in proposal order)."""
        todo = [run_id for run_id, view in self.views.items()
                if view.state == "open" and run_id not in self.in_flight and self.planner.owns(view)]
        for run_id in todo:
            if run_id not in self.configs:  # an open run of an interrupted batch: rebuild it
                self.configs[run_id] = _config_of(self.views[run_id].config, self.trainer)
                self.costs[run_id] = _cost(self.configs[run_id], _counts(self.configs[run_id], self.by_model, self.trainer))
        if self.planner.name == "grid":
            todo.sort(key=lambda r: -self.costs[r])
        return todo

    def record(self, completions) -> list[str]:
        """Store finished attempts (one transaction) and update the planner's views;
        returns each completion's status."""
        self.store.record_results([(c.run_id, c.result, c.host, c.versions, c.traceback) for c in completions])
        statuses = []
        for completion in completions:
            run_id, result = completion.run_id, completion.result
            self.in_flight.discard(run_id)
            status = result.status if result.status in ("ok", "diverged") else "failed"
            if status == "failed":
                self.attempts[run_id] = self.attempts.get(run_id, 0) + 1
            loss = result_fields(result.to_dict())[self.objective]  # finite or None
            self.views[run_id] = self._view(run_id, self.views[run_id].config, status, loss)
            statuses.append(status)
        return statuses


def _capabilities(trainer) -> tuple:
    return tuple(getattr(trainer, "capabilities", ()) or ())


def _config_of(config: dict, trainer):
    """A stored run's config dict as the run object it was proposed as."""
    if "contract" in config:  # a trial for another trainer (steplaw.trial)
        return Trial.from_dict(config)
    if "replay" in config:
        from steplaw.sweep.replay import ReplayRun

        return ReplayRun.from_dict(config)
    if trainer is None or not hasattr(trainer, "from_dict"):
        raise RuntimeError("the store holds an unfinished run of a trainer's own kind (e.g. steplaw's RunConfig): "
                           "run_sweep needs that trainer (trainer=) to rebuild it")
    return trainer.from_dict(config)


def _cost(config, counts: dict | None) -> float:
    """params x tokens, the driver's measure of a run's work (ETA, largest first)."""
    if isinstance(config, Trial):
        return float(config.N_active or config.N) * config.D
    if not _native(config):
        return 0.0
    return float((counts or {}).get("active") or 0) * getattr(config, "tokens", 0)


def _trunks(sweep: _Sweep, stack="auto") -> dict[str, list[str]]:
    """run id -> the run ids of its trunk, for every run of this sweep that shares one: the
    trainer's `plan_trunks` (steplaw's: WSD runs equal but in D, and lr as a stacked trunk
    where they form a full grid, unless `stack` is "off"), else runs of the "wsd" schedule equal in every trial
    field but D. A trunk holds its finished runs too, so that its id (and directory) stays
    the same when a rerun finishes what a killed one left."""
    trainer = sweep.trainer
    owned = [run_id for run_id in sweep.configs if run_id in sweep.views and sweep.planner.owns(sweep.views[run_id])]
    native = [run_id for run_id in owned if _native(sweep.configs[run_id])]
    groups: list[list[str]] = []
    if native and hasattr(trainer, "plan_trunks"):
        by_config = {id(sweep.configs[r]): r for r in native}
        configs = [sweep.configs[r] for r in native]
        groups = [[by_config[id(c)] for c in group] for group in trainer.plan_trunks(configs, stack=stack != "off")]
    trials: dict[str, list[str]] = {}
    for run_id in owned:
        config = sweep.configs[run_id]
        if isinstance(config, Trial) and config.schedule == "wsd":
            key = json.dumps({**config.to_dict(), "D": None}, sort_keys=True, default=str)
            trials.setdefault(key, []).append(run_id)
    groups += list(trials.values())
    return {run_id: group for group in groups if len(group) > 1 for run_id in group}


def _groups(sweep: _Sweep, executor, queue: list[str], stack, trunks: dict | None = None) -> list[tuple]:
    """The units to hand out now, at most one per idle worker slot: (run ids, None) for a
    run or a stack, (open run ids, every run id of the trunk) for a trunk."""
    idle = max(0, executor.idle())
    if not idle or not queue:
        return []
    units: list[tuple] = []
    if trunks:
        rest, handed = [], set()
        for run_id in queue:
            if run_id not in trunks:
                rest.append(run_id)
            elif run_id not in handed and len(units) < idle:
                members = trunks[run_id]
                handed.update(members)
                units.append(([r for r in members if r in queue], members))
            elif run_id not in handed:
                rest.append(run_id)  # no slot for its trunk now: it waits for one (never alone)
        queue = [r for r in rest if r not in trunks]
        idle -= len(units)
        if not idle or not queue:
            return units
    return units + [(group, None) for group in _stacks(sweep, executor, queue, stack, idle)]


def _stacks(sweep: _Sweep, executor, queue: list[str], stack, idle: int) -> list[list[str]]:
    """The groups of run ids to hand out now: at most one per idle worker slot."""
    trainer = sweep.trainer
    if stack == "off" or "stack" not in _capabilities(trainer) or getattr(executor, "group_fn", None) is None:
        return [[run_id] for run_id in queue[:idle]]
    # a window of the queue large enough to fill every idle slot with full stacks even when
    # the runs of a stack are spread out in it (the grid's order interleaves batch sizes)
    window = queue[:4 * idle * (stack if isinstance(stack, int) else getattr(trainer, "stack_window", STACK_WINDOW))]
    trainable = [r for r in window if _native(sweep.configs[r])]
    by_config = {id(sweep.configs[r]): r for r in trainable}
    groups = [[by_config[id(c)] for c in group] for group in trainer.plan_stacks([sweep.configs[r] for r in trainable], stack)]
    groups += [[r] for r in window if not _native(sweep.configs[r])]  # trials, replayed runs: alone
    position = {run_id: i for i, run_id in enumerate(window)}
    groups.sort(key=lambda group: min(position[run_id] for run_id in group))
    while len(groups) < idle and max(len(g) for g in groups) > 1:  # a worker idle costs more than a smaller stack
        big = max(range(len(groups)), key=lambda i: len(groups[i]))
        half = len(groups[big]) // 2
        groups[big:big + 1] = [groups[big][:half], groups[big][half:]]
    return groups[:idle]


def _warn(line, message: str, shown: set):
    """A warning line on stderr, once per sweep, clear of the progress line."""
    if message in shown:
        return
    shown.add(message)
    line.clear()
    warn(message, PROG)


def _drive(sweep: _Sweep, executor, line, summary, sweep_dir, started, stack="auto", branch="auto"):
    failed_seen = 0
    shown: set = set()
    branching = branch != "off" and "branch" in _capabilities(sweep.trainer) and hasattr(executor, "submit_trunk")
    trunks = _trunks(sweep, stack) if branching else {}
    total_cost = sum(sweep.costs.get(r, 0.0) for r in sweep.queue())
    done_cost = 0.0
    finished = summary.reused
    latest = ""
    queue = sweep.queue()
    try:
        while queue or executor.running():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                groups = _groups(sweep, executor, queue, stack, trunks)
            for warning in caught:  # e.g. "stacks of K runs do not fit the memory budget"
                _warn(line, str(warning.message), shown)
            handing = [run_id for group, _ in groups for run_id in group]
            if handing:
                handed = set(handing)
                queue = [run_id for run_id in queue if run_id not in handed]
                sweep.store.mark_running(*handing)  # one transaction for the batch
                sweep.in_flight.update(handing)
                for group, trunk in groups:
                    if trunk is not None:
                        every = [(r, sweep.configs[r], str(sweep_dir / "runs" / r)) for r in trunk]
                        done = {r for r in trunk if r not in group}
                        executor.submit_trunk(every, str(sweep_dir / "trunks" / trunk_id(trunk)), done)
                        continue
                    members = [(r, sweep.configs[r], str(sweep_dir / "runs" / r)) for r in group]
                    if len(members) == 1:
                        executor.submit(*members[0])
                    else:
                        executor.submit_group(members)
            completions, updates = executor.poll(0.25)
            for completion, status in zip(completions, sweep.record(completions)):
                summary.ran += 1
                if status == "failed":
                    failed_seen += 1
                if sweep.views[completion.run_id].state != "open":
                    finished += 1
                    done_cost += sweep.costs.get(completion.run_id, 0.0)
            # The grid registered all its runs at the start: only an adaptive planner has
            # new runs to propose after completions (asking the grid again costs O(runs)).
            if completions:
                if sweep.planner.name != "grid" and sweep.register(sweep.planner.propose(sweep.views)):
                    line.total = sweep.total()
                    if branching:  # new runs may share a trunk (with each other: finished trunks keep their ids)
                        trunks = {**_trunks(sweep, stack), **{r: t for r, t in trunks.items() if r in sweep.in_flight}}
                    # the cells' states as they stand, for a report mid-sweep
                    sweep.store.set_meta("planner_cells", sweep.planner.cell_reports(sweep.views))
                    total_cost = done_cost + sum(sweep.costs.get(r, 0.0) for r in sweep.queue() + list(sweep.in_flight))
                queue = sweep.queue()
            for update in updates:
                if "warning" in update.info:  # from a worker: shown once, however many workers say it
                    _warn(line, str(update.info["warning"]), shown)
                else:
                    latest = describe_progress(update.run_id, update.info)
            eta = _eta(time.time() - started, finished - summary.reused, len(queue) + len(executor.running()),
                       done_cost, total_cost)
            line.update(finished, len(executor.running()), failed_seen, eta, latest)
        executor.close()
    except BaseException:
        # Ctrl-C or a driver bug: stop the workers, leave unfinished runs pending.
        interrupted = list(executor.running())
        executor.close(force=True)
        sweep.store.mark_pending(*interrupted)
        raise


def _eta(elapsed: float, finished: int, remaining: int, done_cost: float, total_cost: float) -> float | None:
    """Seconds left: the mean of two estimates. By cost (params x tokens) alone it comes
    out low, as small-batch runs pay a per-step overhead that cost misses; by run count
    alone it comes out high, as the largest runs go first."""
    if finished <= 0 or done_cost <= 0:
        return None
    by_cost = elapsed * (total_cost - done_cost) / done_cost
    by_count = elapsed * remaining / finished
    return (by_cost + by_count) / 2


def describe_progress(run_id: str, info: dict) -> str:
    """'run 1a2b3c4d 45% loss 2.345' from a training run's progress dict."""
    parts = [f"run {run_id[:8]}"]
    tokens, total = info.get("tokens"), info.get("total_tokens")
    if isinstance(tokens, (int, float)) and isinstance(total, (int, float)) and total > 0:
        parts.append(f"{100 * tokens / total:.0f}%")
    if isinstance(info.get("loss"), (int, float)):
        parts.append(f"loss {info['loss']:.3f}")
    if len(parts) == 1:
        parts += [f"{k}={v}" for k, v in list(info.items())[:3]]
    return " ".join(parts)
