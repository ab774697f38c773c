"""`fit-loss --form auto`: choose the loss law's form by the error of the expanding-window
rollout by N (steplaw.laws.rollout.rollout_loss), and say which form won and by how much.

Each candidate form (steplaw.laws.loss_forms) is fitted at every rollout step with the
other fitting choices (E, weights, penalty) kept; the forms are compared on the steps
every one of them could fit.
"""
from __future__ import annotations

import numpy as np

from steplaw.errors import UserError
from steplaw.laws.loss_forms import FORMS, LossForm
from steplaw.laws.rollout import rollout_loss


def choose_form(table, base: LossForm, *, n_column: str = "N", forms=FORMS) -> tuple[LossForm, dict]:
    """(the winning form, the choice as a dict) by the mean absolute relative error of the
    expanding-window rollout by N; a UserError when no candidate can be scored."""
    per_step = {}
    for name in forms:
        try:
            rollout = rollout_loss(table, "N", n_column=n_column, form=base.with_name(name))
        except UserError as exc:
            raise UserError(f"--form auto chooses by the rollout by N, which cannot run here: {exc}") from None
        per_step[name] = {s["predicted"]["N"]: s["mean_abs_rel_error"] for s in rollout["steps"]
                          if "mean_abs_rel_error" in s}
    # Forms are compared on the steps every one of them could fit (a form with fewer
    # constants may fit a step the others refuse), so the means are over the same cells.
    common = sorted(set.intersection(*(set(steps) for steps in per_step.values())))
    if not common:
        raise UserError("--form auto: no rollout step by N could be fitted with every form (see "
                        "`fit-loss --rollout N --form NAME`); name a --form.")
    scores = {name: float(np.mean([per_step[name][n] for n in common])) for name in forms}
    ranked = sorted(scores, key=scores.get)
    winner, runner_up = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    choice = {"by": "rollout N", "chosen": winner, "mean_abs_rel_error": scores,
              "compared_on": {"steps": len(common), "N": [float(common[0]), float(common[-1])]}, "runner_up": runner_up,
              "margin": None if runner_up is None else scores[runner_up] - scores[winner]}
    return base.with_name(winner), choice


def choice_lines(choice: dict) -> list[str]:
    """--form auto's choice as text: each form's rollout error, the winner and the margin."""
    parts = [f"{name} {err:.3%}" for name, err in choice["mean_abs_rel_error"].items()]
    steps = choice["compared_on"]["steps"]
    line = (f"form auto (rollout by N, mean |rel_error| over the {steps} step(s) every form fits): "
            f"{'; '.join(parts)} -> {choice['chosen']}")
    if choice["margin"] is not None:
        line += f", better than {choice['runner_up']} by {choice['margin'] * 100:.3f} points"
    return [line]
