"""`steplaw predict`, `steplaw fit`, `steplaw fit-loss`, `steplaw plan` and `steplaw score` (texts: steplaw.laws.text).

Data goes to stdout, warnings to stderr. Sweep directories are resolved here (through
steplaw.sweep.store.export_rows): steplaw.laws itself reads only rows and files.
Output paths are checked before any work, so a bad --out costs no fit.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from steplaw.cli import args as cliargs
from steplaw.errors import UserError, warn
from steplaw.runtable import json_safe
from steplaw.sweep.store import export_rows, sweep_objective
from steplaw.units import parse_count


def _json(obj) -> str:
    """Strict JSON: NaN and infinities (e.g. an unidentifiable fold) become null."""
    return json.dumps(json_safe(obj), indent=2, allow_nan=False)


def _warn(args, lines) -> None:
    """Each distinct warning once, on stderr."""
    for line in dict.fromkeys(lines):
        warn(line, getattr(args, "command_prog", "steplaw"))


# ---------------------------------------------------------------------------- tables
def sweep_rows(sweep_dir) -> list[dict]:
    """The run-table rows of a sweep directory; a damaged store is a one-line UserError."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "runs.sqlite").is_file():
        raise UserError(f"directory {str(sweep_dir)!r} holds no runs.sqlite; expected a sweep directory or a table file.")
    try:
        return export_rows(sweep_dir)
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{str(sweep_dir / 'runs.sqlite')!r} is not a readable sweep store ({exc}); "
                        "restore it from a backup or rerun the sweep into a new directory.") from None


def _add_store_details(sweep_dir, rows: list[dict], curves: bool) -> None:
    """Each row's LR schedule label (from its stored config) and, with `curves`, its loss
    curve: the run-table columns `schedule` and `curve` that steplaw.laws.table reads."""
    from steplaw.laws.schedules import label_of_config
    from steplaw.sweep.store import ResultStore

    with ResultStore(sweep_dir, readonly=True) as store:
        for row in rows:
            try:
                row["schedule"] = label_of_config(store.config(row["run_id"])) or ""
            except (TypeError, ValueError):  # a config the store cannot give back: the schedule is unknown
                row["schedule"] = ""
            if curves:
                row["curve"] = [list(point) for point in store.curve(row["run_id"])]


def add_spec_args(parser) -> None:
    """--spec / --all-specs: which of a sweep directory's specs to fit (steplaw.laws.table.select_spec)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--spec", dest="spec_id", default=None, metavar="ID",
                       help="a sweep directory swept with several specs (--new-spec): use only this spec's runs "
                            "(an id from `steplaw runs DIR --specs`, or its unique prefix)")
    group.add_argument("--all-specs", action="store_true",
                       help="a sweep directory swept with several specs: fit all their runs together (with a warning)")


def load_table(args):
    """The RunTable of args.runs (a file or a sweep directory), exactly as `steplaw fit` reads it;
    a sweep directory's runs are those of one spec (see add_spec_args) where the command asks."""
    from steplaw.laws.table import read_runs, select_spec

    source, name, col_loss, note = args.runs, None, args.col_loss, None
    if Path(args.runs).is_dir():
        source, name = sweep_rows(args.runs), str(args.runs)
        _add_store_details(args.runs, source, curves=bool(getattr(args, "critical_batch", False)))
        if hasattr(args, "all_specs"):  # commands with add_spec_args (not sweep --replay)
            source, note = select_spec(source, args.spec_id, args.all_specs, f"sweep directory {name!r}")
        if col_loss is None:
            col_loss = sweep_objective(args.runs)
    elif getattr(args, "spec_id", None) is not None:
        raise UserError(f"--spec {args.spec_id!r} chooses among a sweep directory's specs; {args.runs!r} is a table file.")
    table = read_runs(
        source, col_N=args.col_N, col_D=args.col_D, col_lr=getattr(args, "col_lr", "lr"),
        col_bs=getattr(args, "col_bs", None), col_loss=col_loss or "loss", col_C=getattr(args, "col_C", None),
        bs_unit=getattr(args, "bs_unit", None), seq_len=getattr(args, "seq_len", None),
        needs=getattr(args, "table_needs", "hparams"), source_name=name,
    )
    if note:
        table.warnings.append(note)
    return table


