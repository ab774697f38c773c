"""`steplaw sweep`, `steplaw runs`, `steplaw demo`.

    steplaw sweep SPEC.toml --out DIR                # a spec file (TOML, YAML, JSON)
    steplaw sweep --params 1M 3M --tokens 1e8 --out DIR   # or flags (they override a file)
    steplaw sweep --out DIR                          # resume DIR with its stored spec
    steplaw sweep ... --new-spec                     # a changed spec on DIR (history kept)
    steplaw sweep ... --stack auto|K|off             # runs of one model shape train as one stacked model
    steplaw sweep ... --planner adaptive [--cell-budget 32 --total-budget R]   # search each cell's optimum
    steplaw sweep --replay TABLE [--col-N ... --bs-unit sequences --seq-len L] --planner adaptive --out DIR
    steplaw runs DIR [--csv | --json] [-o FILE]      # the runs table (steplaw.runtable)
    steplaw runs DIR --specs                         # the specs DIR was swept with
    steplaw runs --columns                           # what each run-table column means
    steplaw demo [--out DIR] [--schedule wsd]        # tiny CPU sweep, fit, report

Every setting is checked before any run starts (also with --dry-run); a mistake is one
line on stderr and exit 2. A sweep whose runs failed prints the distinct reasons and
exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from steplaw.cli import args as cliargs
from steplaw.cli.args import count, nonnegative_float, positive_float, positive_int
from steplaw.errors import UserError, warn
from steplaw.fileio import write_atomic
from steplaw.runtable import OBJECTIVES


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
    grid.add_argument("--params", nargs="+", type=count, help="target non-embedding parameter counts, e.g. 1M 3M")
    grid.add_argument("--tokens", nargs="+", type=count, help="token budgets D, e.g. 2e7 1e8")
    grid.add_argument("--moe-experts", type=positive_int, help="make every model MoE with this many experts")
    grid.add_argument("--moe-topk", type=positive_int, help="experts per token (with --moe-experts; default 2)")
    grid.add_argument("--lr-points", type=positive_int, help="LRs per cell (default 5)")
    grid.add_argument("--lr-span", type=positive_float, help="LR grid covers centre/span..centre*span (default 4)")
    grid.add_argument("--lr-scale", type=positive_float, help="LR centre = scale x Step Law LR (default 1)")
    grid.add_argument("--lrs", nargs="+", type=positive_float, help="explicit peak LRs for every cell")
    grid.add_argument("--batch-points", type=positive_int, help="batch sizes per cell, powers of two (default 5)")
    grid.add_argument("--batch-scale", type=positive_float, help="batch centre = scale x Step Law batch size (default 1)")
    grid.add_argument("--batch-sizes", nargs="+", type=count, help="explicit batch sizes in tokens")
    grid.add_argument("--min-steps", type=positive_int, help="drop batch sizes leaving fewer optimizer steps (default 16)")
    grid.add_argument("--seq-len", type=positive_int, help="sequence length (tokens)")
    grid.add_argument("--objective", choices=OBJECTIVES, default=None,
                      help="the loss each cell's optimum minimises: loss (smoothed final training loss; default) or "
                           "val_loss (validation loss; fairer across tiny batch sizes). fit and report use it too")
    grid.add_argument("--set", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                      help="a fixed RunConfig setting for every run (repeatable), e.g. --set schedule=wsd --set seed=1")
    _add_execution_flags(sweep)
    add_planner_flags(sweep)
    sweep.add_argument("--dry-run", action="store_true", help="check every run, print the cells and grids, run nothing")
    sweep.add_argument("--new-spec", action="store_true",
                       help="allow a spec that differs from the one --out was swept with: its runs join the old "
                            "ones, each row keeps its spec_id, and the history stays in the store")
    sweep.set_defaults(func=cmd_sweep)

    runs = subparsers.add_parser("runs", help="list or export the runs of a sweep directory")
    runs.add_argument("sweep_dir", nargs="?", help="sweep directory")
    fmt = runs.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV with the runs-table columns (what `steplaw fit` reads)")
    fmt.add_argument("--json", action="store_true", help="JSON list of rows with the runs-table columns")
    fmt.add_argument("--specs", action="store_true", help="the specs the directory was swept with (spec_id: JSON)")
    fmt.add_argument("--columns", action="store_true", help="what each column of the runs table means, with its unit")
    runs.add_argument("--output", "-o", help="write to this file instead of stdout")
    runs.set_defaults(func=cmd_runs)

    demo = subparsers.add_parser("demo", help="tiny CPU sweep on the embedded corpus, then fit and report (make demo)")
    demo.add_argument("--out", "-o", default="steplaw-demo", help="sweep directory (default ./steplaw-demo)")
    demo.add_argument("--scale", choices=["full", "small"], default="full",
                      help="full: 9 cells at 16K-144K tokens; small: the same models at 1K-4K, a smoke run")
    demo.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                      help="cosine (the Step Law's setup; default) or wsd: warmup-stable-decay with 1-sqrt cooldowns and "
                           "five budgets per model, whose runs branch off shared trunks (README: what a WSD law is "
                           "comparable with)")
    demo.add_argument("--no-report", action="store_true", help="only run the sweep")
    demo.add_argument("--new-spec", action="store_true", help="allow a different demo scale on an existing --out")
    _add_execution_flags(demo, ray=False)
    demo.set_defaults(func=cmd_demo)


def stack_size(text: str):
    """--stack: "auto", "off" or a whole number of runs per stack >= 1."""
    word = str(text).strip().lower()
    if word in ("auto", "off"):
        return word
    try:
        return positive_int(word)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, off or a whole number of runs per stack >= 1") from None


def _add_execution_flags(parser, ray: bool = True):
    group = parser.add_argument_group("execution")
    if ray:
        group.add_argument("--executor", choices=["local", "ray"], default="local",
                           help="local worker processes (default) or Ray tasks")
        group.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
        group.add_argument("--cpus-per-run", type=nonnegative_float, help="Ray: CPUs per run (default 1)")
        group.add_argument("--gpus-per-run", type=nonnegative_float,
                           help="Ray: GPUs per run, fractions allowed (e.g. 0.25; default 0)")
    group.add_argument("--workers", type=positive_int,
                       help="local worker processes (default: one per GPU, else one per core)")
    group.add_argument("--threads-per-worker", type=positive_int,
                       help="torch threads per local worker (default: cores / workers)")
    group.add_argument("--workers-per-gpu", type=positive_int, help="local workers sharing each GPU (default 1)")
    group.add_argument("--max-attempts", type=positive_int, default=2,
                       help="tries per failed run, over all invocations (default 2)")
    group.add_argument("--retry-failed", action="store_true", help="give runs that failed all their attempts new ones")
    group.add_argument("--trainer", default="steplaw", metavar="steplaw|hf|MODULE:FUNCTION",
                       help="what trains the runs: steplaw's own trainer (default), hf (a Hugging Face transformers model, "
                            "steplaw[hf]) or a function(trial, report) -> result "
                            "(see steplaw.trial)")
    group.add_argument("--trainer-cmd", metavar="TEMPLATE",
                       help="a command per run, e.g. 'python train.py --lr {lr} --out {run_dir}': trial fields in braces "
                            "(shell-quoted), {trial_json} the whole trial; it writes {run_dir}/result.json")
    group.add_argument("--run-timeout", type=positive_float, metavar="SECONDS",
                       help="--trainer-cmd: kill and fail a run after this many seconds")
    group.add_argument("--trainer-resumes", action="store_true",
                       help="--trainer-cmd: the command resumes from what an unfinished attempt left in its run_dir "
                            "(default: the directory is cleared before each attempt)")
    # steplaw's own trainer swapped for a function of a RunConfig (the tests' fake trainers);
    # a user's trainer goes through --trainer or --trainer-cmd and the trial contract.
    group.add_argument("--run-fn", default="steplaw.train:run", help=argparse.SUPPRESS)
    group.add_argument("--stack", type=stack_size, default="auto", metavar="auto|K|off",
                       help="train runs of one model shape (different lr, tokens and, for small dense models, batch size) "
                            "together, as one stacked model: auto (as many as fit "
                            "memory and pay off; default), at most K per stack, or off (steplaw's own trainer only)")
    group.add_argument("--branch", choices=["auto", "off"], default=None,
                       help="WSD runs equal but in D: auto (default with --set schedule=wsd) trains them as one trunk, the "
                            "stable phase once and a cooldown branch per D (same runs and run ids); off: every D alone")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress line")


def trainer_name(args) -> str:
    """The spec's `trainer`: steplaw, hf, MODULE:FUNCTION or command (--trainer-cmd)."""
    name = getattr(args, "trainer", "steplaw")
    if getattr(args, "trainer_cmd", None) is not None:
        if name != "steplaw":
            raise UserError(f"--trainer {name} and --trainer-cmd both name a trainer: expected one of them")
        return "command"
    return name


