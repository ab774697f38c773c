"""Smoke run of every custom op against its PyTorch reference, on small cases, in seconds.

The first question a GPU machine must answer is "do the kernels run, and do they agree
with the references?"; bench/gpu_check.py asks it right after the build. Each case runs
twice, in two processes with the same inputs: once with the compiled extension (the
kernels), once with it blocked, so the same public calls run the pure-PyTorch
references. Only public entry points are called (steplaw.optim.FusedAdamW, and
moe_route / moe_permute / moe_unpermute with autograd, which reaches both backward ops),
so the check does not depend on how an op picks its implementation.

    python bench/ops_smoke.py [--device cuda|cpu] [--json PATH]

Prints one JSON object: per op, pass/fail and the largest absolute difference over its
cases (integer outputs must match exactly, floating ones within torch.testing's default
tolerance for their dtype). Exit status 0 when every op passed and, on that device, ran a
compiled kernel; 1 otherwise. On CPU it checks the C++ kernels (used by the CI tests).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's steplaw, whatever else is installed


def _inputs(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _adamw_case(device: str, dtype: torch.dtype, amsgrad: bool, master_weights: bool) -> dict:
    from steplaw.optim import FusedAdamW

    sizes = [1, 7, 1000, 65_537]  # odd sizes reach every tail of the vectorised loops
    params = [torch.nn.Parameter(_inputs(i, n).to(device, dtype)) for i, n in enumerate(sizes)]
    groups = [{"params": params[:2], "weight_decay": 0.0}, {"params": params[2:], "weight_decay": 0.1}]
    opt = FusedAdamW(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, amsgrad=amsgrad, master_weights=master_weights)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = _inputs(100 * step + i, p.numel()).to(device, dtype)
        opt.step()
    out = {f"param{i}": p.detach() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                out[f"param{i}.{key}"] = value
    return out


def _route_case(device: str, score_func: str) -> dict:
    from steplaw.ops import moe_route

    logits = _inputs(1, 257, 16).to(device).requires_grad_()
    outputs = moe_route(logits, top_k=4, score_func=score_func)
    # The output order is the wrapper's business: find the weights by their dtype.
    weights = next(t for t in outputs if t.is_floating_point())
    (weights * _inputs(2, *weights.shape).to(device)).sum().backward()
    out = {f"out{i}": t.detach() for i, t in enumerate(outputs)}
    out["logits.grad"] = logits.grad
    return out


def _dispatch_case(device: str, pad_multiple: int, capacity: int) -> dict:
    from steplaw.ops import moe_permute, moe_unpermute

    tokens, hidden, experts, top_k = 300, 64, 8, 2
    ids = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(t))[:top_k]
                       for t in range(tokens)]).to(torch.int32).to(device)
    x = _inputs(3, tokens, hidden).to(device).requires_grad_()
    weights = _inputs(4, tokens, top_k).softmax(-1).to(device).requires_grad_()
    permuted, row_map, src_index, offsets, dropped = moe_permute(x, ids, experts, pad_multiple=pad_multiple,
                                                                 capacity=capacity)
    y = (permuted * 1.5).detach().requires_grad_()
    combined = moe_unpermute(y, row_map, src_index, weights)
    (permuted * _inputs(5, *permuted.shape).to(device)).sum().backward()
    (combined * _inputs(6, *combined.shape).to(device)).sum().backward()
    return {"permuted": permuted.detach(), "row_map": row_map, "src_index": src_index, "offsets": offsets,
            "dropped": dropped, "combined": combined.detach(), "x.grad": x.grad, "y.grad": y.grad,
            "weights.grad": weights.grad}


# (case, ops it exercises, function of the device)
CASES = [
    ("fused_adamw_ fp32", ["fused_adamw_"], lambda d: _adamw_case(d, torch.float32, False, False)),
    ("fused_adamw_ fp32 amsgrad", ["fused_adamw_"], lambda d: _adamw_case(d, torch.float32, True, False)),
    ("fused_adamw_ bf16 master weights", ["fused_adamw_"], lambda d: _adamw_case(d, torch.bfloat16, False, True)),
    ("moe_route softmax fwd+bwd", ["moe_route"], lambda d: _route_case(d, "softmax")),
    ("moe_route sigmoid fwd+bwd", ["moe_route"], lambda d: _route_case(d, "sigmoid")),
    ("moe_permute/unpermute dropless fwd+bwd",
     ["moe_permute", "moe_permute_backward", "moe_unpermute", "moe_unpermute_backward"],
     lambda d: _dispatch_case(d, 1, 0)),
    ("moe_permute/unpermute padded, capacity fwd+bwd",
     ["moe_permute", "moe_permute_backward", "moe_unpermute", "moe_unpermute_backward"],
     lambda d: _dispatch_case(d, 8, 60)),
]


def child(mode: str, device: str, save: str) -> None:
    """Run every case in this process and save its outputs; mode 'reference' blocks the
    extension first, so every op runs its pure-PyTorch reference."""
    if mode == "reference":
        sys.modules["steplaw._C"] = None  # makes `import steplaw._C` fail
    import warnings

    warnings.simplefilter("ignore")  # the reference run's "kernels unavailable" warning
    from steplaw import ops

    results: dict = {"kernels": ops.kernel_table(), "loaded": ops.load_extension(), "cases": {}}
    for name, _, run in CASES:
        try:
            results["cases"][name] = {k: v.detach().cpu() for k, v in run(device).items()}
        except Exception as exc:  # noqa: BLE001 - recorded per case; the other cases still run
            results["cases"][name] = f"{type(exc).__name__}: {exc}"
    torch.save(results, save)


def compare(kernel: dict, reference: dict) -> tuple[bool, float, str | None]:
    """(pass, largest absolute difference, first mismatch) of two cases' outputs."""
    worst, problem = 0.0, None
    if kernel.keys() != reference.keys():
        return False, float("nan"), f"outputs differ: {sorted(kernel)} vs {sorted(reference)}"
    for key in kernel:
        a, b = kernel[key], reference[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, float("nan"), f"{key}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if a.numel():
            diff = (a.double() - b.double()).abs().nan_to_num(nan=float("inf"))
            both_nan = a.double().isnan() & b.double().isnan()
            worst = max(worst, float(diff[~both_nan].max()) if (~both_nan).any() else 0.0)
        try:
            torch.testing.assert_close(a, b, equal_nan=True, rtol=None if a.is_floating_point() else 0,
                                       atol=None if a.is_floating_point() else 0)
        except AssertionError as exc:
            problem = problem or f"{key}: {str(exc).splitlines()[0]}"
    return problem is None, worst, problem


def _run_children(device: str) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        saved = {}
        for mode in ("kernel", "reference"):
            path = str(Path(tmp) / f"{mode}.pt")
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--device", device, "--save", path],
                                  cwd=ROOT, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} run failed: {proc.stderr[-2000:]}")
            saved[mode] = torch.load(path, weights_only=False)
    return saved["kernel"], saved["reference"]