def _describe_table(table) -> str:
    dropped = ", ".join(f"{reason} {count}" for reason, count in table.dropped.items()) or "none"
    return f"{len(table)} runs from {table.source} ({table.n_valid} finished with a finite loss; dropped: {dropped})"


# ---------------------------------------------------------------------------- predict
def _predict_from_file(args) -> int:
    from steplaw.laws.saved import SavedHparamLaw, read_law

    law = read_law(args.law)
    if not isinstance(law, SavedHparamLaw):
        raise UserError(f"--law {args.law!r} holds a loss law; predict needs a file from `steplaw fit --save`.")
    from steplaw.laws.schedules import mismatch_warning

    lr, bs, warnings = law.predict(args.params, args.tokens, n_active=args.moe_active, batch_tokens=args.batch_tokens)
    warnings = law.warnings + warnings  # the fit's own warnings travel with its file
    schedule_note = mismatch_warning(law.schedule, f"law file {args.law}", args.schedule)
    warnings += [schedule_note] if schedule_note else []
    at_batch = args.batch_tokens is not None
    lr_formula = (law.lr_batch_law if at_batch else law.lr_law).formula("lr")
    out = {"law": args.law, "n_column": law.n_column, "lr": lr, "batch_tokens": bs, "batch_seqs": bs / args.seq_len,
           "seq_len": args.seq_len, "lr_law": lr_formula, "bs_law": law.bs_law.formula("B"),
           "schedule": law.schedule, "batch_given": at_batch, "warnings": warnings}
    if at_batch:  # the batch the law would choose, for comparison with the one given
        out["optimal_batch_tokens"] = law.predict(args.params, args.tokens, n_active=args.moe_active)[1]
    if args.json:
        print(_json({"inputs": {"n_params": args.params, "tokens": args.tokens, "n_active": args.moe_active,
                                "seq_len": args.seq_len, "batch_tokens": args.batch_tokens,
                                "schedule": args.schedule}, "predictions": [out]}))
    else:
        which = "your" if at_batch else "optimal"
        print(f"fitted law {args.law} (N = {law.n_column}, schedule {law.schedule}): peak LR {lr:.3g} at {which} "
              f"batch {bs:.4g} tokens = {bs / args.seq_len:.1f} sequences of {args.seq_len}")
        print(f"  {out['lr_law']}   {out['bs_law']}"
              + (f"   (optimal batch {out['optimal_batch_tokens']:.4g} tokens)" if at_batch else ""))
    _warn(args, warnings)
    return 0


def cmd_predict(args) -> int:
    from steplaw.laws.published import LAWS, disagreements, predict_all
    from steplaw.laws.schedules import check_kind
    from steplaw.laws.text import prediction_lines

    args.params = parse_count(args.params, "--params")
    args.tokens = parse_count(args.tokens, "--tokens")
    args.moe_active = parse_count(args.moe_active, "--moe-active")
    args.compute = parse_count(args.compute, "--compute")
    args.loss = parse_count(args.loss, "--loss")
    args.batch_tokens = parse_count(args.batch_tokens, "--batch-tokens")
    args.schedule = check_kind(args.schedule)
    if args.law.endswith(".json") or "/" in args.law or Path(args.law).is_file():
        return _predict_from_file(args)
    if args.batch_tokens is not None:
        raise UserError("--batch-tokens needs a batch-aware law file from `steplaw fit --lr-form batch --save` "
                        f"(--law FILE); the published laws ({args.law}) give the LR at their own optimal batch only.")
    predictions = predict_all(
        args.params, args.tokens, n_active=args.moe_active, compute=args.compute, loss=args.loss, laws=args.law
    )
    notes = disagreements(predictions) + _schedule_notes(predictions, LAWS, args.schedule)
    if args.json:
        print(_json({
            "inputs": {"n_params": args.params, "tokens": args.tokens, "n_active": args.moe_active,
                       "compute": args.compute, "loss": args.loss, "seq_len": args.seq_len},
            "predictions": [p.to_dict(args.seq_len) for p in predictions],
            "laws": {key: LAWS[key].info() for key in dict.fromkeys(p.law for p in predictions)},
            "disagreements": notes,
        }))
        return 0
    head = f"N = {args.params:.4g} non-embedding parameters"
    if args.moe_active:
        head += f" ({args.moe_active:.4g} activated)"
    print("\n".join(prediction_lines(predictions, LAWS, args.seq_len,
                                     f"{head}, D = {args.tokens:.4g} tokens, sequence length {args.seq_len}")))
    _warn(args, [w for p in predictions for w in p.warnings] + notes)
    return 0


