"""A training plan from a compute budget (or a given N and D): model size, tokens, peak
LR and batch size, from published laws or from your own fitted ones.

    make_plan(compute=C)                      # N, D compute-optimal under the loss law
    make_plan(params=N, tokens=D)             # N and D given
    make_plan(..., loss_law="besiroglu" | "hoffmann" | FILE, hparam_law="step_law" | ... | FILE)

Steps: (1) N_opt, D_opt minimizing L(N, D) at C = k N D (k = 6 for published laws, the
fitted k for a file), with the bootstrap interval when the loss law is a fitted file
(published laws give no joint uncertainty of their constants, so none is invented);
(2) the loss the law predicts there; (3) peak LR and batch size (tokens, and sequences
of `seq_len`) from the hyperparameter law at that N and D; (4) the schedule the
hyperparameter law was fitted with, since its LR means a peak LR of that schedule;
(5) warnings wherever a law is evaluated outside the range it was fitted on, and where
the laws count N differently (Chinchilla's N includes embeddings, the Step Law's not).
"""
from __future__ import annotations

import math
from pathlib import Path

from steplaw.errors import UserError
from steplaw.laws.published import LAWS, LawInputs, range_warnings
from steplaw.laws.published_loss import LOSS_LAWS
from steplaw.laws.published_loss import loss_law as published_loss_law
from steplaw.laws.saved import SavedHparamLaw, SavedLossLaw, read_law
from steplaw.laws.schedules import check_kind, mismatch_warning

DEFAULT_LOSS_LAW = "besiroglu"
DEFAULT_HPARAM_LAW = "step_law"


def _is_file_name(value: str) -> bool:
    return value.endswith(".json") or "/" in value or Path(value).is_file()


def _resolve_loss_law(value: str) -> tuple[object, dict]:
    if _is_file_name(value):
        law = read_law(value)
        if not isinstance(law, SavedLossLaw):
            raise UserError(f"{value!r} holds a hyperparameter law; --loss-law needs a file from `steplaw fit-loss --save`.")
        return law, {"key": value, "name": "fitted loss law", "citation": law.source, "n_column": law.n_column,
                     **law.formula_dict(), "fitted_range": law.fitted_range}
    published = published_loss_law(value)
    return published.law, published.info()


def _resolve_hparam_law(value: str) -> tuple[object, dict]:
    if _is_file_name(value):
        law = read_law(value)
        if not isinstance(law, SavedHparamLaw):
            raise UserError(f"{value!r} holds a loss law; --hparam-law needs a file from `steplaw fit --save`.")
        return law, {"key": value, "name": "fitted hyperparameter law", "citation": law.source,
                     "lr_law": law.lr_law.formula("lr"), "bs_law": law.bs_law.formula("B"), "n_column": law.n_column,
                     "fitted_range": law.fitted_range, "schedule_kind": law.schedule,
                     "schedule": f"{law.schedule}: the schedule of the runs the law was fitted on (its LR is a peak LR "
                                 "of that schedule)"}
    if value not in LAWS:
        raise UserError(f"unknown hyperparameter law {value!r}; expected one of {', '.join(LAWS)} or a file from "
                        "`steplaw fit --save`.")
    return LAWS[value], LAWS[value].info()


def _check(name: str, value) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


def _model_and_tokens(law, compute, params, tokens) -> tuple[float, float, float, dict | None, str]:
    if compute is not None:
        if params is not None or tokens is not None:
            raise UserError("give either --compute or --params with --tokens, not both.")
        n, d = law.compute_optimal(compute)
        interval = law.optimal_interval(compute) if hasattr(law, "optimal_interval") else None
        return n, d, compute, interval, "compute-optimal"
    if params is None or tokens is None:
        raise UserError("a plan needs --compute C, or both --params N and --tokens D.")
    return params, tokens, law.flops_per_param_token * params * tokens, None, "given"


