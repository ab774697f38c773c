"""Which LR schedule a law was fitted under, and the checks that keep laws and runs of different schedules apart.

An optimal peak LR is a peak LR *of a schedule*: the best WSD peak is about half the best
cosine one in Hägele et al. 2024 (arXiv:2405.18392), and under WSD or decay-to-zero the
LR law's D exponent is flat or negative where the Step Law's cosine runs give +0.307. So
every law names its schedule (published laws in steplaw.laws.published, fitted laws in
their files), a fit refuses runs of several schedules (`schedule_of_runs`) and a
prediction warns when it is asked for another one (`mismatch_warning`).

A schedule label is a kind, optionally with its settings: "cosine", "wsd",
"cosine(min_lr_ratio=0.1)", "wsd(decay_fraction=0.2,decay_shape=sqrt,min_lr_ratio=0)".
Two labels with different settings are different schedules for a fit; a prediction's
`--schedule` names a kind and is compared with the law's kind.
"""
from __future__ import annotations

import numpy as np

from steplaw.errors import UserError

# The kinds a law or a prediction may name: steplaw's own schedules (steplaw.optim.schedule)
# and the others published laws were fitted under.
KINDS = ("cosine", "wsd", "constant", "multistep", "linear")
UNKNOWN = "unknown"


def kind_of(label: str | None) -> str:
    """The kind of a label ('wsd' of 'wsd(decay_fraction=0.2)'); UNKNOWN for none."""
    label = (label or "").strip().lower()
    return label.split("(", 1)[0].strip() or UNKNOWN


def label_of_config(config: dict) -> str | None:
    """The schedule label of a steplaw RunConfig dict (the settings that shape its LR curve;
    the warmup is left out: its default is a fraction of each run's D), or None when the
    config names no schedule (another trainer's trial)."""
    kind = config.get("schedule")
    if not isinstance(kind, str) or not kind:
        return None
    if kind == "constant":
        return kind
    settings = {"min_lr_ratio": config.get("min_lr_ratio")}
    if kind == "wsd":
        settings.update(decay_fraction=config.get("decay_fraction"), decay_shape=config.get("decay_shape") or "linear")
    inner = ",".join(f"{key}={value:g}" if isinstance(value, (int, float)) else f"{key}={value}"
                     for key, value in sorted(settings.items()) if value is not None)
    return f"{kind}({inner})" if inner else kind


def schedule_of_runs(labels: np.ndarray | None, used: np.ndarray, allow_mixed: bool = False) -> tuple[str, list[str]]:
    """(the schedule label of the runs a fit uses, warnings). labels: per-row labels of the
    table (None: the table has no schedule column); used: a boolean mask of the fitted rows.
    Several labels among them are refused in one sentence unless `allow_mixed` (then a
    warning, and the label lists them all)."""
    if labels is None:
        return UNKNOWN, []
    named = labels[used]
    counts: dict[str, int] = {}
    for label in named:
        if label:
            counts[label] = counts.get(label, 0) + 1
    unnamed = int(sum(1 for label in named if not label))
    warnings = [f"{unnamed} of {named.size} fitted runs name no schedule; the law's schedule is that of the others."] \
        if unnamed and counts else []
    if not counts:
        return UNKNOWN, warnings
    if len(counts) == 1:
        return next(iter(counts)), warnings
    listing = ", ".join(f"{label}: {count} runs" for label, count in sorted(counts.items()))
    if not allow_mixed:
        raise UserError(f"the runs were trained under {len(counts)} LR schedules ({listing}), and an optimal LR is a "
                        "peak LR of one schedule; fit one schedule's runs (filter the table or choose a --spec), or "
                        "pass --allow-mixed-schedules to fit the mixture anyway.")
    warnings.append(f"the law is fitted to runs of {len(counts)} LR schedules ({listing}); its LR is the peak LR of no "
                    "single schedule.")
    return " + ".join(sorted(counts)), warnings


def check_kind(value: str | None, flag: str = "--schedule") -> str | None:
    """A --schedule value checked against KINDS (None passes)."""
    if value is None:
        return None
    kind = kind_of(value)
    if kind not in KINDS:
        raise UserError(f"{flag} {value!r} is not a schedule steplaw knows; expected one of {', '.join(KINDS)}.")
    return kind


def mismatch_warning(law_label: str, law_name: str, wanted: str | None) -> str | None:
    """A warning when a prediction for schedule `wanted` uses a law fitted under another (or
    an unknown) one; None when they agree or nothing was asked."""
    if wanted is None:
        return None
    law_kind = kind_of(law_label)
    if law_kind == UNKNOWN:
        return (f"{law_name} does not say which LR schedule it was fitted under, so it cannot be checked against "
                f"--schedule {wanted}; its LR may not be a good {wanted} peak LR.")
    if "+" in law_label:
        return f"{law_name} was fitted to a mixture of schedules ({law_label}); its LR is no {wanted} peak LR."
    if law_kind != wanted:
        return (f"{law_name} was fitted under a {law_label} schedule, not {wanted}: its LR is a peak LR of "
                f"{law_kind} (the best WSD peak is about half the cosine one in Hägele et al. 2024, "
                f"arXiv:2405.18392); refit on {wanted} runs for a {wanted} law.")
    return None