def _schedule_notes(predictions, laws, wanted) -> list[str]:
    """A warning per published law fitted under another schedule than --schedule."""
    from steplaw.laws.schedules import mismatch_warning

    notes = (mismatch_warning(laws[key].schedule_kind, f"{laws[key].name} ({key})", wanted)
             for key in dict.fromkeys(p.law for p in predictions))
    return [note for note in notes if note]


# ---------------------------------------------------------------------------- fit
def _n_columns(table, choice: str) -> list[str]:
    import numpy as np

    if choice != "auto":
        if choice == "both":
            if table.N_active is None:
                raise UserError("--n-column both needs an N_active column; the table has only N.")
            return ["N", "N_active"]
        table.param_counts(choice)  # raises a UserError when missing
        return [choice]
    columns = ["N"]
    active = table.N_active
    if active is not None and np.all(np.isfinite(active)) and not np.allclose(active, table.N):
        columns.append("N_active")  # MoE: report the fit with activated parameters too
    return columns


def _fit_out_dir(args) -> Path | None:
    """Where fit.json and plots go (checked before any work), or None (--json without --out)."""
    if args.out:
        return cliargs.check_output_dir(args.out, "--out")
    if args.json:
        return None
    source = Path(args.runs)
    out = source / "fit" if source.is_dir() else source.parent / f"{source.stem}_fit"
    return cliargs.check_output_dir(out, "the fit directory")


def _write_fit_files(args, out_dir: Path, result: dict, table, primary, plots: bool) -> list[Path]:
    from steplaw.laws.saved import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(out_dir / "fit.json", result)]
    if plots:
        from steplaw.report.plots import heatmap_cells, plot_fit

        try:
            written += plot_fit(table, primary, out_dir)
        except UserError as exc:  # matplotlib missing: the fit still stands
            _warn(args, [f"no plots: {exc}"])
        else:
            shown = heatmap_cells(primary)[1]  # many cells: heatmaps of a chosen few, say which
            if shown:
                _warn(args, [shown])
    return written


def cmd_fit(args) -> int:
    from steplaw.laws.fit import fit_hparams
    from steplaw.laws.saved import hparam_law_record, write_json
    from steplaw.laws.text import fit_lines

    out_dir = _fit_out_dir(args)
    save = cliargs.check_output_file(args.save, "--save") if args.save else None
    from steplaw.laws.rollout import holdout_hparam_lines, holdout_hparams, parse_holdout

    rule = parse_holdout(args.holdout) if args.holdout is not None else None
    table = load_table(args)
    columns = _n_columns(table, args.n_column)
    critical = _critical_batch(args, table, columns[0]) if args.critical_batch else None
    options = {"gap": args.gap, "n_boot": args.n_boot, "seed": args.seed, "fit_bs_N": args.fit_bs_N,
               "sparsity": args.sparsity, "lr_form": args.lr_form,
               "allow_mixed_schedules": args.allow_mixed_schedules}
    if rule is not None:  # every fit on the rest; the primary one scored on the held-out cells
        holdout = {column: holdout_hparams(table, rule, n_column=column, **options) for column in columns}
        fits, holdout = {column: pair[0] for column, pair in holdout.items()}, holdout[columns[0]][1]
    else:
        fits, holdout = {column: fit_hparams(table, n_column=column, **options) for column in columns}, None
    primary = fits[columns[0]]
    warnings = _fits_warnings(fits)
    result = {**primary.to_dict(), "source": table.source, "warnings": warnings}
    if holdout is not None:
        result["holdout"] = holdout
    if critical is not None:
        from steplaw.laws.critical import critical_record

        result["critical_batch"] = critical_record(critical, primary.bs_law if primary.bs_law.exps else None)
        result["warnings"] = warnings = warnings + critical.warnings
    if len(fits) > 1:
        result["by_n_column"] = {column: fit.to_dict() for column, fit in fits.items() if column != columns[0]}
    written = _write_fit_files(args, out_dir, result, table, primary, not args.no_plots) if out_dir is not None else []
    if save is not None:
        written.append(write_json(save, hparam_law_record(primary, table.source)))
    if args.json:
        print(_json(result))
    else:
        print(_describe_table(table))
        for column in columns:
            print("\n".join(fit_lines(fits[column])))
            print(f"schedule of the runs: {fits[column].schedule}")
            if fits[column].lr_batch is not None:
                from steplaw.laws.lr_batch import batch_law_lines

                print("\n".join(batch_law_lines(fits[column].lr_batch)))
        if holdout is not None:
            print("\n".join(holdout_hparam_lines(holdout)))
        if critical is not None:
            from steplaw.laws.critical import critical_lines

            print("\n".join(critical_lines(critical, primary.bs_law if primary.bs_law.exps else None)))
        if written:
            print("wrote " + ", ".join(str(path) for path in written))
    _warn(args, warnings)
    return 0


