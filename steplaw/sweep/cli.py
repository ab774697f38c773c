"""`steplaw sweep`, `steplaw runs`, `steplaw demo`.

    steplaw sweep SPEC.toml --out DIR                # a spec file (TOML, YAML, JSON)
    steplaw sweep --params 1M 3M --tokens 1e8 --out DIR   # or flags (they override a file)
    steplaw sweep --out DIR                          # resume DIR with its stored spec
    steplaw sweep ... --planner adaptive [--cell-budget 32 --total-budget R]   # search each cell's optimum
    steplaw sweep --replay TABLE [--col-N ... --bs-unit sequences --seq-len L] --planner adaptive --out DIR
    steplaw runs DIR [--csv | --json] [-o FILE]      # the runs table
    steplaw demo [--out DIR]                         # tiny CPU sweep, fit, report
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from steplaw.errors import UserError
from steplaw.units import parse_count

def _count_arg(text: str) -> float:
    """argparse type for counts like 3M or 2.5e5 (see steplaw.units.parse_count)."""
    try:
        return parse_count(text, "count")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setting(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (a RunConfig field, e.g. schedule=wsd)")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_commands(subparsers) -> None:
    sweep = subparsers.add_parser("sweep", help="run a learning-rate x batch-size sweep into a directory",
                                  description="Run a LR x batch-size sweep over model sizes and token budgets. "
                                              "Finished runs are reused: rerun the same command to resume.")
    sweep.add_argument("spec", nargs="?", help="sweep spec file (TOML, YAML or JSON); flags override it")
    sweep.add_argument("--out", "-o", required=True, help="sweep directory (holds runs.sqlite)")
    grid = sweep.add_argument_group("grid (flags override the spec file)")
    grid.add_argument("--params", nargs="+", type=_count_arg, help="target non-embedding parameter counts, e.g. 1M 3M")
    grid.add_argument("--tokens", nargs="+", type=_count_arg, help="token budgets D, e.g. 2e7 1e8")
    grid.add_argument("--moe-experts", type=int, help="make every model MoE with this many experts")
    grid.add_argument("--moe-topk", type=int, default=2, help="experts per token (with --moe-experts)")
    grid.add_argument("--lr-points", type=int, help="LRs per cell (default 5)")
    grid.add_argument("--lr-span", type=float, help="LR grid covers centre/span..centre*span (default 4)")
    grid.add_argument("--lr-scale", type=float, help="LR centre = scale x Step Law LR (default 1)")
    grid.add_argument("--lrs", nargs="+", type=float, help="explicit peak LRs for every cell")
    grid.add_argument("--batch-points", type=int, help="batch sizes per cell, powers of two (default 5)")
    grid.add_argument("--batch-scale", type=float, help="batch centre = scale x Step Law batch size (default 1)")
    grid.add_argument("--batch-sizes", nargs="+", type=lambda s: int(_count_arg(s)), help="explicit batch sizes in tokens")
    grid.add_argument("--min-steps", type=int, help="drop batch sizes leaving fewer optimizer steps (default 16)")
    grid.add_argument("--seq-len", type=int, help="sequence length (tokens)")
    grid.add_argument("--set", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                      help="a fixed RunConfig setting for every run (repeatable), e.g. --set schedule=wsd --set seed=1")
    _add_execution_flags(sweep)
    add_planner_flags(sweep)
    sweep.add_argument("--dry-run", action="store_true", help="print the cells and grids, run nothing")
    sweep.set_defaults(func=cmd_sweep)

    runs = subparsers.add_parser("runs", help="list or export the runs of a sweep directory")
    runs.add_argument("sweep_dir", help="sweep directory")
    fmt = runs.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV with the runs-table columns (what `steplaw fit` reads)")
    fmt.add_argument("--json", action="store_true", help="JSON list of rows with the runs-table columns")
    runs.add_argument("--output", "-o", help="write to this file instead of stdout")
    runs.set_defaults(func=cmd_runs)

    demo = subparsers.add_parser("demo", help="tiny CPU sweep on the embedded corpus, then fit and report (make demo)")
    demo.add_argument("--out", "-o", default="steplaw-demo", help="sweep directory (default ./steplaw-demo)")
    demo.add_argument("--scale", choices=["full", "small"], default="full", help="full: 9 cells at 32K-128K tokens; small: the same at 1K-4K, a smoke run")
    demo.add_argument("--no-report", action="store_true", help="only run the sweep")
    _add_execution_flags(demo, ray=False)
    demo.set_defaults(func=cmd_demo)


def _add_execution_flags(parser, ray: bool = True):
    group = parser.add_argument_group("execution")
    if ray:
        group.add_argument("--executor", choices=["local", "ray"], default="local",
                           help="local worker processes (default) or Ray tasks")
        group.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
        group.add_argument("--cpus-per-run", type=float, default=1, help="Ray: CPUs per run (default 1)")
        group.add_argument("--gpus-per-run", type=float, default=0, help="Ray: GPUs per run, fractions allowed (e.g. 0.25)")
    group.add_argument("--workers", type=int, help="local worker processes (default: one per GPU, else one per core)")
    group.add_argument("--threads-per-worker", type=int, help="torch threads per local worker (default: cores / workers)")
    group.add_argument("--workers-per-gpu", type=int, default=1, help="local workers sharing each GPU (default 1)")
    group.add_argument("--max-attempts", type=int, default=2, help="tries per failed run, over all invocations (default 2)")
    group.add_argument("--retry-failed", action="store_true", help="give runs that failed all their attempts new ones")
    group.add_argument("--run-fn", default="steplaw.train:run", metavar="MODULE:FUNCTION",
                       help="the training function, run_fn(RunConfig, run_dir=...) -> RunResult (default steplaw.train:run)")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress line")


def load_run_fn(name: str):
    module_name, _, attr = name.partition(":")
    if not attr:
        raise UserError(f"--run-fn {name!r}: expected MODULE:FUNCTION, e.g. steplaw.train:run")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--run-fn {name!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--run-fn {name!r}: {module_name} has no function {attr!r}")
    return fn


def spec_from_args(args):
    from steplaw.sweep.spec import ModelSpec, SweepSpec

    spec_path = Path(args.out) / "spec.json"
    if args.spec:
        data = SweepSpec.from_file(args.spec).to_dict()
    elif args.params is None and args.tokens is None and spec_path.is_file():
        data = json.loads(spec_path.read_text())  # resume with the stored spec
    else:
        data = {}
    moe = {"n_experts": args.moe_experts, "top_k": args.moe_topk} if args.moe_experts else None
    if args.params is not None:
        data["models"] = [{"params": p, "moe": moe} for p in args.params]
    elif moe is not None and data.get("models"):
        data["models"] = [{**m, "moe": moe} for m in data["models"]]
    if args.tokens is not None:
        data["tokens"] = [int(t) for t in args.tokens]
    overrides = {
        "lr_points": args.lr_points, "lr_span": args.lr_span, "lr_center_scale": args.lr_scale,
        "lrs": args.lrs, "batch_points": args.batch_points, "batch_center_scale": args.batch_scale,
        "batch_sizes": args.batch_sizes, "min_steps": args.min_steps,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    fixed = dict(data.get("fixed") or {})
    if args.seq_len is not None:
        fixed["seq_len"] = args.seq_len
    fixed.update(dict(args.set))
    data["fixed"] = fixed
    if not data.get("models") or not data.get("tokens"):
        raise UserError("no sweep to run: expected a spec file, or --params and --tokens, or an --out directory holding spec.json")
    data["models"] = [m if isinstance(m, ModelSpec) else _clean_model(m) for m in data["models"]]
    return SweepSpec.from_dict(data)


def _clean_model(entry):
    if isinstance(entry, dict):
        return {k: v for k, v in entry.items() if v is not None}
    return entry


def make_executor_factory(args, run_fn):
    if getattr(args, "executor", "local") == "ray":
        def make():
            from steplaw.sweep.executors import RayExecutor

            return RayExecutor(run_fn, address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    else:
        def make():
            from steplaw.sweep.executors import LocalExecutor

            return LocalExecutor(run_fn, workers=args.workers, threads_per_worker=args.threads_per_worker,
                                 workers_per_gpu=args.workers_per_gpu)
    return make


def _check_execution_args(args):
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected at least 1")
    if args.max_attempts < 1:
        raise UserError(f"--max-attempts {args.max_attempts}: expected at least 1")


def run_spec(spec, args) -> "object":
    from steplaw.sweep.driver import run_sweep
    from steplaw.sweep.progress import ProgressLine

    _check_execution_args(args)
    run_fn = load_run_fn(args.run_fn)
    planner = make_planner(spec, args)
    runs = spec.expand() if planner is None else []
    line = ProgressLine(len(runs), enabled=not args.quiet)
    return run_sweep(runs, args.out, make_executor_factory(args, run_fn), max_attempts=args.max_attempts,
                     spec=spec.to_dict(), progress=line, retry_failed=args.retry_failed, planner=planner)


def cmd_sweep(args) -> int:
    if getattr(args, "replay", None):
        return cmd_replay(args)
    spec = spec_from_args(args)
    if args.dry_run and getattr(args, "planner", "grid") == "adaptive":
        return dry_run_adaptive(spec, args)
    if args.dry_run:
        cells = spec.cells()
        for cell in cells:
            print(f"{cell.label}: N={cell.n_params:,} D={cell.tokens:,}  lr {', '.join(f'{x:.3g}' for x in cell.lrs)}"
                  f"  batch {', '.join(str(b) for b in cell.batch_sizes)} tokens")
        print(f"{len(spec.expand())} runs in {len(cells)} cells")
        return 0
    summary = run_spec(spec, args)
    return 0 if not summary.counts.get("pending") and not summary.counts.get("running") else 1


def cmd_runs(args) -> int:
    from steplaw.sweep.store import EXPORT_COLUMNS, export_rows, rows_to_csv, rows_to_json

    if not Path(args.sweep_dir).is_dir():
        raise UserError(f"sweep directory {args.sweep_dir!r} does not exist")
    rows = export_rows(args.sweep_dir)
    if args.csv:
        text = rows_to_csv(rows)
    elif args.json:
        text = rows_to_json(rows) + "\n"
    else:
        text = _text_table(rows, EXPORT_COLUMNS)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _text_table(rows, columns) -> str:
    shown = ["run_id", "status", "N", "D", "lr", "batch_tokens", "loss", "val_loss"]
    cells = [[_fmt(row.get(c)) for c in shown] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_demo(args) -> int:
    import time

    from steplaw.sweep.presets import DEMO_PLANNER, demo_spec

    started = time.time()
    args.executor = "local"
    args.address = None
    spec = demo_spec(args.scale)
    args.planner, args.planner_settings, args.max_batch = "adaptive", DEMO_PLANNER[args.scale], None
    summary = run_spec(spec, args)
    if args.no_report:
        return 0
    from steplaw.report.build import write_report

    paths = write_report(args.out)
    print(f"demo: sweep, fit and report in {time.time() - started:.0f} s", file=sys.stderr)
    for path in paths:
        print(path)
    return 0 if summary.counts.get("ok") else 1


# -- planners and replay (steplaw.sweep.planner, steplaw.sweep.replay) ------------------------

def add_planner_flags(parser) -> None:
    """--planner, the run budgets, and --replay TABLE with the table flags of `steplaw fit`."""
    from steplaw.laws.cli import add_table_args

    group = parser.add_argument_group("planner")
    group.add_argument("--planner", choices=["grid", "adaptive"], default="grid",
                       help="grid: every run of the LR x batch grid (default); adaptive: search each cell's optimum "
                            "from the finished runs (the grid flags then only set the starting point)")
    group.add_argument("--cell-budget", type=int, default=None, metavar="RUNS",
                       help="adaptive: runs per cell at most (default 32; replay: no limit)")
    group.add_argument("--total-budget", type=int, default=None, metavar="RUNS",
                       help="adaptive: runs in all, split evenly over the cells (default: no limit)")
    group.add_argument("--max-batch", type=lambda s: int(_count_arg(s)), default=None, metavar="TOKENS",
                       help="adaptive: largest batch size in tokens the search may try")
    replay = parser.add_argument_group("replay a table of finished runs (read as `steplaw fit` reads it; "
                                       "--seq-len is the table's sequence length)")
    replay.add_argument("--replay", metavar="TABLE", help="CSV / JSONL / Parquet table or sweep directory to replay")
    scratch = argparse.ArgumentParser(add_help=False)
    add_table_args(scratch)
    for action in scratch._actions:  # the column flags of `steplaw fit`, minus its positional and --seq-len
        if action.option_strings and action.dest not in ("help", "seq_len"):
            replay._group_actions.append(parser._add_action(action))


def planner_settings(args, replay: bool = False):
    from steplaw.sweep.planner import AdaptiveSettings

    budget = args.cell_budget if args.cell_budget is not None else (None if replay else AdaptiveSettings.cell_budget)
    return AdaptiveSettings(cell_budget=budget, total_budget=args.total_budget)


def make_planner(spec, args):
    """None for the grid (run_sweep runs spec.expand()), else the adaptive planner."""
    if getattr(args, "planner", "grid") != "adaptive":
        return None
    from steplaw.sweep.planner import AdaptivePlanner, spec_cells

    settings = getattr(args, "planner_settings", None) or planner_settings(args)
    return AdaptivePlanner(spec_cells(spec, getattr(args, "max_batch", None)), settings)


def dry_run_adaptive(spec, args) -> int:
    from steplaw.sweep.planner import spec_cells

    cells = spec_cells(spec, args.max_batch)
    for cell in cells:
        print(f"{cell.label}: N={cell.N:,.0f} D={cell.D:,.0f}  start at lr {cell.prior[0]:.3g}, batch "
              f"{cell.prior[1]:.4g} tokens; batch sizes {cell.batch_sizes[0]:.0f}..{cell.batch_sizes[-1]:.0f} tokens")
    settings = planner_settings(args)
    print(f"adaptive planner: {len(cells)} cells, runs chosen as the sweep goes "
          f"(at most {settings.cell_budget or 'unlimited'} per cell)")
    return 0


def cmd_replay(args) -> int:
    from steplaw.laws.cli import load_table
    from steplaw.sweep.driver import run_sweep
    from steplaw.sweep.planner import AdaptivePlanner
    from steplaw.sweep.progress import ProgressLine
    from steplaw.sweep.replay import ReplayExecutor, replay_table

    if args.spec:
        raise UserError(f"--replay {args.replay!r} and a spec file {args.spec!r}: expected one of them")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len {args.seq_len}: expected a positive number of tokens per sequence")
    args.runs = args.replay
    table = load_table(args)
    replay = replay_table(table, table.source)
    for warning in table.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in replay.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not replay.cells:
        raise UserError(f"{table.source}: no cell can be replayed ({len(replay.problems)} problem(s) above)")
    planner = AdaptivePlanner(replay.cells, planner_settings(args, replay=True)) if args.planner == "adaptive" else None
    if args.dry_run:
        print(f"replay of {table.source}: {len(replay.cells)} cells, {len(replay.runs)} runs in the table")
        return 0
    summary = run_sweep(replay.runs if planner is None else [], args.out, lambda: ReplayExecutor(replay.outcomes),
                        progress=ProgressLine(0, enabled=not args.quiet), planner=planner,
                        spec={"replay": str(table.source), "problems": replay.problems})
    return 0 if not summary.counts.get("pending") else 1
