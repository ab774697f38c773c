"""Numbers as users type them on the command line: 2M, 1e9, 7B, 1.5T, 32768.

`parse_count` is the one parser of counts in steplaw (parameters, tokens, batch sizes,
FLOP budgets); `steplaw.cli.args` wraps it as argparse types.
"""
from __future__ import annotations

import math
import re

from steplaw.errors import UserError

_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
_NUMBER = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbBtT]?)\s*$")


def parse_count(text, option: str | None = "value", *, integer: bool = False):
    """'2M' -> 2e6, '1e9' -> 1e9, '7B' -> 7e9, '1.5k' -> 1500.0; None stays None.

    A positive finite number with an optional k/M/G/B/T suffix (B = billion), else a
    UserError whose sentence starts with `option` (or with the bad text when `option` is
    None, for callers that name the option themselves). With integer=True the value
    must be whole and is returned as an int.
    """
    if text is None:
        return None
    prefix = f"{option} " if option else ""
    match = _NUMBER.match(str(text))
    if not match:
        raise UserError(f"{prefix}{str(text)!r} is not a number; expected e.g. 1e9, 7B, 300M or 32768.")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{prefix}{str(text)!r} must be a positive finite number.")
    if integer:
        if value < 1 or abs(value - round(value)) > 1e-6 * value:
            raise UserError(f"{prefix}{str(text)!r} must be a positive whole number.")
        return int(round(value))
    return value
