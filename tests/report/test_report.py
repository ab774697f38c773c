"""The sweep report, on stores filled in-process with a known loss surface."""
import json
import math
from pathlib import Path

import pytest

from steplaw.cli import main
from steplaw.errors import UserError
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


def fill(sweep_dir, tokens=(2**16, 2**18, 2**20), shapes=SHAPES, lrs=LRS, batches=BATCHES, fail_one=False,
         spec_id=None):
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
        store.add_runs(entries, counts, spec_id=spec_id)
        for i, entry in enumerate(entries):
            n = counts[i]["non_embedding"]
            lr_opt, bs_opt = optimum(n, entry["tokens"])
            loss = 2 + 0.2 * math.log(entry["lr"] / lr_opt) ** 2 + 0.1 * math.log(entry["batch_tokens"] / bs_opt) ** 2
            result = {"status": "ok", "final_train_loss": loss, "final_val_loss": loss,
                      "curve": [(0, 5.0), (entry["tokens"], loss)], "compute_flops": 6.0 * n * entry["tokens"]}
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
    sweep = fill(tmp_path, tokens=(2**16, 2**18), lrs=LRS[:1], batches=BATCHES[:1])  # one run per cell
    md_path, html_path = write_report(sweep, n_boot=10)
    text = md_path.read_text()
    assert "No law was fitted: no (N, D) cell has two or more finished runs" in text
    assert "## Cells" in text and "## Runs" in text
    assert not (tmp_path / "report" / "fit.json").exists()


def test_report_names_an_exponent_it_refused(tmp_path):
    sweep = fill(tmp_path, tokens=(2**16, 2**18))  # two token budgets: the D exponent is not identified
    md_path, _ = write_report(sweep, n_boot=10, plots=False)
    text = md_path.read_text()
    assert "Not fitted: the learning-rate law's exponent of D is not fitted because the cells have 2" in text
    assert "| not fitted |" in text
    fit = json.loads((tmp_path / "report" / "fit.json").read_text(), parse_constant=_no_nan)
    assert "exp_D" not in fit["lr_law"] and fit["refused_exponents"]


def _no_nan(name):
    raise AssertionError(f"fit.json holds {name}: not JSON")


def test_report_shows_planner_runs_per_cell_and_law_scores(tmp_path):
    sweep = fill(tmp_path / "sweep", lrs=LRS[:4])
    with ResultStore(sweep) as store:
        store.set_meta("planner", "adaptive")
    md_path, _ = write_report(sweep, n_boot=20, plots=False)
    text = md_path.read_text()
    assert "proposed by the `adaptive` planner" in text
    assert "| runs used |" in text and "| 20 | 20 |" in text  # 4 LRs x 5 batches per cell, all finished
    assert "## Every law scored on these cells" in text and "step_law (Li et al. 2025" in text
    assert "fit_loco" in text and "nearest" in text
    json.loads((sweep / "report" / "fit.json").read_text(), parse_constant=_no_nan)


def test_report_of_an_old_sweep_says_grid(tmp_path):
    sweep = fill(tmp_path / "sweep")
    text = write_report(sweep, n_boot=0, plots=False, html_report=False)[0].read_text()
    assert "proposed by the `grid` planner" in text


