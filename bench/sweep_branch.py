"""`steplaw sweep --branch auto` vs `--branch off` end to end: a WSD grid of one model,
2 LRs and 4 token budgets x2 apart, through the real command (a driver subprocess, one
worker process, stores and run directories), the two contenders interleaved round by
round on the same machine.

Reported (JSON on stdout):
  same_run_ids       both sweeps stored the same 8 run ids
  max_abs_loss_diff  largest |loss - loss| and |val_loss - val_loss| between them (0: each
                     branch ends as its run alone, to the bit, on one CPU)
  tokens_ratio       sum of tokens_trained with branches / sum of tokens alone (target
                     <= 0.65; ideal for 20% cooldowns of budgets 1, 2, 4, 8: 0.627)
  speedup            median wall time off / auto over the rounds (target >= 1.3); the
                     wall time includes starting the driver, the worker and torch
  load_avg           the machine's 1-minute load average at the start and the end

    python bench/sweep_branch.py [--rounds N] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def grid(quick: bool) -> list[str]:
    tokens = ["8192", "16384", "32768", "65536"] if quick else ["32768", "65536", "131072", "262144"]
    return ["--params", "20K", "--tokens", *tokens, "--lrs", "0.003", "0.01", "--batch-sizes", "512", "--seq-len", "64",
            "--set", "schedule=wsd", "--set", "warmup_tokens=2048", "--set", "eval_tokens=4096", "--workers", "1",
            "--threads-per-worker", "1", "-q"]


def sweep(out: Path, branch: str, quick: bool, stack: str) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "steplaw", "sweep", "--out", str(out), *grid(quick), "--branch", branch, "--stack", stack],
                   env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    db = sqlite3.connect(out / "runs.sqlite")
    try:
        rows = {r[0]: (r[1], r[2], json.loads(r[3])) for r in db.execute("SELECT run_id, loss, val_loss, result FROM runs")}
    finally:
        db.close()
    return wall, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small budgets, one round (a smoke test)")
    parser.add_argument("--stack", default="auto", help="--stack for both sweeps: auto (the 2 LRs as one stacked trunk, "
                                                         "vs the 8 runs as stacks) or off (a trunk per LR vs 8 runs alone)")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    load_start = os.getloadavg()[0]
    walls: dict[str, list[float]] = {"auto": [], "off": []}
    last: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for branch in (("auto", "off") if i % 2 == 0 else ("off", "auto")):  # interleaved, order alternating
                wall, rows = sweep(Path(tmp) / f"{branch}-{i}", branch, args.quick, args.stack)
                walls[branch].append(wall)
                last[branch] = rows
    auto, off = last["auto"], last["off"]
    diffs = [abs(auto[r][k] - off[r][k]) for r in auto if r in off for k in (0, 1)
             if auto[r][k] is not None and off[r][k] is not None]
    trained = sum(row[2].get("tokens_trained") or row[2]["tokens"] for row in auto.values())
    alone = sum(row[2]["tokens"] for row in off.values())
    print(json.dumps({
        "bench": "sweep_branch", "stack": args.stack, "rounds": rounds, "quick": args.quick, "runs": len(auto),
        "same_run_ids": set(auto) == set(off), "max_abs_loss_diff": max(diffs) if diffs else None,
        "tokens_trained_auto": trained, "tokens_off": alone, "tokens_ratio": trained / alone,
        "wall_s": walls, "speedup": statistics.median(walls["off"]) / statistics.median(walls["auto"]),
        "load_avg": [load_start, os.getloadavg()[0]],
    }, indent=1))


if __name__ == "__main__":
    main()
