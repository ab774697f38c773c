"""`steplaw predict`, `steplaw fit` and `steplaw fit-loss`."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from steplaw.errors import UserError
from steplaw.units import parse_count

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or positive")
    return value


def _json(obj) -> str:
    """Strict JSON: NaN and infinities (e.g. an unidentifiable fold) become null."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


# ---------------------------------------------------------------------------- predict
def cmd_predict(args) -> int:
    from steplaw.laws.published import LAWS, disagreements, predict_all

    args.params = parse_count(args.params, "--params")
    args.tokens = parse_count(args.tokens, "--tokens")
    args.moe_active = parse_count(args.moe_active, "--moe-active")
    args.compute = parse_count(args.compute, "--compute")
    args.loss = parse_count(args.loss, "--loss")
    predictions = predict_all(
        args.params, args.tokens, n_active=args.moe_active, compute=args.compute, loss=args.loss, laws=args.law
    )
    notes = disagreements(predictions)
    if args.json:
        out = {
            "inputs": {"n_params": args.params, "tokens": args.tokens, "n_active": args.moe_active,
                       "compute": args.compute, "loss": args.loss, "seq_len": args.seq_len},
            "predictions": [p.to_dict(args.seq_len) for p in predictions],
            "laws": {key: LAWS[key].info() for key in dict.fromkeys(p.law for p in predictions)},
            "disagreements": notes,
        }
        print(_json(out))
        return 0
    head = f"N = {args.params:.4g} non-embedding parameters"
    if args.moe_active:
        head += f" ({args.moe_active:.4g} activated)"
    print(f"{head}, D = {args.tokens:.4g} tokens, sequence length {args.seq_len}")
    rows = [("law", "N used", "peak LR", "batch (tokens)", "batch (seqs)", "source")]
    for p in predictions:
        rows.append((p.law, p.n_used, _fmt(p.lr), _fmt(p.batch_tokens), _fmt(p.batch_seqs(args.seq_len), ".1f"),
                     LAWS[p.law].citation))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for p in predictions:
        for key, value in p.derived.items():
            print(f"  {p.law}: derived {key} = {value:.4g}")
    seen = set()
    for p in predictions:
        for warning in p.warnings:
            if warning not in seen:
                seen.add(warning)
                print(f"warning: {warning}")
    for note in notes:
        print(f"warning: {note}")
    return 0


# ---------------------------------------------------------------------------- tables
def add_table_args(parser: argparse.ArgumentParser, with_compute: bool = False) -> None:
    parser.add_argument("runs", help="CSV, JSONL or Parquet table of runs, or a sweep directory (runs.sqlite)")
    group = parser.add_argument_group("column mapping (defaults: the runs-table names)")
    group.add_argument("--col-N", default="N", metavar="NAME", help="non-embedding parameters (default N)")
    group.add_argument("--col-D", default=None, metavar="NAME", help="training tokens (default D)")
    group.add_argument("--col-lr", default="lr", metavar="NAME", help="peak learning rate (default lr)")
    group.add_argument("--col-bs", default="batch_tokens", metavar="NAME", help="batch size (default batch_tokens)")
    group.add_argument("--col-loss", default="loss", metavar="NAME", help="final smoothed loss (default loss)")
    if with_compute:
        group.add_argument("--col-C", default=None, metavar="NAME",
                           help="training FLOPs; with no token column, D = C / (6 N)")
    group.add_argument("--bs-unit", choices=["tokens", "sequences"], default="tokens",
                       help="unit of the batch-size column (default tokens)")
    group.add_argument("--seq-len", type=_positive_int, default=None, metavar="L",
                       help="tokens per sequence, for --bs-unit sequences (else a seq_len column)")


def load_table(args):
    from steplaw.laws.table import read_runs

    return read_runs(
        args.runs, col_N=args.col_N, col_D=args.col_D, col_lr=args.col_lr, col_bs=args.col_bs,
        col_loss=args.col_loss, col_C=getattr(args, "col_C", None), bs_unit=args.bs_unit, seq_len=args.seq_len,
    )


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


def _describe_table(table) -> str:
    dropped = ", ".join(f"{reason} {count}" for reason, count in table.dropped.items()) or "none"
    return f"{len(table)} runs from {table.source} ({table.n_valid} finished with a finite loss; dropped: {dropped})"


_N_WORDS = {"N": "non-embedding parameters (total for MoE)", "N_active": "activated non-embedding parameters",
            "N_total": "all parameters incl. embeddings"}


