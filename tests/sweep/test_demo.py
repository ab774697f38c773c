"""The demo preset end to end with real training, at its small scale (36 runs)."""
import json

import pytest

from steplaw.cli import main
from steplaw.laws.fit import fit_hparams
from steplaw.laws.table import read_runs
from steplaw.sweep.presets import demo_spec
from steplaw.sweep.store import ResultStore, export_rows


def test_demo_full_preset_shape():
    spec = demo_spec("full")
    cells = spec.cells()
    assert len({c.n_params for c in cells}) >= 3 and len({c.tokens for c in cells}) >= 2
    assert all(len(c.lrs) == 4 and len(c.batch_sizes) == 3 for c in cells)
    assert len(spec.expand()) >= 72


@pytest.mark.slow
def test_small_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--scale", "small", "--out", str(out), "--quiet"]) == 0, failures(out)
    printed = capsys.readouterr().out.split()
    report_md, report_html = out / "report" / "report.md", out / "report" / "report.html"
    assert [str(report_md), str(report_html)] == printed
    text = report_md.read_text()
    assert "Fitted laws beside the Step Law" in text and "No law was fitted" not in text
    assert "| 36 " not in text and text.count("| ok |") == 36
    assert (out / "report" / "figures").is_dir() and "](figures/" in text
    page = report_html.read_text()
    assert "data:image/png;base64," in page and "src=\"figures/" not in page

    # the same command again reuses every run
    before = finished_at(out)
    assert main(["demo", "--scale", "small", "--out", str(out), "--no-report"]) == 0
    assert "ran 0, reused 36" in capsys.readouterr().err
    assert finished_at(out) == before

    # `steplaw fit DIR` and `steplaw fit exported.csv` see the same runs
    csv_path, json_path = tmp_path / "runs.csv", tmp_path / "runs.json"
    assert main(["runs", str(out), "--csv", "-o", str(csv_path)]) == 0
    assert main(["runs", str(out), "--json", "-o", str(json_path)]) == 0
    assert len(json.loads(json_path.read_text())) == 36
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
