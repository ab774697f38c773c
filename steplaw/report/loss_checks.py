"""The report's extrapolation checks of the loss law, when asked for (`steplaw report
--loss-holdout RULE`, `--loss-rollout N|D`): the holdout (fit on the rest, predict the held-out
cells) and the expanding-window rollout of steplaw.laws.rollout, as report blocks.

A check the table cannot support is shown as its one-sentence refusal, not dropped.
"""
from __future__ import annotations

from steplaw.errors import UserError
from steplaw.laws.rollout import holdout_loss, parse_holdout, rollout_loss


def loss_checks(table, holdout: str | None, rollout: str | None, n_boot: int, seed: int = 0) -> dict | None:
    """{"holdout": dict or {"refused": sentence}, "rollout": ...} for the checks asked for; None if none."""
    if holdout is None and rollout is None:
        return None
    checks = {}
    if holdout is not None:
        try:
            fit, checks["holdout"] = holdout_loss(table, parse_holdout(holdout), n_boot=n_boot, seed=seed)
        except UserError as exc:
            checks["holdout"] = {"rule": holdout, "refused": str(exc)}
        else:
            for row in checks["holdout"]["rows"]:
                row["interval"] = fit.loss_interval(row["N"], row["D"])
    if rollout is not None:
        try:
            checks["rollout"] = rollout_loss(table, rollout)
        except UserError as exc:
            checks["rollout"] = {"variable": rollout, "refused": str(exc)}
    return checks


def _pct(value) -> str:
    return "–" if value is None else f"{value:+.2%}"


def loss_check_blocks(checks: dict | None) -> list[tuple]:
    """Blocks for the loss-law section: the holdout rows and mean, the rollout steps and mean."""
    if not checks:
        return []
    blocks: list[tuple] = []
    hold = checks.get("holdout")
    if hold is not None and "refused" in hold:
        blocks.append(("p", f"Holdout `{hold['rule']}`: not run: {hold['refused']}"))
    elif hold is not None:
        on = hold["fitted_on"]
        blocks.append(("p", f"Holdout `{hold['rule']}`: fitted on N {on['N'][0]:.3g} to {on['N'][1]:.3g}, D "
                            f"{on['D'][0]:.3g} to {on['D'][1]:.3g}; mean |rel_error| {hold['mean_abs_rel_error']:.2%} "
                            f"over {len(hold['rows'])} held-out cell(s)."))
        rows = [[f"{r['N']:.4g}", f"{r['D']:.4g}", f"{r['loss']:.4f}", f"{r['predicted']:.4f}",
                 "–" if not r.get("interval") else f"[{r['interval'][0]:.4f}, {r['interval'][1]:.4f}]",
                 _pct(r["rel_error"])] for r in hold["rows"]]
        blocks.append(("table", ["N", "D", "observed", "predicted", "95% prediction interval", "rel_error"], rows))
    roll = checks.get("rollout")
    if roll is not None and "refused" in roll:
        blocks.append(("p", f"Rollout by {roll['variable']}: not run: {roll['refused']}"))
    elif roll is not None:
        rows = []
        for step in roll["steps"]:
            (name, target), = step["predicted"].items()
            fitted = step["fitted_on"][name] if name in step["fitted_on"] else ["–", "–"]
            span = f"{fitted[0]:.3g} to {fitted[1]:.3g}" if not isinstance(fitted[0], str) else "–"
            rows.append([f"{target:.4g}", span, "refused: " + step["refused"] if "refused" in step
                         else f"{step['mean_abs_rel_error']:.2%}"])
        mean = roll["mean_abs_rel_error"]
        blocks.append(("p", f"Rollout by {roll['variable']} (fit on the k smallest values, predict the next): mean "
                            f"|rel_error| over steps {'–' if mean is None else format(mean, '.2%')}."))
        blocks.append(("table", [f"predicted {roll['variable']}", f"fitted on {roll['variable']}",
                                 "mean |rel_error|"], rows))
    return blocks