def _critical_batch(args, table, n_column: str):
    """fit --critical-batch: B_crit per cell from the runs' loss curves (steplaw.laws.critical)."""
    from steplaw.laws.critical import critical_batch

    targets = None
    if args.critical_targets is not None:
        targets = [parse_count(part.strip(), "--critical-targets") for part in args.critical_targets.split(",")
                   if part.strip()]
    return critical_batch(table, n_column=n_column, targets=targets, n_boot=args.n_boot, seed=args.seed)


def _fits_warnings(fits: dict) -> list[str]:
    """Every fit's warnings, each once; with several fits (N and N_active) each names the
    fit it belongs to, except those of the table itself, which all fits share."""
    fits = list(fits.values())
    if len(fits) == 1:
        return list(fits[0].warnings)
    shared = [w for w in fits[0].warnings if all(w in fit.warnings for fit in fits)]
    return shared + [f"fit with N = {fit.n_column}: {w}" for fit in fits for w in fit.warnings if w not in shared]


# ---------------------------------------------------------------------------- fit-loss
def _loss_form(args):
    """The LossForm of --form/--E/--weights/--underprediction-penalty (name 'chinchilla' for auto)."""
    from steplaw.laws.loss_forms import LossForm

    fixed_e = parse_count(args.E, "--E") if args.E is not None else None
    return LossForm("chinchilla" if args.form == "auto" else args.form, fixed_e, args.weights,
                    args.underprediction_penalty)


def _at_budget(fit, budget: float) -> tuple[dict, list[str]]:
    """fit-loss --budget: N_opt, D_opt with intervals, the predicted loss with its prediction
    interval (the one plan gives), the Step Law's hyperparameters; and the range warnings."""
    from steplaw.laws.published import range_warnings, step_law

    n_opt, d_opt = fit.compute_optimal(budget)
    lr, bs = step_law(n_opt, d_opt)
    interval = fit.optimal_interval(budget)
    # N_opt and D_opt beyond the cells are the law's extrapolation: say so, as plan does.
    warnings = range_warnings("the fitted loss law", fit.fitted_range, {"N": n_opt, "D": d_opt})
    return {"compute": budget, "N_opt": n_opt, "D_opt": d_opt,
            "N_interval": list(interval["N"]) if interval else None,
            "D_interval": list(interval["D"]) if interval else None,
            "predicted_loss": float(fit.predict(n_opt, d_opt)),
            "predicted_loss_interval": fit.loss_interval(n_opt, d_opt),
            "step_law_lr": lr, "step_law_batch_tokens": bs}, warnings


def _add_holdout_intervals(fit, holdout: dict) -> None:
    """Each held-out cell's 95% prediction interval and whether its loss fell inside."""
    inside = []
    for row in holdout["rows"]:
        row["interval"] = fit.loss_interval(row["N"], row["D"])
        if row["interval"] is not None:
            row["inside_interval"] = bool(row["interval"][0] <= row["loss"] <= row["interval"][1])
            inside.append(row["inside_interval"])
    holdout["inside_interval"] = {"count": int(sum(inside)), "of": len(inside)} if inside else None


