"""The demo preset: its design, and end to end with real training at its small scale."""
import json

import pytest

from steplaw.cli import main
from steplaw.laws.fit import fit_hparams
from steplaw.laws.table import read_runs
from steplaw.sweep.planner import AdaptivePlanner, AdaptiveSettings, spec_cells
from steplaw.sweep.presets import DEMO_SEQ_LEN, demo_spec
from steplaw.sweep.store import ResultStore, export_rows
from steplaw.trainers.steplaw import SteplawTrainer


def test_demo_full_preset_design():
    spec = demo_spec("full").bind(SteplawTrainer())
    cells = spec_cells(spec)
    assert len(cells) == 9 and len({c.N for c in cells}) == 3 and len({c.D for c in cells}) == 3
    assert max(c.N for c in cells) / min(c.N for c in cells) > 10  # N spans more than a decade
    for cell in cells:
        # room below the starting batch size: the batch optimum can be bracketed from below
        assert cell.batch_sizes[0] == DEMO_SEQ_LEN and cell.prior[1] >= 4 * DEMO_SEQ_LEN
        assert cell.batch_sizes[-1] >= 8 * cell.prior[1]
    first = AdaptivePlanner(cells, AdaptiveSettings()).propose({})
    assert len(first) == 15  # the first wave: 3 cells x 5 runs; the rest start from their fit


@pytest.mark.slow
def test_small_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--scale", "small", "--out", str(out), "--quiet"]) == 0, failures(out)
    printed = capsys.readouterr().out.split()
    report_md, report_html = out / "report" / "report.md", out / "report" / "report.html"
    assert [str(report_md), str(report_html)] == printed
    text = report_md.read_text()
    assert "Fitted laws beside the Step Law" in text and "No law was fitted" not in text
    with ResultStore(out, readonly=True) as store:
        assert store.meta("planner") == "adaptive"
        cells = store.meta("planner_cells")
        runs = len(store.rows())
    assert len(cells) == 9 and sum(c["runs"] for c in cells) == runs
    assert all(c["state"] in ("bracketed", "edge", "unbracketed") for c in cells)

    # the same command again reuses every run
    before = finished_at(out)
    assert main(["demo", "--scale", "small", "--out", str(out), "--no-report"]) == 0
    assert f"ran 0, reused {runs}" in capsys.readouterr().err
    assert finished_at(out) == before

    # `steplaw fit DIR` and `steplaw fit exported.csv` see the same runs
    csv_path, json_path = tmp_path / "runs.csv", tmp_path / "runs.json"
    assert main(["runs", str(out), "--csv", "-o", str(csv_path)]) == 0
    assert main(["runs", str(out), "--json", "-o", str(json_path)]) == 0
    assert len(json.loads(json_path.read_text())) == runs
    fits = [fit_hparams(read_runs(source), n_boot=50).to_dict() for source in (export_rows(out), csv_path)]
    for law in ("lr_law", "bs_law"):
        numbers = [{k: v for k, v in fit[law].items() if k != "ci"} for fit in fits]
        assert numbers[0] == pytest.approx(numbers[1], rel=1e-12)
        assert fits[0][law]["ci"] == fits[1][law]["ci"]


def failures(out):
    with ResultStore(out, readonly=True) as store:
        return {row["run_id"]: row["reason"] for row in store.rows() if row["status"] != "ok"}


def finished_at(out):
    with ResultStore(out, readonly=True) as store:
        return {row["run_id"]: row["finished_at"] for row in store.rows()}
