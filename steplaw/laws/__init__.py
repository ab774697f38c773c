"""Scaling laws for the peak learning rate and batch size, and the loss law.

- `steplaw.laws.published`: published hyperparameter laws (Step Law, DeepSeek LLM, Kaplan
  et al.'s critical batch and LR fit, Porian et al.) with units, citations, fitted ranges
  and the schedules they were fitted with; `step_law(N, D)`, `predict_all(...)`, `LAWS`.
- `steplaw.laws.published_loss`: published loss laws (Hoffmann et al. 2022 and the
  Besiroglu et al. 2024 replication), `LOSS_LAWS`.
- `steplaw.laws.table`: `read_runs(source, ...)` reads CSV / JSONL / Parquet tables or
  rows (a sweep directory's rows come from steplaw.sweep.store.export_rows, read by the
  CLI) into a checked `RunTable`.
- `steplaw.laws.fit`: `fit_hparams(table, ...)` fits eta(N, D) and B(D) the Step Law way,
  optionally with an MoE sparsity term, with bootstrap intervals and leave-one-cell-out
  validation, from the cells' optima (`steplaw.laws.cells`); `steplaw.laws.scores`
  scores every published law on the same cells.
- `steplaw.laws.identify`: when a table can identify an exponent (one rule for all fits).
- `steplaw.laws.loss`: `fit_loss(table, ...)` fits L(N, D) = E + A/N^alpha + B/D^beta and
  the compute-optimal N(C), D(C).
- `steplaw.laws.plan`: N, D, peak LR and batch size from a compute budget.
- `steplaw.laws.saved`: fitted laws written to and read from JSON files.
- `steplaw.laws.synthetic`: sweeps with a known answer, for tests and benchmarks.

Pure Python on numpy and scipy: nothing here imports torch, training, sweeps or reports.
"""
