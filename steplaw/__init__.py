"""steplaw: the learning rate and batch size to pretrain a language model with.

Predict them from published hyperparameter scaling laws (`steplaw.laws`), measure them
with sweeps of small dense and MoE models on fused kernels (`steplaw.sweep`), and fit
your own laws from those sweeps or any table of runs (`steplaw.laws.fit`).

Importing this package does not import torch; `steplaw.ops`, `steplaw.optim`,
`steplaw.models` and `steplaw.train` do.
"""

__version__ = "0.1.0"
