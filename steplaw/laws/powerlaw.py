"""Power laws y = coef * prod(x_k ** exp_k) and which variables a law over cells may have.

The shared pieces of steplaw.laws.fit (the Step Law's eta(N, D) and B(D)) and
steplaw.laws.lr_batch (the batch-aware eta(N, D, B)): the PowerLaw dataclass with its
intervals and file form, the identification of each exponent over the cells
(steplaw.laws.identify's rule), and the wording of a refusal when every cell ran one value.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplaw.errors import UserError
from steplaw.laws import identify

LR_VARIABLES = ("N", "D")


@dataclass
class PowerLaw:
    """y = coef * prod(x_k ** exps[k]) over N, D, S (sparsity, 1 = dense) and B (batch tokens,
    only in a batch-aware LR law, steplaw.laws.lr_batch); ci: 95% intervals."""

    coef: float
    exps: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __call__(self, N, D, S=None, B=None):
        if "B" in self.exps and B is None:
            raise UserError("this learning-rate law depends on the batch size; give the batch in tokens.")
        values = {"N": np.asarray(N, float), "D": np.asarray(D, float),
                  "S": np.asarray(1.0 if S is None else S, float), "B": np.asarray(1.0 if B is None else B, float)}
        out = self.coef * np.ones(np.broadcast(values["N"], values["D"], values["S"], values["B"]).shape)
        for name, exp in self.exps.items():
            out = out * values[name] ** exp
        return out

    def to_dict(self) -> dict:
        out = {"coef": self.coef}
        for name, exp in self.exps.items():
            out[f"exp_{name}"] = exp
        out["ci"] = {key: [float(low), float(high)] for key, (low, high) in self.ci.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PowerLaw:
        exps = {key[4:]: float(value) for key, value in data.items() if key.startswith("exp_")}
        ci = {key: tuple(value) for key, value in (data.get("ci") or {}).items()}
        return cls(coef=float(data["coef"]), exps=exps, ci=ci)

    def formula(self, name: str) -> str:
        terms = " * ".join(f"{var}^{exp:+.4f}" for var, exp in self.exps.items())
        return f"{name} = {self.coef:.4g}" + (f" * {terms}" if terms else " (constant)")


# S = N_active / N, so with N and S in one law the other parameter count is implied:
# log N_other = log N -+ log S. Its spread is what tells N's exponent from S's.
_IMPLIED_N = {"N": ("N_active", +1.0, "N_active"), "N_active": ("N", -1.0, "the total N")}


def law_variables(cell_logs: dict, candidates: tuple[str, ...], law: str,
                   n_column: str = "N") -> tuple[list[str], list[dict]]:
    """The candidates the cells can identify, and one refusal record per one they cannot."""
    kept, refused = [], []
    for name in candidates:
        problem = identify.exponent_problem(np.exp(cell_logs[name]), name)
        if problem is None and name == "S" and "N" in kept and n_column in _IMPLIED_N:
            # With N and S both in the law only the implied other count separates them: an
            # MoE sweep whose total N barely moves cannot tell N_active's exponent from S's.
            other, sign, words = _IMPLIED_N[n_column]
            implied = identify.exponent_problem(np.exp(cell_logs["N"] + sign * cell_logs["S"]), other)
            if implied is not None:
                problem = f"{n_column} and the sparsity are told apart only by {words}, and {implied}"
        if problem is None:
            kept.append(name)
        else:
            refused.append({"law": law, "variable": name, "reason": identify.refusal(law, name, problem)})
    if len(kept) > 1:
        design = np.column_stack([np.ones(cell_logs["D"].size)] + [cell_logs[name] for name in kept])
        if np.linalg.matrix_rank(design) < design.shape[1]:
            raise UserError(
                f"cannot separate the effects of {' and '.join(kept)} in the {law} law: across the cells one is a "
                "linear function of the others in log space (e.g. a fixed tokens-per-parameter ratio); add cells off "
                "that line."
            )
    return kept, refused


def one_value_words(per_cell: list[np.ndarray], what: str, unit: str) -> str:
    """'one batch size (1.049e+06 tokens)' or 'one batch size each (a to b tokens)': what every
    cell ran when each ran a single value (the one wording of every such refusal)."""
    ran = identify.distinct_values(np.concatenate(per_cell))
    return (f"one {what} ({ran[0]:.4g}{unit})" if ran.size == 1
            else f"one {what} each ({ran[0]:.4g} to {ran[-1]:.4g}{unit})")
