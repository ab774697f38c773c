"""Custom ops of steplaw: the Python face of the C++/CUDA kernels in csrc/.

Each op module registers fake (meta) kernels and autograd with torch.library and
carries a pure-PyTorch reference, used when a compiled kernel is missing and by the
tests as the oracle. Call the ops through the functions exported here.
"""
from steplaw.ops._loader import (
    OP_NAMES,
    cuda_compiled,
    has_kernel,
    kernel_table,
    load_error,
    load_extension,
    warn_fallbacks_once,
)

load_extension()

# Op modules (each registers its names with the loader on import).
from steplaw.ops.adamw import fused_adamw_, reference_fused_adamw_  # noqa: E402,F401
from steplaw.ops.moe import moe_permute, moe_route, moe_unpermute  # noqa: E402,F401

warn_fallbacks_once()

__all__ = [
    "OP_NAMES",
    "cuda_compiled",
    "fused_adamw_",
    "has_kernel",
    "kernel_table",
    "load_error",
    "load_extension",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
]
