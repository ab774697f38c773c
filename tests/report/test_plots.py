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


def test_heatmaps_of_many_cells_are_bounded_and_say_which(tmp_path):
    from steplaw.report.plots import heatmap_cells, loss_heatmaps

    n_values = tuple(6e7 * 1.5**i for i in range(6))
    d_values = tuple(2e9 * 1.6**j for j in range(5))
    # a 3 x 3 grid per cell: many cells have their best run on the grid's edge
    table = synthetic_runs(seed=3, n_values=n_values, d_values=d_values, lr_steps=3, bs_steps=3)
    fit = fit_hparams(table, n_boot=0, score_laws=False)
    assert len(fit.cells) == 30
    chosen, note = heatmap_cells(fit, cap=12)
    assert len(chosen) == 12 and "12 of 30 cells" in note and "the 9 at the smallest" in note and "3 of the 12 cells" in note
    keys = {(c.N, c.D) for c in chosen}
    ns, ds = sorted({c.N for c in fit.cells}), sorted({c.D for c in fit.cells})
    # the sweep's span is always shown: smallest / median / largest N crossed with D
    for n in (ns[0], ns[3], ns[-1]):
        for d in (ds[0], ds[2], ds[-1]):
            assert (n, d) in keys
    edge_keys = [(c.N, c.D) for c in sorted(fit.cells, key=lambda c: (c.N, c.D)) if c.lr_edge or c.bs_edge]
    extra = keys - {(n, d) for n in (ns[0], ns[3], ns[-1]) for d in (ds[0], ds[2], ds[-1])}
    assert extra == set([k for k in edge_keys if k not in keys - extra][:3])  # then edge cells, in (N, D) order
    assert heatmap_cells(fit, cap=12) == (chosen, note)  # deterministic
    assert heatmap_cells(fit, cap=30) == (sorted(fit.cells, key=lambda c: (c.N, c.D)), None)
    paths = loss_heatmaps(table, fit, tmp_path, max_cells=12)
    assert [p.name for p in paths] == ["loss_heatmap_1.png"]


def test_a_nine_cell_sweep_shows_every_cell():
    from steplaw.report.plots import heatmap_cells

    table = synthetic_runs(seed=7, n_values=(6e7, 2.4e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10))
    chosen, note = heatmap_cells(fit_hparams(table, n_boot=0, score_laws=False))
    assert len(chosen) == 9 and note is None
