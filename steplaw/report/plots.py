"""PNG figures of a hyperparameter fit (matplotlib, imported only when a plot is drawn).

Each function takes the RunTable and the HparamFit it was fitted from, writes PNGs into
`out_dir` and returns their paths:

- loss_heatmaps: loss over the LR x batch grid of each (N, D) cell, relative to the
  cell's best, with the best run, the near-optimal runs, the quadratic optimum and the
  leave-one-cell-out prediction marked; diverged or failed runs grey.
- optimal_lr: the cells' optimal LR against N (one series per D) and against D (one
  series per N), with the fitted law and the published Step Law beside it.
- optimal_batch: the cells' optimal batch against D with both laws.
- predicted_vs_observed: leave-one-cell-out predictions against the observed optima.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from steplaw.errors import UserError
from steplaw.laws.published import step_law


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib; install it with pip install 'steplaw[plot]'.") from None
    matplotlib.use("Agg", force=False)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _cell_rows(table, fit, cell) -> np.ndarray:
    n_values = table.param_counts(fit.n_column)
    return np.flatnonzero(np.isclose(n_values, cell.N, rtol=1e-12) & np.isclose(table.D, cell.D, rtol=1e-12))


def _grid_position(value: float, grid: np.ndarray) -> float:
    """Fractional index of `value` on a log-spaced grid (for markers on an image)."""
    if grid.size == 1:
        return 0.0
    return float(np.interp(math.log(value), np.log(grid), np.arange(grid.size), left=-0.5, right=grid.size - 0.5))


def loss_heatmaps(table, fit, out_dir, cells_per_figure: int = 16) -> list[Path]:
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loco = {(item["N"], item["D"]): item for item in fit.validation["per_cell"]}
    paths = []
    cells = sorted(fit.cells, key=lambda c: (c.N, c.D))
    for page, start in enumerate(range(0, len(cells), cells_per_figure)):
        chunk = cells[start:start + cells_per_figure]
        cols = min(4, len(chunk))
        rows = math.ceil(len(chunk) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.ravel()[len(chunk):]:
            ax.set_visible(False)
        for ax, cell in zip(axes.ravel(), chunk):
            idx = _cell_rows(table, fit, cell)
            lr_grid = np.unique(table.lr[idx])
            bs_grid = np.unique(table.batch_tokens[idx])
            image = np.full((bs_grid.size, lr_grid.size), np.nan)
            li = np.searchsorted(lr_grid, table.lr[idx])
            bi = np.searchsorted(bs_grid, table.batch_tokens[idx])
            rel = np.where(table.valid[idx], table.loss[idx] / cell.best_loss - 1, np.nan) * 100
            # Several runs per grid point (repeats): keep the lowest.
            for r, c, value in zip(bi, li, rel):
                if np.isfinite(value) and not (image[r, c] <= value):
                    image[r, c] = value
            cmap = plt.get_cmap("viridis").with_extremes(bad="0.75")  # grey: diverged or failed
            shown = ax.imshow(np.ma.masked_invalid(image), origin="lower", aspect="auto", cmap=cmap,
                              vmin=0, vmax=max(np.nanpercentile(image, 90), 0.5) if np.isfinite(image).any() else 1)
            fig.colorbar(shown, ax=ax, label="loss above best (%)")
            near = idx[table.valid[idx] & (table.loss[idx] <= cell.best_loss * (1 + fit.gap))]
            ax.scatter([_grid_position(v, lr_grid) for v in table.lr[near]],
                       [_grid_position(v, bs_grid) for v in table.batch_tokens[near]],
                       s=14, facecolors="none", edgecolors="white", label=f"within {fit.gap:.2%}")
            ax.scatter([_grid_position(cell.best_lr, lr_grid)], [_grid_position(cell.best_bs, bs_grid)],
                       marker="*", s=120, color="red", label="best run")
            quad = cell.quadratic or {}
            if quad.get("lr"):
                ax.scatter([_grid_position(quad["lr"], lr_grid)], [_grid_position(quad["bs"], bs_grid)],
                           marker="x", s=60, color="orange", label="quadratic min")
            pred = loco.get((cell.N, cell.D))
            if pred and np.isfinite(pred["pred_lr"]):
                ax.scatter([_grid_position(pred["pred_lr"], lr_grid)], [_grid_position(pred["pred_bs"], bs_grid)],
                           marker="P", s=60, color="cyan", label="fit (held out)")
            ax.set_xticks(range(lr_grid.size))
            ax.set_xticklabels([f"{v:.1e}" for v in lr_grid], rotation=90, fontsize=6)
            ax.set_yticks(range(bs_grid.size))
            ax.set_yticklabels([f"{v:.2g}" for v in bs_grid], fontsize=6)
            edge = " (edge)" if cell.lr_edge or cell.bs_edge else ""
            ax.set_title(f"N={cell.N:.3g}, D={cell.D:.3g}{edge}", fontsize=9)
            ax.set_xlabel("peak LR")
            ax.set_ylabel("batch (tokens)")
        axes.ravel()[0].legend(fontsize=6, loc="upper left")
        fig.tight_layout()
        path = out_dir / f"loss_heatmap_{page + 1}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def optimal_lr(table, fit, out_dir) -> list[Path]:
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = np.array([c.N for c in fit.cells])
    d = np.array([c.D for c in fit.cells])
    opt = np.array([c.opt_lr for c in fit.cells])
    fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.get_cmap("plasma")
    for ax, x, group, x_name, group_name in ((ax_n, n, d, "N", "D"), (ax_d, d, n, "D", "N")):
        groups = np.unique(group)
        for i, value in enumerate(groups):
            color = colors(i / max(len(groups) - 1, 1) * 0.85)
            sel = group == value
            ax.scatter(x[sel], opt[sel], color=color, label=f"{group_name}={value:.2g}")
            xs = np.geomspace(x.min(), x.max(), 50)
            nn, dd = (xs, np.full_like(xs, value)) if x_name == "N" else (np.full_like(xs, value), xs)
            ax.plot(xs, fit.lr_law(nn, dd), color=color)
            ax.plot(xs, [step_law(a, b)[0] for a, b in zip(nn, dd)], color=color, ls="--", alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels collide on short decades
        ax.set_xlabel(f"{x_name} ({'parameters: ' + fit.n_column if x_name == 'N' else 'tokens'})")
        ax.set_ylabel("optimal peak LR")
        ax.legend(fontsize=7, title="solid: fit, dashed: Step Law", title_fontsize=7)
    fig.suptitle(fit.lr_law.formula("lr"), fontsize=10)
    fig.tight_layout()
    path = out_dir / "optimal_lr.png"
    fig.savefig(path, dpi=110)
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
    fig.tight_layout()
    path = out_dir / "optimal_batch.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def predicted_vs_observed(table, fit, out_dir) -> list[Path]:
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_cell = fit.validation["per_cell"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
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
    fig.tight_layout()
    path = out_dir / "predicted_vs_observed.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_fit(table, fit, out_dir) -> list[Path]:
    """All figures of a hyperparameter fit; returns the PNG paths."""
    _pyplot()  # fail early, once, when matplotlib is missing
    paths = []
    for draw in (loss_heatmaps, optimal_lr, optimal_batch, predicted_vs_observed):
        paths += draw(table, fit, out_dir)
    return paths