def check_trainer(args) -> None:
    """Mistakes in the trainer flags, before anything runs (exit 2)."""
    name = trainer_name(args)
    if name == "steplaw":
        for flag, value in (("--run-timeout", args.run_timeout), ("--trainer-resumes", args.trainer_resumes or None)):
            if value is not None:
                raise UserError(f"{flag} applies to --trainer-cmd only: expected --trainer-cmd with it")
        make_trainer(args).check()
        return
    if isinstance(getattr(args, "stack", "auto"), int):
        raise UserError(f"--stack {args.stack} is a setting of steplaw's own trainer: a {name} trainer's runs run alone "
                        "(expected no --stack, or --trainer steplaw)")
    if getattr(args, "moe_experts", None) is not None:
        raise UserError(f"--moe-experts is a setting of steplaw's own trainer (its MoE shape): expected a user model "
                        f"(name, params, active_params, args) in the spec for a {name} trainer")
    if name == "command":
        from steplaw.trainers.command import template_fields

        template_fields(args.trainer_cmd)
        return
    if args.run_timeout is not None or args.trainer_resumes:
        raise UserError("--run-timeout and --trainer-resumes apply to --trainer-cmd only: expected --trainer-cmd with them")
    if name == "hf":
        from steplaw.trainers.hf import transformers_module

        transformers_module()  # one sentence naming `pip install steplaw[hf]` when it is missing
        return
    from steplaw.trainers.python import load_function

    load_function(name)


