"""l0kernels: fused kernels for L0-regularized networks with hard-concrete gates.

Louizos, Welling, Kingma, "Learning Sparse Neural Networks through L0 Regularization"
(ICLR 2018, arXiv 1712.01312). The contract every backend shares is docs/design.md.
"""
from ._dispatch import Backend, available_backends, get_backend, register_backend, select_backend
from ._gates import GateConfig
from ._lazy import register_optional_backends as _register_optional_backends
from ._philox import philox_uniform
from .backends._plans import clear_eval_cache
from .backends.torch import L0Conv2dFunction, L0LinearFunction
from .compact import CompactContext, Units, compact, compare, input_select, register_compact_rule, summary
from .convert import convert
from .save import load_compact, save_compact
from .functional import (deterministic_gates, expected_l0, explain_conv2d, explain_linear, l0_conv2d, l0_linear,
                         prob_open, sample_gates, structure_linear)
from .distributed import seed_gates
from .targets import SparsityTarget
from .modules import (L0Conv2d, L0Linear, constrain_, expected_params, l0_gates, l0_layers, l0_penalty,
                      l0_regularizer)
from .structure import StructureGate, StructureLinear

_register_optional_backends()

__version__ = "0.1.0"

__all__ = [
    "philox_uniform", "sample_gates", "deterministic_gates", "prob_open", "expected_l0",
    "l0_linear", "l0_conv2d", "structure_linear", "L0Linear", "L0Conv2d", "L0LinearFunction", "L0Conv2dFunction",
    "l0_penalty", "l0_regularizer", "SparsityTarget", "seed_gates", "constrain_", "expected_params", "l0_layers",
    "l0_gates", "StructureGate", "StructureLinear",
    "compact", "summary", "compare", "register_compact_rule", "CompactContext", "Units",
    "input_select", "convert", "save_compact", "load_compact", "clear_eval_cache",
    "GateConfig", "Backend", "register_backend", "get_backend", "available_backends", "select_backend",
    "explain_linear", "explain_conv2d",
]
