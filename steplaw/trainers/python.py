"""--trainer MODULE:FUNCTION: a Python function as a trainer.

    def train(trial: dict, report) -> dict: ...

`trial` is the contract's trial (steplaw.trial; a dict, the same as a command trainer's
trial.json), `report(tokens=..., loss=...)` feeds the progress line and the ETA, and
returns True when the run should stop (its loss is not finite or rose above the
divergence rule: the run is then diverged, whatever the function returns). The return
value is the contract's result, checked by steplaw.trial.parse_result.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

from steplaw.errors import UserError
from steplaw.trial import Trial, diverging, parse_result


def load_function(target: str, flag: str = "--trainer",
                  expected: str = "steplaw, hf or MODULE:FUNCTION (e.g. mytrain:train)"):
    """The function MODULE:FUNCTION names; UserError naming `flag` when it cannot be found."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UserError(f"{flag} {target!r}: expected {expected}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{flag} {target!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{flag} {target!r}: {module_name} has no function {attr!r}")
    return fn


@dataclass(frozen=True)
class PythonTrainer:
    target: str  # MODULE:FUNCTION (a name, so that the trainer pickles to any worker)
    capabilities = ()

    @property
    def name(self) -> str:
        return self.target

    def __call__(self, config: Trial, run_dir: str | None = None, progress=None) -> dict:
        fn = load_function(self.target)
        state = {"first": None, "diverged": None}

        def report(tokens=None, loss=None, **extra) -> bool:
            if loss is not None:
                why = diverging(state["first"], loss)
                if why and state["diverged"] is None:
                    state["diverged"] = f"{why} (stopped early)"
                if state["first"] is None and not why and math.isfinite(loss):
                    state["first"] = float(loss)
            if progress is not None:
                progress({k: v for k, v in {"tokens": tokens, "loss": loss, **extra}.items() if v is not None})
            return state["diverged"] is not None

        value = fn(config.placed(run_dir), report)
        if state["diverged"] is not None:
            return {"status": "diverged", "reason": state["diverged"]}
        return parse_result(value, f"trainer {self.target}")