def make_trainer(args):
    """The trainer object (steplaw.trainers) the sweep hands its runs to; what it can do
    (stack, branch, resume) is its `capabilities`."""
    name = trainer_name(args)
    if name == "steplaw":
        from steplaw.trainers.steplaw import SteplawTrainer

        run_fn = getattr(args, "run_fn", None)
        return SteplawTrainer.swapped(run_fn) if run_fn else SteplawTrainer()
    if name == "command":
        from steplaw.trainers.command import CommandTrainer

        return CommandTrainer(args.trainer_cmd, cwd=os.getcwd(), timeout=args.run_timeout, resumes=args.trainer_resumes)
    if name == "hf":
        from steplaw.trainers.hf import HFTrainer

        return HFTrainer()
    from steplaw.trainers.python import PythonTrainer

    return PythonTrainer(name)


def spec_from_args(args):
    from steplaw.sweep.spec import ModelSpec, SweepSpec

    _check_grid_flags(args)
    if args.spec:
        data = SweepSpec.from_file(args.spec, trainer=trainer_name(args)).to_dict()
    elif args.params is None and args.tokens is None:
        data = stored_spec(args.out) or {}  # resume with the stored spec
    else:
        data = {}
    moe = {"n_experts": args.moe_experts, "top_k": args.moe_topk or 2} if args.moe_experts else None
    if args.params is not None:
        data["models"] = [{"params": p, "moe": moe} for p in args.params]
    elif moe is not None and data.get("models"):
        data["models"] = [{**m, "moe": moe} for m in data["models"]]
    if args.tokens is not None:
        data["tokens"] = [int(t) for t in args.tokens]
    overrides = {
        "lr_points": args.lr_points, "lr_span": args.lr_span, "lr_center_scale": args.lr_scale,
        "lrs": args.lrs, "batch_points": args.batch_points, "batch_center_scale": args.batch_scale,
        "batch_sizes": args.batch_sizes, "min_steps": args.min_steps, "objective": args.objective,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    fixed = dict(data.get("fixed") or {})
    if args.seq_len is not None:
        fixed["seq_len"] = args.seq_len
    fixed.update(dict(args.set))
    data["fixed"] = fixed
    if not data.get("models") or not data.get("tokens"):
        raise UserError("no sweep to run: expected a spec file, or --params and --tokens, or an --out directory holding "
                        "spec.json")
    data["models"] = [m if isinstance(m, ModelSpec) else _clean_model(m) for m in data["models"]]
    data["trainer"] = trainer_name(args)
    if getattr(args, "branch", None) is not None:
        data["branch"] = args.branch
    return SweepSpec.from_dict(data).bind(make_trainer(args))


def _check_grid_flags(args):
    """Rules between grid flags (each flag's own form is checked by its argparse type)."""
    keys = [key for key, _ in args.set]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        values = [repr(value) for key, value in args.set if key == twice[0]]
        raise UserError(f"--set {twice[0]} is given {len(values)} times ({', '.join(values)}): expected each key once")
    setting = dict(args.set)
    if args.seq_len is not None and "seq_len" in setting and setting["seq_len"] != args.seq_len:
        raise UserError(f"--set seq_len={setting['seq_len']!r} contradicts --seq-len {args.seq_len}: expected one of them")
    if args.lr_span is not None and args.lr_span < 1:
        raise UserError(f"--lr-span {args.lr_span}: expected at least 1 (the grid spans centre/span..centre*span)")
    if args.moe_topk is not None:
        if args.moe_experts is None:
            raise UserError(f"--moe-topk {args.moe_topk} needs --moe-experts: expected both, or neither for dense models")
        if args.moe_topk > args.moe_experts:
            raise UserError(f"--moe-topk {args.moe_topk}: expected at most --moe-experts {args.moe_experts} experts per token")


def stored_spec(out) -> dict | None:
    """The spec a sweep directory was last swept with: from its store, else spec.json."""
    from steplaw.sweep.store import DB_NAME, SPEC_NAME, ResultStore

    out = Path(out)
    if (out / DB_NAME).is_file():
        try:
            with ResultStore(out, readonly=True) as store:
                spec = store.meta("spec")
            if spec is not None:
                return spec
        except UserError:
            pass  # a damaged store: spec.json may still hold the spec, and the driver rebuilds the store
    path = out / SPEC_NAME
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{str(path)!r} is damaged ({exc}) and the store holds no spec: expected a spec file or "
                        f"--params and --tokens to say what to sweep") from None
    if not isinstance(spec, dict):
        raise UserError(f"{str(path)!r} holds {type(spec).__name__}: expected the sweep spec as a JSON table")
    return spec


