"""Loads the compiled extension steplaw._C once, defines every op the one way, and says
which ops run where.

The one pattern for every op (`define_op`): the schema comes from `_C`
(csrc/steplaw.cpp), or from the op module's copy of it when `_C` is missing; the op's
pure-PyTorch reference is registered as its CompositeExplicitAutograd kernel, so it
serves every device that has no compiled kernel (all of them without `_C`, with one
warning saying so); the Python wrappers always call torch.ops.steplaw.<name>.

The one error rule (`op_error`): a bad argument raises ValueError with one sentence
prefixed "steplaw: ", from a kernel (STEPLAW_CHECK, csrc/common/checks.h) and from a
reference alike, with the same text for the same mistake.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator

import torch

# Every op of the extension, by schema name (torch.ops.steplaw.<name>), and its
# reference. Each op module adds its ops at import time through `define_op`.
OP_NAMES: list[str] = []
REFERENCES: dict[str, Callable] = {}

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


def op_error(message: str) -> ValueError:
    """The error of a bad op argument, as the kernels' STEPLAW_CHECK raises it."""
    return ValueError(f"steplaw: {message}")


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.steplaw, name).default  # noqa: B018 - probing the registry
        return True
    except (AttributeError, RuntimeError):
        return False


_state["fallback_lib"] = None


def define_op(name: str, schema: str, reference: Callable) -> None:
    """Defines torch.ops.steplaw.<name> (from `_C`, else from `schema`, the text after the
    name) and registers `reference` as its CompositeExplicitAutograd kernel: compiled
    CPU/CUDA kernels take precedence for their devices."""
    if not (load_extension() and _op_defined(name)):
        if _state["fallback_lib"] is None:
            _state["fallback_lib"] = torch.library.Library("steplaw", "FRAGMENT")  # noqa: TOR901
        _state["fallback_lib"].define(name + schema)
    torch.library.impl(f"steplaw::{name}", "CompositeExplicitAutograd")(reference)
    REFERENCES[name] = reference
    if name not in OP_NAMES:
        OP_NAMES.append(name)


@contextlib.contextmanager
def reference_kernels(names: list[str] | None = None) -> Iterator[None]:
    """Runs the named ops (all by default) on their references on CPU and CUDA for the
    duration, through the same torch.ops calls and wrappers: the honest way to time or
    compare a compiled kernel with its reference. Registers kernels process-wide; not
    for use while other threads run steplaw ops."""
    lib = torch.library.Library("steplaw", "IMPL")  # noqa: TOR901
    try:
        for name in names or list(REFERENCES):
            for key in ("CPU", "CUDA"):
                lib.impl(name, REFERENCES[name], key)
        yield
    finally:
        lib._destroy()


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
