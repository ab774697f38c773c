"""Command-line arguments shared by every `steplaw` subcommand: one way to parse them,
to check output paths, and to turn user mistakes into one line on stderr (the sentences
themselves, and warnings, come from steplaw.errors: UserError, config_errors, warn).

Every subcommand module uses these instead of its own helpers:

  Parser            argparse.ArgumentParser whose usage errors are one line
                    ("steplaw train: error: ...", exit 2), the usage left to --help.
  count             type=: a positive whole count with an optional k/M/B/T suffix
                    (2M, 1e9, 32768), parsed by steplaw.units.parse_count.
  quantity          type=: the same, not necessarily whole (a FLOP budget, a loss).
  positive_int      type=: a plain whole number >= 1 (experts, steps, workers).
  nonnegative_int   type=: a plain whole number >= 0 (a seed, shared experts).
  positive_float    type=: a finite number > 0 (a learning rate, a scale).
  nonnegative_float type=: a finite number >= 0 (weight decay, a coefficient).
  finite_float      type=: any finite number.
  add_table_args(parser, with_compute, needs)
                    the runs argument and the column flags (--col-N, --col-lr, ...)
                    of every command that reads a table of runs (fit, fit-loss,
                    sweep --replay), so one column mapping serves them all.
  check_output_file(path, what) / check_output_dir(path, what)
                    UserError unless a file / directory can be written there, to be
                    called before any work starts (nothing is created).
  run_command(handler, args, prog)
                    calls a `cmd_*` handler, printing a UserError or an OSError as one
                    line and returning 2 (STEPLAW_TRACEBACK=1 re-raises instead).

Values that a config checks anyway (a ratio in [0, 1], a seed below 2^63) are parsed
by these types for their form and then refused by the config's validate(), so the rule
lives in one place.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from steplaw.errors import UserError
from steplaw.units import parse_count

_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?[kKmMgGbBtT]?$|^-(inf|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `PROG: error: MESSAGE`, exit 2.

    Subparsers made with `add_subparsers().add_parser(...)` are Parsers too, and each
    sets `args.command_prog` (e.g. "steplaw data prepare") for the messages of the
    command that runs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_defaults(command_prog=self.prog)
        # argparse takes "-1e-3" or "-2M" for an option (it knows only -5 and -0.5 as
        # numbers) and says "expected one argument"; let them reach the types, which
        # name what is wrong with them.
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argparse types
# Each raises ArgumentTypeError, whose message argparse prints after "argument --x: ".

def _type_error(exc: UserError) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(str(exc).rstrip("."))


def count(text: str) -> int:
    """A positive whole count: 2M, 1e9, 1.5k, 32768."""
    try:
        return parse_count(text, None, integer=True)
    except UserError as exc:
        raise _type_error(exc) from None


def quantity(text: str) -> float:
    """A positive finite amount with an optional suffix: 1e21, 2.5M, 3.1."""
    try:
        return parse_count(text, None)
    except UserError as exc:
        raise _type_error(exc) from None


def _integer(text: str, low: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {low}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (no suffixes: 8, not 8k)."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """A whole number >= 0."""
    return _integer(text, 0)


def _float(text: str, low: float | None, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 3e-3)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
    if low is not None and (value <= low if strict else value < low):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number {'>' if strict else '>='} {low:g}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _float(text, 0.0, strict=True)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _float(text, 0.0, strict=False)


def finite_float(text: str) -> float:
    """Any finite number."""
    return _float(text, None, strict=False)


# ---------------------------------------------------------------- table columns

def add_table_args(parser: argparse.ArgumentParser, with_compute: bool = False, needs: str = "hparams") -> None:
    """The runs argument and the column flags a command needs ('hparams': N, D, lr, batch,
    loss; 'loss': N, D or compute, loss)."""
    parser.add_argument("runs", help="CSV, JSONL or Parquet table of runs, or a sweep directory (runs.sqlite)")
    group = parser.add_argument_group("column mapping (defaults: the runs-table names)")
    # The loss law reads no LR or batch column; its parser still takes their flags (hidden)
    # so that one column mapping serves both fit and fit-loss.
    hparams_only = (lambda text: text) if needs == "hparams" else (lambda text: argparse.SUPPRESS)
    group.add_argument("--col-N", default="N", metavar="NAME", help="non-embedding parameters (default N)")
    group.add_argument("--col-D", default=None, metavar="NAME", help="training tokens (default D)")
    group.add_argument("--col-lr", default="lr", metavar="NAME", help=hparams_only("peak learning rate (default lr)"))
    group.add_argument("--col-bs", default=None, metavar="NAME",
                       help=hparams_only("batch size (default: batch_tokens, else batch_seqs / batch_sequences)"))
    group.add_argument("--col-loss", default=None, metavar="NAME",
                       help="final loss (default loss; for a sweep directory, the loss its sweep minimised: "
                            "loss or val_loss)")
    if with_compute:
        group.add_argument("--col-C", default=None, metavar="NAME",
                           help="training FLOPs; with no token column, D = C / (6 N)")
    group.add_argument("--bs-unit", choices=["tokens", "sequences"], default=None,
                       help=hparams_only("unit of the batch-size column; required when its name (e.g. bs, "
                                         "batch_size) does not say it (batch_tokens: tokens; batch_seqs: sequences)"))
    group.add_argument("--seq-len", type=positive_int, default=None, metavar="L",
                       help=hparams_only("tokens per sequence, for a batch in sequences (else a seq_len column)"))
    parser.set_defaults(table_needs=needs)



# ---------------------------------------------------------------- output paths

def _probe_write(directory: Path, path: Path, what: str) -> None:
    """Create and remove a temporary file in `directory`: permission bits cannot tell a
    read-only mount, /proc, or what root may not write, so only a real write is trusted."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UserError(f"{what} {str(path)!r} cannot be written: no permission to write in {str(directory)!r} "
                        f"({exc.strerror or exc})") from None


def _writable_ancestor(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a directory we may write in
    (then the missing directories can be made when the output is written)."""
    parent = path.absolute().parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    _probe_write(parent, path, what)


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """The Path of an output file that can be written, else a UserError naming `what`
    (e.g. "--out"): not a directory, and in a writable directory or one that can be
    made. An existing file is allowed (it will be replaced). Creates nothing that stays."""
    if not os.fspath(path):
        raise UserError(f"{what} is empty: expected a file name")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory: expected a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UserError(f"{what} {str(path)!r}: no permission to write this file")
        # Outputs are written to a temporary file and renamed over the old one.
        _probe_write(path.absolute().parent, path, what)
        return path
    _writable_ancestor(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """The Path of an output directory that exists and is writable, or can be made,
    else a UserError naming `what`. Creates nothing that stays."""
    if not os.fspath(path):
        raise UserError(f"{what} is empty: expected a directory name")
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {str(path)!r} is a file: expected a directory")
        _probe_write(path, path, what)
        return path
    _writable_ancestor(path, what)
    return path


# ---------------------------------------------------------------- running a command

def run_command(handler, args, prog: str) -> int:
    """Call `handler(args)` and return its exit code. A UserError, or an OSError (a path
    the user named that cannot be read or written), is printed as one line on stderr and
    gives 2. Anything else is a bug and propagates with its traceback. With the
    environment variable STEPLAW_TRACEBACK=1 the user errors propagate too."""
    show = os.environ.get("STEPLAW_TRACEBACK", "") not in ("", "0")
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        if show:
            raise
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if show or isinstance(exc, BrokenPipeError):
            raise
        where = f": {str(exc.filename)!r}" if exc.filename is not None else ""
        reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
        print(f"{prog}: error: {reason}{where}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