def _without_held_out(table, rule, n_column: str):
    from steplaw.laws.rollout import held_out_rows, subset

    return subset(table, ~(held_out_rows(table, rule, table.param_counts(n_column)) & table.valid))


def cmd_fit_loss(args) -> int:
    from steplaw.laws.loss import fit_loss
    from steplaw.laws.rollout import holdout_loss, parse_holdout, rollout_loss
    from steplaw.laws.saved import loss_law_record, write_json

    args.budget = parse_count(args.budget, "--budget")
    rule = parse_holdout(args.holdout) if args.holdout is not None else None
    save = cliargs.check_output_file(args.save, "--save") if args.save else None
    form = _loss_form(args)
    if args.method == "isoflop":
        if args.save or args.holdout or args.rollout or args.form != "chinchilla":
            raise UserError("--save, --holdout, --rollout and --form need the parametric loss law; use --method both.")
        return _fit_loss_isoflop(args, load_table(args))
    table = load_table(args)
    choice = None
    if args.form == "auto":
        from steplaw.laws.form_choice import choose_form

        # With --holdout the form is chosen on the runs the law is fitted on, never on those it is scored on.
        chosen_on = table if rule is None else _without_held_out(table, rule, args.n_column)
        form, choice = choose_form(chosen_on, form, n_column=args.n_column)
    options = {"n_column": args.n_column, "form": form}
    holdout = None
    if rule is not None:  # the law is fitted on the rest: what is saved and shown is that fit
        fit, holdout = holdout_loss(table, rule, n_boot=args.n_boot, seed=args.seed, **options)
        _add_holdout_intervals(fit, holdout)
    else:
        fit = fit_loss(table, n_boot=args.n_boot, seed=args.seed, **options)
    result = {**fit.to_dict(), "source": table.source}
    if choice is not None:
        result["form_choice"] = choice
    if holdout is not None:
        result["holdout"] = holdout
    if args.rollout:
        result["rollout"] = rollout_loss(table, args.rollout, **options)
    iso = None
    if args.method == "both":
        from steplaw.laws.isoflop import isoflop_fit

        iso = isoflop_fit(table, n_boot=args.n_boot, seed=args.seed, n_column=args.n_column)
        result["isoflop"] = iso.to_dict()
    if args.budget:
        result["at_budget"], budget_warnings = _at_budget(fit, args.budget)
        result["warnings"] += budget_warnings
    if save is not None:
        write_json(save, loss_law_record(fit, table.source))
    if args.json:
        print(_json(result))
    else:
        _print_fit_loss(table, fit, result, iso, save)
    _warn(args, result["warnings"])
    return 0


def _print_fit_loss(table, fit, result: dict, iso, save) -> None:
    from steplaw.laws.form_choice import choice_lines
    from steplaw.laws.rollout import holdout_lines, rollout_lines
    from steplaw.laws.text import loss_fit_lines

    print(_describe_table(table))
    if "form_choice" in result:
        print("\n".join(choice_lines(result["form_choice"])))
    print("\n".join(loss_fit_lines(fit, result)))
    if iso is not None:
        from steplaw.laws.isoflop import isoflop_lines

        print("\n".join(isoflop_lines(iso)))
    if "holdout" in result:
        print("\n".join(holdout_lines(result["holdout"])))
    if "rollout" in result:
        print("\n".join(rollout_lines(result["rollout"])))
    if save is not None:
        print(f"wrote {save}")


def _fit_loss_isoflop(args, table) -> int:
    """fit-loss --method isoflop: the compute-optimal N(C), D(C) from IsoFLOP parabolas alone."""
    from steplaw.laws.isoflop import isoflop_fit, isoflop_lines

    iso = isoflop_fit(table, n_boot=args.n_boot, seed=args.seed, n_column=args.n_column)
    result = {**iso.to_dict(), "source": table.source}
    if args.budget:
        n_opt, d_opt = iso.compute_optimal(args.budget)
        result["at_budget"] = {"compute": args.budget, "N_opt": n_opt, "D_opt": d_opt}
    if args.json:
        print(_json(result))
    else:
        print(_describe_table(table))
        print("\n".join(isoflop_lines(iso)))
        if args.budget:
            print(f"at C = {args.budget:.3g} FLOPs: N_opt = {result['at_budget']['N_opt']:.4g}, "
                  f"D_opt = {result['at_budget']['D_opt']:.4g}")
    _warn(args, result["warnings"])
    return 0