def _clean_model(entry):
    if isinstance(entry, dict):
        return {k: v for k, v in entry.items() if v is not None}
    return entry


def make_executor_factory(args, trainer):
    """The executor the command line asks for, running `trainer` (its "stack" groups through
    the trainer's own run_group: steplaw.sweep.execution.group_function)."""
    if getattr(args, "executor", "local") == "ray":
        def make():
            from steplaw.sweep.ray_executor import RayExecutor

            return RayExecutor(trainer, address=args.address,
                               **_given(cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run))
    else:
        def make():
            from steplaw.sweep.executors import LocalExecutor

            return LocalExecutor(trainer, workers=args.workers, threads_per_worker=args.threads_per_worker,
                                 **_given(workers_per_gpu=args.workers_per_gpu))
    return make


def _given(**options) -> dict:
    """The executor options the user gave: the others keep the executor's own defaults
    (flags default to None, so that _check_unused_flags can tell a given one)."""
    return {name: value for name, value in options.items() if value is not None}


def _check_out(out: str):
    cliargs.check_output_dir(out, "--out")


def run_spec(spec, args):
    """Check every run of `spec`, then run the sweep into args.out; returns its summary."""
    from steplaw.progress import ProgressLine
    from steplaw.sweep.driver import run_sweep
    from steplaw.sweep.spec import validate_runs

    _check_out(args.out)
    trainer = make_trainer(args)
    spec.bind(trainer)
    if "stack" not in trainer.capabilities and trainer.name != "steplaw" and not args.quiet:
        warn(f"the {spec.trainer} trainer's runs run alone (stacking is steplaw's own trainer's)", "steplaw sweep")
    planner = make_planner(spec, args)
    grid_runs = spec.expand()
    # The adaptive planner proposes runs as it goes, all with the spec's fixed settings:
    # checking the grid's runs checks every setting its proposals can carry.
    validate_runs(grid_runs, local=getattr(args, "executor", "local") != "ray", trainer=trainer)
    branch = check_branch(spec, trainer, grid_runs, args)
    runs = grid_runs if planner is None else []
    line = ProgressLine(len(runs), enabled=not args.quiet)
    return run_sweep(runs, args.out, make_executor_factory(args, trainer), max_attempts=args.max_attempts,
                     spec=spec.to_dict(), progress=line, retry_failed=args.retry_failed, new_spec=args.new_spec,
                     planner=planner, stack=getattr(args, "stack", "auto"), trainer=trainer,
                     branch=branch)


