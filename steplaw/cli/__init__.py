"""`steplaw ...`: the command line.

Every command lives in this package, on top of the layers it uses: each module here adds
the subcommands of one concern (a function `add_commands(subparsers)` that sets `func` to
a `cmd_*` handler on each parser: laws, train, data, sweep, report, doctor; ddp is the
torchrun entry point), so this file only wires them together. Errors go through steplaw.cli.args: a user mistake is one
line on stderr and exit code 2, never a traceback; a bug keeps its traceback.
"""
from __future__ import annotations

import importlib
import sys

from steplaw.cli import args as cliargs

# Modules that contribute subcommands, in help order.
COMMAND_MODULES = [
    "steplaw.cli.laws",  # predict, fit, fit-loss, plan
    "steplaw.cli.train",  # train
    "steplaw.cli.data",  # data prepare
    "steplaw.cli.sweep",  # sweep, runs, demo
    "steplaw.cli.report",  # report
    "steplaw.cli.doctor",  # doctor
]


def build_parser() -> cliargs.Parser:
    from steplaw import __version__

    parser = cliargs.Parser(
        prog="steplaw",
        description="Learning rate and batch size for LLM pretraining: predict, sweep, fit.",
    )
    parser.add_argument("--version", action="version", version=f"steplaw {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    prog = getattr(args, "command_prog", f"steplaw {args.command}")
    try:
        return cliargs.run_command(args.func, args, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # stdout closed early (e.g. `steplaw runs | head`): not an error


if __name__ == "__main__":
    sys.exit(main())
