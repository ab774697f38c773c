"""What a sweep's runs cost: the compute trained against the same runs trained alone.

WSD runs that differ only in D train as one trunk (steplaw.train.branch): each shorter
budget is charged only its cooldown (the run table's `tokens_trained`), so Σ tokens_trained
is what the sweep trained and Σ D what the same runs would have cost each from step 0.
FLOPs scale the same way, run by run (compute x tokens_trained / D). Where the sweep has
trunks, the cost model of steplaw.sweep.cost (the planner's) is shown beside the measured
figure: the two differ only by the rounding of each cooldown to whole steps.
"""
from __future__ import annotations

from steplaw.runtable import FINISHED
from steplaw.sweep.cost import alone_tokens, trunk_tokens


def compute_summary(rows: list[dict], decay_fraction: float | None = None) -> dict | None:
    """Tokens and FLOPs trained against trained alone, over the finished runs of `rows`
    (run-table rows); None when no finished run reports its tokens. `decay_fraction`: the
    spec's WSD cooldown fraction, for the cost model's figure."""
    done = [r for r in rows if r.get("status") in FINISHED and r.get("tokens_trained") is not None and r.get("D")]
    if not done:
        return None
    trained = float(sum(r["tokens_trained"] for r in done))
    alone = alone_tokens(r["D"] for r in done)
    with_flops = [r for r in done if r.get("compute") is not None]
    flops_alone = sum(r["compute"] for r in with_flops)
    flops_trained = sum(r["compute"] * r["tokens_trained"] / r["D"] for r in with_flops)
    trunks: dict[str, list[float]] = {}
    for r in done:
        if r.get("trunk"):
            trunks.setdefault(r["trunk"], []).append(r["D"])
    model = None
    if trunks and decay_fraction is not None and 0 < decay_fraction <= 1:
        model = alone_tokens(r["D"] for r in done if not r.get("trunk")) + sum(
            trunk_tokens(budgets, decay_fraction) for budgets in trunks.values())
    return {
        "runs": len(done), "trunks": len(trunks), "runs_in_trunks": sum(len(b) for b in trunks.values()),
        "tokens_trained": trained, "tokens_alone": alone, "ratio": trained / alone if alone else None,
        "flops_trained": flops_trained if with_flops else None, "flops_alone": flops_alone if with_flops else None,
        "cost_model_tokens": model, "decay_fraction": decay_fraction,
    }


def compute_sentence(summary: dict | None) -> str | None:
    """The report's one paragraph on compute (None: nothing to say)."""
    if summary is None:
        return None
    text = (f"Compute used: {summary['tokens_trained']:.4g} tokens trained against {summary['tokens_alone']:.4g} for the "
            f"same {summary['runs']} finished runs trained alone ({summary['ratio']:.3f}x)")
    if summary["flops_trained"] is not None:
        text += f"; {summary['flops_trained']:.3g} FLOPs against {summary['flops_alone']:.3g}"
    if summary["trunks"]:
        text += (f". {summary['runs_in_trunks']} runs branched off {summary['trunks']} WSD trunk"
                 f"{'s' if summary['trunks'] != 1 else ''} (the stable phase trained once, each shorter budget only "
                 f"its cooldown)")
        if summary["cost_model_tokens"] is not None:
            text += (f"; the cost model (longest budget + {summary['decay_fraction']:g} x each shorter one) gives "
                     f"{summary['cost_model_tokens']:.4g} tokens")
    else:
        text += ". Every run trained alone (no WSD trunks)"
    return text + "."
