"""PNG figures of a hyperparameter fit (matplotlib, imported only when a plot is drawn).

Each function takes the RunTable and the HparamFit it was fitted from, writes PNGs into
`out_dir` and returns their paths:

- loss_heatmaps: loss over the LR x batch grid of each (N, D) cell, relative to the
  cell's best, with the best run, the near-optimal runs, the quadratic optimum and the
  leave-one-cell-out prediction marked; diverged or failed runs grey. At most
  MAX_HEATMAP_CELLS cells (heatmap_cells says which, and the figure says so).
- optimal_lr: the cells' optimal LR against N (one series per D) and against D (one
  series per N), with the fitted law and the published Step Law beside it; a colour bar
  instead of a legend when there are many series.
- optimal_batch: the cells' optimal batch against D with both laws.
- predicted_vs_observed: leave-one-cell-out predictions against the observed optima.

Speed (a 50,000-run sweep must plot in seconds): fixed margins instead of tight_layout,
few tick labels, one scatter call per marker kind, array code for the heatmap images.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from steplaw.errors import UserError
from steplaw.fileio import write_atomic
from steplaw.laws.published import step_law


def _save(fig, path: Path) -> None:
    """Save a figure atomically (steplaw.fileio.write_atomic): a crash leaves the old figure
    or the new one, never half a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    write_atomic(path, buffer.getvalue())


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib; install it with pip install 'steplaw[plot]'.") from None
    matplotlib.use("Agg", force=False)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


MAX_HEATMAP_CELLS = 16  # one page: per-cell heatmaps of thousands of cells are neither fast nor readable
MAX_TICKS = 6  # tick labels per heatmap axis; text layout is most of a figure's drawing time
DPI = 100
MAX_LEGEND_SERIES = 8  # beyond this a colour bar names the series: a legend of dozens hides the data