def check_branch(spec, trainer, runs, args) -> str:
    """Whether the sweep branches ("auto" or "off"), its trunks checked before anything
    runs (a bad branching setting, given --branch, is one sentence: exit 2); a sweep that
    would branch but cannot says so once."""
    wanted = spec.branch or "auto"
    if wanted == "off" or spec.fixed.get("schedule") != "wsd":
        return "off"
    quiet = getattr(args, "quiet", False)
    if "branch" not in getattr(trainer, "capabilities", ()):
        if not quiet:
            warn(f"the {trainer.name} trainer does not branch WSD runs (no 'branch' capability): every D trains alone",
                 "steplaw sweep")
        return "off"
    if hasattr(trainer, "check_trunks"):
        alone = trainer.check_trunks(runs, explicit=spec.branch is not None)
        if alone and not quiet:
            warn(alone, "steplaw sweep")
    return "auto"


def report_failures(summary, out) -> int:
    """Print why runs failed (distinct reasons, with counts); the exit code of the sweep:
    0 when every run finished, 1 when runs failed or are left pending."""
    from steplaw.sweep.store import ResultStore

    failed = summary.counts.get("failed", 0)
    if failed:
        with ResultStore(out, readonly=True) as store:
            reasons = store.failure_reasons()
        print(f"steplaw sweep: {failed} run(s) failed; reasons (runs: reason):", file=sys.stderr)
        for reason, count in reasons.items():
            first = reason.strip().splitlines()[0] if reason.strip() else "no reason recorded"
            print(f"  {count}: {first[:300]}", file=sys.stderr)
        print(f"  (`steplaw runs {out}` lists them; rerun with --retry-failed to try them again)", file=sys.stderr)
    unfinished = summary.counts.get("pending", 0) + summary.counts.get("running", 0)
    return 1 if failed or unfinished else 0


def _check_unused_flags(args):
    """Flags that would be silently ignored, or that the executor cannot honour: refused
    before anything starts (a dry run too)."""
    if args.address is not None and args.executor != "ray":
        raise UserError(f"--address {args.address!r} is a Ray cluster address: expected --executor ray with it")
    for flag, value, executor, instead in (
            ("--cpus-per-run", args.cpus_per_run, "ray", "--workers / --threads-per-worker for local workers"),
            ("--gpus-per-run", args.gpus_per_run, "ray", "--workers-per-gpu for local workers"),
            ("--workers", args.workers, "local", "--cpus-per-run / --gpus-per-run for Ray"),
            ("--threads-per-worker", args.threads_per_worker, "local", "--cpus-per-run for Ray"),
            ("--workers-per-gpu", args.workers_per_gpu, "local", "--gpus-per-run for Ray")):
        if value is not None and args.executor != executor:
            raise UserError(f"{flag} {value:g} applies to --executor {executor} only: expected {instead}")
    if args.executor == "ray" and args.cpus_per_run == 0 and not (args.gpus_per_run or 0) > 0:
        raise UserError("--cpus-per-run 0 with --gpus-per-run 0: expected CPUs or GPUs per run above 0 (Ray runs as "
                        "many runs at once as they fit)")
    if args.planner != "adaptive":
        for flag, value in (("--cell-budget", args.cell_budget), ("--total-budget", args.total_budget),
                            ("--max-batch", args.max_batch)):
            if value is not None:
                raise UserError(f"{flag} {value} applies to the adaptive planner only: expected --planner adaptive with "
                                f"it, or no {flag} with --planner {args.planner}")


def check_spec_change(spec, args):
    """The refusal a real run would give for a spec that differs from the one --out was
    swept with (unless --new-spec), given now: a dry run must not pass what the run refuses."""
    from steplaw.sweep.store import DB_NAME, ResultStore

    if not (Path(args.out) / DB_NAME).is_file():
        return
    try:
        store = ResultStore(args.out, readonly=True)
    except UserError:
        return  # a damaged store: the run rebuilds it from its run directories and says so
    with store:
        store.check_spec(spec.to_dict(), allow_change=args.new_spec)


def cmd_sweep(args) -> int:
    from steplaw.sweep.spec import validate_runs

    _check_unused_flags(args)
    if getattr(args, "replay", None):
        return cmd_replay(args)
    _check_out(args.out)
    check_trainer(args)
    spec = spec_from_args(args)
    if args.dry_run:
        check_spec_change(spec, args)
        runs = spec.expand()
        validate_runs(runs, local=args.executor != "ray", trainer=make_trainer(args))
        if getattr(args, "planner", "grid") == "adaptive":
            return dry_run_adaptive(spec, args)
        cells = spec.cells()
        for cell in cells:
            print(f"{cell.label}: N={cell.n_params:,} D={cell.tokens:,}  lr {', '.join(f'{x:.3g}' for x in cell.lrs)}"
                  f"  batch {', '.join(str(b) for b in cell.batch_sizes)} tokens")
        print(f"{len(runs)} runs in {len(cells)} cells (all checked)")
        return 0
    summary = run_spec(spec, args)
    return report_failures(summary, args.out)


