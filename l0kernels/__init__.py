"""l0kernels: fused kernels for L0-regularized networks with hard-concrete gates.

Louizos, Welling, Kingma, "Learning Sparse Neural Networks through L0 Regularization"
(ICLR 2018, arXiv 1712.01312). See SPEC.md-derived docs in README.md.
"""
from ._dispatch import Backend, available_backends, get_backend, register_backend, select_backend
from ._gates import GateConfig
from ._philox import philox_uniform
from .backends.torch_backend import L0Conv2dFunction, L0LinearFunction
from .functional import (deterministic_gates, expected_l0, l0_conv2d, l0_linear, prob_open, sample_gates)
from . import backends as _backends_pkg  # noqa: F401
from ._lazy import register_optional_backends as _register_optional_backends

_register_optional_backends()

__version__ = "0.1.0"

from .modules import (L0Conv2d, L0Linear, constrain_, expected_params, l0_layers, l0_penalty,  # noqa: E402
                      l0_regularizer)
