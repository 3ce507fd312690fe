"""Build script. Installs the pure-Python package everywhere; builds the CUDA extension ``l0kernels._C``
from ``csrc/`` only where PyTorch has CUDA and nvcc is found (see ``_cuda_ext_modules``).

The CUDA build must see the installed CUDA PyTorch, so install without build isolation:
``pip install --no-build-isolation .`` (or ``-e .``). That path does not install the build requirements, so
this script checks the setuptools floor itself (``license = "MIT"`` in pyproject.toml needs setuptools >= 77).
Include paths are absolute (torch's ninja builder compiles from a temporary folder); source paths are relative
to this file's folder, as setuptools requires, and this script changes into that folder first.
Environment switches:

- ``L0K_SKIP_CUDA=1``: never build the extension.
- ``L0K_FORCE_CUDA=1``: build it even if ``torch.cuda.is_available()`` is False (a build box without a
  GPU); still needs a CUDA build of PyTorch and nvcc.
- ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``): target architectures; default sm_80 and sm_90.
- ``CUDA_HOME``: the CUDA toolkit. Unset: the toolkit of the ``nvcc`` on PATH, resolved through links and
  wrapper scripts (see ``_cuda_home``); the choice and the reason are printed.
- ``L0K_SKIP_CPU_EXT=1`` / ``L0K_CPU_SIMD=0``: skip the CPU kernels ``l0kernels._cpu``, or build them scalar.
"""
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import Extension, setup

_ROOT = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(_ROOT, "csrc")
# relative to _ROOT: setuptools refuses absolute source paths ("setup script specifies an absolute path")
_SOURCES = ["csrc/binding.cpp", "csrc/gates.cu", "csrc/elementwise.cu", "csrc/reduce.cu", "csrc/gemm.cu"]
_MIN_SETUPTOOLS = 77  # PEP 639 license expressions (pyproject.toml: license = "MIT")
_DEFAULT_GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _skip(reason):
    print(f"l0kernels: not building the CUDA extension l0kernels._C: {reason}", file=sys.stderr)
    return [], {}


def _check_setuptools(version=setuptools.__version__):
    """Stop with one clear line if setuptools is older than pyproject.toml needs. With build isolation pip
    installs ``setuptools>=77`` itself; ``--no-build-isolation`` and ``python setup.py`` use whatever is
    installed, and an old one fails later on pyproject.toml with a long validation error (or, before 61,
    silently builds a package named UNKNOWN)."""
    m = re.match(r"(\d+)", version)
    if m is None or int(m.group(1)) < _MIN_SETUPTOOLS:
        sys.exit(f"l0kernels: setuptools {version} is too old: the build needs setuptools>={_MIN_SETUPTOOLS} "
                 f"(pyproject.toml's license = \"MIT\"). Run: {sys.executable} -m pip install 'setuptools>={_MIN_SETUPTOOLS}'")


def _has_headers(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def _toolkit_of(nvcc):
    """The toolkit folder that ``nvcc`` really runs from: the folder above its real path, or, for a wrapper
    script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"`` in /usr/local/bin), the ``_HERE_`` folder that nvcc
    itself reports in ``--dryrun``."""
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _has_headers(home):
        return home, f"the nvcc on PATH, {nvcc}, resolves to {os.path.realpath(nvcc)}"
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        m = None
    if m:
        home = os.path.dirname(os.path.realpath(m.group(1).strip()))
        if _has_headers(home):
            return home, f"the nvcc on PATH, {nvcc}, is a wrapper; nvcc --dryrun runs from {m.group(1).strip()}"
    return None, f"the nvcc on PATH, {nvcc}, belongs to no toolkit with include/cuda_runtime_api.h"


def _cuda_home():
    """``(CUDA_HOME, why)``: the toolkit to build with, or ``(None, why not)``. An explicit ``CUDA_HOME`` /
    ``CUDA_PATH`` must hold bin/nvcc and include/cuda_runtime_api.h; otherwise the toolkit of the nvcc on PATH
    (``_toolkit_of``), else /usr/local/cuda. torch guesses the folder above the nvcc on PATH, which for a
    wrapper in /usr/local/bin is /usr/local, where binding.cpp finds no cuda_runtime_api.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if os.path.isfile(os.path.join(home, "bin", "nvcc")) and _has_headers(home):
                return os.path.realpath(home), f"{var} is set"
            return None, f"{var}={home} holds no bin/nvcc and include/cuda_runtime_api.h"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_of(nvcc)
    if os.path.isfile("/usr/local/cuda/bin/nvcc") and _has_headers("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda"), "no nvcc on PATH; /usr/local/cuda holds a toolkit"
    return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"


def _cuda_ext_kwargs():
    """The arguments of the ``l0kernels._C`` extension (include paths absolute, sources relative to _ROOT)."""
    # TORCH_CUDA_ARCH_LIST, when set, is turned into -gencode flags by BuildExtension itself.
    gencode = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else _DEFAULT_GENCODE
    return dict(name="l0kernels._C", sources=list(_SOURCES), include_dirs=[_CSRC],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"] + gencode})


def _build_flag(name: str) -> bool:
    """A build switch, as ``l0kernels/config.py`` declares it (loaded by path: the package itself needs torch)."""
    spec = importlib.util.spec_from_file_location("_l0kernels_config", os.path.join(_ROOT, "l0kernels", "config.py"))
    config = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
    spec.loader.exec_module(config)
    return config.build_flag(name)


def _cuda_ext_modules():
    if _build_flag("L0K_SKIP_CUDA"):
        return _skip("L0K_SKIP_CUDA=1")
    try:
        import torch
    except ImportError as e:  # build isolation hides the installed torch
        return _skip(f"torch is not importable here ({e}); use pip install --no-build-isolation .")
    if not torch.version.cuda:
        return _skip(f"PyTorch {torch.__version__} is a CPU-only build")
    home, why = _cuda_home()
    if home is None:
        return _skip(why)
    if not torch.cuda.is_available() and not _build_flag("L0K_FORCE_CUDA"):
        return _skip("torch.cuda.is_available() is False (set L0K_FORCE_CUDA=1 to build anyway)")
    # torch.utils.cpp_extension fixes its CUDA_HOME when first imported: set it before, and on the module
    # in case something imported it already.
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = home
    print(f"l0kernels: building l0kernels._C with CUDA_HOME={home} ({why}); torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}); TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(unset: sm_80, sm_90)')}",
          file=sys.stderr)
    return [cpp_extension.CUDAExtension(**_cuda_ext_kwargs())], {"build_ext": cpp_extension.BuildExtension}


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
    if _build_flag("L0K_SKIP_CPU_EXT"):
        return []
    args, libs, macros = ["-O3", "-std=c++17"], [], []
    if (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
            and _build_flag("L0K_CPU_SIMD")):
        args += ["-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros"]
        libs, macros = ["mvec"], [("L0K_LIBMVEC", "1")]
    return [Extension("l0kernels._cpu", ["csrc/host/cpu_kernels.cpp"], include_dirs=[_CSRC],
                      define_macros=macros, extra_compile_args=args, libraries=libs, language="c++", optional=True)]


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__; tests import the builders
    _check_setuptools()
    os.chdir(_ROOT)  # the relative source paths (and pyproject.toml) are read from here, wherever we start
    ext_modules, cmdclass = _cuda_ext_modules()
    setup(ext_modules=_cpu_ext_modules() + ext_modules, cmdclass=cmdclass)
