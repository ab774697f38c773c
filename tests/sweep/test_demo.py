"""The demo preset: its design, and end to end with real training at its small scale."""
import json

import pytest

from steplaw.cli import main
from steplaw.errors import UserError
from steplaw.laws.fit import fit_hparams
from steplaw.laws.table import read_runs
from steplaw.sweep.planner import AdaptivePlanner, AdaptiveSettings, spec_cells
from steplaw.sweep.presets import DEMO_PLANNER, DEMO_SEQ_LEN, demo_spec
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


def test_demo_wsd_preset_design():
    """`steplaw demo --schedule wsd`: five budgets per model over the cosine demo's 9x span,
    one absolute warmup (the runs of a model, lr and batch share their stable phase), a
    1-sqrt cooldown to 0, and the planner searching trunks (cheaper than the runs alone)."""
    from steplaw.sweep.cost import alone_tokens, trunk_tokens

    spec, cosine = demo_spec("full", "wsd"), demo_spec("full")
    assert spec.fixed["schedule"] == "wsd" and spec.fixed["decay_shape"] == "sqrt" and spec.fixed["min_lr_ratio"] == 0
    assert isinstance(spec.fixed["warmup_tokens"], int) and spec.fixed["warmup_tokens"] < min(spec.tokens) / 4
    assert len(spec.tokens) > len(cosine.tokens) and max(spec.tokens) / min(spec.tokens) == 9
    assert trunk_tokens(spec.tokens, 0.2) / alone_tokens(spec.tokens) < 0.55
    assert trunk_tokens(spec.tokens, 0.2) < alone_tokens(cosine.tokens)  # 5 budgets cost less than cosine's 3
    cells = spec_cells(spec.bind(SteplawTrainer()))
    assert len({c.column for c in cells}) == 3 and {c.decay_fraction for c in cells} == {0.2}
    planner = AdaptivePlanner(cells, DEMO_PLANNER["full"])
    first = planner.propose({})
    used, alone = planner.batch_cost(first)
    assert used < alone  # the first wave's lead at the largest budget branches to its column's shorter ones
    from steplaw.optim.schedule import check_branching

    for run in first:  # every run a valid WSD config whose branch point lies after its warmup
        run.validate()
        check_branching(run.tokens // run.batch_tokens, max(1, round(run.warmup_tokens / run.batch_tokens)), 0.2)
    small = demo_spec("small", "wsd")
    assert small.fixed["warmup_tokens"] < min(small.tokens) / 4
    with pytest.raises(UserError):
        demo_spec("full", "constant")


def test_demo_cli_passes_the_schedule(tmp_path, monkeypatch):
    from steplaw.cli import sweep as cli_sweep

    seen = {}

    def fake_run_spec(spec, args):
        seen["spec"] = spec
        raise SystemExit(0)

    monkeypatch.setattr(cli_sweep, "run_spec", fake_run_spec)
    with pytest.raises(SystemExit):
        main(["demo", "--scale", "small", "--schedule", "wsd", "--out", str(tmp_path / "d"), "--quiet"])
    assert seen["spec"].fixed["schedule"] == "wsd" and seen["spec"].tokens == demo_spec("small", "wsd").tokens
