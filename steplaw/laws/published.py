"""Published hyperparameter scaling laws: peak learning rate and batch size from N and D.

Every law in `LAWS` says its formula, the units of its inputs and outputs, the paper,
and the range it was fitted on. Units throughout: N = parameter count (each law says
which), D = training tokens, batch size in tokens, lr = peak learning rate.

Laws included (formulas and constants checked against the papers' text):

- Step Law — Li et al. 2025, "Predictable Scale: Part I — Optimal Hyperparameter Scaling
  Law in Large Language Model Pretraining", arXiv:2503.04715:
  eta = 1.79 N^-0.713 D^0.307, B = 0.58 D^0.571 tokens; N non-embedding parameters.
  The paper states it also holds for MoE models (we let the user pick total or
  activated N and print both).
- DeepSeek LLM — Bi et al. 2024, arXiv:2401.02954: eta = 0.3118 C^-0.1250,
  B = 0.2920 C^0.3271 tokens, C = M*D FLOPs with M the non-embedding FLOPs per token.
  We approximate M = 6*N (N non-embedding, activated for MoE), so C = 6*N*D, unless the
  user gives C. (The paper's M also counts attention, 6*n_layer*l_seq*d_model per token;
  6N leaves that out, which matters little for short contexts.)
- Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv:2001.08361:
  critical batch size B_crit(L) = B_* / L^(1/alpha_B), B_* = 2.1e8 tokens,
  alpha_B = 0.21 (Eq. 5.3 and Fig. 10: "B_crit = 2.1e8 tokens * L^-4.8"), L the loss in
  nats; and the learning rate of its Appendix D.6, Eq. D.1:
  lr(N) = 0.003239 - 0.0001395 ln(N), N non-embedding parameters (fitted for its Adam
  setup with a 3,000-step warmup and cosine decay to zero, batch 512 x 1024 tokens; it
  turns negative above N ~ 1.2e10, where we give no LR). When the user gives no loss
  we derive it as the paper does, from its L(N, D) (Eq. 1.5):
  L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D with N_c = 8.8e13, alpha_N = 0.076,
  D_c = 5.4e13, alpha_D = 0.095 (the constants of Eqs. 1.1-1.2, which Eq. 1.5 reduces
  to in its limits). That loss is on WebText2 with GPT-2's tokenizer: a user's own loss
  (`loss=`) is better when their data differ.

- Porian et al. 2024, "Resolving Discrepancies in Compute-Optimal Scaling of Language
  Models", arXiv:2406.19146: eta = 3.7 N^-0.36 and B = 0.7576 N^0.703 tokens (the paper
  states B as 0.00037 N^0.703 sequences of 2048 tokens), fitted on models of 5M to 901M
  parameters with AdamW (beta2 tuned at small batches). The constants are as Li et al.
  2025 tabulate them in their comparison of laws; Porian's N counts the output head but
  not the input embedding, one d_model x vocab more than our non-embedding N, which we
  pass unchanged (the law depends on N alone; no D).

Published loss laws L(N, D) (Hoffmann et al. 2022, Besiroglu et al. 2024) live beside
these in `steplaw.laws.published_loss`.

Left out because their constants could not be checked against the paper text here:
Bjorck et al. 2024 (the stored secondary sources disagree on its coefficient), Power
Lines (Bergsma et al. 2025), MiniCPM.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from steplaw.errors import UserError

# Step Law constants (arXiv:2503.04715, Eq. for eta(N, D) and B(D)).
STEP_LR_COEF, STEP_LR_EXP_N, STEP_LR_EXP_D = 1.79, -0.713, 0.307
STEP_BS_COEF, STEP_BS_EXP_D = 0.58, 0.571

# DeepSeek LLM constants (arXiv:2401.02954, Sec. 3.1).
DEEPSEEK_LR_COEF, DEEPSEEK_LR_EXP_C = 0.3118, -0.1250
DEEPSEEK_BS_COEF, DEEPSEEK_BS_EXP_C = 0.2920, 0.3271

# Kaplan et al. 2020 (arXiv:2001.08361): Eq. 5.3 / Fig. 10 and Eqs. 1.1, 1.2, 1.5.
KAPLAN_B_STAR, KAPLAN_ALPHA_B = 2.1e8, 0.21
KAPLAN_N_C, KAPLAN_ALPHA_N = 8.8e13, 0.076
KAPLAN_D_C, KAPLAN_ALPHA_D = 5.4e13, 0.095
# Porian et al. 2024 (arXiv:2406.19146), as tabulated by Li et al. 2025.
PORIAN_LR_COEF, PORIAN_LR_EXP_N = 3.7, -0.36
PORIAN_BS_COEF, PORIAN_BS_EXP_N = 0.7576, 0.703
# Kaplan et al. 2020 Appendix D.6, Eq. D.1 (natural log).
KAPLAN_LR_INTERCEPT, KAPLAN_LR_SLOPE = 0.003239, -0.0001395


def _check_positive(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a positive number, got {value!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} must be a positive finite number, got {value!r}.")
    return value


def step_law(n_params: float, tokens: float) -> tuple[float, float]:
    """(peak lr, batch size in tokens) from the Step Law (Li et al. 2025, arXiv:2503.04715).

    n_params: non-embedding parameters N; tokens: training tokens D.
    """
    n = _check_positive("n_params", n_params)
    d = _check_positive("tokens", tokens)
    lr = STEP_LR_COEF * n**STEP_LR_EXP_N * d**STEP_LR_EXP_D
    batch_tokens = STEP_BS_COEF * d**STEP_BS_EXP_D
    return lr, batch_tokens


def deepseek_law(compute_flops: float) -> tuple[float, float]:
    """(peak lr, batch size in tokens) from DeepSeek LLM (Bi et al. 2024), C in FLOPs."""
    c = _check_positive("compute", compute_flops)
    return DEEPSEEK_LR_COEF * c**DEEPSEEK_LR_EXP_C, DEEPSEEK_BS_COEF * c**DEEPSEEK_BS_EXP_C


def kaplan_loss(n_params: float, tokens: float) -> float:
    """Kaplan et al. 2020 Eq. 1.5: loss in nats of N non-embedding params after D tokens."""
    n = _check_positive("n_params", n_params)
    d = _check_positive("tokens", tokens)
    inner = (KAPLAN_N_C / n) ** (KAPLAN_ALPHA_N / KAPLAN_ALPHA_D) + KAPLAN_D_C / d
    return inner**KAPLAN_ALPHA_D


def kaplan_critical_batch(loss_nats: float) -> float:
    """Kaplan et al. 2020 Eq. 5.3: critical batch size in tokens at loss L (nats/token)."""
    loss = _check_positive("loss", loss_nats)
    return KAPLAN_B_STAR / loss ** (1.0 / KAPLAN_ALPHA_B)


def kaplan_lr(n_params: float) -> float | None:
    """Kaplan et al. 2020 Eq. D.1: learning rate for N non-embedding parameters, or None
    where the linear-in-log fit turns non-positive (N above ~1.2e10)."""
    n = _check_positive("n_params", n_params)
    lr = KAPLAN_LR_INTERCEPT + KAPLAN_LR_SLOPE * math.log(n)
    return lr if lr > 0 else None


def porian_law(n_params: float) -> tuple[float, float]:
    """(lr, batch size in tokens) from Porian et al. 2024 for N parameters (see above)."""
    n = _check_positive("n_params", n_params)
    return PORIAN_LR_COEF * n**PORIAN_LR_EXP_N, PORIAN_BS_COEF * n**PORIAN_BS_EXP_N


@dataclass(frozen=True)
class LawInputs:
    """What a prediction may use. n_params: non-embedding parameters (for MoE the total
    non-embedding count); n_active: activated non-embedding parameters per token (MoE);
    tokens: D; compute: training FLOPs if known; loss: expected final loss in nats."""

    n_params: float
    tokens: float
    n_active: float | None = None
    compute: float | None = None
    loss: float | None = None


@dataclass
class Prediction:
    law: str
    lr: float | None
    batch_tokens: float | None
    n_used: str  # which N the law was evaluated with, in words
    derived: dict[str, float] = field(default_factory=dict)  # quantities we derived (C, loss)
    warnings: list[str] = field(default_factory=list)

    def batch_seqs(self, seq_len: int | None) -> float | None:
        if self.batch_tokens is None or not seq_len:
            return None
        return self.batch_tokens / seq_len

    def to_dict(self, seq_len: int | None = None) -> dict:
        out = {
            "law": self.law,
            "lr": self.lr,
            "batch_tokens": self.batch_tokens,
            "n_used": self.n_used,
            "derived": dict(self.derived),
            "warnings": list(self.warnings),
        }
        if seq_len:
            out["batch_seqs"] = self.batch_seqs(seq_len)
            out["seq_len"] = seq_len
        return out


@dataclass(frozen=True)
class Law:
    key: str
    name: str
    citation: str
    formula: str
    input_units: str
    output_units: str
    # variable -> (low, high): where the paper's fits had data; outside it we warn.
    fitted_range: dict[str, tuple[float, float]]
    range_note: str
    predict: Callable[[LawInputs], Prediction]
    schedule: str = ""  # the training setup the law was fitted with (what its LR means)
    # Its kind (steplaw.laws.schedules.KINDS, or "unknown" where the paper does not say):
    # what `predict/plan --schedule` is checked against.
    schedule_kind: str = "unknown"

    def info(self) -> dict:
        return {
            "key": self.key,
            "name": self.name,
            "citation": self.citation,
            "formula": self.formula,
            "input_units": self.input_units,
            "output_units": self.output_units,
            "fitted_range": {k: list(v) for k, v in self.fitted_range.items()},
            "range_note": self.range_note,
            "schedule": self.schedule,
            "schedule_kind": self.schedule_kind,
        }


def range_warnings(label: str, ranges: dict, values: dict) -> list[str]:
    """One warning per value outside the (low, high) range its law was fitted on (published
    laws, fitted laws, law files: the one check). Ends count as inside (1e-9 relative, the
    float noise of a range read back from JSON); a missing value or range is skipped."""
    warnings = []
    for name, bounds in ranges.items():
        value = values.get(name)
        if value is None or not bounds:
            continue
        low, high = bounds
        if value < low * (1 - 1e-9) or value > high * (1 + 1e-9):
            warnings.append(
                f"{label}: {name}={value:.3g} is outside the range the law was fitted on "
                f"[{low:.3g}, {high:.3g}]; this is an extrapolation."
            )
    return warnings


def check_moe_counts(n_params, n_active) -> tuple[float, float | None]:
    """(n_params, n_active) checked: both positive and finite, n_active (when given) at most
    n_params. The one check for published and fitted laws."""
    n = _check_positive("n_params", n_params)
    if n_active is None:
        return n, None
    n_active = _check_positive("n_active", n_active)
    if n_active > n:
        raise UserError(f"n_active={n_active:.4g} exceeds n_params={n:.4g}; activated parameters are a part of the total.")
    return n, n_active


# Fitted ranges, used only to warn. Kaplan's models span 768 to 1.5e9 non-embedding
# parameters and 22M-23B tokens (stated in the paper). The Step Law (roughly 6e7-1e9
# parameters, 2e9-1e11 tokens) and DeepSeek (roughly 1e17-3e20 FLOPs) ranges are our
# reading of the papers' experiment grids, not numbers the papers state as a range:
# treat their warnings as a hint.
_STEP_RANGE = {"N": (6e7, 1.1e9), "D": (2e9, 1.1e11)}
_DEEPSEEK_RANGE = {"C": (1e17, 3e20)}
_KAPLAN_RANGE = {"N": (7.68e2, 1.5e9), "D": (2.2e7, 2.3e10)}
_PORIAN_RANGE = {"N": (5e6, 9.01e8)}  # the paper's model sizes


def _predict_step(inputs: LawInputs) -> Prediction:
    # The Step Law's N is non-embedding parameters; for MoE the user chooses which count
    # to pass (predict_all evaluates it with both when n_active is given).
    lr, bs = step_law(inputs.n_params, inputs.tokens)
    pred = Prediction("step_law", lr, bs, "N (non-embedding)")
    pred.warnings += range_warnings("step_law", _STEP_RANGE, {"N": inputs.n_params, "D": inputs.tokens})
    return pred


def _predict_deepseek(inputs: LawInputs) -> Prediction:
    derived = {}
    n_for_flops = inputs.n_active if inputs.n_active else inputs.n_params
    if inputs.compute:
        compute = _check_positive("compute", inputs.compute)
        n_used = "C given by the user"
    else:
        # C = M*D with M ~ 6N non-embedding FLOPs per token (activated N for MoE: FLOPs
        # follow the parameters a token passes through).
        compute = 6.0 * n_for_flops * inputs.tokens
        derived["compute"] = compute
        n_used = "C = 6*N_active*D" if inputs.n_active else "C = 6*N*D"
    lr, bs = deepseek_law(compute)
    pred = Prediction("deepseek", lr, bs, n_used, derived)
    pred.warnings += range_warnings("deepseek", _DEEPSEEK_RANGE, {"C": compute})
    return pred


def _predict_kaplan(inputs: LawInputs) -> Prediction:
    derived = {}
    n_for_loss = inputs.n_active if inputs.n_active else inputs.n_params
    if inputs.loss:
        loss = _check_positive("loss", inputs.loss)
        n_used = "loss given by the user"
    else:
        loss = kaplan_loss(n_for_loss, inputs.tokens)
        derived["loss"] = loss
        n_used = "L from Kaplan Eq. 1.5 with N_active" if inputs.n_active else "L from Kaplan Eq. 1.5 with N"
    bs = kaplan_critical_batch(loss)
    # The LR law's N is the dense (for MoE: activated) non-embedding count, like the loss.
    lr = kaplan_lr(n_for_loss)
    pred = Prediction("kaplan", lr, bs, n_used, derived)
    if lr is None:
        pred.warnings.append(
            f"kaplan: the LR fit 0.003239 - 0.0001395 ln(N) is not positive at N={n_for_loss:.3g}; no LR given."
        )
    ranges = _KAPLAN_RANGE if not inputs.loss else {"N": _KAPLAN_RANGE["N"]}
    pred.warnings += range_warnings("kaplan", ranges, {"N": n_for_loss, "D": inputs.tokens})
    return pred


def _predict_porian(inputs: LawInputs) -> Prediction:
    # A dense-model law of N alone; for MoE we evaluate it with the activated count, the
    # parameters a token's compute passes through.
    n = inputs.n_active if inputs.n_active else inputs.n_params
    lr, bs = porian_law(n)
    pred = Prediction("porian", lr, bs, "N_active (non-embedding)" if inputs.n_active else "N (non-embedding)")
    pred.warnings += range_warnings("porian", _PORIAN_RANGE, {"N": n})
    return pred


LAWS: dict[str, Law] = {
    "step_law": Law(
        key="step_law",
        name="Step Law (Predictable Scale: Part I)",
        citation="Li et al. 2025, arXiv:2503.04715",
        formula="lr = 1.79 * N^-0.713 * D^0.307 ; B = 0.58 * D^0.571",
        input_units="N: non-embedding parameters (dense or MoE); D: training tokens",
        output_units="lr: peak learning rate; B: tokens per batch",
        fitted_range=_STEP_RANGE,
        range_note="approximate extent of the paper's (N, D) grid (our reading, not a stated range)",
        predict=_predict_step,
        schedule="AdamW; warmup, then decay to a fixed final LR of 1e-5 (not a fraction of the peak), as fitted",
        # "Predictable Scale: Part I" (arXiv:2503.04715), training setup: cosine decay to a
        # fixed minimum LR of 1e-5 rather than a fraction of the peak.
        schedule_kind="cosine",
    ),
    "deepseek": Law(
        key="deepseek",
        name="DeepSeek LLM",
        citation="Bi et al. 2024, arXiv:2401.02954",
        formula="lr = 0.3118 * C^-0.1250 ; B = 0.2920 * C^0.3271 ; C = 6*N*D unless given",
        input_units="C: training FLOPs (non-embedding FLOPs/token * D; we use 6*N*D, N activated for MoE)",
        output_units="lr: peak learning rate; B: tokens per batch",
        fitted_range=_DEEPSEEK_RANGE,
        range_note="approximate extent of the paper's compute budgets (our reading, not a stated range)",
        predict=_predict_deepseek,
        schedule="AdamW; 2,000 warmup steps, then multi-step decay: 31.6% of the peak after 80% of the tokens, "
                 "10% after 90%",
        # arXiv:2401.02954 Sec. 2.3: the multi-step scheduler (the same warmup-and-step-decay
        # strategy the DeepSeek-V2-Lite model card describes: x0.316 at ~80% and ~90% of tokens).
        schedule_kind="multistep",
    ),
    "kaplan": Law(
        key="kaplan",
        name="Kaplan et al. (critical batch, LR fit)",
        citation="Kaplan et al. 2020, arXiv:2001.08361",
        formula=(
            "lr = 0.003239 - 0.0001395 ln(N) ; B_crit = 2.1e8 / L^(1/0.21) ;"
            " L = [(8.8e13/N)^(0.076/0.095) + 5.4e13/D]^0.095 unless given"
        ),
        input_units="L: loss in nats per token (or N non-embedding parameters and D tokens to derive it)",
        output_units="lr: learning rate (Kaplan's schedule); B: critical batch size in tokens",
        fitted_range=_KAPLAN_RANGE,
        range_note="extent of Kaplan's models (768 to 1.5e9 parameters, 22M to 23B tokens)",
        predict=_predict_kaplan,
        schedule="Adam; 3,000-step linear warmup, cosine decay to zero; batch 512 x 1024 tokens for the LR fit",
        schedule_kind="cosine",  # arXiv:2001.08361 Appendix D.6 (the runs of Eq. D.1)
    ),
    "porian": Law(
        key="porian",
        name="Porian et al. (compute-optimal scaling, tuned AdamW)",
        citation="Porian et al. 2024, arXiv:2406.19146 (constants as tabulated in arXiv:2503.04715)",
        formula="lr = 3.7 * N^-0.36 ; B = 0.7576 * N^0.703 (= 0.00037 * N^0.703 sequences of 2048)",
        input_units="N: parameters (Porian counts the output head, not the input embedding); no D",
        output_units="lr: peak learning rate; B: tokens per batch",
        fitted_range=_PORIAN_RANGE,
        range_note="the paper's model sizes, 5M to 901M parameters",
        predict=_predict_porian,
        schedule="AdamW with beta2 tuned at small batches; warmup and cosine decay (see the paper for the details)",
        # arXiv:2406.19146 decays with a cosine matched to each run's length (one of the three
        # factors it finds behind the Kaplan/Chinchilla gap); its final-LR details are unchecked here.
        schedule_kind="cosine",
    ),
}


def resolve_law_names(names: str | list[str] | None) -> list[str]:
    """'all', None, a comma-separated string or a list -> law keys, checked."""
    if names is None or names == "all" or names == ["all"]:
        return list(LAWS)
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    if not names:
        raise UserError(f"--law names no law; expected 'all' or one of {', '.join(LAWS)}.")
    unknown = [name for name in names if name not in LAWS]
    if unknown:
        raise UserError(f"unknown law {unknown[0]!r}; expected 'all' or one of {', '.join(LAWS)}.")
    return list(names)


def predict_all(
    n_params: float,
    tokens: float,
    *,
    n_active: float | None = None,
    compute: float | None = None,
    loss: float | None = None,
    laws: str | list[str] | None = None,
) -> list[Prediction]:
    """Every chosen law's prediction for N non-embedding parameters trained on D tokens.

    n_active (MoE): activated non-embedding parameters per token. The Step Law is then
    evaluated twice, with the total and with the activated count (the paper says the law
    holds for MoE; which count transfers best is the user's call), and the compute- and
    loss-based laws use the activated count.
    """
    n, n_active = check_moe_counts(n_params, n_active)
    d = _check_positive("tokens", tokens)
    if compute is not None:
        compute = _check_positive("compute", compute)
    if loss is not None:
        loss = _check_positive("loss", loss)
    inputs = LawInputs(n, d, n_active, compute, loss)
    predictions = []
    for key in resolve_law_names(laws):
        pred = LAWS[key].predict(inputs)
        if key == "step_law" and n_active is not None and n_active != n:
            pred.n_used = "N total (non-embedding)"
            predictions.append(pred)
            active = LAWS[key].predict(LawInputs(n_active, d))
            active.law = "step_law"
            active.n_used = "N activated (non-embedding)"
            predictions.append(active)
        else:
            predictions.append(pred)
    return predictions


def disagreements(predictions: list[Prediction], factor: float = 2.0) -> list[str]:
    """One line per quantity whose predictions differ by more than `factor`."""
    lines = []
    for attr, label in (("lr", "learning rate"), ("batch_tokens", "batch size")):
        values = [(p, getattr(p, attr)) for p in predictions if getattr(p, attr)]
        if len(values) < 2:
            continue
        low = min(values, key=lambda item: item[1])
        high = max(values, key=lambda item: item[1])
        ratio = high[1] / low[1]
        if ratio > factor:
            lines.append(
                f"the laws disagree on the {label} by {ratio:.1f}x "
                f"({low[0].law} [{low[0].n_used}] {low[1]:.3g} vs {high[0].law} [{high[0].n_used}] {high[1]:.3g})."
            )
    return lines