def _print_law(label: str, law, unit: str) -> None:
    print(f"{label}: {law.formula(unit)}")
    parts = [f"coef {law.coef:.4g} [{_fmt(law.ci.get('coef', (None,))[0], '.4g')}, {_fmt(law.ci.get('coef', (None, None))[1], '.4g')}]"]
    for name, exp in law.exps.items():
        low, high = law.ci.get(f"exp_{name}", (None, None))
        parts.append(f"exp_{name} {exp:+.4f} [{_fmt(low, '+.4f')}, {_fmt(high, '+.4f')}]")
    print("    " + "   ".join(parts) + "   (95% bootstrap intervals)")


def _print_fit(fit) -> None:
    print(f"N = {fit.n_column}: {_N_WORDS.get(fit.n_column, fit.n_column)}; "
          f"{fit.counts['cells_used']} cells, {fit.counts['near_optimal_runs']} near-optimal runs "
          f"(within {fit.gap:.2%} of each cell's best loss)")
    _print_law("  learning rate", fit.lr_law, "lr")
    _print_law("  batch size   ", fit.bs_law, "B_tokens")
    v, s = fit.validation, fit.validation["step_law"]

    def pair(block, key, spec, scale=1.0):
        item = block[key]
        if item["median"] is None:
            return "-"
        return f"{item['median'] * scale:{spec}} / {item['max'] * scale:{spec}}"

    print("  validation (leave-one-cell-out)       this fit           Step Law (published, same cells)")
    print(f"    LR error factor (median / max)     {pair(v, 'lr_factor', '.3f'):<18} {pair(s, 'lr_factor', '.3f')}")
    print(f"    batch error factor (median / max)  {pair(v, 'bs_factor', '.3f'):<18} {pair(s, 'bs_factor', '.3f')}")
    print(f"    relative loss gap % (median / max) {pair(v, 'relative_loss_gap', '.3f', 100):<18} "
          f"{pair(s, 'relative_loss_gap', '.3f', 100)}")
    edges = [c for c in fit.cells if c.lr_edge or c.bs_edge]
    if edges:
        print(f"  {len(edges)} cell(s) have the best run on the grid's edge (true optimum may lie outside):")
        for cell in edges[:8]:
            print(f"    N={cell.N:.3g} D={cell.D:.3g}: lr {cell.lr_edge or 'inside'}, batch {cell.bs_edge or 'inside'}")
        if len(edges) > 8:
            print(f"    ... and {len(edges) - 8} more (see fit.json)")


def cmd_fit(args) -> int:
    from steplaw.laws.fit import fit_hparams

    table = load_table(args)
    columns = _n_columns(table, args.n_column)
    fits = {column: fit_hparams(table, gap=args.gap, n_boot=args.n_boot, seed=args.seed, n_column=column,
                                fit_bs_N=args.fit_bs_N) for column in columns}
    primary = fits[columns[0]]
    result = primary.to_dict()
    result["source"] = table.source
    if len(fits) > 1:
        result["by_n_column"] = {column: fit.to_dict() for column, fit in fits.items() if column != columns[0]}

    out_dir = Path(args.out) if args.out else None
    if out_dir is None and not args.json:
        source = Path(table.source)
        out_dir = source / "fit" if source.is_dir() else source.parent / f"{source.stem}_fit"
    written = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fit.json").write_text(_json(result) + "\n")
        written.append(out_dir / "fit.json")
        if not args.no_plots:
            try:
                from steplaw.report.plots import plot_fit
            except ImportError:  # the report package is not there
                plot_fit = None
            if plot_fit is not None:
                try:
                    written += plot_fit(table, primary, out_dir)
                except UserError as exc:  # matplotlib missing: the fit still stands
                    print(f"note: no plots: {exc}", file=sys.stderr)

    if args.json:
        print(_json(result))
        return 0
    print(_describe_table(table))
    for warning in primary.warnings:
        print(f"warning: {warning}")
    for column in columns:
        _print_fit(fits[column])
    if written:
        print("wrote " + ", ".join(str(path) for path in written))
    return 0


