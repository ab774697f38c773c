"""`steplaw ...`: the command line.

Each concern adds its own subcommands from its own module (a function
`add_commands(subparsers)` that sets `func` on each parser), so this file only wires
them together and turns user mistakes into one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from steplaw.errors import UserError

# Modules that contribute subcommands, in help order. A module that fails to import
# (an optional dependency missing) does not take the others down with it.
COMMAND_MODULES = [
    "steplaw.laws.cli",  # predict, fit, fit-loss
    "steplaw.train.cli",  # train
    "steplaw.data.cli",  # data prepare
    "steplaw.sweep.cli",  # sweep, runs, demo
    "steplaw.report.cli",  # report
    "steplaw.doctor",  # doctor
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steplaw",
        description="Learning rate and batch size for LLM pretraining: predict, sweep, fit.",
    )
    from steplaw import __version__

    parser.add_argument("--version", action="version", version=f"steplaw {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("steplaw"):
                continue  # that part of steplaw is not there yet
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"steplaw {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steplaw {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
