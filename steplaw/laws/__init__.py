"""Scaling laws for the peak learning rate and batch size, and the loss law.

- `steplaw.laws.published`: published laws (Step Law, DeepSeek LLM, Kaplan et al.'s
  critical batch) with units, citations and fitted ranges; `step_law(N, D)`,
  `predict_all(...)`, the registry `LAWS`.
- `steplaw.laws.table`: `read_runs(source, ...)` reads CSV / JSONL / Parquet tables or a
  sweep directory into a checked `RunTable`.
- `steplaw.laws.fit`: `fit_hparams(table, ...)` fits eta(N, D) and B(D) the Step Law way,
  with bootstrap intervals and leave-one-cell-out validation.
- `steplaw.laws.loss`: `fit_loss(table, ...)` fits L(N, D) = E + A/N^alpha + B/D^beta and
  the compute-optimal N(C), D(C).
- `steplaw.laws.synthetic`: sweeps with a known answer, for tests and benchmarks.

Pure Python on numpy and scipy: nothing here imports torch.
"""
