"""Build script. Installs the pure-Python package everywhere; builds the CUDA extension ``l0kernels._C``
from ``csrc/`` only where PyTorch has CUDA and nvcc is found (see ``_cuda_ext_modules``).

The CUDA build must see the installed CUDA PyTorch, so install without build isolation:
``pip install --no-build-isolation .`` (or ``-e .``). Environment switches:

- ``L0K_SKIP_CUDA=1``: never build the extension.
- ``L0K_FORCE_CUDA=1``: build it even if ``torch.cuda.is_available()`` is False (a build box without a
  GPU); still needs a CUDA build of PyTorch and nvcc.
- ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``): target architectures; default sm_80 and sm_90.
- ``CUDA_HOME``: the CUDA toolkit (else nvcc on PATH).
- ``L0K_SKIP_CPU_EXT=1`` / ``L0K_CPU_SIMD=0``: skip the CPU kernels ``l0kernels._cpu``, or build them scalar.
"""
import os
import platform
import shutil
import sys

from setuptools import Extension, setup

_ROOT = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ["csrc/binding.cpp", "csrc/gates.cu", "csrc/elementwise.cu", "csrc/reduce.cu", "csrc/gemm.cu"]
_DEFAULT_GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _skip(reason):
    print(f"l0kernels: not building the CUDA extension l0kernels._C: {reason}", file=sys.stderr)
    return [], {}


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_ext_modules():
    if os.environ.get("L0K_SKIP_CUDA", "0") == "1":
        return _skip("L0K_SKIP_CUDA=1")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:  # build isolation hides the installed torch
        return _skip(f"torch is not importable here ({e}); use pip install --no-build-isolation .")
    if not torch.version.cuda:
        return _skip(f"PyTorch {torch.__version__} is a CPU-only build")
    if _nvcc() is None:
        return _skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not torch.cuda.is_available() and os.environ.get("L0K_FORCE_CUDA", "0") != "1":
        return _skip("torch.cuda.is_available() is False (set L0K_FORCE_CUDA=1 to build anyway)")
    # TORCH_CUDA_ARCH_LIST, when set, is turned into -gencode flags by BuildExtension itself.
    gencode = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else _DEFAULT_GENCODE
    ext = CUDAExtension(
        name="l0kernels._C",
        sources=_SOURCES,
        include_dirs=[os.path.join(_ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"] + gencode},
    )
    return [ext], {"build_ext": BuildExtension}


def _cpu_ext_modules():
    """``l0kernels._cpu``: the torch backend's CPU kernels (Philox stream, gates, fused gradient scaling) from
    ``csrc/host/cpu_kernels.cpp`` and the headers ``csrc/l0_philox.cuh`` / ``csrc/l0_gate.cuh`` (plain C++, no
    PyTorch headers, compiles in seconds). Optional: if no compiler is there the build goes on and the
    package uses its numpy/torch paths. ``L0K_SKIP_CPU_EXT=1`` skips it.

    On x86-64 Linux with GCC the loops are vectorized (AVX2 and baseline clones) and call glibc's libmvec
    for logf/log1pf/expf: that needs -fno-math-errno and finite-math flags for this one file, never
    -ffast-math (its startup code would flush denormals for the whole process). Under -ffinite-math-only
    the NaN tests of ``csrc/l0_gate.cuh`` compare bits (a float compare would be folded away). ``L0K_CPU_SIMD=0`` builds
    the plain scalar version."""
    if os.environ.get("L0K_SKIP_CPU_EXT", "0") == "1":
        return []
    args, libs, macros = ["-O3", "-std=c++17"], [], []
    if (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
            and os.environ.get("L0K_CPU_SIMD", "1") != "0"):
        args += ["-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros"]
        libs, macros = ["mvec"], [("L0K_LIBMVEC", "1")]
    return [Extension("l0kernels._cpu", ["csrc/host/cpu_kernels.cpp"], include_dirs=["csrc"], define_macros=macros,
                      extra_compile_args=args, libraries=libs, language="c++", optional=True)]


ext_modules, cmdclass = _cuda_ext_modules()
setup(ext_modules=_cpu_ext_modules() + ext_modules, cmdclass=cmdclass)
