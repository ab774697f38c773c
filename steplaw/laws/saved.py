"""Fitted laws in JSON files: `steplaw fit --save` / `fit-loss --save` write them,
`steplaw predict --law FILE` and `steplaw plan --hparam-law FILE --loss-law FILE` read them.

A file is one JSON object with "kind": "steplaw.hparam_law" (the LR and batch laws as
coefficients and exponents over N, D and S = N_active/N, the parameter count N stands for,
the range of the cells) or "steplaw.loss_law" (E, A, B, alpha, beta, FLOPs per parameter
and token, the bootstrap parameter rows for intervals, the range of the cells). Files are
written atomically (temporary file, fsync, rename): a crash leaves the old file or the new.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steplaw.errors import UserError
from steplaw.fileio import write_atomic
from steplaw.laws.fit import HparamFit, PowerLaw
from steplaw.laws.loss import LossFit, LossFormula, loss_interval, optimal_interval
from steplaw.laws.published import check_moe_counts, range_warnings
from steplaw.runtable import json_safe

HPARAM_KIND = "steplaw.hparam_law"
LOSS_KIND = "steplaw.loss_law"
VERSION = 1


def write_json(path, obj) -> Path:
    """Write strict JSON (NaN -> null) atomically, making missing parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")


def hparam_law_record(fit: HparamFit, source: str) -> dict:
    return {"kind": HPARAM_KIND, "version": VERSION, "source": source, "n_column": fit.n_column,
            "lr_law": fit.lr_law.to_dict(), "bs_law": fit.bs_law.to_dict(), "fitted_range": fit.fitted_range,
            "sparsity": fit.sparsity, "gap": fit.gap, "warnings": list(fit.warnings), "schedule": fit.schedule,
            **_lr_batch_record(fit)}


def _lr_batch_record(fit: HparamFit) -> dict:
    """The batch-aware LR law (`fit --lr-form batch`), when fitted: its law, range and delta's verdict."""
    if fit.lr_batch is None:
        return {}
    return {"lr_batch_law": fit.lr_batch.law.to_dict(), "lr_batch_range": fit.lr_batch.fitted_range,
            "lr_batch_delta": fit.lr_batch.delta}


def loss_law_record(fit: LossFit, source: str) -> dict:
    samples = fit.samples if fit.samples is not None else np.empty((0, 5))
    return {"kind": LOSS_KIND, "version": VERSION, "source": source, **fit.formula_dict(),
            "n_column": fit.n_column, "intervals": fit.intervals, "fitted_range": fit.fitted_range,
            "bootstrap": {"columns": ["ln_A", "ln_B", "ln_E", "alpha", "beta"], "rows": samples.tolist()},
            "refused_terms": list(fit.refused_terms), "rms_log_residual": fit.rms_log_residual,
            "form": fit.form.to_dict(),
            "warnings": list(fit.warnings)}


@dataclass
class SavedHparamLaw:
    lr_law: PowerLaw
    bs_law: PowerLaw
    n_column: str
    fitted_range: dict
    source: str
    path: str
    warnings: list[str] = field(default_factory=list)  # the fit's own, stored in the file
    schedule: str = "unknown"  # the LR schedule of the runs it was fitted on (steplaw.laws.schedules)
    lr_batch_law: PowerLaw | None = None  # eta(N, D, B) from `fit --lr-form batch`
    lr_batch_range: dict = field(default_factory=dict)

    def predict(self, n_params: float, tokens: float, n_active: float | None = None,
                batch_tokens: float | None = None) -> tuple[float, float, list[str]]:
        """(peak lr, batch tokens, warnings) for N non-embedding parameters (MoE: total, with
        n_active activated) trained on D tokens, in the units the law was fitted with. With
        `batch_tokens` the LR is the batch-aware law's for that batch (and the batch is yours)."""
        if batch_tokens is not None:
            return self._predict_at_batch(n_params, tokens, n_active, batch_tokens)
        n_params, n_active = check_moe_counts(n_params, n_active)
        warnings = []
        if self.n_column == "N_active":
            if n_active is None:
                warnings.append(f"{self.path}: fitted on activated parameters; a dense model's N stands for them.")
            n = n_active if n_active is not None else n_params
        else:
            n = n_params
        sparsity = None
        if "S" in self.lr_law.exps or "S" in self.bs_law.exps:
            sparsity = (n_active / n_params) if n_active is not None else 1.0
        values = {"N": n, "D": tokens, "S": sparsity if sparsity is not None else 1.0}
        warnings += range_warnings(self.path, self.fitted_range, values)
        lr, bs = self.lr_law(n, tokens, sparsity), self.bs_law(n, tokens, sparsity)
        return float(lr), float(bs), warnings

    def _predict_at_batch(self, n_params, tokens, n_active, batch_tokens) -> tuple[float, float, list[str]]:
        if self.lr_batch_law is None:
            raise UserError(f"--batch-tokens needs a batch-aware law; {self.path} was fitted without one (its LR law "
                            "is the LR at each cell's optimal batch): refit with `steplaw fit --lr-form batch --save`.")
        if not (isinstance(batch_tokens, (int, float)) and np.isfinite(batch_tokens) and batch_tokens > 0):
            raise UserError(f"--batch-tokens must be a positive number of tokens, got {batch_tokens!r}.")
        n_params, n_active = check_moe_counts(n_params, n_active)
        warnings = []
        if self.n_column == "N_active" and n_active is None:
            warnings.append(f"{self.path}: fitted on activated parameters; a dense model's N stands for them.")
        n = n_active if self.n_column == "N_active" and n_active is not None else n_params
        values = {"N": n, "D": tokens, "B": batch_tokens}
        warnings += range_warnings(f"{self.path} (batch-aware LR law)", self.lr_batch_range, values)
        return float(self.lr_batch_law(n, tokens, B=batch_tokens)), float(batch_tokens), warnings