def cmd_runs(args) -> int:
    from steplaw import runtable
    from steplaw.sweep.store import EXPORT_COLUMNS, ResultStore, rows_to_csv, rows_to_json

    if args.columns:
        sys.stdout.write(runtable.describe())
        return 0
    if args.sweep_dir is None:
        raise UserError("no sweep directory given: expected `steplaw runs DIR` (or `steplaw runs --columns`)")
    path = Path(args.sweep_dir)
    if not path.is_dir():
        raise UserError(f"sweep directory {args.sweep_dir!r} does not exist or is not a directory")
    if args.output:
        cliargs.check_output_file(args.output, "-o")
    with ResultStore(path, readonly=True) as store:
        if args.specs:
            current = store.meta("spec_id")
            text = "".join(f"{spec_id}{' (current)' if spec_id == current else ''}: {json.dumps(spec, sort_keys=True)}\n"
                           for spec_id, spec in store.specs())
        else:
            rows = store.export()
            if args.csv:
                text = rows_to_csv(rows)
            elif args.json:
                text = rows_to_json(rows) + "\n"
            else:
                text = _text_table(rows, EXPORT_COLUMNS)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.output, text)  # an OSError is one line through cliargs.run_command
    else:
        sys.stdout.write(text)
    return 0


def _text_table(rows, columns) -> str:
    shown = ["run_id", "status", "spec_id", "N", "D", "lr", "batch_tokens", "loss", "val_loss"]
    if any(row.get("trunk") for row in rows):  # WSD branches: which trunk, and what each trained
        shown += ["trunk", "tokens_trained"]
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
    spec = demo_spec(args.scale, getattr(args, "schedule", "cosine"))
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
    from steplaw.cli.args import add_table_args

    group = parser.add_argument_group("planner")
    group.add_argument("--planner", choices=["grid", "adaptive"], default="grid",
                       help="grid: every run of the LR x batch grid (default); adaptive: search each cell's optimum "
                            "from the finished runs (the grid flags then only set the starting point)")
    group.add_argument("--cell-budget", type=int, default=None, metavar="RUNS",
                       help="adaptive: runs per cell at most (default 32; replay: no limit)")
    group.add_argument("--total-budget", type=int, default=None, metavar="RUNS",
                       help="adaptive: runs in all, split evenly over the cells (default: no limit)")
    group.add_argument("--max-batch", type=count, default=None, metavar="TOKENS",
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
    # Columns of trunks only for a trainer that branches: for one that trains each D alone
    # they would only add runs.
    branch = None if "branch" in make_trainer(args).capabilities else False
    return AdaptivePlanner(spec_cells(spec, getattr(args, "max_batch", None), branch=branch), settings)


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
    from steplaw.cli.laws import load_table
    from steplaw.progress import ProgressLine
    from steplaw.sweep.driver import run_sweep
    from steplaw.sweep.planner import AdaptivePlanner
    from steplaw.sweep.replay import replay_executor, replay_spec, replay_table

    if args.spec:
        raise UserError(f"--replay {args.replay!r} and a spec file {args.spec!r}: expected one of them")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len {args.seq_len}: expected a positive number of tokens per sequence")
    args.runs = args.replay
    table = load_table(args)
    replay = replay_table(table, table.source)
    for warning in table.warnings + replay.problems:
        warn(warning, getattr(args, "command_prog", "steplaw sweep"))
    if not replay.cells:
        raise UserError(f"{table.source}: no cell can be replayed ({len(replay.problems)} problem(s) above)")
    planner = AdaptivePlanner(replay.cells, planner_settings(args, replay=True)) if args.planner == "adaptive" else None
    if args.dry_run:
        print(f"replay of {table.source}: {len(replay.cells)} cells, {len(replay.runs)} runs in the table")
        return 0
    summary = run_sweep(replay.runs if planner is None else [], args.out, lambda: replay_executor(replay.outcomes),
                        progress=ProgressLine(0, enabled=not args.quiet), planner=planner, new_spec=args.new_spec,
                        spec=replay_spec(table.source, replay))
    # A replayed failure is a row of the table, not a failure of this sweep.
    return 0 if not summary.counts.get("pending") else 1
