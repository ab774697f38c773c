"""`make gpu-check`: everything that needs a GPU, in one command, inside a time budget.

A GPU machine is lent for minutes, and a command stopped at its limit returns only the
files it has already written. So this script keeps to a total budget (default 8
minutes) and rewrites its JSON, <out>/gpu-check_<date>_<device>.json, before and after
every step. The steps come in the order of how much their answer matters:

  1. build       steplaw._C in place with its CUDA kernels, on all cores
  2. ops_smoke   each op's CUDA kernel against its PyTorch reference on small cases
                 (bench/ops_smoke.py): do the kernels run, and do they agree?
  2b. sanitizer  when compute-sanitizer exists: the op smoke run under its memcheck and
                 racecheck tools (out-of-bounds and misaligned accesses, shared-memory races)
  3. doctor      what was built and what runs where
  4. gpu_tests   the tests marked `gpu`, with what the budget leaves them
  5. benchmarks  bench/*.py on the GPU, each with its share of the rest (--quick when
                 the share is short)

A failed or timed-out step is recorded, not fatal. Without a CUDA device every step is
recorded as skipped ("no CUDA device") and the exit status is 2; --dry-run records the
plan (commands and time allotments) without running anything. Exit status 0 when the
build, the op smoke run and the tests passed, else 1.

    python bench/gpu_check.py [--out DIR] [--budget-s 480] [--skip-build] [--dry-run]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ["adamw.py", "moe.py", "train.py", "sweep.py"]  # the ones present are run
NO_DEVICE = "no CUDA device"
# Seconds kept back from the build for the op smoke run: the most important answer.
SMOKE_RESERVE_S = 90
# Share of the time left after the smoke run that the gpu tests may use; the benchmarks
# get the rest, split evenly, and run --quick when a share is under QUICK_BELOW_S.
TESTS_SHARE = 0.55
QUICK_BELOW_S = 150
# A step is not started with less than this left of the budget.
MIN_STEP_S = 10
# What a CUDA build of the extension takes on a 16-core GPU machine, roughly; used only to
# show in a plan (--dry-run) what the later steps would get.
TYPICAL_BUILD_S = 150


def _log(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if isinstance(text, str) else ""


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (read from /proc). They stay in our
    session, so that whoever stops this script at its limit stops them too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run a command; on timeout it is killed with everything it started (a build's
    compiler jobs, the op smoke run's child processes), and what it printed is kept."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired as exc:
        _kill_tree(proc.pid)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a process that left the tree still holds the pipes
            out, err = exc.stdout, exc.stderr
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
        timed_out = True
    return {"rc": 124 if timed_out else proc.returncode, "timed_out": timed_out,
            "seconds": round(time.monotonic() - t0, 1), "stdout": out or "", "stderr": err or "",
            "timeout_s": round(timeout, 1)}


class Check:
    """The result document, rewritten atomically after every change to it."""

    def __init__(self, out_dir: Path, budget_s: float, device: str, started: float):
        self.deadline = started + budget_s
        slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "unknown"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"gpu-check_{dt.date.today().isoformat()}_{slug}.json"
        self.doc: dict = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                          "device": device, "budget_s": budget_s, "running": None, "steps": {}}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        os.replace(tmp, self.path)

    def start(self, step: str) -> None:
        self.doc["running"] = step
        self.save()
        _log(f"{step} ({self.remaining():.0f} s of the budget left)")

    def record(self, step: str, result: dict) -> None:
        self.doc["steps"][step] = result
        self.doc["running"] = None
        self.save()
        _log(f"{step}: {result.get('status')} {result.get('summary') or ''}".rstrip())


def _status(proc: dict, ok_codes=(0,)) -> str:
    return "timed out" if proc["timed_out"] else "passed" if proc["rc"] in ok_codes else "failed"


def step_build(check: Check, env: dict) -> dict:
    timeout = check.remaining() - SMOKE_RESERVE_S
    proc = run([sys.executable, "setup.py", "build_ext", "--inplace"], env, timeout)
    return {"status": _status(proc), "rc": proc["rc"], "seconds": proc["seconds"], "timeout_s": proc["timeout_s"],
            "max_jobs": env["MAX_JOBS"], "log_tail": _tail(proc["stdout"] + proc["stderr"])}


def step_smoke(check: Check, env: dict) -> dict:
    proc = run([sys.executable, "bench/ops_smoke.py", "--device", "cuda"], env, min(SMOKE_RESERVE_S, check.remaining()))
    try:
        result = json.loads(proc["stdout"])
    except json.JSONDecodeError:
        return {"status": _status(proc), "rc": proc["rc"], "seconds": proc["seconds"],
                "log_tail": _tail(proc["stdout"] + proc["stderr"])}
    failing = [op for op, rec in result["ops"].items() if not rec["pass"]]
    return {"status": "passed" if result["passed"] else "failed", "seconds": proc["seconds"],
            "summary": f"{len(result['ops']) - len(failing)}/{len(result['ops'])} ops agree"
                       + (f"; failing: {', '.join(failing)}" if failing else ""), **result}


def compute_sanitizer() -> str | None:
    """The compute-sanitizer executable: on PATH, or in the CUDA toolkit's bin/."""
    found = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidate = Path(home or "") / "bin" / "compute-sanitizer"
        if not found and home and candidate.exists():
            found = str(candidate)
    return found


