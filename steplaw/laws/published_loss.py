"""Published loss laws L(N, D) = E + A / N^alpha + B / D^beta, so a plan needs no fit of one's own.

Units: N = parameters (Hoffmann et al. count all parameters, embeddings included; our
hyperparameter laws take non-embedding N, see `steplaw plan`), D = training tokens,
L = loss in nats per token on the authors' data (MassiveText, SentencePiece tokenizer):
the absolute loss does not transfer to other data, the compute-optimal split more nearly.

- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla),
  arXiv:2203.15556, Approach 3 (Eq. 10): E = 1.69, A = 406.4, B = 410.7, alpha = 0.34,
  beta = 0.28, fitted on over 400 models of 70M to 16B parameters trained on 5B to 500B
  tokens.
- Besiroglu et al. 2024, "Chinchilla Scaling: A Replication Attempt", arXiv:2404.10102:
  the same fit redone on data reconstructed from Hoffmann et al.'s Figure 4: E = 1.8172,
  A = 482.01, B = 2085.43, alpha = 0.3478, beta = 0.3658 (standard errors 0.03, 124.58,
  1293.23, 0.02, 0.02), giving N_opt ~ C^0.5126; they find Hoffmann et al.'s reported
  constants fit the data poorly (an optimizer stopped early, rounded estimates). E is
  often quoted rounded as 1.82. Same fitted range as the data it reconstructs.

Constants as stated by the papers, checked here against secondary sources that quote them
(Epoch AI's write-up of the replication and textbook restatements of Eq. 10).
"""
from __future__ import annotations

from dataclasses import dataclass

from steplaw.errors import UserError
from steplaw.laws.loss import LossLaw

# Hoffmann et al. 2022, arXiv:2203.15556, Eq. 10 (Approach 3).
HOFFMANN_E, HOFFMANN_A, HOFFMANN_B, HOFFMANN_ALPHA, HOFFMANN_BETA = 1.69, 406.4, 410.7, 0.34, 0.28
# Besiroglu et al. 2024, arXiv:2404.10102, their Approach 3 estimates.
BESIROGLU_E, BESIROGLU_A, BESIROGLU_B, BESIROGLU_ALPHA, BESIROGLU_BETA = 1.8172, 482.01, 2085.43, 0.3478, 0.3658
# The models and token counts of Hoffmann et al.'s runs (the replication reuses them).
_CHINCHILLA_RANGE = {"N": (7e7, 1.6e10), "D": (5e9, 5e11)}


@dataclass(frozen=True)
class PublishedLossLaw:
    key: str
    name: str
    citation: str
    law: LossLaw
    fitted_range: dict
    units: str = "N: all parameters (embeddings included); D: training tokens; L: nats per token on the authors' data"
    note: str = ""
    standard_errors: dict | None = None

    def info(self) -> dict:
        return {"key": self.key, "name": self.name, "citation": self.citation, **self.law.formula_dict(),
                "units": self.units, "fitted_range": {k: list(v) for k, v in self.fitted_range.items()},
                "note": self.note, "standard_errors": self.standard_errors}


LOSS_LAWS: dict[str, PublishedLossLaw] = {
    "besiroglu": PublishedLossLaw(
        key="besiroglu", name="Chinchilla Approach 3, replicated", citation="Besiroglu et al. 2024, arXiv:2404.10102",
        law=LossLaw(BESIROGLU_E, BESIROGLU_A, BESIROGLU_B, BESIROGLU_ALPHA, BESIROGLU_BETA),
        fitted_range=_CHINCHILLA_RANGE,
        note="refit of Hoffmann et al.'s data reconstructed from their Figure 4; agrees with their Approaches 1 and 2",
        standard_errors={"E": 0.03, "A": 124.58, "B": 1293.23, "alpha": 0.02, "beta": 0.02},
    ),
    "hoffmann": PublishedLossLaw(
        key="hoffmann", name="Chinchilla Approach 3", citation="Hoffmann et al. 2022, arXiv:2203.15556 (Eq. 10)",
        law=LossLaw(HOFFMANN_E, HOFFMANN_A, HOFFMANN_B, HOFFMANN_ALPHA, HOFFMANN_BETA),
        fitted_range=_CHINCHILLA_RANGE,
        note="as printed in the paper; Besiroglu et al. 2024 find these rounded constants fit the data poorly",
    ),
}


def loss_law(key: str) -> PublishedLossLaw:
    if key not in LOSS_LAWS:
        raise UserError(f"unknown loss law {key!r}; expected one of {', '.join(LOSS_LAWS)} or a file from "
                        "`steplaw fit-loss --save`.")
    return LOSS_LAWS[key]
