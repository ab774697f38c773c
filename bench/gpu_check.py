"""`make gpu-check`: everything that needs a GPU, in one command, results in one JSON file.

On a machine with a CUDA GPU (the lent H100/H200 machines: offline, torch preinstalled,
no venv) this builds the extension in place with its CUDA kernels, runs every test
marked `gpu`, runs each benchmark in bench/ on the GPU, and writes
<out>/gpu-check_<date>_<device>.json holding the doctor report, the test summary and
every benchmark's JSON. Each step's failure is recorded, not fatal, so one broken
benchmark does not lose the others' numbers.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ["adamw.py", "moe.py", "train.py"]


def _log(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, str, float]:
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr, time.time() - t0
    except subprocess.TimeoutExpired as exc:
        return 124, exc.stdout or "", (exc.stderr or "") + f"\ntimed out after {timeout:.0f} s", time.time() - t0


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:] if isinstance(text, str) else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("RESULTS_DIR", "bench/results"))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--quick", action="store_true", help="benchmarks with --quick")
    ap.add_argument("--bench-timeout", type=float, default=240)
    args = ap.parse_args()

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MAX_JOBS", str(min(16, os.cpu_count() or 2)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    result: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "steps": {}}

    import torch

    if not torch.cuda.is_available():
        _log("no CUDA device visible: nothing to check here")
        return 2
    cap = torch.cuda.get_device_capability()
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{cap[0]}.{cap[1]}")
    device = torch.cuda.get_device_name()
    result.update(device=device, torch=torch.__version__, python=sys.version.split()[0])

    if not args.skip_build:
        _log(f"building steplaw._C for sm_{cap[0]}{cap[1]} ...")
        rc, out, err, secs = _run([sys.executable, "setup.py", "build_ext", "--inplace"], env, timeout=900)
        result["steps"]["build"] = {"rc": rc, "seconds": round(secs, 1), "log_tail": _tail(out + err)}
        _log(f"build rc={rc} in {secs:.0f} s")

    rc, out, err, _ = _run([sys.executable, "-m", "steplaw", "doctor", "--json"], env, timeout=120)
    try:
        result["doctor"] = json.loads(out)
    except json.JSONDecodeError:
        result["doctor"] = {"rc": rc, "error": _tail(out + err)}

    _log("running tests marked gpu ...")
    rc, out, err, secs = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], env, timeout=1200)
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    result["steps"]["gpu_tests"] = {
        "rc": rc,
        "seconds": round(secs, 1),
        "summary": summary[-1] if summary else None,
        "failures": [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))],
        "log_tail": _tail(out + err) if rc not in (0, 5) else "",
    }
    _log(f"gpu tests: {summary[-1] if summary else rc}")

    result["benchmarks"] = {}
    for script in BENCHMARKS:
        path = ROOT / "bench" / script
        if not path.exists():
            continue
        _log(f"bench/{script} ...")
        cmd = [sys.executable, str(path), "--device", "cuda"] + (["--quick"] if args.quick else [])
        rc, out, err, secs = _run(cmd, env, timeout=args.bench_timeout)
        try:
            result["benchmarks"][script] = json.loads(out)
        except json.JSONDecodeError:
            result["benchmarks"][script] = {"rc": rc, "error": _tail(out + err)}
        _log(f"bench/{script} rc={rc} in {secs:.0f} s")

    out_dir = Path(args.out)
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = out_dir / f"gpu-check_{dt.date.today().isoformat()}_{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(path)
    tests_ok = result["steps"]["gpu_tests"]["rc"] in (0, 5)
    build_ok = result["steps"].get("build", {"rc": 0})["rc"] == 0
    return 0 if tests_ok and build_ok else 1


if __name__ == "__main__":
    sys.exit(main())