def make_plan(*, compute: float | None = None, params: float | None = None, tokens: float | None = None,
              loss_law: str = DEFAULT_LOSS_LAW, hparam_law: str = DEFAULT_HPARAM_LAW, seq_len: int = 2048,
              schedule: str | None = None) -> dict:
    """The plan as plain data (see the module docstring); N parameters, D tokens, FLOPs.
    schedule: the LR schedule kind the run will use (warned about when the law's differs)."""
    compute, params, tokens = _check("compute", compute), _check("params", params), _check("tokens", tokens)
    schedule = check_kind(schedule)
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}.")
    loss, loss_info = _resolve_loss_law(loss_law)
    hparams, hparam_info = _resolve_hparam_law(hparam_law)
    n, d, c, interval, mode = _model_and_tokens(loss, compute, params, tokens)
    # A law file carries its fit's warnings (e.g. a refused exponent): the plan repeats them.
    warnings = [w for law in (loss, hparams) if isinstance(law, (SavedLossLaw, SavedHparamLaw)) for w in law.warnings]
    warnings += range_warnings(f"loss law {loss_info['key']}", loss_info.get("fitted_range") or {}, {"N": n, "D": d})
    if isinstance(hparams, SavedHparamLaw):
        lr, bs, more = hparams.predict(n, d)
        warnings += more
    else:
        prediction = hparams.predict(LawInputs(n_params=n, tokens=d))
        lr, bs = prediction.lr, prediction.batch_tokens
        warnings += prediction.warnings
    notes = []
    if loss_info["key"] in LOSS_LAWS:
        notes.append("the published loss law's N counts all parameters (embeddings included) and the hyperparameter "
                     "law is evaluated at that N; with a large vocabulary subtract the embedding share first "
                     "(--params with --tokens).")
        if interval is None and mode == "compute-optimal":
            notes.append("no interval for N and D: the paper gives no joint uncertainty of its constants "
                         "(fit your own with `steplaw fit-loss --save` for one).")
    if lr is None:
        warnings.append(f"{hparam_info['key']} gives no learning rate at N={n:.3g}.")
    mismatch = mismatch_warning(hparam_info.get("schedule_kind", "unknown"),
                                f"hyperparameter law {hparam_info['key']}", schedule)
    warnings += [mismatch] if mismatch else []
    return {
        "mode": mode, "N": n, "D": d, "compute": c,
        "N_interval": list(interval["N"]) if interval else None,
        "D_interval": list(interval["D"]) if interval else None,
        "tokens_per_parameter": d / n,
        "predicted_loss": float(loss.predict(n, d)),
        "predicted_loss_interval": loss.loss_interval(n, d) if isinstance(loss, SavedLossLaw) else None,
        "lr": lr, "batch_tokens": bs, "seq_len": seq_len,
        "batch_seqs": bs / seq_len if bs else None,
        "steps": d / bs if bs else None,
        "schedule": hparam_info.get("schedule", ""), "schedule_kind": hparam_info.get("schedule_kind", "unknown"),
        "planned_schedule": schedule,
        "loss_law": loss_info, "hparam_law": hparam_info,
        "warnings": warnings, "notes": notes,
    }


def plan_lines(plan: dict) -> list[str]:
    """The plan as lines of text (warnings excluded: the CLI prints them on stderr)."""
    def fmt(value, spec=".4g"):
        return "-" if value is None else format(value, spec)

    def span(key):
        bounds = plan.get(f"{key}_interval")
        return f" (95% interval {bounds[0]:.3g} to {bounds[1]:.3g})" if bounds else ""

    loss, hp = plan["loss_law"], plan["hparam_law"]
    lines = [
        f"compute C = {plan['compute']:.4g} FLOPs ({plan['mode']}; loss law {loss['key']}: {loss.get('citation', '')})",
        f"  model      N = {plan['N']:.4g} parameters{span('N')}",
        f"  tokens     D = {plan['D']:.4g}{span('D')}  ({plan['tokens_per_parameter']:.1f} tokens per parameter)",
        f"  loss       {plan['predicted_loss']:.4f} nats (predicted by the loss law"
        + (", 95% interval {:.4f} to {:.4f} with the runs' scatter)".format(*plan["predicted_loss_interval"])
           if plan.get("predicted_loss_interval") else ")"),
        f"  peak LR    {fmt(plan['lr'], '.3g')}  (hyperparameter law {hp['key']}: {hp.get('citation', '')})",
        f"  batch      {fmt(plan['batch_tokens'], '.4g')} tokens = {fmt(plan['batch_seqs'], '.1f')} sequences of "
        f"{plan['seq_len']}; {fmt(plan['steps'], '.4g')} steps",
        f"  schedule   {plan['schedule']}",
    ]
    lines += [f"note: {note}" for note in plan["notes"]]
    return lines