# ---------------------------------------------------------------------------- plan
def cmd_plan(args) -> int:
    from steplaw.laws.plan import make_plan, plan_lines

    save = cliargs.check_output_file(args.save, "--save") if args.save else None
    plan = make_plan(compute=parse_count(args.compute, "--compute"), params=parse_count(args.params, "--params"),
                     tokens=parse_count(args.tokens, "--tokens"), loss_law=args.loss_law, hparam_law=args.hparam_law,
                     seq_len=args.seq_len, schedule=args.schedule)
    if save is not None:
        from steplaw.laws.saved import write_json
        from steplaw.laws.scoring import plan_record

        write_json(save, plan_record(plan))
    print(_json(plan) if args.json else "\n".join(plan_lines(plan) + ([f"wrote {save}"] if save else [])))
    _warn(args, plan["warnings"])
    return 0


# ---------------------------------------------------------------------------- score
def cmd_score(args) -> int:
    from steplaw.laws.scoring import read_plan, score_lines, score_plan, score_runs

    loss, lr, bs = (parse_count(v, name) for v, name in ((args.loss, "--loss"), (args.lr, "--lr"),
                                                         (args.batch_tokens, "--batch-tokens")))
    if (loss is None) == (args.runs is None):
        raise UserError("score needs the outcome: --loss L (with --lr / --batch-tokens if they differ from the "
                        "plan) or --runs TABLE, one of them.")
    plan = read_plan(args.plan)
    if args.runs is not None:
        args.table_needs, args.col_lr, args.col_bs = "loss", "lr", None
        score = score_runs(plan, load_table(args))
    else:
        score = score_plan(plan, loss, lr, bs)
    print(_json({"plan": args.plan, **score}) if args.json else "\n".join(score_lines(plan, score)))
    return 0


def _add_score(subparsers) -> None:
    score = subparsers.add_parser(
        "score", help="score a saved plan against the run's outcome (rel_error, inside_interval)",
        description="How far a run's final loss fell from a plan saved by `steplaw plan --save`, and whether it "
                    "fell inside the plan's 95% interval.")
    score.add_argument("plan", metavar="PLAN.json", help="a plan file from `steplaw plan --save`")
    score.add_argument("--loss", default=None, metavar="NATS", help="the run's final loss")
    score.add_argument("--lr", default=None, metavar="LR", help="the peak LR it ran with (default: the plan's)")
    score.add_argument("--batch-tokens", default=None, metavar="B", help="the batch it ran with, in tokens")
    score.add_argument("--runs", default=None, metavar="TABLE",
                       help="instead of --loss: a table of runs or a sweep directory; its best finished run at the "
                            "plan's N and D (within 10%%) is scored")
    score.add_argument("--col-N", default="N", metavar="NAME", help="with --runs: the N column (default N)")
    score.add_argument("--col-D", default=None, metavar="NAME", help="with --runs: the token column (default D)")
    score.add_argument("--col-loss", default=None, metavar="NAME", help="with --runs: the loss column (default loss)")
    score.add_argument("--json", action="store_true", help="print one JSON object")
    score.set_defaults(func=cmd_score)


# ---------------------------------------------------------------------------- parsers
def _add_predict(subparsers) -> None:
    predict = subparsers.add_parser(
        "predict", help="peak LR and batch size for N parameters and D tokens from published laws",
        description="Peak learning rate and batch size from published scaling laws (Step Law, DeepSeek, Kaplan, "
                    "Porian) or from a law file written by `steplaw fit --save`.",
    )
    predict.add_argument("--params", required=True, metavar="N",
                         help="non-embedding parameters (for MoE: total non-embedding), e.g. 1e9 or 7B")
    predict.add_argument("--tokens", required=True, metavar="D", help="training tokens, e.g. 1e11")
    predict.add_argument("--law", default="all", metavar="LAWS|FILE",
                         help="'all', a comma-separated list of step_law, deepseek, kaplan, porian, or a law file "
                              "from `steplaw fit --save`")
    predict.add_argument("--moe-active", default=None, metavar="N_ACTIVE",
                         help="MoE: activated non-embedding parameters per token (a fitted sparsity law uses it)")
    predict.add_argument("--seq-len", type=cliargs.positive_int, default=2048, metavar="L",
                         help="tokens per sequence for the batch in sequences (default 2048)")
    predict.add_argument("--compute", default=None, metavar="FLOPS",
                         help="training FLOPs for DeepSeek's law (default 6*N*D)")
    predict.add_argument("--loss", default=None, metavar="NATS",
                         help="expected final loss for Kaplan's critical batch (default: Kaplan's L(N, D))")
    predict.add_argument("--batch-tokens", default=None, metavar="B",
                         help="the batch you will train with, in tokens: the LR for it from a law file fitted with "
                              "`steplaw fit --lr-form batch`")
    predict.add_argument("--schedule", default=None, metavar="KIND",
                         help="the LR schedule you will train with (cosine, wsd, constant, multistep, linear): warn "
                              "when a law was fitted under another")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    predict.set_defaults(func=cmd_predict)