# ---------------------------------------------------------------------------- fit-loss
def cmd_fit_loss(args) -> int:
    from steplaw.laws.loss import fit_loss
    from steplaw.laws.published import step_law

    args.budget = parse_count(args.budget, "--budget")
    table = load_table(args)
    column = args.n_column
    fit = fit_loss(table, n_boot=args.n_boot, seed=args.seed, n_column=column)
    result = fit.to_dict()
    result["source"] = table.source
    if args.budget:
        n_opt, d_opt = fit.compute_optimal(args.budget)
        lr, bs = step_law(n_opt, d_opt)
        result["at_budget"] = {"compute": args.budget, "N_opt": n_opt, "D_opt": d_opt,
                               "predicted_loss": float(fit.predict(n_opt, d_opt)),
                               "step_law_lr": lr, "step_law_batch_tokens": bs}
    if args.json:
        print(_json(result))
        return 0
    print(_describe_table(table))
    for warning in fit.warnings:
        print(f"warning: {warning}")
    print(f"L(N, D) = E + A / N^alpha + B / D^beta   (N = {column}; {fit.n_cells} cells, best run per cell; "
          f"Huber on log-loss; rms log residual {fit.rms_log_residual:.2e})")
    for key in ("E", "A", "B", "alpha", "beta"):
        low, high = fit.intervals.get(key, (None, None))
        print(f"  {key:<6} {getattr(fit, key):.5g}   [{_fmt(low, '.5g')}, {_fmt(high, '.5g')}]")
    co = result["compute_optimal"]
    print(f"compute-optimal with {co['compute']}: N_opt ~ C^{co['N_exponent']:.3f}, D_opt ~ C^{co['D_exponent']:.3f}")
    if args.budget:
        at = result["at_budget"]
        print(f"at C = {args.budget:.3g} FLOPs: N_opt = {at['N_opt']:.4g}, D_opt = {at['D_opt']:.4g}, "
              f"predicted loss {at['predicted_loss']:.4f}; Step Law there: lr {at['step_law_lr']:.3g}, "
              f"batch {at['step_law_batch_tokens']:.3g} tokens")
    return 0


def add_commands(subparsers) -> None:
    predict = subparsers.add_parser(
        "predict", help="peak LR and batch size for N parameters and D tokens from published laws",
        description="Peak learning rate and batch size from published scaling laws (Step Law, DeepSeek, Kaplan).",
    )
    predict.add_argument("--params", required=True, metavar="N",
                         help="non-embedding parameters (for MoE: total non-embedding), e.g. 1e9 or 7B")
    predict.add_argument("--tokens", required=True, metavar="D", help="training tokens, e.g. 1e11")
    predict.add_argument("--law", default="all", help="'all' or a comma-separated list of: step_law, deepseek, kaplan, porian")
    predict.add_argument("--moe-active", default=None, metavar="N_ACTIVE",
                         help="MoE: activated non-embedding parameters per token")
    predict.add_argument("--seq-len", type=_positive_int, default=2048, metavar="L",
                         help="tokens per sequence for the batch in sequences (default 2048)")
    predict.add_argument("--compute", default=None, metavar="FLOPS",
                         help="training FLOPs for DeepSeek's law (default 6*N*D)")
    predict.add_argument("--loss", default=None, metavar="NATS",
                         help="expected final loss for Kaplan's critical batch (default: Kaplan's L(N, D))")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    predict.set_defaults(func=cmd_predict)

    fit = subparsers.add_parser(
        "fit", help="fit eta(N, D) and B(D) from a table of runs or a sweep",
        description="Fit lr = coef*N^exp_N*D^exp_D and B = coef*D^exp_D (the Step Law's method) with bootstrap "
                    "intervals and leave-one-cell-out validation.",
    )
    add_table_args(fit)
    fit.add_argument("--gap", type=float, default=0.0025, help="relative loss gap of the near-optimal set (default 0.0025)")
    fit.add_argument("--n-boot", type=_nonneg_int, default=1000, help="bootstrap resamples (default 1000)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    fit.add_argument("--n-column", choices=["auto", "N", "N_active", "N_total", "both"], default="auto",
                     help="which parameter count is N (auto: N, plus N_active for MoE tables)")
    fit.add_argument("--fit-bs-N", action="store_true", help="also fit an exponent of N in the batch-size law")
    fit.add_argument("--out", default=None, metavar="DIR",
                     help="write fit.json and PNG plots here (default: RUNS_fit/ beside a file, RUNS/fit/ for a sweep)")
    fit.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    fit.add_argument("--json", action="store_true", help="print one JSON object (files only with --out)")
    fit.set_defaults(func=cmd_fit)

    fit_loss_parser = subparsers.add_parser(
        "fit-loss", help="fit L(N, D) = E + A/N^alpha + B/D^beta and the compute-optimal N(C), D(C)",
        description="Fit the loss law (Huber on log-loss, BFGS from a grid of starts; Hoffmann et al. 2022).",
    )
    add_table_args(fit_loss_parser, with_compute=True)
    fit_loss_parser.add_argument("--n-boot", type=_nonneg_int, default=200, help="bootstrap resamples (default 200)")
    fit_loss_parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    fit_loss_parser.add_argument("--n-column", choices=["N", "N_active", "N_total"], default="N",
                                 help="which parameter count is N (default N)")
    fit_loss_parser.add_argument("--budget", default=None, metavar="FLOPS",
                                 help="also give N_opt, D_opt, the loss there and the Step Law's hyperparameters")
    fit_loss_parser.add_argument("--json", action="store_true", help="print one JSON object")
    fit_loss_parser.set_defaults(func=cmd_fit_loss)
