"""The one exception type for user mistakes, and the checks that word its sentences.

Anything a user can get wrong (a malformed table, a missing file, an impossible
config, a NaN where a number was expected) raises `UserError` with one sentence that
names the bad value and what was expected. The CLI prints that sentence and exits 2,
never a traceback. Bugs raise anything else and do show a traceback.

`whole_number_problem` and `number_problem` return such a sentence (or None) for one
field, so that a config can collect every mistake before raising one UserError.
`config_errors` turns what a dataclass raises on a wrong key or type into one. `warn`
writes a warning line on stderr, for any layer (stdout carries only a command's data).
"""
from __future__ import annotations

import contextlib
import math
import sys


class UserError(ValueError):
    """A user mistake, with a message fit to print as is."""


def whole_number_problem(
    name: str, value, low: int | None = None, high: int | None = None, *, high_text: str | None = None
) -> str | None:
    """None if `value` is an int (not a bool) in [low, high), else the sentence saying so."""
    if low is not None and high is not None:
        expected = f"a whole number in [{low}, {high_text or high})"
    elif low is not None:
        expected = f"a whole number >= {low}"
    elif high is not None:
        expected = f"a whole number below {high_text or high}"
    else:
        expected = "a whole number"
    wrong_type = isinstance(value, bool) or not isinstance(value, int)
    if wrong_type or (low is not None and value < low) or (high is not None and value >= high):
        return f"{name}={value!r}: expected {expected}"
    return None


def number_problem(
    name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> str | None:
    """None if `value` is a finite int or float in the range, else the sentence saying so.

    The range is [low, high]; low_open / high_open exclude that end."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}={value!r}: expected a number"
    if not math.isfinite(value):
        return f"{name}={value!r}: expected a finite number"
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if low is not None and high is not None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            return f"{name}={value!r}: expected a number in {left}{low:g}, {high:g}{right}"
        if low is not None:
            return f"{name}={value!r}: expected a number {'>' if low_open else '>='} {low:g}"
        return f"{name}={value!r}: expected a number {'<' if high_open else '<='} {high:g}"
    return None


def raise_problems(problems: list[str | None], what: str | None = None) -> None:
    """Raise one UserError listing every problem (joined by '; '), if there is any."""
    found = [p for p in problems if p]
    if found:
        head = f"{what}: " if what else ""
        raise UserError(head + "; ".join(found))


@contextlib.contextmanager
def config_errors(what: str):
    """Turn a ValueError or TypeError raised while building a config from user input
    (a dataclass given a wrong key or type) into a one-line UserError naming `what`.
    Wrap only the construction from user input: elsewhere these are bugs."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what}: {first}") from exc


def warn(message: str, prog: str = "steplaw") -> None:
    """One warning line on stderr, "PROG: warning: MESSAGE"."""
    print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
