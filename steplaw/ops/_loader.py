"""Loads the compiled extension steplaw._C once and says which ops run where.

If `_C` is missing (not built, or built for another torch or Python), steplaw still
works: every op falls back to its pure-PyTorch reference, and one warning says so.
"""
from __future__ import annotations

import importlib
import warnings

import torch

# Every op of the extension, by schema name (torch.ops.steplaw.<name>). Each op module
# adds its names here at import time through `register_op_names`.
OP_NAMES: list[str] = []

_state: dict = {"loaded": None, "error": None, "warned": False}


def load_extension() -> bool:
    """Import steplaw._C (which registers the kernels); True when it loaded."""
    if _state["loaded"] is None:
        try:
            importlib.import_module("steplaw._C")
            _state["loaded"] = True
        except Exception as exc:  # noqa: BLE001 - any load failure means "use the reference"
            _state["loaded"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return bool(_state["loaded"])


def cuda_compiled() -> bool:
    """Whether the loaded extension was built with its CUDA kernels (GPU visible or not)."""
    if not load_extension():
        return False
    return bool(getattr(importlib.import_module("steplaw._C"), "WITH_CUDA", 0))


def load_error() -> str | None:
    load_extension()
    return _state["error"]


def register_op_names(*names: str) -> None:
    for name in names:
        if name not in OP_NAMES:
            OP_NAMES.append(name)


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether a compiled kernel of torch.ops.steplaw.<op_name> exists for a device type
    ('cpu' or 'cuda'), whatever devices are visible."""
    if not load_extension():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    qualified = f"steplaw::{op_name}"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key))
    except RuntimeError:
        return False


def kernel_table() -> dict[str, dict[str, bool]]:
    """{op name: {'cpu': compiled?, 'cuda': compiled?}} for every registered op name."""
    return {name: {"cpu": has_kernel(name, "cpu"), "cuda": has_kernel(name, "cuda")} for name in OP_NAMES}


def warn_fallbacks_once() -> None:
    """One warning listing the ops that run on the pure-PyTorch reference on CPU."""
    if _state["warned"]:
        return
    _state["warned"] = True
    missing = [name for name in OP_NAMES if not has_kernel(name, "cpu")]
    if missing:
        reason = _state["error"] or "the extension lacks them"
        warnings.warn(
            f"steplaw: compiled kernels unavailable ({reason}); these ops use the slower "
            f"pure-PyTorch reference: {', '.join(missing)}. Rebuild with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
