"""Compute used against the same runs trained alone: the cost model, the summary of a
sweep's rows and the report's paragraph and compute.json."""
import json
import math

import pytest

from steplaw.report.build import write_report
from steplaw.report.compute import compute_summary
from steplaw.sweep.cost import alone_tokens, trunk_tokens
from steplaw.sweep.store import ResultStore


def test_trunk_cost_model_matches_the_issue_figures():
    # budgets 1, 2, 4, 8 with 20% cooldowns: (8 + 0.2 x 7) / 15 = 0.627 (issue 22)
    assert trunk_tokens([1, 2, 4, 8], 0.2) / alone_tokens([1, 2, 4, 8]) == pytest.approx(9.4 / 15)
    six = [3 ** (k / 2) for k in range(6)]
    assert trunk_tokens(six, 0.2) / alone_tokens(six) == pytest.approx(0.55, abs=0.01)
    assert trunk_tokens([5], 0.2) == 5 and trunk_tokens([], 0.2) == 0
    with pytest.raises(ValueError):
        trunk_tokens([1, 2], 0.0)


def row(run_id, d, trained, trunk=None, status="ok", compute=None):
    return {"run_id": run_id, "status": status, "D": d, "tokens_trained": trained, "trunk": trunk,
            "compute": compute if compute is not None else 6.0 * 100 * d}


def test_summary_counts_trunks_and_runs_alone():
    rows = [row("a", 800, 800, "t1"), row("b", 400, 80, "t1"), row("c", 200, 40, "t1"), row("d", 100, 100),
            row("e", 100, None, status="pending"), row("f", 100, 0, status="failed")]
    s = compute_summary(rows, 0.2)
    assert (s["runs"], s["trunks"], s["runs_in_trunks"]) == (4, 1, 3)
    assert s["tokens_trained"] == 1020 and s["tokens_alone"] == 1500 and s["ratio"] == pytest.approx(1020 / 1500)
    assert s["flops_trained"] == pytest.approx(6.0 * 100 * 1020) and s["flops_alone"] == pytest.approx(6.0 * 100 * 1500)
    assert s["cost_model_tokens"] == pytest.approx(800 + 0.2 * 600 + 100)
    alone = compute_summary([row("d", 100, 100)], 0.2)
    assert alone["ratio"] == 1.0 and alone["trunks"] == 0 and alone["cost_model_tokens"] is None
    assert compute_summary([row("e", 100, None, status="pending")]) is None


def test_report_shows_compute_used_against_alone(tmp_path):
    from steplaw.models.config import ModelConfig
    from steplaw.train.config import RunConfig

    model = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=64)
    with ResultStore(tmp_path) as store:
        store.record_spec({"fixed": {"schedule": "wsd", "decay_fraction": 0.25}, "tokens": [4096, 8192]})
        for lr in (0.004, 0.008, 0.016):
            for bs in (128, 256, 512):
                configs = [RunConfig(model=model, tokens=d, lr=lr, batch_tokens=bs, seq_len=64, schedule="wsd",
                                     warmup_tokens=256, decay_fraction=0.25) for d in (4096, 8192)]
                store.add_runs([{**c.to_dict(), "run_id": c.run_id()} for c in configs])
                trunk = f"{lr:.3f}{bs}".replace(".", "").ljust(16, "0")[:16]
                for c in configs:
                    loss = 3 + math.log(lr / 0.008) ** 2 + 0.1 * math.log(bs / 256) ** 2 + 4096 / c.tokens
                    store.record_result(c.run_id(), {"status": "ok", "final_train_loss": loss, "tokens": c.tokens,
                                                     "compute_flops": 1e3 * c.tokens, "trunk": trunk,
                                                     "tokens_trained": c.tokens if c.tokens == 8192 else 1024})
    md = write_report(tmp_path, n_boot=0, html_report=True, plots=False)
    text, page = md[0].read_text(), md[1].read_text()
    summary = json.loads((tmp_path / "report" / "compute.json").read_text())
    assert summary["tokens_trained"] == 9 * (8192 + 1024) and summary["tokens_alone"] == 9 * (8192 + 4096)
    assert summary["cost_model_tokens"] == 9 * (8192 + 0.25 * 4096) and summary["trunks"] == 9
    assert f"({summary['ratio']:.3f}x)" in text and "18 runs branched off 9 WSD trunks" in text
    assert "Compute used:" in page
