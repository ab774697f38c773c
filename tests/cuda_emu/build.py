"""Builds the test-only emulated-CUDA extension (steplaw_cuda_emu ops) from the working
tree into a build folder of its own, and loads it; `make test-cuda-emu` and the tests'
conftest call this. Not part of the package: nothing here is installed or shipped.

The sources are csrc/**/*_cuda.cu themselves, compiled by the host compiler against
tests/cuda_emu/emu/cuda_emu.h (tests/cuda_emu/*_cuda_emu.cpp include them), so the kernels and
launch code tested are those nvcc builds. ninja rebuilds only what a changed source or header
touches. SANITIZE=1 (or sanitize=True) builds with AddressSanitizer and UBSan into
build/cuda_emu_asan; Python must then run with libasan preloaded (see the Makefile).

Usage: python tests/cuda_emu/build.py [--sanitize]   (prints the built library's path)
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = ["emu/runtime.cpp", "module.cpp", "adamw_cuda_emu.cpp", "moe_cuda_emu.cpp"]
NAME = "steplaw_cuda_emu"


def sanitize_requested() -> bool:
    return os.environ.get("SANITIZE", "").strip().lower() in ("1", "true", "yes", "on")


def build(sanitize: bool | None = None, verbose: bool = False) -> str:
    """Compiles (when stale) and loads the emulated module; returns the library path."""
    sanitize = sanitize_requested() if sanitize is None else sanitize
    build_dir = os.path.join(ROOT, "build", "cuda_emu_asan" if sanitize else "cuda_emu")
    os.makedirs(build_dir, exist_ok=True)
    # -O1: the emulation's cost is the fibers, not the kernel code, and -O1 compiles fast.
    # No FMA contraction: the kernels' arithmetic must round where the GPU's does.
    flags = ["-O1", "-g0", "-ffp-contract=off", "-fno-fast-math", "-DSTEPLAW_CUDA_EMU=1",
             "-include", os.path.join(HERE, "emu", "cuda_emu.h")]
    # Misaligned vector loads fault on a GPU; UBSan's alignment check is their CPU analogue.
    sanitizers = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
    if sanitize:
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        flags[0:2] = ["-O1", "-g"]
    if sanitize and not _asan_loaded():
        raise RuntimeError("the sanitized emulated module loads only into a Python started with libasan "
                           "preloaded: LD_PRELOAD=$(c++ -print-file-name=libasan.so) (make test-cuda-emu "
                           "SANITIZE=1 does this)")
    # The compiler and ninja run without the preloaded sanitizer runtime (it is only for the
    # Python process that loads the module).
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        return _load(sanitize, flags + sanitizers, build_dir, verbose)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def _asan_loaded() -> bool:
    with open("/proc/self/maps") as maps:
        return "libasan" in maps.read()


def _load(sanitize: bool, flags: list[str], build_dir: str, verbose: bool) -> str:
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=NAME + ("_asan" if sanitize else ""),
        sources=[os.path.join(HERE, s) for s in SOURCES],
        extra_cflags=flags,
        extra_ldflags=[f for f in flags if f.startswith("-fsanitize") or f.startswith("-fno-sanitize")],
        extra_include_paths=[os.path.join(HERE, "shim"), HERE, os.path.join(ROOT, "csrc")],
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize", action="store_true", help="ASan + UBSan build (build/cuda_emu_asan)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    print(build(sanitize=args.sanitize or None, verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
