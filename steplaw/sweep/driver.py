"""The sweep driver: the one process that hands runs to an executor and writes the store.

    run_sweep(runs, sweep_dir, make_executor) -> SweepSummary

Order of events for a run, each one SQLite transaction: registered `pending` ->
`running` when handed to a worker -> `ok` / `diverged` / `failed` when its result comes
back. A driver killed at any point leaves at worst some rows `running`; the next driver
(same command) puts them back to pending and runs them, and skips every finished run. A
run is never recorded twice: the row is keyed by run id and a result overwrites only
that row's attempt.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from steplaw.progress import ProgressLine, format_duration
from steplaw.sweep.spec import count_params
from steplaw.sweep.store import DriverLock, ResultStore
from steplaw.train.config import RunConfig


@dataclass
class SweepSummary:
    sweep_dir: Path
    total: int  # runs in this sweep
    counts: dict = field(default_factory=dict)  # status -> runs, over the whole sweep
    ran: int = 0  # attempts made by this invocation
    reused: int = 0  # runs found finished in the store
    wall_s: float = 0.0

    def line(self) -> str:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        return (f"sweep {self.sweep_dir}: {self.total} runs ({parts}); ran {self.ran}, reused {self.reused}, "
                f"{format_duration(self.wall_s)}")


def run_sweep(runs: list[RunConfig], sweep_dir: str | Path, make_executor, *, max_attempts: int = 2,
              spec: dict | None = None, progress: ProgressLine | bool = True, retry_failed: bool = False,
              new_spec: bool = False) -> SweepSummary:
    """Run every config not yet finished in the store of `sweep_dir`.

    `make_executor()` builds the executor (called only when there is something to run).
    Failed runs are tried at most `max_attempts` times over all invocations
    (`retry_failed` grants them `max_attempts` more); diverged runs are results.
    `spec` (a dict) is recorded as the directory's spec (ResultStore.record_spec): one that
    differs from the stored spec is refused unless `new_spec`.
    """
    sweep_dir = Path(sweep_dir)
    started = time.time()
    run_ids = [config.run_id() for config in runs]
    configs = {run_id: config for run_id, config in zip(run_ids, runs)}
    if len(configs) != len(runs):
        raise ValueError("run_sweep got duplicate configs")
    with DriverLock(sweep_dir), ResultStore(sweep_dir) as store:
        for notice in store.notices:
            print(f"steplaw sweep: warning: {notice}", file=sys.stderr)
        spec_id = store.record_spec(spec, allow_change=new_spec) if spec is not None else None
        store.recover_interrupted()
        counts = _register(store, configs, spec_id)
        if retry_failed:
            store.reset_failed()
        todo = store.todo(run_ids, max_attempts)
        # Largest runs first: the pool's last minutes are not spent waiting on one big run.
        todo.sort(key=lambda r: -_cost(configs[r], counts[r]))
        summary = SweepSummary(sweep_dir, len(run_ids))
        summary.reused = len(run_ids) - len(todo)  # finished, or failed with no attempts left
        line = progress if isinstance(progress, ProgressLine) else ProgressLine(len(run_ids), enabled=bool(progress))
        if todo:
            _drive(store, configs, counts, todo, make_executor(), max_attempts, line, summary, sweep_dir, started)
        summary.counts = store.status_counts(run_ids)
        summary.wall_s = time.time() - started
        line.finish(summary.line())
        return summary


def _register(store, configs: dict, spec_id: str | None) -> dict:
    """Add the runs the store does not hold yet (each with its parameter counts and spec
    id); returns the counts of every run. Counted once per model shape, serialized only
    for new runs: a rerun of a large finished sweep stays cheap."""
    by_model: dict = {}
    counts = {run_id: by_model.get(c.model) or by_model.setdefault(c.model, count_params(c.model))
              for run_id, c in configs.items()}
    new = store.missing(list(configs))
    store.add_runs([{**configs[r].to_dict(), "run_id": r} for r in new], [counts[r] for r in new], spec_id=spec_id)
    if spec_id is not None:
        store.adopt(list(configs), spec_id)
    return counts


def _cost(config: RunConfig, counts: dict | None) -> float:
    params = (counts or {}).get("active") or (config.model.d_model**2 * 12 * config.model.n_layers)
    return float(params) * config.tokens


def _drive(store, configs, counts, todo, executor, max_attempts, line, summary, sweep_dir, started):
    queue = deque(todo)
    failed_seen = 0
    attempts = store.attempts(todo)
    remaining_cost = {run_id: _cost(configs[run_id], counts[run_id]) for run_id in todo}
    total_cost = sum(remaining_cost.values())
    done_cost = 0.0
    finished = summary.reused
    latest = ""
    try:
        while queue or executor.running():
            handing = []
            while queue and executor.idle() > len(handing):
                handing.append(queue.popleft())
            if handing:
                store.mark_running(*handing)  # one transaction for the batch
                for run_id in handing:
                    executor.submit(run_id, configs[run_id], str(sweep_dir / "runs" / run_id))
            completions, updates = executor.poll(0.25)
            newly_finished, newly_failed, cost = _record_completions(store, completions, attempts, max_attempts, queue,
                                                                      remaining_cost)
            summary.ran += len(completions)
            finished += newly_finished
            failed_seen += newly_failed
            done_cost += cost
            for update in updates:
                latest = describe_progress(update.run_id, update.info)
            eta = _eta(time.time() - started, finished - summary.reused, len(queue) + len(executor.running()),
                       done_cost, total_cost)
            line.update(finished, len(executor.running()), failed_seen, eta, latest)
        executor.close()
    except BaseException:
        # Ctrl-C or a driver bug: stop the workers, leave unfinished runs pending.
        interrupted = list(executor.running())
        executor.close(force=True)
        store.mark_pending(*interrupted)
        raise


def _record_completions(store, completions, attempts, max_attempts, queue, remaining_cost) -> tuple[int, int, float]:
    """Store finished attempts (one transaction) and requeue failed runs with attempts
    left. Returns (runs finished for good, failed attempts, cost of the finished runs)."""
    store.record_results([(c.run_id, c.result, c.host, c.versions, c.traceback) for c in completions])
    finished, failed, cost = 0, 0, 0.0
    for completion in completions:
        if completion.result.status == "failed":
            failed += 1
            attempts[completion.run_id] = attempts.get(completion.run_id, 0) + 1
            if attempts[completion.run_id] < max_attempts:
                queue.append(completion.run_id)
                continue
        finished += 1
        cost += remaining_cost.pop(completion.run_id, 0.0)
    return finished, failed, cost


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
