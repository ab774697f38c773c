"""The critical batch size (issue 24 item 5): B_crit = E_min / S_min from the loss curves,
McCandlish et al.'s (S/S_min - 1)(E/E_min - 1) = 1, recovered on curves built to follow it;
a B_crit(D) law beside B_opt(D) in `fit --critical-batch` and the report; too few or too
short curves said in one sentence, no curves at all refused (exit 2)."""
import json
import math
import re

import numpy as np
import pytest

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.laws.critical import critical_batch, fit_tradeoff, tokens_to_reach
from steplaw.laws.table import read_runs

N_VALUES, D_VALUES = (1e7, 4e7, 1.6e8), (1e8, 4e8, 1.6e9)
EXP_D = 0.4


def b_noise(d):
    return 2e4 * (d / 1e8) ** EXP_D


def _curve(d, b, bn, slow=1.0, points=40):
    """Loss after t tokens at batch b: S_min(L) = (10 / (L - 2))^2 perfect-batch steps, and the
    steps at batch b are S_min (1 + bn / b) (McCandlish's model); `slow` a worse LR."""
    t = np.linspace(d / points, d, points)
    s_min = t / b / (1 + bn / b)
    return np.column_stack([t, 2.0 + 10 * s_min ** -0.5 / math.sqrt(slow)])


def _rows(batches_per_cell=7, points=40, curves=True):
    rows = []
    for n in N_VALUES:
        for d in D_VALUES:
            bn = b_noise(d)
            for b in bn * 2.0 ** np.arange(-3, batches_per_cell - 3):
                for slow, lr in ((1.0, 1e-3), (0.7, 3e-3)):
                    curve = _curve(d, b, bn, slow, points)
                    row = {"N": n, "D": d, "lr": lr, "batch_tokens": float(b), "loss": float(curve[-1, 1])}
                    if curves:
                        row["curve"] = curve.tolist()
                    rows.append(row)
    return rows


def test_tradeoff_line_and_crossing():
    batches = np.array([1e3, 2e3, 4e3, 8e3])
    tokens = 5e6 + 250.0 * batches  # E_min 5e6, S_min 250
    fit = fit_tradeoff(batches, tokens)
    assert fit["B_crit"] == pytest.approx(2e4) and fit["rms_rel_error"] < 1e-12
    # (S/S_min - 1)(E/E_min - 1) = 1 at every point
    steps = tokens / batches
    assert np.allclose((steps / fit["S_min"] - 1) * (tokens / fit["E_min"] - 1), 1.0)
    assert "refused" in fit_tradeoff(batches, np.full(4, 5e6) - batches)  # tokens falling with B
    curve = np.array([[10, 5.0], [20, 4.0], [30, 4.5], [40, 3.0]])
    assert tokens_to_reach(curve, 3.5) == pytest.approx(35.0)  # the running minimum, linear between points
    assert tokens_to_reach(curve, 5.5) is None and tokens_to_reach(curve, 2.0) is None


def test_known_critical_batch_is_recovered_per_cell_and_in_D():
    result = critical_batch(read_runs(_rows()), n_boot=200)
    assert len(result.cells) == 9 and not result.warnings
    for cell in result.cells:
        assert cell.B_crit == pytest.approx(b_noise(cell.D), rel=0.02)
        assert all(t["B_crit"] == pytest.approx(b_noise(cell.D), rel=0.05) for t in cell.targets)
    assert result.law["exp_D"] == pytest.approx(EXP_D, abs=0.01)
    low, high = result.law["ci"]["exp_D"]
    assert low <= EXP_D + 0.01 and high >= EXP_D - 0.01


def test_too_few_batch_sizes_and_too_short_curves_are_said():
    rows = _rows()
    for row in rows:  # the smallest N's cells: two batch sizes only
        if row["N"] == N_VALUES[0] and row["batch_tokens"] > b_noise(row["D"]) / 3:
            row["status"] = "failed"
    rows[-1]["curve"] = rows[-1]["curve"][:2]
    result = critical_batch(read_runs(rows), n_boot=0)
    assert "3 of 9 cells have curves at fewer than 3 batch sizes, too few for the trade-off" in result.warnings[0]
    assert "1 curves have fewer than 3 points, too short" in result.warnings[1]
    assert sum(c.B_crit is not None for c in result.cells) == 6
    with pytest.raises(UserError, match="no cell gives a critical batch size: 9 of 9 cells have curves at fewer"):
        critical_batch(read_runs(_rows(batches_per_cell=2)), n_boot=0)


def test_fit_critical_batch_cli(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in _rows()) + "\n")
    assert main(["fit", str(path), "--critical-batch", "--n-boot", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["critical_batch"]
    assert out["law"]["exp_D"] == pytest.approx(EXP_D, abs=0.01) and "2410.21676" in out["citation"]
    assert all(cell["B_crit"] == pytest.approx(b_noise(cell["D"]), rel=0.02) and cell["B_opt"] > 0
               for cell in out["cells"])
    assert "B_opt_law" in out
    assert main(["fit", str(path), "--critical-batch", "--n-boot", "0", "--no-plots", "--out", str(tmp_path / "f"),
                 "--critical-targets", "2.5"]) == 0
    text = capsys.readouterr().out
    assert "critical batch size (McCandlish" in text and "B_crit = " in text and "beside the optimal batch" in text
    bare = tmp_path / "bare.jsonl"
    bare.write_text("\n".join(json.dumps(row) for row in _rows(curves=False)) + "\n")
    assert main(["fit", str(bare), "--critical-batch", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs loss curves" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_report_has_a_critical_batch_section(tmp_path):
    from steplaw.models.accounting import param_counts
    from steplaw.models.config import ModelConfig
    from steplaw.report.build import write_report
    from steplaw.sweep.store import ResultStore
    from steplaw.train.config import RunConfig

    sweep = tmp_path / "sweep"
    with ResultStore(sweep) as store:
        entries, counts = [], []
        for d_model in (32, 64, 128):
            model = ModelConfig(d_model=d_model, n_layers=2, n_heads=2, d_ff=2 * d_model, max_seq_len=64)
            for d in (2**20, 2**22, 2**24):
                for lr in (0.002, 0.004, 0.008):
                    for bs in (2**10, 2**11, 2**12, 2**13, 2**14):
                        config = RunConfig(model=model, tokens=d, lr=lr, batch_tokens=bs, seq_len=64)
                        entries.append({**config.to_dict(), "run_id": config.run_id()})
                        p = param_counts(model)
                        counts.append({"non_embedding": p.non_embedding, "active": p.active, "total": p.total})
        store.add_runs(entries, counts)
        for entry in entries:
            d, b, lr = entry["tokens"], entry["batch_tokens"], entry["lr"]
            curve = _curve(d, b, 4e3 * (d / 2**20) ** EXP_D, slow=1.0 / (1 + math.log(lr / 0.004) ** 2), points=20)
            store.record_result(entry["run_id"], {"status": "ok", "final_train_loss": float(curve[-1, 1]),
                                                  "curve": curve.tolist(), "compute_flops": 1e12}, host="test")
    md, _ = write_report(sweep, n_boot=50, plots=False)
    text = md.read_text()
    section = text.split("## Critical batch size (from the loss curves)")[1].split("## Cells")[0]
    assert "| B_crit (tokens) | B_opt (tokens) |" in section and re.search(r"B_crit = \S+ \* D\^\+0\.(39|40)", section)
    assert "2410.21676" in section
