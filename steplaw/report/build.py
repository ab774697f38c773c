"""The sweep report: Markdown with PNG figures, and the same as one self-contained HTML.

    write_report(sweep_dir, out_dir=None) -> [report.md, report.html]

It reads the sweep store (steplaw.sweep.store.export_rows, and the store's meta key
"planner"), fits the hyperparameter laws (steplaw.laws.fit.fit_hparams), draws the
fit's figures (steplaw.report.plots) and lays out: which planner proposed the runs, the
fitted laws beside the Step Law with the exponents the data could not identify, the loss
law L(N, D) with its compute-optimal split or why it has none (steplaw.laws.loss), every
published law scored on the sweep's cells (ranked), one line per (N, D) cell with the
runs it used, its best run and whether that run sits on the grid's edge
(steplaw.laws.cells.grid_edge, the one definition), the failed runs with their reasons,
and the table of every run. A fit that cannot be made (too few cells, say) is explained
in the report instead of stopping it. The report is built as a list of blocks, rendered
once as Markdown and once as HTML (images embedded as base64), so both say the same.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import sqlite3
from collections import defaultdict
from pathlib import Path

import numpy as np

from steplaw.errors import UserError
from steplaw.fileio import write_atomic
from steplaw.laws.cells import grid_edge
from steplaw.laws.fit import fit_hparams
from steplaw.laws.identify import distinct_values
from steplaw.laws.loss import fit_loss
from steplaw.laws.published import LAWS, STEP_BS_COEF, STEP_BS_EXP_D, STEP_LR_COEF, STEP_LR_EXP_D, STEP_LR_EXP_N, step_law
from steplaw.laws.saved import write_json
from steplaw.laws.table import read_runs, select_spec
from steplaw.report.compute import compute_sentence, compute_summary
from steplaw.report.critical import critical_blocks, insert_critical
from steplaw.report.loss_checks import loss_check_blocks, loss_checks
from steplaw.report.plots import heatmap_cells, plot_fit
from steplaw.sweep.store import ResultStore, export_rows, rows_to_csv

MAX_RUN_ROWS = 5000  # beyond this the table of runs lives in runs.csv only
DEFAULT_PLANNER = "grid"  # sweeps written before the store recorded its planner


# -- analysis ---------------------------------------------------------------------------------

def cell_summaries(rows: list[dict], objective: str = "loss") -> list[dict]:
    """Per (N, D) cell (MoE layouts apart): runs used, best finished run, grid-edge flags.

    The edge flags are steplaw.laws.cells.grid_edge of the best run's LR (batch size) on the
    cell's grid: 'low' / 'high' at the grid's ends, 'single' for a one-value grid.
    """
    cells = defaultdict(list)
    for row in rows:
        cells[(row["N"], row["N_active"], row["n_experts"], row["top_k"], row["D"])].append(row)
    out = []
    for (n, n_active, n_experts, top_k, d), members in sorted(cells.items(), key=lambda kv: (kv[0][0] or 0, kv[0][4] or 0)):
        lrs = sorted({r["lr"] for r in members if r["lr"] is not None})
        batches = sorted({r["batch_tokens"] for r in members if r["batch_tokens"] is not None})
        finished = [r for r in members if r["status"] == "ok" and _finite(r[objective])]
        best = min(finished, key=lambda r: r[objective]) if finished else None
        counts = defaultdict(int)
        for r in members:
            counts[r["status"]] += 1
        out.append({
            "N": n, "N_active": n_active, "D": d, "n_experts": n_experts, "top_k": top_k,
            "runs": len(members), "counts": dict(counts), "lrs": lrs, "batch_sizes": batches,
            "best": best,
            "lr_edge": grid_edge(best["lr"], lrs) if best else None,
            "bs_edge": grid_edge(best["batch_tokens"], batches) if best else None,
        })
    return out


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def fit_sweep(rows: list[dict], source: str, n_boot: int, gap: float, seed: int = 0, objective: str = "loss"):
    """(table, fit, None) or (table or None, None, why the fit could not be made)."""
    try:
        table = read_runs(rows, source_name=source, col_loss=objective)
    except UserError as exc:
        return None, None, str(exc)
    try:
        return table, fit_hparams(table, gap=gap, n_boot=n_boot, seed=seed, sparsity=_mixes_sparsity(table)), None
    except UserError as exc:
        return table, None, str(exc)


LOSS_BOOT_MAX = 200  # the loss law's bootstrap is a side result of the report: capped


def fit_sweep_loss(table, n_boot: int, seed: int = 0):
    """(loss fit, None) or (None, why the loss law could not be fitted)."""
    if table is None:
        return None, "the runs could not be read as a table (see above)."
    try:
        return fit_loss(table, n_boot=min(n_boot, LOSS_BOOT_MAX), seed=seed), None
    except UserError as exc:
        return None, str(exc)


def loss_law_blocks(loss_fit, loss_error: str | None, shown_warnings=()) -> list[tuple]:
    """The loss law's constants, its compute-optimal exponents or the sentence saying why it
    has none, and its own warnings (not those of the table, shown with the other fit)."""
    blocks: list[tuple] = [("h2", "Loss law L(N, D) = E + A / N^alpha + B / D^beta")]
    if loss_fit is None:
        return blocks + [("p", f"No loss law was fitted: {loss_error}")]
    data = loss_fit.to_dict()
    rows = []
    for key in ("E", "A", "B", "alpha", "beta"):
        interval = data["intervals"].get(key)
        span = f"[{_num(interval[0], 4)}, {_num(interval[1], 4)}]" if interval else "–"
        rows.append([key, "not fitted" if _refused_key(key, data["refused_terms"]) else _num(data[key], 5), span])
    blocks.append(("table", ["constant", "value", "95% interval"], rows))
    blocks.append(("p", f"{data['n_cells']} (N, D) cells, best run per cell, N column `{data['n_column']}`; "
                        f"rms log residual {data['rms_log_residual']:.2e}; {data['n_boot']} bootstrap resamples "
                        "of the cells."))
    split = data["compute_optimal"]
    if "refused" in split:
        blocks.append(("p", f"No compute-optimal split: {split['refused']}"))
    else:
        spans = split.get("exponent_intervals") or {}

        def exponent(key):
            low_high = spans.get(key)
            return f"{split[key]:.3f}" + (f" [{_num(low_high[0], 3)}, {_num(low_high[1], 3)}]" if low_high else "")
        blocks.append(("p", f"Compute-optimal split under {split['compute']}: N_opt ~ C^{exponent('N_exponent')}, "
                            f"D_opt ~ C^{exponent('D_exponent')}."))
    skip = set(shown_warnings) | {split.get("refused")}
    blocks += [("p", f"Note: {w}") for w in data["warnings"] if w not in skip]
    return blocks


def _refused_key(key: str, refused_terms) -> bool:
    return ("N" in refused_terms and key in ("A", "alpha")) or ("D" in refused_terms and key in ("B", "beta"))


def _mixes_sparsity(table) -> bool:
    """Whether the sweep holds more than one MoE sparsity N_active / N (dense counts as 1):
    then the laws get a sparsity term and the report says whether the data support it."""
    if table.N_active is None:
        return False
    shares = np.where(np.isfinite(table.N_active), table.N_active / table.N, 1.0)[table.valid]
    return distinct_values(shares).size >= 2


def _decay_fraction(spec) -> float | None:
    """The WSD cooldown fraction of a stored spec dict (its `fixed` settings), or None."""
    fixed = spec.get("fixed") if isinstance(spec, dict) else None
    value = fixed.get("decay_fraction", 0.2) if isinstance(fixed, dict) else None  # 0.2: RunConfig's default
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _store_reads(sweep_dir: Path) -> tuple[list[dict], str, dict, list[dict], str, float | None]:
    """(rows, planner, failure reasons, the planner's per-cell reports, the loss column the
    sweep minimises, the spec's WSD decay fraction) from the sweep store; a damaged store
    is a UserError."""
    try:
        rows = export_rows(sweep_dir)
        with ResultStore(sweep_dir, readonly=True) as store:
            decay_fraction = _decay_fraction(store.meta("spec"))
            planner = store.meta("planner", None)
            planner_cells = store.meta("planner_cells", None) or []
            objective = store.objective()
            reasons = {}
            failed_ids = [r["run_id"] for r in rows if r["status"] == "failed"]
            if failed_ids:
                reasons = {r["run_id"]: (r["reason"] or "") for r in store.rows(failed_ids)}
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{str(sweep_dir / 'runs.sqlite')!r} is not a readable sweep store ({exc}); "
                        "restore it from a backup or rerun the sweep into a new directory.") from None
    if not isinstance(planner_cells, list):
        planner_cells = []
    planner_cells = [c for c in planner_cells if isinstance(c, dict)]
    return rows, str(planner) if planner else DEFAULT_PLANNER, reasons, planner_cells, objective, decay_fraction


def attach_planner_states(cells: list[dict], planner_cells: list[dict]) -> None:
    """Set each cell summary's "planner_state" and "open_sides" from the adaptive planner's
    report of the same (N, D) cell (store meta "planner_cells"); None where it has none."""
    for cell in cells:
        cell["planner_state"], cell["open_sides"] = None, []
        for report in planner_cells:
            n, d = report.get("N"), report.get("D")
            if n is None or d is None or cell["N"] is None or cell["D"] is None:
                continue
            if math.isclose(n, cell["N"], rel_tol=1e-9) and math.isclose(d, cell["D"], rel_tol=1e-9):
                cell["planner_state"] = report.get("state")
                cell["open_sides"] = sorted(side for side, verdict in (report.get("sides") or {}).items()
                                            if verdict == "open")
                break


def _unbracketed_note(cells: list[dict]) -> str | None:
    """The warning shown beside the law and under the cell table, or None."""
    loose = [c for c in cells if c.get("planner_state") == "unbracketed"]
    if not loose:
        return None
    names = "; ".join(f"N={_num(c['N'])}, D={_num(c['D'])}"
                      + (f" (open: {', '.join(c['open_sides'])})" if c["open_sides"] else "") for c in loose[:10])
    more = f"; and {len(loose) - 10} more (see the cell table)" if len(loose) > 10 else ""
    return (f"Warning: {len(loose)} of {len(cells)} cells are unbracketed: the adaptive planner reached the "
            f"cell's run budget before a worse run bounded the best one on every side, so their optimum is a "
            f"bound, not an answer, and the fitted law leans on them: {names}{more}. Raise the run budget "
            "and rerun the sweep; finished runs are reused.")


# -- blocks and rendering -------------------------------------------------------------------------

def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def _ci(law: dict, key: str) -> str:
    ci = (law.get("ci") or {}).get(key)
    return f" [{_num(ci[0], 3)}, {_num(ci[1], 3)}]" if ci and ci[0] is not None else ""


_OBJECTIVE_WORDS = {"loss": "loss = final smoothed training loss (nats/token)",
                    "val_loss": "loss = validation loss at the end of the run (nats/token; the loss this sweep minimised)"}


def _overview_blocks(sweep_dir: Path, rows: list[dict], planner: str, objective: str = "loss",
                     compute_used: dict | None = None) -> list[tuple]:
    status = defaultdict(int)
    for row in rows:
        status[row["status"]] += 1
    compute = sum(r["compute"] or 0 for r in rows)
    used = compute_sentence(compute_used)
    return [
        ("h1", "steplaw sweep report"),
        ("p", f"Sweep directory `{sweep_dir}`, {len(rows)} runs: "
              + ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
              + f"; training compute {compute:.3g} FLOPs; runs proposed by the `{planner}` planner. "
              f"Generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}."),
        ("p", "Units: N = non-embedding parameters (for MoE all experts counted; N_active = activated per "
              f"token), D = training tokens, lr = peak learning rate, B = batch size in tokens, "
              f"{_OBJECTIVE_WORDS[objective]}."),
    ] + ([("p", used)] if used else [])


def _law_table(data: dict) -> tuple:
    lr, bs = data["lr_law"], data["bs_law"]

    def exp(law, name):
        return _num(law.get(f"exp_{name}")) + _ci(law, f"exp_{name}") if f"exp_{name}" in law else "not fitted"

    # A fitted (or refused) sparsity term gets its own column, S = N_active / N.
    sparse = bool(data.get("sparsity"))
    rows = [
        ["η(N, D) = a·N^α·D^β" + ("·S^g" if sparse else ""), "fitted", _num(lr["coef"]) + _ci(lr, "coef"),
         exp(lr, "N"), exp(lr, "D")] + ([exp(lr, "S")] if sparse else []),
        ["", "Step Law", _num(STEP_LR_COEF), _num(STEP_LR_EXP_N), _num(STEP_LR_EXP_D)] + (["–"] if sparse else []),
        ["B(D) = c·D^γ" + ("·N^δ" if "exp_N" in bs else "") + ("·S^e" if sparse else ""), "fitted",
         _num(bs["coef"]) + _ci(bs, "coef"), exp(bs, "N") if "exp_N" in bs else "–", exp(bs, "D")]
        + ([exp(bs, "S")] if sparse else []),
        ["", "Step Law", _num(STEP_BS_COEF), "–", _num(STEP_BS_EXP_D)] + (["–"] if sparse else []),
    ]
    headers = ["law", "source", "coefficient", "exponent of N", "exponent of D"]
    return ("table", headers + (["exponent of S = N_active/N"] if sparse else []), rows)


def _score_table(data: dict) -> list[tuple]:
    scores = data.get("law_scores") or []
    if not scores:
        return []

    def pair(item, a, b, pct=False):
        if item[a] is None:
            return "–"
        return f"{item[a]:.2%} / {item[b]:.2%}" if pct else f"{item[a]:.2f}× / {item[b]:.2f}×"

    rows = [[str(s["rank"]), s["law"] + ("" if s["law"] not in LAWS else f" ({LAWS[s['law']].citation})"),
             pair(s, "lr_factor", "lr_factor_max"), pair(s, "bs_factor", "bs_factor_max"),
             pair(s, "gap_mean", "gap_max", True), pair(s, "bowl_gap_mean", "bowl_gap_max", True),
             f"{s['cells_scored']}" + (f" ({s['cells_extrapolated']} outside its fitted range)"
                                       if s.get("cells_extrapolated") else "")] for s in scores]
    return [("h2", "Every law scored on these cells"),
            ("table", ["rank", "law", "LR error (median / max)", "batch error (median / max)",
                       "loss gap, nearest run (mean / max)", "loss gap, bowl (mean / max)", "cells"], rows),
            ("p", f"Scoring: {data.get('scoring', '')}")]


def _fit_blocks(fit, fit_error: str | None, unbracketed: str | None = None) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Fitted laws beside the Step Law")]
    if fit is None:
        return blocks + [("p", f"No law was fitted: {fit_error}")]
    data = fit.to_dict()
    blocks.append(_law_table(data))
    if unbracketed:
        blocks.append(("p", unbracketed))
    blocks.append(("p", f"N column used: `{data['n_column']}`; near-optimal gap {data['gap']:.2%}; "
                        f"95% bootstrap intervals from {data['n_boot']} resamples (runs resampled within cells)."))
    for refused in data["refused_exponents"]:
        blocks.append(("p", f"Not fitted: {refused['reason']}"))
    if data.get("sparsity"):
        for key, verdict in data["sparsity"]["laws"].items():
            exponent = "" if verdict["exponent"] is None else f" exponent {verdict['exponent']:+.3f};"
            blocks.append(("p", f"MoE sparsity S = N_active / N in the {key} law:{exponent} {verdict['verdict']}."))
    shown = {r["reason"] for r in data["refused_exponents"]}
    for warning in data.get("warnings", []):
        if warning not in shown:
            blocks.append(("p", f"Note: {warning}"))
    return blocks + _score_table(data)


def _planner_state(cell: dict) -> str:
    state = cell.get("planner_state") or "–"
    if state == "unbracketed":
        return "UNBRACKETED (a bound" + (f"; open: {', '.join(cell['open_sides'])}" if cell["open_sides"] else "") + ")"
    return state


def _cell_blocks(cells: list[dict], fit) -> list[tuple]:
    with_planner = any(cell.get("planner_state") for cell in cells)
    cell_rows = []
    for cell in cells:
        best = cell["best"]
        law_lr, law_bs = step_law(cell["N_active"] or cell["N"], cell["D"]) if cell["N"] else (None, None)
        fit_lr = fit_bs = None
        if fit is not None and cell["N"]:
            n_value = {"N": cell["N"], "N_active": cell["N_active"]}.get(fit.n_column, cell["N"])
            share = cell["N_active"] / cell["N"] if cell["N_active"] else None  # the sparsity term's S
            fit_lr, fit_bs = (float(x) for x in fit.predict(n_value, cell["D"], share))
        edge = ", ".join(f"{what} {side}" for what, side in (("LR", cell["lr_edge"]), ("batch", cell["bs_edge"])) if side)
        cell_rows.append([
            _num(cell["N"]) + (f" ({cell['n_experts']}e top-{cell['top_k']})" if cell["n_experts"] else ""),
            _num(cell["D"]), str(cell["runs"]), str(cell["counts"].get("ok", 0)),
            _num(best["loss"]) if best else "–", _num(best["lr"], 3) if best else "–",
            _num(best["batch_tokens"]) if best else "–",
            f"{_num(law_lr, 3)} / {_num(law_bs, 3)}", f"{_num(fit_lr, 3)} / {_num(fit_bs, 3)}", edge or "no",
        ] + ([_planner_state(cell)] if with_planner else []))
    headers = ["N", "D", "runs used", "finished", "best loss", "best lr", "best B", "Step Law lr / B",
               "fitted lr / B", "optimum on grid edge"] + (["planner state"] if with_planner else [])
    blocks = [("h2", "Cells"), ("table", headers, cell_rows)]
    note = _unbracketed_note(cells)
    if note:
        blocks.append(("p", note))
    edges = [c for c in cells if c["lr_edge"] or c["bs_edge"]]
    if edges:
        blocks.append(("p", f"{len(edges)} of {len(cells)} cells have their best run on the edge of the grid (or a "
                            "grid of one value): the true optimum may lie outside it, and the fitted law is pulled "
                            "towards the edge. Widen the grid in that direction (`--lr-span`, `--lr-scale`, "
                            "`--batch-points`, `--batch-scale`) and rerun the sweep; finished runs are reused."))
    else:
        blocks.append(("p", "Every cell has its best run inside its grid."))
    return blocks


def _run_blocks(rows: list[dict], reasons: dict) -> list[tuple]:
    blocks: list[tuple] = []
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        blocks.append(("h2", "Failed runs"))
        blocks.append(("table", ["run_id", "N", "D", "lr", "B", "reason"],
                       [[r["run_id"], _num(r["N"]), _num(r["D"]), _num(r["lr"], 3), _num(r["batch_tokens"]),
                         reasons.get(r["run_id"], "")] for r in failed]))
    blocks.append(("h2", "Runs"))
    columns = ["run_id", "status", "N", "D", "lr", "batch_tokens", "loss", "val_loss", "compute"]
    shown = rows[:MAX_RUN_ROWS]
    blocks.append(("table", columns, [[_num(r[c], 5) if c not in ("run_id", "status") else r[c] for c in columns]
                                      for r in shown]))
    note = f"All {len(rows)} runs with every column: runs.csv beside this report."
    if len(rows) > len(shown):
        note = f"First {len(shown)} of {len(rows)} runs shown; " + note
    blocks.append(("p", note))
    return blocks


def build_blocks(sweep_dir: Path, rows: list[dict], table, fit, fit_error: str | None, figures: list[Path],
                 out_dir: Path, *, planner: str = DEFAULT_PLANNER, reasons: dict | None = None,
                 planner_cells: list[dict] | None = None, figures_note: str | None = None,
                 objective: str = "loss", loss: tuple | None = None, loss_checks: dict | None = None,
                 compute_used: dict | None = None) -> list[tuple]:
    """The report as blocks: overview (with `compute_used`, steplaw.report.compute), laws
    and scores, the loss law (`loss`: the pair of fit_sweep_loss, with `loss_checks`:
    steplaw.report.loss_checks), cells, figures, failed runs, runs."""
    cells = cell_summaries(rows, objective)
    attach_planner_states(cells, planner_cells or [])
    blocks = _overview_blocks(sweep_dir, rows, planner, objective, compute_used)
    blocks += _fit_blocks(fit, fit_error, _unbracketed_note(cells))
    if loss is not None:
        blocks += loss_law_blocks(*loss, shown_warnings=table.warnings if table is not None else ())
        blocks += loss_check_blocks(loss_checks)
    blocks += _cell_blocks(cells, fit)
    if figures:
        blocks.append(("h2", "Figures"))
        if figures_note:
            blocks.append(("p", figures_note))
        blocks += [("img", path, path.stem.replace("_", " ")) for path in figures]
    return blocks + _run_blocks(rows, reasons or {})


def render_markdown(blocks: list[tuple], out_dir: Path) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            parts.append(f"# {block[1]}")
        elif kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            headers, body = block[1], block[2]
            lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in body]
            parts.append("\n".join(lines))
        elif kind == "img":
            path, caption = block[1], block[2]
            parts.append(f"![{caption}]({Path(path).relative_to(out_dir).as_posix()})")
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f3f3f3}"""


def render_html(blocks: list[tuple]) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>steplaw sweep report</title>",
             f"<style>{_CSS}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_code(html.escape(block[1]))}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode()
            parts.append(f"<figure><img alt=\"{html.escape(block[2])}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _inline_code(text: str) -> str:
    pieces = text.split("`")
    return "".join(p if i % 2 == 0 else f"<code>{p}</code>" for i, p in enumerate(pieces))


def write_report(sweep_dir, out_dir=None, *, n_boot: int = 1000, gap: float = 0.0025, html_report: bool = True,
                 plots: bool = True, spec: str | None = None, all_specs: bool = False, warn=None,
                 loss_holdout: str | None = None, loss_rollout: str | None = None) -> list[Path]:
    """Write report.md (+ figures/*.png), report.html, runs.csv, fit.json, loss_fit.json and
    compute.json (compute used against the runs trained alone) into
    `out_dir` (default SWEEP_DIR/report); returns the report paths. A directory swept with
    several specs needs `spec` (its runs only) or `all_specs` (steplaw.laws.table.select_spec);
    `warn(message)` hears the warning of specs reported together. `loss_holdout` (a rule) and
    `loss_rollout` (N or D) add the loss law's extrapolation checks. Every file is written
    atomically: a crash leaves the old report or the new one."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "runs.sqlite").is_file():
        raise UserError(f"{str(sweep_dir)!r} holds no sweep store (runs.sqlite): expected a directory written by "
                        "`steplaw sweep`")
    rows, planner, reasons, planner_cells, objective, decay_fraction = _store_reads(sweep_dir)
    if not rows:
        raise UserError(f"sweep {str(sweep_dir)!r} holds no runs: expected a directory written by `steplaw sweep`")
    rows, specs_note = select_spec(rows, spec, all_specs, f"sweep directory {str(sweep_dir)!r}")
    if specs_note and warn is not None:
        warn(specs_note)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "runs.csv", rows_to_csv(rows))
    table, fit, fit_error = fit_sweep(rows, str(sweep_dir), n_boot=n_boot, gap=gap, objective=objective)
    figures: list[Path] = []
    plots_note = figures_note = None
    if fit is not None:
        write_json(out_dir / "fit.json", fit.to_dict())  # strict JSON: NaN becomes null
        if plots:
            try:  # matplotlib is imported only when a figure is drawn
                figures = [Path(p) for p in plot_fit(table, fit, out_dir / "figures")]
                figures_note = heatmap_cells(fit)[1]
            except UserError as exc:
                plots_note = f"No figures: {exc}"
    loss = fit_sweep_loss(table, n_boot)
    checks = loss_checks(table, loss_holdout, loss_rollout, min(n_boot, LOSS_BOOT_MAX)) if table is not None else None
    if loss[0] is not None:
        write_json(out_dir / "loss_fit.json", {**loss[0].to_dict(), **(checks or {})})
    compute_used = compute_summary(rows, decay_fraction)
    if compute_used is not None:
        write_json(out_dir / "compute.json", compute_used)
    blocks = build_blocks(sweep_dir, rows, table, fit, fit_error, figures, out_dir, planner=planner, reasons=reasons,
                          planner_cells=planner_cells, figures_note=figures_note, objective=objective, loss=loss,
                          loss_checks=checks, compute_used=compute_used)
    blocks = insert_critical(blocks, critical_blocks(sweep_dir, rows, fit, objective, min(n_boot, LOSS_BOOT_MAX)))
    for note in (plots_note, specs_note and f"Warning: {specs_note}"):
        if note:
            blocks.insert(3, ("p", note))
    paths = [write_atomic(out_dir / "report.md", render_markdown(blocks, out_dir))]
    if html_report:
        paths.append(write_atomic(out_dir / "report.html", render_html(blocks)))
    return paths