def _add_fit(subparsers) -> None:
    fit = subparsers.add_parser(
        "fit", help="fit eta(N, D) and B(D) from a table of runs or a sweep",
        description="Fit lr = coef*N^exp_N*D^exp_D and B = coef*D^exp_D (the Step Law's method) with bootstrap "
                    "intervals, leave-one-cell-out validation and every published law scored on the same cells.",
    )
    cliargs.add_table_args(fit)
    add_spec_args(fit)
    fit.add_argument("--gap", type=cliargs.nonnegative_float, default=0.0025,
                     help="relative loss gap of the near-optimal set (default 0.0025)")
    fit.add_argument("--n-boot", type=cliargs.nonnegative_int, default=1000, help="bootstrap resamples (default 1000)")
    fit.add_argument("--seed", type=cliargs.nonnegative_int, default=0, help="bootstrap seed (default 0)")
    fit.add_argument("--n-column", choices=["auto", "N", "N_active", "N_total", "both"], default="auto",
                     help="which parameter count is N (auto: N, plus N_active for MoE tables)")
    fit.add_argument("--fit-bs-N", action="store_true", help="also fit an exponent of N in the batch-size law")
    fit.add_argument("--sparsity", action="store_true",
                     help="fit dense and MoE runs together with a term (N_active/N)^gamma in both laws")
    fit.add_argument("--out", default=None, metavar="DIR",
                     help="write fit.json and PNG plots here (default: RUNS_fit/ beside a file, RUNS/fit/ for a sweep)")
    fit.add_argument("--save", default=None, metavar="FILE",
                     help="write the fitted law for `steplaw predict --law FILE` / `steplaw plan --hparam-law FILE`")
    fit.add_argument("--holdout", default=None, metavar="RULE",
                     help="fit on the runs the rule leaves and score the laws on the cells it holds out: "
                          "N>=X, D>=Y, C>=Z or largest, comma-joined for 'and'")
    fit.add_argument("--lr-form", choices=["cells", "batch"], default="cells",
                     help="cells: the LR law from each cell's optimum (default); batch: also lr = a*N^a*D^b*B^delta "
                          "from each (N, D, batch) row's optimum in LR, for `predict --batch-tokens`")
    fit.add_argument("--allow-mixed-schedules", action="store_true",
                     help="fit runs of several LR schedules together (with a warning) instead of refusing")
    fit.add_argument("--critical-batch", action="store_true",
                     help="also the critical batch size per cell from the runs' loss curves (McCandlish et al. 2018) "
                          "and a B_crit(D) law beside B_opt(D)")
    fit.add_argument("--critical-targets", default=None, metavar="L1,L2",
                     help="with --critical-batch: the target losses in nats (default: from the curves)")
    fit.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    fit.add_argument("--json", action="store_true", help="print one JSON object (files only with --out)")
    fit.set_defaults(func=cmd_fit)

    fit_loss_parser = subparsers.add_parser(
        "fit-loss", help="fit L(N, D) = E + A/N^alpha + B/D^beta and the compute-optimal N(C), D(C)",
        description="Fit the loss law (Huber on log-loss, BFGS from a grid of starts; Hoffmann et al. 2022). "
                    "Needs only N, D (or compute) and the loss.",
    )
    cliargs.add_table_args(fit_loss_parser, with_compute=True, needs="loss")
    add_spec_args(fit_loss_parser)
    fit_loss_parser.add_argument("--n-boot", type=cliargs.nonnegative_int, default=200, help="bootstrap resamples (default 200)")
    fit_loss_parser.add_argument("--seed", type=cliargs.nonnegative_int, default=0, help="bootstrap seed (default 0)")
    fit_loss_parser.add_argument("--n-column", choices=["N", "N_active", "N_total"], default="N",
                                 help="which parameter count is N (default N)")
    fit_loss_parser.add_argument("--budget", default=None, metavar="FLOPS",
                                 help="also give N_opt, D_opt, the loss there and the Step Law's hyperparameters")
    fit_loss_parser.add_argument("--save", default=None, metavar="FILE",
                                 help="write the fitted law for `steplaw plan --loss-law FILE`")
    fit_loss_parser.add_argument("--method", choices=["parametric", "isoflop", "both"], default="parametric",
                                 help="parametric: the law L(N, D) (default); isoflop: N_opt(C), D_opt(C) from a "
                                      "parabola of loss in log N per compute budget (Chinchilla Approach 2); both")
    fit_loss_parser.add_argument("--holdout", default=None, metavar="RULE",
                                 help="fit on the runs the rule leaves and score the law on those it holds out: "
                                      "N>=X, D>=Y, C>=Z or largest, comma-joined for 'and' (e.g. N>=1e9)")
    fit_loss_parser.add_argument("--rollout", choices=["N", "D"], default=None,
                                 help="also an expanding-window check: fit on the k smallest N (or D), predict the next")
    fit_loss_parser.add_argument("--form", choices=["chinchilla", "tied", "auto"], default="chinchilla",
                                 help="chinchilla: five free constants (default); tied: alpha = beta; auto: the form "
                                      "with the lower rollout-by-N error (says which won and by how much)")
    fit_loss_parser.add_argument("--E", default=None, metavar="NATS",
                                 help="fix the irreducible loss E at this value instead of fitting it")
    fit_loss_parser.add_argument("--weights", choices=["none", "compute"], default="none",
                                 help="cell weights: none (default) or compute (C / mean C: large cells count most)")
    fit_loss_parser.add_argument("--underprediction-penalty", type=float, default=1.0, metavar="K",
                                 help="weigh cells the law predicts too low K times more (K >= 1; default 1, "
                                      "symmetric)")
    fit_loss_parser.add_argument("--json", action="store_true", help="print one JSON object")
    fit_loss_parser.set_defaults(func=cmd_fit_loss)


