"""The forms and fitting choices of the loss law, and `--form auto`: choosing by rollout error.

Every form is L(N, D) = E + A/N^alpha + B/D^beta (so a fitted law of any form is a
steplaw.laws.loss.LossFormula, saved, planned and scored alike); the forms differ in what
the fit may move:

- chinchilla: all five constants free (Hoffmann et al. 2022, Approach 3);
- tied: alpha = beta, one exponent for N and D. Used for ladders of over-trained models,
  where the tokens-per-parameter ratio varies along the ladder (Gadre et al. 2024,
  arXiv:2403.08540, fit L = E + (A N^-a + B D^-a)-type laws with one exponent). A tied law's
  compute-optimal N_opt ~ C^0.5 by construction, so it reports no interval for that
  exponent (it is the form's, not the data's).

and in how the cells count:

- E fixed (`--E VALUE`, the irreducible loss, in nats) or free;
- weights: none (every cell alike) or compute (a cell weighs C / mean C, C = the table's
  compute or k N D): the large cells that the law is used to extrapolate from count most;
- underprediction_penalty K >= 1: a cell the law predicts too low weighs K times more
  (an asymmetric penalty, as OLMo-core's scaling-law fit offers, PR #554). Fits of a
  symmetric loss put about half the cells below the law; a law that is to be trusted
  not to promise too low a loss leans the other way.

`--form auto` (choosing by rollout error) is steplaw.laws.form_choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from steplaw.errors import UserError

FORMS = ("chinchilla", "tied")
WEIGHTS = ("none", "compute")
# theta = (a, b, e, alpha, beta); a refused term is held at a = -1000 (its share exp(-1000)
# vanishes) with exponent 0.
_REFUSED = {"N": {0: -1000.0, 3: 0.0}, "D": {1: -1000.0, 4: 0.0}}


@dataclass(frozen=True)
class LossForm:
    """How to fit the loss law: the form, E fixed or free, the weights, the asymmetry."""

    name: str = "chinchilla"
    E: float | None = None  # fixed irreducible loss (nats); None: fitted
    weights: str = "none"
    underprediction_penalty: float = 1.0

    def __post_init__(self):
        if self.name not in FORMS:
            raise UserError(f"--form {self.name!r} is not a loss-law form; expected one of {', '.join(FORMS)} or auto.")
        if self.weights not in WEIGHTS:
            raise UserError(f"--weights {self.weights!r} is not a weighting; expected none or compute.")
        if self.E is not None and not (math.isfinite(self.E) and self.E > 0):
            raise UserError(f"--E {self.E!r} must be a positive irreducible loss in nats.")
        if not (math.isfinite(self.underprediction_penalty) and self.underprediction_penalty >= 1):
            raise UserError(f"--underprediction-penalty {self.underprediction_penalty!r} must be a number >= 1 "
                            "(1: symmetric).")

    def with_name(self, name: str) -> LossForm:
        return LossForm(name, self.E, self.weights, self.underprediction_penalty)

    def to_dict(self) -> dict:
        return {"form": self.name, "E_fixed": self.E, "weights": self.weights,
                "underprediction_penalty": self.underprediction_penalty}

    def describe(self) -> str:
        parts = ["alpha = beta (tied)" if self.name == "tied" else "five free constants (chinchilla)"]
        parts.append(f"E fixed at {self.E:.4g}" if self.E is not None else "E fitted")
        if self.weights == "compute":
            parts.append("cells weighted by compute")
        if self.underprediction_penalty != 1:
            parts.append(f"under-prediction weighted x{self.underprediction_penalty:g}")
        return ", ".join(parts)

    def fixed_values(self, refused_terms) -> dict[int, float]:
        """theta coordinates the fit holds fixed: refused terms, and e = ln E when E is fixed."""
        fixed = {}
        for term in refused_terms:
            fixed.update(_REFUSED[term])
        if self.E is not None:
            fixed[2] = math.log(self.E)
        return fixed

    def basis(self, refused_terms) -> np.ndarray:
        """Q (5, k): theta = start + Q x. Tied: one column moving alpha and beta together."""
        fixed = self.fixed_values(refused_terms)
        tie = self.name == "tied" and not refused_terms
        columns = []
        for index in range(5):
            if index in fixed or (tie and index == 4):
                continue
            column = np.zeros(5)
            column[index] = 1.0
            if tie and index == 3:
                column[4] = 1.0
            columns.append(column)
        return np.column_stack(columns)

    def place(self, theta: np.ndarray, refused_terms) -> np.ndarray:
        """Start rows (S, 5) moved into the form's subspace (fixed values set, beta = alpha if tied)."""
        theta = np.array(theta, float)
        if self.name == "tied" and not refused_terms:
            theta[..., 4] = theta[..., 3]
        for index, value in self.fixed_values(refused_terms).items():
            theta[..., index] = value
        return theta

    def n_parameters(self, refused_terms) -> int:
        return self.basis(refused_terms).shape[1]

    def cell_weights(self, cells: np.ndarray, flops_per_param_token: float, compute=None) -> np.ndarray:
        """Per-cell weights, mean 1. `compute`: per-cell FLOPs when the table has them."""
        if self.weights == "none":
            return np.ones(len(cells))
        flops = compute if compute is not None else flops_per_param_token * cells[:, 0] * cells[:, 1]
        return flops / np.mean(flops)