def smoke(device: str) -> dict:
    kernel, reference = _run_children(device)
    if reference["loaded"]:
        raise RuntimeError("the reference run loaded the extension: it would compare the kernels with themselves")
    device_type = torch.device(device).type
    ops: dict[str, dict] = {name: {"compiled_kernel": has.get(device_type, False), "cases": []}
                            for name, has in kernel["kernels"].items()}
    for name, covered, _ in CASES:
        got, want = kernel["cases"][name], reference["cases"][name]
        if isinstance(got, str) or isinstance(want, str):
            record = {"case": name, "pass": False, "max_abs_error": None,
                      "error": got if isinstance(got, str) else f"reference: {want}"}
        else:
            ok, worst, problem = compare(got, want)
            record = {"case": name, "pass": ok, "max_abs_error": worst, **({"error": problem} if problem else {})}
        for op in covered:
            ops.setdefault(op, {"compiled_kernel": False, "cases": []})["cases"].append(record)
    for op in ops.values():
        errors = [c["max_abs_error"] for c in op["cases"] if c["max_abs_error"] is not None]
        op["max_abs_error"] = max(errors) if errors else None
        # Without a compiled kernel the reference was compared with itself: not a pass.
        op["pass"] = bool(op["cases"]) and op["compiled_kernel"] and all(c["pass"] for c in op["cases"])
    return {"device": device, "extension_loaded": kernel["loaded"], "ops": ops,
            "passed": all(op["pass"] for op in ops.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--child", choices=["kernel", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device, args.save)
        return 0
    result = smoke(args.device)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