def _add_plan(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan", help="model size, tokens, peak LR and batch size from a compute budget",
        description="Compute-optimal N and D from a loss law, then peak LR and batch size from a hyperparameter "
                    "law, with the schedule the law was fitted with and warnings where a law is extrapolated.",
    )
    plan.add_argument("--compute", default=None, metavar="FLOPS", help="training budget in FLOPs, e.g. 1e21")
    plan.add_argument("--params", default=None, metavar="N", help="model parameters (instead of --compute)")
    plan.add_argument("--tokens", default=None, metavar="D", help="training tokens (with --params)")
    plan.add_argument("--loss-law", default="besiroglu", metavar="LAW|FILE",
                      help="besiroglu (default), hoffmann, or a file from `steplaw fit-loss --save`")
    plan.add_argument("--hparam-law", default="step_law", metavar="LAW|FILE",
                      help="step_law (default), deepseek, kaplan, porian, or a file from `steplaw fit --save`")
    plan.add_argument("--seq-len", type=cliargs.positive_int, default=2048, metavar="L",
                      help="tokens per sequence for the batch in sequences (default 2048)")
    plan.add_argument("--save", default=None, metavar="PLAN.json",
                      help="also write the plan (prediction, interval, laws and their hashes, assumptions, date) "
                           "for `steplaw score` after the run")
    plan.add_argument("--schedule", default=None, metavar="KIND",
                      help="the LR schedule you will train with (cosine, wsd, constant, multistep, linear): warn "
                           "when the hyperparameter law was fitted under another")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)


def add_commands(subparsers) -> None:
    _add_predict(subparsers)
    _add_fit(subparsers)
    _add_plan(subparsers)
    _add_score(subparsers)
