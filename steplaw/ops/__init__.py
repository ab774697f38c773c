"""Custom ops of steplaw: the Python face of the C++/CUDA kernels in csrc/.

Each op module defines its ops the one way (steplaw.ops._loader.define_op): the schema
from csrc/steplaw.cpp, a pure-PyTorch reference registered as the op's fallback kernel
(used on devices without a compiled kernel, and by the tests as the oracle), fake
kernels and autograd. Call the ops through the functions exported here;
`reference_kernels()` runs them on their references for comparisons and benchmarks.
"""
from steplaw.ops._loader import (
    OP_NAMES,
    cuda_compiled,
    has_kernel,
    kernel_table,
    load_error,
    load_extension,
    reference_kernels,
    warn_fallbacks_once,
)

load_extension()

# Op modules (each registers its names with the loader on import).
from steplaw.ops.adamw import fused_adamw_, reference_fused_adamw_  # noqa: E402,F401
from steplaw.ops.moe import moe_permute, moe_route, moe_unpermute  # noqa: E402

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
    "reference_kernels",
]