def heatmap_cells(fit, cap: int = MAX_HEATMAP_CELLS) -> tuple[list, str | None]:
    """The cells that get a heatmap, in (N, D) order, and a sentence saying which (None when all).

    Up to `cap` cells: all of them when they fit; otherwise, deterministically, the cells at
    the smallest, median and largest N crossed with the smallest, median and largest D
    (the sweep's span), then the cells whose best run sits on the grid's edge, in (N, D)
    order, until the cap is reached.
    """
    cells = sorted(fit.cells, key=lambda c: (c.N, c.D))
    if len(cells) <= cap:
        return cells, None
    ns, ds = sorted({c.N for c in cells}), sorted({c.D for c in cells})
    pick_n = {ns[0], ns[len(ns) // 2], ns[-1]}
    pick_d = {ds[0], ds[len(ds) // 2], ds[-1]}
    chosen = [c for c in cells if c.N in pick_n and c.D in pick_d][:cap]
    spanning = len(chosen)
    edges = [c for c in cells if (c.lr_edge or c.bs_edge) and c not in chosen]
    chosen += edges[:cap - len(chosen)]
    n_edges = sum(1 for c in cells if c.lr_edge or c.bs_edge)
    edge_part = (f"and {len(chosen) - spanning} of the {n_edges} cells whose best run is on the grid's edge "
                 "(in (N, D) order)" if n_edges else "(no cell has its best run on the grid's edge)")
    note = (f"Loss heatmaps of {len(chosen)} of {len(cells)} cells: the {spanning} at the smallest, median and "
            f"largest N and D {edge_part}; every cell is in the cell table and runs.csv.")
    return sorted(chosen, key=lambda c: (c.N, c.D)), note


def _tick_stride(size: int) -> int:
    return max(1, math.ceil(size / MAX_TICKS))


def _grid_positions(values, grid: np.ndarray) -> np.ndarray:
    """Fractional indices of `values` on a log-spaced grid (for markers on an image)."""
    values = np.atleast_1d(np.asarray(values, float))
    if grid.size == 1:
        return np.zeros(values.size)
    return np.interp(np.log(values), np.log(grid), np.arange(grid.size), left=-0.5, right=grid.size - 0.5)


def _cell_image(table, rows: np.ndarray, cell) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lr grid, batch grid, loss above the cell's best in % on that grid; NaN where no finished run)."""
    lr_grid = np.unique(table.lr[rows])
    bs_grid = np.unique(table.batch_tokens[rows])
    image = np.full((bs_grid.size, lr_grid.size), np.inf)
    rel = np.where(table.valid[rows], table.loss[rows] / cell.best_loss - 1, np.nan) * 100
    keep = np.isfinite(rel)
    # several runs per grid point (repeats): keep the lowest
    np.minimum.at(image, (np.searchsorted(bs_grid, table.batch_tokens[rows][keep]),
                          np.searchsorted(lr_grid, table.lr[rows][keep])), rel[keep])
    image[np.isinf(image)] = np.nan
    return lr_grid, bs_grid, image


def _draw_cell(ax, table, fit, rows, cell, loco, norm, cmap, label_x: bool, label_y: bool):
    lr_grid, bs_grid, image = _cell_image(table, rows, cell)
    shown = ax.imshow(np.ma.masked_invalid(image), origin="lower", aspect="auto", cmap=cmap, norm=norm,
                      interpolation="nearest")
    near = rows[table.valid[rows] & (table.loss[rows] <= cell.best_loss * (1 + fit.gap))]
    ax.scatter(_grid_positions(table.lr[near], lr_grid), _grid_positions(table.batch_tokens[near], bs_grid),
               s=14, facecolors="none", edgecolors="white", label=f"within {fit.gap:.2%}")
    marks = [(cell.best_lr, cell.best_bs, dict(marker="*", s=120, color="red", label="best run"))]
    quad = cell.quadratic or {}
    if quad.get("lr"):
        marks.append((quad["lr"], quad["bs"], dict(marker="x", s=60, color="orange", label="quadratic min")))
    pred = loco.get((cell.N, cell.D))
    if pred and np.isfinite(pred["pred_lr"]):
        marks.append((pred["pred_lr"], pred["pred_bs"], dict(marker="P", s=60, color="cyan", label="fit (held out)")))
    for lr, bs, style in marks:
        ax.scatter(_grid_positions(lr, lr_grid), _grid_positions(bs, bs_grid), **style)
    x_ticks = np.arange(0, lr_grid.size, _tick_stride(lr_grid.size))
    y_ticks = np.arange(0, bs_grid.size, _tick_stride(bs_grid.size))
    ax.set_xticks(x_ticks, [f"{v:.1e}" for v in lr_grid[x_ticks]], fontsize=6)
    ax.set_yticks(y_ticks, [f"{v:.2g}" for v in bs_grid[y_ticks]], fontsize=6)
    edge = " (edge)" if cell.lr_edge or cell.bs_edge else ""
    ax.set_title(f"N={cell.N:.3g}, D={cell.D:.3g}{edge}", fontsize=8)
    if label_x:
        ax.set_xlabel("peak LR", fontsize=8)
    if label_y:
        ax.set_ylabel("batch (tokens)", fontsize=8)
    return shown, image


def loss_heatmaps(table, fit, out_dir, cells_per_figure: int = 16, max_cells: int = MAX_HEATMAP_CELLS) -> list[Path]:
    """Heatmaps of (at most `max_cells`, see heatmap_cells) cells, `cells_per_figure` a page.

    One colour scale per page (loss above each cell's best, in %), fixed margins instead of
    tight_layout and a few tick labels per axis: drawing text dominates the time otherwise.
    """
    plt = _pyplot()
    from matplotlib.colors import Normalize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loco = {(item["N"], item["D"]): item for item in fit.validation["per_cell"]}
    cells, note = heatmap_cells(fit, max_cells)
    n_values, d_values = table.param_counts(fit.n_column), table.D
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.75", over="#f4f4c0")  # grey: diverged or failed; pale: off the scale
    paths = []
    for page, start in enumerate(range(0, len(cells), cells_per_figure)):
        chunk = cells[start:start + cells_per_figure]
        row_sets = [np.flatnonzero(np.isclose(n_values, c.N, rtol=1e-12) & np.isclose(d_values, c.D, rtol=1e-12))
                    for c in chunk]
        images = [_cell_image(table, rows, c)[2] for rows, c in zip(row_sets, chunk)]
        p90 = [np.nanpercentile(im, 90) for im in images if np.isfinite(im).any()]
        norm = Normalize(0, max(float(np.median(p90)) if p90 else 1.0, 0.5))
        cols = min(4, len(chunk))
        rows_n = math.ceil(len(chunk) / cols)
        top = 0.4 if note else 0.25  # inches above the grid for the page title
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols + 1.2, 2.9 * rows_n + top + 0.5), squeeze=False)
        height = fig.get_figheight()
        fig.subplots_adjust(left=0.9 / fig.get_figwidth(), right=1 - 0.8 / fig.get_figwidth(),
                            bottom=0.5 / height, top=1 - (top + 0.25) / height, wspace=0.3, hspace=0.45)
        for ax in axes.ravel()[len(chunk):]:
            ax.set_visible(False)
        for i, (ax, rows, cell) in enumerate(zip(axes.ravel(), row_sets, chunk)):
            shown, _ = _draw_cell(ax, table, fit, rows, cell, loco, norm, cmap,
                                  label_x=i + cols >= len(chunk), label_y=i % cols == 0)
        fig.colorbar(shown, ax=axes.ravel().tolist(), label="loss above the cell's best (%)", extend="max",
                     fraction=0.02, pad=0.02)
        axes.ravel()[0].legend(fontsize=6, loc="upper left")
        if note:
            fig.suptitle(note, fontsize=8, wrap=True)
        path = out_dir / f"loss_heatmap_{page + 1}.png"
        _save(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def optimal_lr(table, fit, out_dir) -> list[Path]:
    plt = _pyplot()
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.lines import Line2D

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = np.array([c.N for c in fit.cells])
    d = np.array([c.D for c in fit.cells])
    opt = np.array([c.opt_lr for c in fit.cells])
    fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(12, 4.8))
    fig.subplots_adjust(left=0.075, right=0.97, bottom=0.13, top=0.88, wspace=0.3)
    colors = plt.get_cmap("plasma")
    for ax, x, group, x_name, group_name in ((ax_n, n, d, "N", "D"), (ax_d, d, n, "D", "N")):
        groups = np.unique(group)
        xs = np.geomspace(x.min(), x.max(), 50)
        palette = [colors(i / max(len(groups) - 1, 1) * 0.85) for i in range(len(groups))]
        rank = np.searchsorted(groups, group)
        # one artist per kind, not per series: dozens of series must draw in well under a second
        ax.scatter(x, opt, color=[palette[r] for r in rank])
        fitted, published = [], []
        for value in groups:
            nn, dd = (xs, np.full_like(xs, value)) if x_name == "N" else (np.full_like(xs, value), xs)
            fitted.append(np.column_stack([xs, fit.lr_law(nn, dd)]))
            published.append(np.column_stack([xs, [step_law(a, b)[0] for a, b in zip(nn, dd)]]))
        ax.add_collection(LineCollection(fitted, colors=palette))
        ax.add_collection(LineCollection(published, colors=palette, linestyles="--", alpha=0.6))
        ax.autoscale_view()
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels collide on short decades
        ax.set_xlabel(f"{x_name} ({'parameters: ' + fit.n_column if x_name == 'N' else 'tokens'})")
        ax.set_ylabel("optimal peak LR")
        if len(groups) <= MAX_LEGEND_SERIES:
            handles = [Line2D([], [], color=c, marker="o") for c in palette]
            ax.legend(handles, [f"{group_name}={v:.2g}" for v in groups], fontsize=7,
                      title="solid: fit, dashed: Step Law", title_fontsize=7)
        else:
            styles = [Line2D([], [], color="0.3"), Line2D([], [], color="0.3", ls="--")]
            ax.legend(styles, ["fit", "Step Law"], fontsize=7)
            series = ListedColormap(palette)
            bar = fig.colorbar(plt.cm.ScalarMappable(Normalize(-0.5, len(groups) - 0.5), series), ax=ax, pad=0.01)
            ticks = np.unique(np.linspace(0, len(groups) - 1, 6).round().astype(int))
            bar.set_ticks(ticks, labels=[f"{groups[t]:.2g}" for t in ticks], fontsize=7)
            bar.set_label(f"{group_name} ({len(groups)} series)", fontsize=7)
    fig.suptitle(fit.lr_law.formula("lr"), fontsize=10)
    path = out_dir / "optimal_lr.png"
    _save(fig, path)
    plt.close(fig)
    return [path]


def optimal_batch(table, fit, out_dir) -> list[Path]:
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = np.array([c.N for c in fit.cells])
    d = np.array([c.D for c in fit.cells])
    opt = np.array([c.opt_bs for c in fit.cells])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    fig.subplots_adjust(left=0.14, right=0.98, bottom=0.12, top=0.92)  # fixed: tight_layout re-measures all text
    shown = ax.scatter(d, opt, c=np.log10(n), cmap="plasma")
    fig.colorbar(shown, ax=ax, label=f"log10 N ({fit.n_column})")
    ds = np.geomspace(d.min(), d.max(), 50)
    median_n = float(np.exp(np.median(np.log(n))))
    ax.plot(ds, fit.bs_law(np.full_like(ds, median_n), ds), color="black", label="fit" +
            (f" (N={median_n:.2g})" if "N" in fit.bs_law.exps else ""))
    ax.plot(ds, [step_law(median_n, x)[1] for x in ds], color="black", ls="--", label="Step Law")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("D (tokens)")
    ax.set_ylabel("optimal batch (tokens)")
    ax.set_title(fit.bs_law.formula("B"), fontsize=9)
    ax.legend(fontsize=8)
    path = out_dir / "optimal_batch.png"
    _save(fig, path)
    plt.close(fig)
    return [path]


def predicted_vs_observed(table, fit, out_dir) -> list[Path]:
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_cell = fit.validation["per_cell"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.9, wspace=0.28)
    for ax, key, label in ((axes[0], "lr", "peak LR"), (axes[1], "bs", "batch (tokens)")):
        obs = np.array([item[f"obs_{key}"] for item in per_cell])
        pred = np.array([item[f"pred_{key}"] for item in per_cell])
        # the Step Law's predictions are there when the fit scored the published laws
        step = np.array([item.get(f"step_law_{key}") or np.nan for item in per_cell], float)
        ax.scatter(obs, pred, label="fit (leave-one-cell-out)")
        ax.scatter(obs, step, marker="^", alpha=0.6, label="Step Law")
        finite = np.concatenate([obs, pred[np.isfinite(pred)], step[np.isfinite(step)]])
        low, high = finite.min() / 1.5, finite.max() * 1.5
        ax.plot([low, high], [low, high], color="black", lw=0.8)
        ax.plot([low, high], [2 * low, 2 * high], color="grey", lw=0.5, ls=":")
        ax.plot([low, high], [low / 2, high / 2], color="grey", lw=0.5, ls=":", label="factor 2")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(f"observed optimal {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.legend(fontsize=8)
    gap = fit.validation["relative_loss_gap"]
    if gap["mean"] is not None:
        fig.suptitle(f"relative loss gap of the held-out predictions: mean {gap['mean']:.3%}, max {gap['max']:.3%}",
                     fontsize=10)
    path = out_dir / "predicted_vs_observed.png"
    _save(fig, path)
    plt.close(fig)
    return [path]


def plot_fit(table, fit, out_dir) -> list[Path]:
    """All figures of a hyperparameter fit; returns the PNG paths."""
    _pyplot()  # fail early, once, when matplotlib is missing
    paths = []
    for draw in (loss_heatmaps, optimal_lr, optimal_batch, predicted_vs_observed):
        paths += draw(table, fit, out_dir)
    return paths