@dataclass
class SavedLossLaw(LossFormula):
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    flops_per_param_token: float
    n_column: str
    fitted_range: dict
    source: str
    path: str
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 5)))
    refused_terms: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)  # the fit's own, stored in the file
    rms_log_residual: float = 0.0  # scatter of the cells' log loss about the fit (0: a file without it)

    def optimal_interval(self, compute_flops: float) -> dict | None:
        return optimal_interval(self.samples if len(self.samples) else None, compute_flops, self.flops_per_param_token)

    def loss_interval(self, n_params: float, tokens: float, draws: int = 20, seed: int = 0) -> list[float] | None:
        """95% prediction interval of the loss at (N, D): steplaw.laws.loss.loss_interval, the
        one `fit-loss` gives (bootstrap over cells and the runs' scatter); None without a bootstrap."""
        return loss_interval(self.samples, self.rms_log_residual, n_params, tokens, draws, seed)


def _stored_warnings(data: dict, path: Path) -> list[str]:
    """The warnings the fit gave, saved with the law: whoever uses the file hears them too."""
    return [f"{path} (from its fit): {w}" for w in data.get("warnings") or [] if isinstance(w, str)]


def _constant(data: dict, key: str) -> float:
    """A loss-law constant; null (how strict JSON stores a fit's NaN) reads back as NaN, so the
    law's own checks name it (e.g. no compute-optimal split) instead of a damaged-file error."""
    value = data[key]
    return float("nan") if value is None else float(value)


def read_law(path) -> SavedHparamLaw | SavedLossLaw:
    """A law file written by `steplaw fit --save` or `steplaw fit-loss --save`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no law file {str(path)!r}; expected a JSON file written by `steplaw fit --save` "
                        "or `steplaw fit-loss --save`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{str(path)!r} is not a JSON law file ({exc}).") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    try:
        if kind == HPARAM_KIND:
            return SavedHparamLaw(lr_law=PowerLaw.from_dict(data["lr_law"]), bs_law=PowerLaw.from_dict(data["bs_law"]),
                                  n_column=str(data.get("n_column", "N")), fitted_range=dict(data.get("fitted_range") or {}),
                                  source=str(data.get("source", "")), path=str(path), warnings=_stored_warnings(data, path),
                                  schedule=str(data.get("schedule") or "unknown"),
                                  lr_batch_law=PowerLaw.from_dict(data["lr_batch_law"]) if data.get("lr_batch_law") else None,
                                  lr_batch_range=dict(data.get("lr_batch_range") or {}))
        if kind == LOSS_KIND:
            rows = np.asarray((data.get("bootstrap") or {}).get("rows") or [], float).reshape(-1, 5)
            constants = {key: _constant(data, key) for key in ("E", "A", "B", "alpha", "beta")}
            return SavedLossLaw(**constants, flops_per_param_token=float(data.get("flops_per_param_token", 6.0)),
                                n_column=str(data.get("n_column", "N")), fitted_range=dict(data.get("fitted_range") or {}),
                                source=str(data.get("source", "")), path=str(path), samples=rows,
                                refused_terms=tuple(str(t) for t in data.get("refused_terms") or ()),
                                rms_log_residual=float(data.get("rms_log_residual") or 0.0),
                                warnings=_stored_warnings(data, path))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{str(path)!r} is a damaged law file (missing or bad {exc}).") from None
    raise UserError(f"{str(path)!r} is not a steplaw law file (kind {kind!r}); expected one written by "
                    "`steplaw fit --save` or `steplaw fit-loss --save`.")
