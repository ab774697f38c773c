"""LR x batch-size sweeps: spec -> runs -> executor (local pool or Ray) -> SQLite store.

    from steplaw.sweep import SweepSpec, ModelSpec, run_sweep, LocalExecutor, export_rows
    spec = SweepSpec(models=[ModelSpec(params=3e6)], tokens=[6e7, 2e8])
    run_sweep(spec.expand(), "sweeps/a", lambda: LocalExecutor(steplaw.train.run))
    rows = export_rows("sweeps/a")   # the runs table that steplaw.laws fits
"""
from steplaw.sweep.driver import SweepSummary, run_sweep
from steplaw.sweep.executors import LocalExecutor
from steplaw.sweep.ray_executor import RayExecutor
from steplaw.sweep.spec import ModelSpec, SweepSpec
from steplaw.sweep.store import ResultStore, export_rows

__all__ = ["SweepSpec", "ModelSpec", "run_sweep", "SweepSummary", "LocalExecutor", "RayExecutor", "ResultStore",
           "export_rows"]
