"""PNG figures of a hyperparameter fit."""
import sys

import pytest

from steplaw.errors import UserError
from steplaw.laws.fit import fit_hparams
from steplaw.laws.synthetic import synthetic_runs

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def table_and_fit():
    table = synthetic_runs(seed=7, n_values=(6e7, 2.4e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10))
    return table, fit_hparams(table, n_boot=20)


def test_plot_fit_writes_pngs(tmp_path, table_and_fit):
    from steplaw.report.plots import plot_fit

    paths = plot_fit(*table_and_fit, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["loss_heatmap_1.png", "optimal_batch.png", "optimal_lr.png", "predicted_vs_observed.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_heatmaps_paginate(tmp_path, table_and_fit):
    from steplaw.report.plots import loss_heatmaps

    paths = loss_heatmaps(*table_and_fit, tmp_path, cells_per_figure=4)
    assert len(paths) == 3  # 9 cells, 4 per figure


def test_missing_matplotlib_is_a_user_error(tmp_path, table_and_fit, monkeypatch):
    from steplaw.report import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="matplotlib"):
        plots.plot_fit(*table_and_fit, tmp_path)


def test_plots_of_a_fit_without_law_scores(tmp_path, table_and_fit):
    from steplaw.report.plots import predicted_vs_observed

    table = table_and_fit[0]
    paths = predicted_vs_observed(table, fit_hparams(table, n_boot=0, score_laws=False), tmp_path)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
