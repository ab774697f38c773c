"""`steplaw doctor`: what was built, what runs, and what falls back to the reference."""
from __future__ import annotations

import json
import platform


def collect() -> dict:
    import torch

    import steplaw
    from steplaw import ops

    gpu = torch.cuda.is_available()
    table = ops.kernel_table()
    return {
        "steplaw": steplaw.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": ops.load_extension(),
        "extension_error": ops.load_error(),
        "cuda_kernels_compiled": ops.cuda_compiled(),
        "gpu_visible": gpu,
        "gpu_name": torch.cuda.get_device_name(0) if gpu else None,
        "ops": {
            name: {
                "cpu_kernel": has["cpu"],
                "cuda_kernel": has["cuda"],
                "runs_on_reference": {
                    "cpu": not has["cpu"],
                    **({"cuda": not has["cuda"]} if gpu else {}),
                },
            }
            for name, has in table.items()
        },
    }


def format_report(info: dict) -> str:
    lines = [
        f"steplaw {info['steplaw']}  python {info['python']}  torch {info['torch']}"
        f"  (CUDA build: {info['torch_cuda'] or 'no'})",
        f"extension steplaw._C: {'loaded' if info['extension_loaded'] else 'NOT loaded: ' + str(info['extension_error'])}",
        f"CUDA kernels compiled: {'yes' if info['cuda_kernels_compiled'] else 'no'}",
        f"GPU visible: {info['gpu_name'] if info['gpu_visible'] else 'no'}",
        "",
        f"{'op':<28} {'CPU kernel':<11} {'CUDA kernel':<12} runs on reference",
    ]
    for name, op in info["ops"].items():
        fallback = [dev for dev, ref in op["runs_on_reference"].items() if ref]
        lines.append(
            f"{name:<28} {'yes' if op['cpu_kernel'] else 'no':<11} {'yes' if op['cuda_kernel'] else 'no':<12} "
            f"{', '.join(fallback) if fallback else '-'}"
        )
    return "\n".join(lines)


def cmd_doctor(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="what was built, what runs, what falls back")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_doctor)