# Seconds each compute-sanitizer tool may take (the smoke run is ~10x slower under it).
SANITIZER_S = 120


def step_sanitizer(check: Check, env: dict, tool_path: str) -> dict:
    tools = {}
    for tool in ("memcheck", "racecheck"):
        cmd = [tool_path, "--tool", tool, "--error-exitcode", "3", sys.executable, "bench/ops_smoke.py", "--device", "cuda"]
        proc = run(cmd, env, min(SANITIZER_S, max(MIN_STEP_S, check.remaining() / 3)))
        errors = re.findall(r"^========= (?:ERROR SUMMARY|RACECHECK SUMMARY): .*$", proc["stdout"] + proc["stderr"], re.M)
        tools[tool] = {"status": _status(proc), "rc": proc["rc"], "seconds": proc["seconds"], "summary": errors[-1:] or None,
                       "log_tail": _tail(proc["stdout"] + proc["stderr"]) if proc["rc"] != 0 else ""}
    statuses = {t["status"] for t in tools.values()}
    return {"status": "passed" if statuses == {"passed"} else "failed", "tools": tools,
            "summary": ", ".join(f"{name}: {t['status']}" for name, t in tools.items())}


def step_doctor(check: Check, env: dict) -> dict:
    proc = run([sys.executable, "-m", "steplaw", "doctor", "--json"], env, min(60, check.remaining()))
    try:
        return {"status": _status(proc), "report": json.loads(proc["stdout"])}
    except json.JSONDecodeError:
        return {"status": "failed", "rc": proc["rc"], "log_tail": _tail(proc["stdout"] + proc["stderr"])}


def tests_timeout(remaining: float, n_benchmarks: int) -> float:
    return remaining * TESTS_SHARE if n_benchmarks else remaining


