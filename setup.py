"""Build of the extension steplaw._C.

C++ CPU kernels are always built. CUDA kernels are built whenever nvcc and a CUDA
build of torch are present, whether or not a GPU is visible. Each environment fix below
says in a comment why it exists. The source distribution carries csrc/ whole (MANIFEST.in);
tests/test_sdist.py builds a wheel from it.

Environment:
  STEPLAW_NO_CUDA=1        build the C++ CPU kernels only
  STEPLAW_NO_EXT=1         build no extension at all (pure-PyTorch reference ops)
  TORCH_CUDA_ARCH_LIST     target GPUs; defaults to "9.0" when no GPU is visible
  STEPLAW_DEBUG=1          -O0 -g
  STEPLAW_QUICK_BUILD=1    -O1 (C++ only): half the compile time, for builds that check the
                           packaging rather than run fast (tests/test_sdist.py)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """torch guesses CUDA_HOME from nvcc's directory (/usr/local here), which then
    fails to link cudart; prefer an explicit toolkit directory holding lib64/."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if candidate and os.path.isdir(os.path.join(candidate, "include")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        for candidate in (real, "/usr/local/cuda"):
            if os.path.exists(os.path.join(candidate, "include", "cuda_runtime.h")):
                return candidate
    if os.path.isdir("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def _extensions():
    if _truthy("STEPLAW_NO_EXT"):
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    nvcc_found = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    want_cuda = not _truthy("STEPLAW_NO_CUDA") and torch.version.cuda is not None and nvcc_found
    if want_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # torch cannot ask a device which architectures to target; H100/H200 are 9.0.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # Headers and inline bodies: setuptools rebuilds the extension when one of them is newer
    # than the built library (without this, editing only a header would leave a stale _C).
    depends = sorted(
        path
        for pattern in ("*.h", "*.cuh", "*.inc")
        for path in glob.glob(os.path.join("csrc", "**", pattern), recursive=True)
    )
    include_dirs = [os.path.join(HERE, "csrc")]
    debug = _truthy("STEPLAW_DEBUG")
    cxx_flags = ["-O0", "-g"] if debug else ["-O1"] if _truthy("STEPLAW_QUICK_BUILD") else ["-O3"]
    # No -std flag: torch picks the standard its headers need (C++20 for torch >= 2.12).
    cxx_flags += ["-fopenmp"] if sys.platform != "darwin" else []
    # The stable ABI of the oldest Python pyproject allows (3.11): one _C.abi3.so for all.
    define_macros = [("Py_LIMITED_API", "0x030B0000")]
    extra_link = ["-fopenmp"] if sys.platform != "darwin" else []

    if want_cuda:
        # ATen/cuda headers pull cusparse.h, which pip's torch ships in nvidia/cu13/include.
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        if spec and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                for sub in sorted(glob.glob(os.path.join(root, "cu*", "include"))):
                    include_dirs.append(sub)
        define_macros.append(("STEPLAW_WITH_CUDA", "1"))
        # No --use_fast_math: it flushes subnormals to zero and approximates exp and
        # division, which would break the CPU/CUDA agreement of the shared per-element
        # math; these kernels are memory-bound and gain nothing from it.
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3"]
        nvcc_flags += ["-lineinfo", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            "steplaw._C",
            cpp_sources + cuda_sources,
            depends=depends,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "steplaw._C",
            cpp_sources,
            depends=depends,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
            py_limited_api=True,
        )
    print(f"steplaw setup: building _C with {'CPU + CUDA' if want_cuda else 'CPU only'} kernels"
          f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})",
          file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if ext_modules else {},
)
