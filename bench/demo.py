"""`steplaw demo` end to end, stacked and one run at a time: its wall time and its law.

Runs the full demo (steplaw.sweep.presets.demo_spec, the adaptive planner, fit and report)
twice into fresh directories, once with `--stack auto` (the default) and once with
`--stack off`, one after the other in this process's children, and reports per run:
- wall seconds of the whole demo (sweep, fit and report) and the sweep's CPU seconds;
- runs, cells whose best run is inside the LR and the batch range it tried, planner states;
- the fitted LR law's exponents with their 95% intervals (and interval widths), the batch
  law's, and the mean leave-one-cell-out relative loss gap (nearest run and bowl scoring);
- stack sizes used;
and, between the two, `speedup` (off / auto wall time) and the largest relative difference
of the two laws' predicted lr and batch size over the demo's cells.

Targets (issues 9 and 10): <= 150 s on 2 cores; interior optima in >= 8 of 9 cells; each
LR exponent's interval narrower than 0.5; mean leave-one-cell-out gap <= 0.5%; the
stacked demo's law within 2% of the unstacked one's.

    python bench/demo.py [--only auto|off]      # ~5 minutes on 2 quiet cores
One JSON object on stdout (the shared bench shape).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import log, report

from steplaw.laws.fit import PowerLaw


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo(out: Path, stack: str) -> dict:
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "steplaw", "demo", "--out", str(out), "--stack", stack, "--quiet"],
                          capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"steplaw demo --stack {stack} failed:\n{proc.stderr[-2000:]}")
    fit = json.loads((out / "report" / "fit.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "fit": fit, **store_facts(out)}


def store_facts(out: Path) -> dict:
    from steplaw.sweep.store import ResultStore

    with ResultStore(out, readonly=True) as store:
        rows = store.export()
        cells = store.meta("planner_cells") or []
    stacks = Counter(r["stack"] for r in rows if r["stack"])
    return {"runs": len(rows), "planner_states": dict(Counter(c["state"] for c in cells)),
            "stack_sizes": dict(sorted(Counter(stacks.values()).items())), "runs_alone": sum(1 for r in rows if not r["stack"])}


def law_summary(fit: dict) -> dict:
    out = {}
    for key in ("lr_law", "bs_law"):
        law = fit[key]
        out[key] = {name: {"exponent": law[name], "ci": law["ci"].get(name), "ci_width": _width(law["ci"].get(name))}
                    for name in law if name.startswith("exp_")}
        out[key]["coef"] = law["coef"]
    cells = fit["cells"]
    out["interior_cells"] = sum(1 for c in cells if not c["lr_edge"] and not c["bs_edge"])
    out["cells"] = len(cells)
    fitted = next(s for s in fit["law_scores"] if s["law"] == "fit_loco")
    out["loco_gap_mean"] = {"nearest_run": fitted["gap_mean"], "bowl": fitted.get("bowl_gap_mean")}
    out["loss_column"] = fit.get("loss_column")
    return out


def _width(ci):
    return None if not ci or ci[0] is None or ci[1] is None else ci[1] - ci[0]


def law_difference(a: dict, b: dict) -> dict:
    """Largest relative difference of a's and b's predicted lr and batch over a's cells."""
    worst = {"lr": 0.0, "batch_tokens": 0.0}
    for cell in a["cells"]:
        for key, law in (("lr", "lr_law"), ("batch_tokens", "bs_law")):
            ratio = float(PowerLaw.from_dict(a[law])(cell["N"], cell["D"]) / PowerLaw.from_dict(b[law])(cell["N"], cell["D"]))
            worst[key] = max(worst[key], abs(ratio - 1))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["auto", "off"], default=None)
    args = parser.parse_args()
    modes = [args.only] if args.only else ["auto", "off"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            log(f"bench demo: steplaw demo --stack {mode}")
            results[mode] = run_demo(Path(tmp) / mode, mode)
            log(f"  {results[mode]['wall_s']:.0f} s wall, {results[mode]['runs']} runs")
    cases = [{"case": f"demo --stack {mode}", "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "runs": r["runs"],
              "planner_states": r["planner_states"], "stack_sizes": r["stack_sizes"], "runs_alone": r["runs_alone"],
              **law_summary(r["fit"])} for mode, r in results.items()]
    extra = {"cores": os.cpu_count()}
    if len(results) == 2:
        extra["speedup"] = {"stacked_vs_off_wall": results["off"]["wall_s"] / results["auto"]["wall_s"],
                            "stacked_vs_off_cpu": results["off"]["cpu_s"] / results["auto"]["cpu_s"]}
        extra["law_difference_stacked_vs_off"] = law_difference(results["auto"]["fit"], results["off"]["fit"])
    report("demo", "cpu", cases, **extra)


if __name__ == "__main__":
    main()