def step_gpu_tests(check: Check, env: dict, n_benchmarks: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "tests"]
    proc = run(cmd, env, tests_timeout(check.remaining(), n_benchmarks))
    # -v prints each test's outcome as it finishes, so a run cut short still says which passed.
    outcomes = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", proc["stdout"], re.M)
    counts: dict[str, int] = {}
    for _, outcome in outcomes:
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    summary = [line for line in proc["stdout"].splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    return {"status": _status(proc, ok_codes=(0, 5)), "rc": proc["rc"], "seconds": proc["seconds"],
            "timeout_s": proc["timeout_s"], "counts": counts, "summary": summary[-1].strip("= ") if summary else None,
            "failures": [name for name, outcome in outcomes if outcome in ("FAILED", "ERROR")],
            "log_tail": _tail(proc["stdout"] + proc["stderr"]) if proc["rc"] not in (0, 5) else ""}


def benchmark_plan(remaining: float, scripts: list[str]) -> list[tuple[str, float, bool]]:
    """(script, timeout, quick) for each benchmark: the time left split evenly."""
    share = remaining / max(1, len(scripts))
    return [(script, share, share < QUICK_BELOW_S) for script in scripts]


def _bench_args(script: str) -> list[str]:
    text = (ROOT / "bench" / script).read_text()
    return ["--device", "cuda"] if "--device" in text else []


def step_benchmark(check: Check, env: dict, script: str, quick: bool, scripts_left: int) -> dict:
    timeout = check.remaining() / max(1, scripts_left)
    cmd = [sys.executable, f"bench/{script}", *_bench_args(script), *(["--quick"] if quick else [])]
    proc = run(cmd, env, timeout)
    try:
        return {"status": _status(proc), "quick": quick, "seconds": proc["seconds"], "result": json.loads(proc["stdout"])}
    except json.JSONDecodeError:
        return {"status": "failed" if not proc["timed_out"] else "timed out", "quick": quick, "rc": proc["rc"],
                "seconds": proc["seconds"], "timeout_s": proc["timeout_s"], "log_tail": _tail(proc["stdout"] + proc["stderr"])}


def _present_benchmarks() -> list[str]:
    return [s for s in BENCHMARKS if (ROOT / "bench" / s).exists()]


def skipped_document(check: Check, reason: str, env: dict, skip_build: bool) -> None:
    """Every step recorded as skipped, with the plan it would have run: the build may use
    all but the smoke run's reserve; the later allotments assume a typical build."""
    scripts = _present_benchmarks()
    build_limit = round(check.remaining() - SMOKE_RESERVE_S, 1)
    after_smoke = check.remaining() - (0 if skip_build else TYPICAL_BUILD_S) - SMOKE_RESERVE_S
    tests_s = round(tests_timeout(after_smoke, len(scripts)), 1)
    plan = {
        "build": {"timeout_s": build_limit, "assumed_s": TYPICAL_BUILD_S, "max_jobs": env["MAX_JOBS"],
                  "skip": skip_build},
        "ops_smoke": {"timeout_s": SMOKE_RESERVE_S},
        "doctor": {"timeout_s": 60},
        "gpu_tests": {"timeout_s": tests_s},
    }
    for step, planned in plan.items():
        check.record(step, {"status": "skipped", "reason": reason, "plan": planned})
    check.record("benchmarks", {"status": "skipped", "reason": reason, "plan": [
        {"script": s, "timeout_s": round(t, 1), "quick": q} for s, t, q in benchmark_plan(after_smoke - tests_s, scripts)]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results", help="directory of the JSON file")
    ap.add_argument("--budget-s", type=float, default=480, help="total seconds for every step together")
    ap.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    ap.add_argument("--dry-run", action="store_true", help="record the plan; run nothing")
    args = ap.parse_args(argv)
    started = time.monotonic()

    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MAX_JOBS"] = env.get("MAX_JOBS_GPU_CHECK") or str(os.cpu_count() or 2)  # all cores
    env.setdefault("PYTHONUNBUFFERED", "1")
    have_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if have_gpu else "none"
    out_dir = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    check = Check(out_dir, args.budget_s, device, started)
    check.doc.update(torch=torch.__version__, python=sys.version.split()[0], dry_run=args.dry_run)

    if not have_gpu or args.dry_run:
        skipped_document(check, NO_DEVICE if not have_gpu else "dry run", env, args.skip_build)
        print(check.path)
        return 0 if args.dry_run else 2

    cap = torch.cuda.get_device_capability()
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{cap[0]}.{cap[1]}")
    scripts = _present_benchmarks()
    sanitizer = compute_sanitizer()
    steps = [("ops_smoke", step_smoke)]
    if sanitizer:
        steps.append(("sanitizer", lambda c, e: step_sanitizer(c, e, sanitizer)))
    steps += [("doctor", step_doctor),
             ("gpu_tests", lambda c, e: step_gpu_tests(c, e, len(scripts)))]
    for name, step in ([] if args.skip_build else [("build", step_build)]) + steps:
        if check.remaining() < MIN_STEP_S:
            check.record(name, {"status": "skipped", "reason": "time budget spent"})
            continue
        check.start(name)
        check.record(name, step(check, env))
    benches: dict = {"status": "running", "scripts": {}}
    for i, (script, _, quick) in enumerate(benchmark_plan(check.remaining(), scripts)):
        check.start(f"bench/{script}")
        benches["scripts"][script] = (step_benchmark(check, env, script, quick, len(scripts) - i)
                                      if check.remaining() >= MIN_STEP_S
                                      else {"status": "skipped", "reason": "time budget spent"})
        done = [b["status"] for b in benches["scripts"].values()]
        benches["summary"] = ", ".join(f"{s}: {b['status']}" for s, b in benches["scripts"].items())
        benches["status"] = "running" if len(done) < len(scripts) else "passed" if set(done) == {"passed"} else "failed"
        check.record("benchmarks", benches)
    check.doc["seconds"] = round(time.monotonic() - started, 1)
    check.save()
    print(check.path)
    recorded = check.doc["steps"]
    ok = all(recorded.get(s, {"status": "passed"})["status"] == "passed" for s in ("build", "ops_smoke", "gpu_tests"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
