"""`steplaw report SWEEP_DIR`: Markdown + HTML report of a sweep (see steplaw.report.build)."""
from __future__ import annotations

from pathlib import Path

from steplaw.cli import args as cliargs
from steplaw.cli.laws import add_spec_args
from steplaw.errors import UserError, warn
from steplaw.report.build import write_report


def add_commands(subparsers) -> None:
    report = subparsers.add_parser("report", help="write the Markdown and HTML report of a sweep directory",
                                   description="Fit the laws from a sweep directory and write report.md (with PNG "
                                               "figures), a self-contained report.html, runs.csv and fit.json.")
    report.add_argument("sweep_dir", help="sweep directory (written by `steplaw sweep` or `steplaw demo`)")
    report.add_argument("--out", "-o", help="report directory (default SWEEP_DIR/report)")
    report.add_argument("--n-boot", type=cliargs.nonnegative_int, default=1000,
                        help="bootstrap resamples of the fit (default 1000)")
    report.add_argument("--gap", type=cliargs.nonnegative_float, default=0.0025,
                        help="relative loss gap of near-optimal runs (default 0.0025)")
    report.add_argument("--no-html", action="store_true", help="Markdown only")
    report.add_argument("--no-plots", action="store_true", help="no figures (no matplotlib needed)")
    report.add_argument("--loss-holdout", default=None, metavar="RULE",
                        help="also check the loss law on held-out cells (as `fit-loss --holdout`: N>=X, D>=Y, C>=Z or "
                             "largest, comma-joined)")
    report.add_argument("--loss-rollout", choices=["N", "D"], default=None,
                        help="also the loss law's expanding-window rollout by N or D (as `fit-loss --rollout`)")
    add_spec_args(report)
    report.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    path = Path(args.sweep_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{args.sweep_dir!r} is a file, not a sweep directory: expected a directory written by "
                        "`steplaw sweep` (a table file is fitted by `steplaw fit`)")
    if not path.is_dir():
        raise UserError(f"sweep directory {args.sweep_dir!r} does not exist")
    if not args.gap < 1:  # a bad gap would otherwise only show as "no law was fitted" in the report
        raise UserError(f"--gap {args.gap!r} must be a relative loss gap in [0, 1).")
    if args.loss_holdout is not None:  # a malformed rule is refused before any work
        from steplaw.laws.rollout import parse_holdout

        parse_holdout(args.loss_holdout)
    cliargs.check_output_dir(args.out if args.out else Path(args.sweep_dir) / "report", "--out")
    for written in write_report(args.sweep_dir, args.out, n_boot=args.n_boot, gap=args.gap,
                                html_report=not args.no_html, plots=not args.no_plots, spec=args.spec_id,
                                all_specs=args.all_specs, warn=lambda line: warn(line, args.command_prog),
                                loss_holdout=args.loss_holdout, loss_rollout=args.loss_rollout):
        print(written)
    return 0
