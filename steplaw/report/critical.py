"""The report's critical-batch section: B_crit per cell from the stored loss curves, beside B_opt.

One section of the sweep report (steplaw.report.build puts it before the cells): the
critical batch size of every (N, D) cell (steplaw.laws.critical, McCandlish et al. 2018)
next to the optimal batch of the fitted law, and the B_crit(D) law beside B_opt(D), with
Zhang et al. 2024 (arXiv:2410.21676) cited for why the two differ. A sweep whose curves
cannot give one (too few batch sizes, curves too short) gets one sentence saying so.
"""
from __future__ import annotations

from pathlib import Path

from steplaw.errors import UserError
from steplaw.laws.critical import CITATION, critical_batch
from steplaw.laws.table import read_runs
from steplaw.sweep.store import ResultStore

TITLE = "Critical batch size (from the loss curves)"


def _num(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def critical_blocks(sweep_dir: Path, rows: list[dict], fit, objective: str = "loss", n_boot: int = 200) -> list[tuple]:
    """The section's blocks (h2, table, paragraphs); never raises for the sweep's data."""
    blocks: list[tuple] = [("h2", TITLE)]
    try:
        with ResultStore(sweep_dir, readonly=True) as store:
            with_curves = [{**row, "curve": [list(p) for p in store.curve(row["run_id"])]} for row in rows]
        table = read_runs(with_curves, source_name=str(sweep_dir), col_loss=objective)
        n_column = fit.n_column if fit is not None else "N"
        result = critical_batch(table, n_column=n_column, n_boot=n_boot)
    except UserError as exc:
        return blocks + [("p", f"No critical batch size: {exc}")]
    bs_law = fit.bs_law if fit is not None and fit.bs_law.exps else None
    body = []
    for cell in result.cells:
        b_opt = float(bs_law(cell.N, cell.D)) if bs_law is not None else None
        target = min((t for t in cell.targets if "B_crit" in t), key=lambda t: t["loss"], default=None)
        body.append([_num(cell.N), _num(cell.D), len(cell.batches), _num(target["loss"] if target else None),
                     _num(cell.B_crit), _num(b_opt), cell.problem or ""])
    blocks.append(("table", ["N", "D", "batch sizes", "target loss", "B_crit (tokens)", "B_opt (tokens)", "note"],
                   body))
    law = result.law["formula"] if result.law else f"B_crit(D) not fitted: {result.law_refused}"
    if result.law and result.law["ci"].get("exp_D"):
        low, high = result.law["ci"]["exp_D"]
        law += f" (95% interval of the exponent [{low:+.3f}, {high:+.3f}])"
    beside = f"; the optimal batch: {bs_law.formula('B_opt')}" if bs_law is not None else ""
    blocks.append(("p", f"{law}{beside}. B_crit = E_min / S_min at the lowest loss every batch size reaches, from "
                        f"E(B) = E_min + S_min B ({CITATION}). The critical batch is where more batch stops buying "
                        "fewer steps; the optimal batch is the lowest loss at fixed tokens: they need not agree."))
    blocks += [("p", f"Note: {w}") for w in result.warnings]
    return blocks


def insert_critical(blocks: list[tuple], section: list[tuple]) -> list[tuple]:
    """`section` placed before the report's cells (at the end when it has none)."""
    at = next((i for i, b in enumerate(blocks) if b[0] == "h2" and b[1] == "Cells"), len(blocks))
    return blocks[:at] + section + blocks[at:]