def test_report_cli(tmp_path, capsys):
    sweep = fill(tmp_path / "sweep")
    assert main(["report", str(sweep), "--out", str(tmp_path / "r"), "--n-boot", "20", "--no-html", "--no-plots"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no sweep store" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"SQLite format 3\x00" + b"\x07" * 300, b"not a database at all" * 20])
def test_report_of_a_damaged_store_is_one_line(tmp_path, capsys, content):
    (tmp_path / "runs.sqlite").write_bytes(content)
    assert main(["report", str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "not a readable sweep store" in err and len(err.strip().splitlines()) == 1


def test_report_out_is_checked_before_any_work(tmp_path, capsys):
    sweep = fill(tmp_path / "sweep", tokens=(2**16,), shapes=SHAPES[:1])
    (tmp_path / "a_file").write_text("x")
    assert main(["report", str(sweep), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file: expected a directory" in capsys.readouterr().err
    assert main(["report", str(sweep), "--out", "/proc/steplaw_report"]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert main(["report", str(sweep), "--gap", "1.5"]) == 2
    assert "--gap" in capsys.readouterr().err
    assert not (sweep / "report").exists()


def test_report_of_dense_and_moe_runs_asks_about_sparsity(tmp_path):
    from steplaw.models.config import MoEConfig

    moe = [ModelConfig(d_model=d, n_layers=2, n_heads=2, d_ff=2 * d, max_seq_len=64, moe=MoEConfig(n_experts=4, top_k=1))
           for d in (32, 64, 128)]
    sweep = fill(tmp_path / "sweep", shapes=SHAPES + moe, lrs=LRS[1:4], batches=BATCHES[1:4])
    text = write_report(sweep, n_boot=50, plots=False, html_report=False)[0].read_text()
    assert "MoE sparsity S = N_active / N in the learning-rate law" in text
    fit = json.loads((sweep / "report" / "fit.json").read_text(), parse_constant=_no_nan)
    assert fit["sparsity"]["laws"]["learning-rate"]["verdict"]
    # the law table shows the sparsity exponent beside N's and D's (issue 11)
    assert "| exponent of D | exponent of S = N_active/N |" in text
    row = next(line for line in text.splitlines() if line.startswith("| η(N, D) = a·N^α·D^β·S^g | fitted |"))
    exp_s = fit["lr_law"].get("exp_S")
    assert (f"{exp_s:.4g}" if exp_s is not None else "not fitted") in row.split("|")[-2]


def test_report_flags_cells_the_planner_left_unbracketed(tmp_path):
    sweep = fill(tmp_path / "sweep")
    n_small, n_mid = (param_counts(shape).non_embedding for shape in SHAPES[:2])

    def report(n, d, state, sides):
        return {"cell": f"N={n} D={d}", "N": float(n), "D": float(d), "runs": 25, "state": state,
                "best_lr": 0.004, "best_batch_tokens": 512, "sides": sides}

    closed = {"lr_low": "bracketed", "lr_high": "bracketed", "bs_low": "bracketed", "bs_high": "bracketed"}
    with ResultStore(sweep) as store:
        store.set_meta("planner", "adaptive")
        store.set_meta("planner_cells", [report(n_small, 2**16, "unbracketed", {**closed, "lr_high": "open"}),
                                         report(n_mid, 2**18, "bracketed", closed),
                                         report(n_mid, 2**20, "edge", {**closed, "bs_low": "limit"})])
    text = write_report(sweep, n_boot=0, plots=False, html_report=False)[0].read_text()
    laws, cells = text.split("## Cells")
    cells = cells.split("## ")[0]
    warning = "1 of 9 cells are unbracketed"
    # said where the law is shown, and again under the cell table
    assert warning in laws.split("## Fitted laws beside the Step Law")[1] and warning in cells
    assert f"N={n_small:,}, D=65,536 (open: lr_high)" in laws
    assert "| planner state |" in cells
    assert cells.count("UNBRACKETED (a bound; open: lr_high)") == 1
    assert cells.count("| bracketed |") == 1 and cells.count("| edge |") == 1


def test_report_without_unbracketed_cells_has_no_warning(tmp_path):
    sweep = fill(tmp_path / "sweep")
    text = write_report(sweep, n_boot=0, plots=False, html_report=False)[0].read_text()
    assert "unbracketed" not in text.lower() and "| planner state |" not in text


def test_report_of_a_sweep_with_several_specs_needs_a_choice(tmp_path, capsys):
    # Issue 12: the report used to mix the runs of every spec with no word.
    sweep = fill(tmp_path / "sweep", spec_id="aaaa1111")
    fill(sweep, tokens=(2**17, 2**19, 2**21), spec_id="bbbb2222")
    with pytest.raises(UserError, match=r"holds the runs of 2 specs \(aaaa1111: 225 runs, bbbb2222: 225 runs\)"):
        write_report(sweep, n_boot=0, plots=False)
    assert main(["report", str(sweep), "--no-plots"]) == 2
    assert "--spec ID" in capsys.readouterr().err
    text = write_report(sweep, n_boot=0, plots=False, html_report=False, spec="bbbb")[0].read_text()
    assert text.count("| ok |") == 225 and "fitted together" not in text
    heard = []
    text = write_report(sweep, n_boot=0, plots=False, html_report=False, all_specs=True, warn=heard.append)[0].read_text()
    assert text.count("| ok |") == 450 and "Warning: the runs of 2 specs are fitted together" in text
    assert len(heard) == 1 and "aaaa1111: 225 runs" in heard[0]
    assert main(["report", str(sweep), "--no-plots", "--no-html", "--n-boot", "0", "--all-specs"]) == 0
    assert "warning: the runs of 2 specs are fitted together" in capsys.readouterr().err


def test_report_of_a_file_says_it_is_not_a_sweep_directory(tmp_path, capsys):
    a_file = tmp_path / "runs.csv"
    a_file.write_text("N,D\n")
    assert main(["report", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a sweep directory" in err and "does not exist" not in err


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    # Issue 12: a crash while writing must leave the old file or the new one, never half.
    import steplaw.report.build as build
    import steplaw.report.plots as plots

    written = []

    def recording(path, data, *args, **kwargs):
        written.append(Path(path).name)
        return real(path, data, *args, **kwargs)

    real = build.write_atomic
    monkeypatch.setattr(build, "write_atomic", recording)
    monkeypatch.setattr(plots, "write_atomic", recording)
    sweep = fill(tmp_path / "sweep")
    paths = write_report(sweep, n_boot=0)
    figures = sorted(p.name for p in (sweep / "report" / "figures").glob("*.png"))
    assert {"runs.csv", "report.md", "report.html"} <= set(written) and figures and set(figures) <= set(written)
    assert [p.name for p in paths] == ["report.md", "report.html"]
    assert not [p for p in (sweep / "report").rglob("*") if p.name.endswith(".tmp")]
