"""`steplaw report --loss-holdout RULE --loss-rollout N`: the loss law's holdout and rollout in
the report's loss-law section (Markdown, HTML, loss_fit.json), and refusals shown there."""
import json
import math

import pytest

from steplaw.cli import main
from steplaw.models.accounting import param_counts
from steplaw.models.config import ModelConfig
from steplaw.sweep.store import ResultStore

SHAPES = [ModelConfig(d_model=d, n_layers=2, n_heads=2, d_ff=2 * d, max_seq_len=64) for d in (32, 64, 96, 128)]
TOKENS = (2**16, 2**18, 2**20)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """4 sizes x 3 token counts x 2 LRs; the loss follows a Chinchilla-shaped law in (N, D)."""
    sweep_dir = tmp_path_factory.mktemp("report") / "sweep"
    from steplaw.train.config import RunConfig

    with ResultStore(sweep_dir) as store:
        entries, counts = [], []
        for model in SHAPES:
            for d in TOKENS:
                for lr in (0.002, 0.004):
                    config = RunConfig(model=model, tokens=d, lr=lr, batch_tokens=256, seq_len=64)
                    entries.append({**config.to_dict(), "run_id": config.run_id()})
                    pc = param_counts(model)
                    counts.append({"non_embedding": pc.non_embedding, "active": pc.active, "total": pc.total})
        store.add_runs(entries, counts)
        for entry, count in zip(entries, counts):
            n, d = count["non_embedding"], entry["tokens"]
            loss = 1.5 + 60 / n**0.35 + 300 / d**0.3 + 0.05 * math.log(entry["lr"] / 0.003) ** 2
            store.record_result(entry["run_id"], {"status": "ok", "final_train_loss": loss, "final_val_loss": loss,
                                                  "curve": [(0, 5.0), (d, loss)], "compute_flops": 6.0 * n * d},
                                host="test", versions={"python": "3"})
    return sweep_dir


def test_report_shows_holdout_fit_on_the_3_smallest_sizes_predicting_the_largest_and_the_rollout(sweep, tmp_path):
    out = tmp_path / "rep"
    largest = param_counts(SHAPES[-1]).non_embedding
    assert main(["report", str(sweep), "--out", str(out), "--no-plots", "--n-boot", "20",
                 "--loss-holdout", "largest", "--loss-rollout", "N"]) == 0
    text = (out / "report.md").read_text()
    assert "Holdout `largest`: fitted on N" in text and "mean |rel_error|" in text
    assert "| N | D | observed | predicted | 95% prediction interval | rel_error |" in text
    table = text.split("| N | D | observed | predicted | 95% prediction interval | rel_error |")[1].split("\n\n")[0]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [f"| {largest:.4g}"] * 3  # held-out cells
    assert "Rollout by N (fit on the k smallest values, predict the next)" in text
    assert "Holdout <code>largest</code>: fitted on N" in (out / "report.html").read_text()
    data = json.loads((out / "loss_fit.json").read_text())
    assert data["holdout"]["rule"] == "largest" and len(data["holdout"]["rows"]) == 3
    assert data["holdout"]["mean_abs_rel_error"] < 0.01
    assert [s["predicted"]["N"] for s in data["rollout"]["steps"]] == \
        pytest.approx([param_counts(m).non_embedding for m in SHAPES[3:]])


def test_report_shows_a_refused_check_and_refuses_a_bad_rule(sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out), "--no-plots", "--n-boot", "0",
                 "--loss-holdout", "N>=1e15"]) == 0
    assert "Holdout `N>=1e15`: not run: --holdout 'N>=1e15' holds out no finished run" in \
        (out / "report.md").read_text()
    assert main(["report", str(sweep), "--out", str(out), "--loss-holdout", "N<3"]) == 2
    assert "--holdout term 'N<3' is not a rule" in capsys.readouterr().err
