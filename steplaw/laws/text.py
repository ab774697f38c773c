"""Plain-text renderings of predictions and fits, one list of lines each, for the CLI.

Warnings are not part of these: the CLI prints them on stderr.
"""
from __future__ import annotations

import math

_N_WORDS = {"N": "non-embedding parameters (total for MoE)", "N_active": "activated non-embedding parameters",
            "N_total": "all parameters incl. embeddings"}


def fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def table_lines(rows: list[tuple]) -> list[str]:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def law_lines(label: str, law, unit: str) -> list[str]:
    parts = [f"coef {law.coef:.4g} [{fmt(law.ci.get('coef', (None,))[0], '.4g')}, "
             f"{fmt(law.ci.get('coef', (None, None))[1], '.4g')}]"]
    for name, exp in law.exps.items():
        low, high = law.ci.get(f"exp_{name}", (None, None))
        parts.append(f"exp_{name} {exp:+.4f} [{fmt(low, '+.4f')}, {fmt(high, '+.4f')}]")
    return [f"{label}: {law.formula(unit)}", "    " + "   ".join(parts) + "   (95% bootstrap intervals)"]


def score_lines(law_scores: list[dict], definition: str) -> list[str]:
    """The ranked law scores as a table, with how they are computed."""
    if not law_scores:
        return []
    rows = [("rank", "law", "LR factor (med/max)", "batch factor (med/max)", "gap nearest run % (mean/max)",
             "gap bowl % (mean/max)", "cells")]
    def pair(item, a, b, scale=1.0, spec=".3f"):
        if item[a] is None:
            return "-"
        return f"{item[a] * scale:{spec}} / {item[b] * scale:{spec}}"

    for item in law_scores:
        rows.append((str(item["rank"]), item["law"], pair(item, "lr_factor", "lr_factor_max"),
                     pair(item, "bs_factor", "bs_factor_max"), pair(item, "gap_mean", "gap_max", 100),
                     pair(item, "bowl_gap_mean", "bowl_gap_max", 100),
                     f"{item['cells_scored']}" + (f" ({item['cells_extrapolated']} extrapolated)"
                                                  if item.get("cells_extrapolated") else "")))
    return ["  every law scored on these cells, ranked (the fitted law leave-one-cell-out):"] + \
        ["    " + line for line in table_lines(rows)] + [f"    scoring: {definition}"]


def fit_lines(fit) -> list[str]:
    lines = [f"N = {fit.n_column}: {_N_WORDS.get(fit.n_column, fit.n_column)}; "
             f"{fit.counts['cells_used']} cells, {fit.counts['near_optimal_runs']} near-optimal runs "
             f"(within {fit.gap:.2%} of each cell's best {fit.loss_column})"]
    lines += law_lines("  learning rate", fit.lr_law, "lr")
    lines += law_lines("  batch size   ", fit.bs_law, "B_tokens")
    for refused in fit.refused:
        lines.append(f"  refused: {refused['reason']}")
    if fit.sparsity:
        for key, verdict in fit.sparsity["laws"].items():
            lines.append(f"  sparsity ({key}): {verdict['verdict']}")
    lines += score_lines(fit.law_scores, fit.scoring)
    edges = [c for c in fit.cells if c.lr_edge or c.bs_edge]
    if edges:
        lines.append(f"  {len(edges)} cell(s) have the best run on the grid's edge (true optimum may lie outside):")
        for cell in edges[:8]:
            lines.append(f"    N={cell.N:.3g} D={cell.D:.3g}: lr {cell.lr_edge or 'inside'}, "
                         f"batch {cell.bs_edge or 'inside'}")
        if len(edges) > 8:
            lines.append(f"    ... and {len(edges) - 8} more (see fit.json)")
    return lines


def loss_fit_lines(fit, result: dict) -> list[str]:
    lines = [f"L(N, D) = E + A / N^alpha + B / D^beta   (N = {fit.n_column}; {fit.n_cells} cells, best run per cell; "
             f"Huber on log-loss; rms log residual {fit.rms_log_residual:.2e})"]
    form = getattr(fit, "form", None)
    if form is not None:
        lines.append(f"  form: {form.describe()}")
    unfitted = {"N": ("A", "alpha"), "D": ("B", "beta")}
    refused = {key for term in fit.refused_terms for key in unfitted[term]}
    for key in ("E", "A", "B", "alpha", "beta"):
        if key in refused:
            lines.append(f"  {key:<6} not fitted (refused: see the warnings)")
            continue
        if key == "E" and form is not None and form.E is not None:
            lines.append(f"  {key:<6} {fit.E:.5g}   (fixed by --E)")
            continue
        low, high = fit.intervals.get(key, (None, None))
        lines.append(f"  {key:<6} {getattr(fit, key):.5g}   [{fmt(low, '.5g')}, {fmt(high, '.5g')}]")
    co = result["compute_optimal"]
    if "refused" in co:
        return lines + ["compute-optimal N and D: none (refused: see the warnings)"]
    tied = " (alpha = beta: 0.5 by the form, not measured)" if form is not None and form.name == "tied" else ""
    lines.append(f"compute-optimal with {co['compute']}: N_opt ~ C^{co['N_exponent']:.3f}, "
                 f"D_opt ~ C^{co['D_exponent']:.3f}{tied}")
    at = result.get("at_budget")
    if at:
        span = ""
        if at.get("N_interval"):
            span = (f" (95% intervals N {at['N_interval'][0]:.3g} to {at['N_interval'][1]:.3g}, "
                    f"D {at['D_interval'][0]:.3g} to {at['D_interval'][1]:.3g})")
        lines.append(f"at C = {at['compute']:.3g} FLOPs: N_opt = {at['N_opt']:.4g}, D_opt = {at['D_opt']:.4g}{span}, "
                     f"predicted loss {at['predicted_loss']:.4f}{_loss_span(at.get('predicted_loss_interval'))}; "
                     f"Step Law there: lr {at['step_law_lr']:.3g}, "
                     f"batch {at['step_law_batch_tokens']:.3g} tokens")
    return lines


def _loss_span(interval) -> str:
    """' [low, high] (95% prediction interval)' or '' without one."""
    return "" if not interval else f" [{interval[0]:.4f}, {interval[1]:.4f}] (95% prediction interval)"


def prediction_lines(predictions, laws, seq_len: int, head: str) -> list[str]:
    rows = [("law", "N used", "peak LR", "batch (tokens)", "batch (seqs)", "source")]
    for p in predictions:
        rows.append((p.law, p.n_used, fmt(p.lr), fmt(p.batch_tokens), fmt(p.batch_seqs(seq_len), ".1f"),
                     laws[p.law].citation if p.law in laws else ""))
    lines = [head] + table_lines(rows)
    for p in predictions:
        for key, value in p.derived.items():
            lines.append(f"  {p.law}: derived {key} = {value:.4g}")
    return lines
