"""The sweep report, on stores filled in-process with a known loss surface."""
import math

import pytest

from steplaw.cli import main
from steplaw.models.accounting import param_counts
from steplaw.models.config import ModelConfig
from steplaw.report.build import cell_summaries, write_report
from steplaw.sweep.store import ResultStore, export_rows
from steplaw.train.config import RunConfig

SHAPES = [ModelConfig(d_model=d, n_layers=2, n_heads=2, d_ff=2 * d, max_seq_len=64) for d in (32, 64, 128)]
LRS = [0.001, 0.002, 0.004, 0.008, 0.016]
BATCHES = [128, 256, 512, 1024, 2048]


def optimum(n, d):
    """Known optimum of the synthetic surface: lr* = 0.5 N^-0.5 D^0.1, B* = 2 D^0.5."""
    return 0.5 * n**-0.5 * d**0.1, 2 * d**0.5


def fill(sweep_dir, tokens=(2**16, 2**18, 2**20), shapes=SHAPES, lrs=LRS, batches=BATCHES, fail_one=False):
    with ResultStore(sweep_dir) as store:
        entries, counts = [], []
        for model in shapes:
            for d in tokens:
                for lr in lrs:
                    for bs in batches:
                        config = RunConfig(model=model, tokens=d, lr=lr, batch_tokens=bs, seq_len=64)
                        entries.append({**config.to_dict(), "run_id": config.run_id()})
                        counts.append({"non_embedding": param_counts(model).non_embedding,
                                       "active": param_counts(model).active, "total": param_counts(model).total})
        store.add_runs(entries, counts)
        for i, entry in enumerate(entries):
            n = counts[i]["non_embedding"]
            lr_opt, bs_opt = optimum(n, entry["tokens"])
            loss = 2 + 0.2 * math.log(entry["lr"] / lr_opt) ** 2 + 0.1 * math.log(entry["batch_tokens"] / bs_opt) ** 2
            result = {"status": "ok", "final_train_loss": loss, "final_val_loss": loss, "curve": [(0, 5.0), (entry["tokens"], loss)],
                      "compute_flops": 6.0 * n * entry["tokens"]}
            if fail_one and i == 0:
                result = {"status": "failed", "reason": "worker process was killed by SIGKILL"}
            store.record_result(entry["run_id"], result, host="test", versions={"python": "3"})
    return sweep_dir


def test_report_has_laws_cells_figures_and_runs(tmp_path):
    sweep = fill(tmp_path / "sweep", fail_one=True)
    md_path, html_path = write_report(sweep, n_boot=100)
    assert md_path == sweep / "report" / "report.md" and html_path.name == "report.html"
    text = md_path.read_text()
    assert "| η(N, D) = a·N^α·D^β | fitted |" in text and "| Step Law | 1.79 | -0.713 | 0.307 |" in text
    assert "## Failed runs" in text and "killed by SIGKILL" in text
    assert text.count("| ok |") == 3 * 3 * 25 - 1 and text.count("| failed |") == 1
    figures = sorted((sweep / "report" / "figures").glob("*.png"))
    assert figures and all(f"](figures/{f.name})" in text for f in figures)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == len(figures) and "<table>" in page
    assert (sweep / "report" / "fit.json").is_file()
    assert (sweep / "report" / "runs.csv").read_text().count("\n") == 3 * 3 * 25 + 1


def test_fitted_exponents_in_report_match_the_surface(tmp_path):
    import json

    sweep = fill(tmp_path / "sweep")
    write_report(sweep, n_boot=50, plots=False)
    fit = json.loads((sweep / "report" / "fit.json").read_text())
    # optima are snapped to the grid, so the recovered exponents are approximate
    assert fit["lr_law"]["exp_N"] == pytest.approx(-0.5, abs=0.2)
    assert fit["bs_law"]["exp_D"] == pytest.approx(0.5, abs=0.2)


@pytest.mark.parametrize("lrs, batches, lr_edge, bs_edge", [
    (LRS, BATCHES, None, None),  # optimum inside both grids
    ([0.016, 0.032, 0.064], BATCHES, "low", None),  # every LR above the optimum
    (LRS, [4096, 8192], None, "low"),
    ([1e-5, 2e-5], [16, 32], "high", "high"),
])
def test_edge_cells_are_flagged(tmp_path, lrs, batches, lr_edge, bs_edge):
    sweep = fill(tmp_path, tokens=(2**18,), shapes=SHAPES[1:2], lrs=lrs, batches=batches)
    (cell,) = cell_summaries(export_rows(sweep))
    assert (cell["lr_edge"], cell["bs_edge"]) == (lr_edge, bs_edge)


def test_report_explains_a_fit_it_cannot_make(tmp_path):
    sweep = fill(tmp_path, tokens=(2**16, 2**18))  # two token budgets: the D exponent is not identified
    md_path, html_path = write_report(sweep, n_boot=10)
    text = md_path.read_text()
    assert "No law was fitted: cannot fit" in text and "## Cells" in text and "## Runs" in text
    assert not (tmp_path / "report" / "fit.json").exists()


def test_report_cli(tmp_path, capsys):
    sweep = fill(tmp_path / "sweep")
    assert main(["report", str(sweep), "--out", str(tmp_path / "r"), "--n-boot", "20", "--no-html", "--no-plots"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no sweep store" in capsys.readouterr().err
