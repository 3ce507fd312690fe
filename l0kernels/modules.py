"""``L0Linear`` and ``L0Conv2d``: ``nn.Linear`` / ``nn.Conv2d`` with hard-concrete gates, and model-level penalties.

Both modes take one route: :func:`l0kernels.functional.layer_linear` / ``layer_conv2d`` check the call once
and dispatch it. Training-mode forward draws a fresh seed per call from PyTorch's default generator (so
``torch.manual_seed`` makes runs repeatable); eval-mode forward uses the deterministic gates, served by the
built-in backends from the layer's cached eval plan (:mod:`l0kernels.backends._plans`).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from ._checks import FLOAT_DTYPES, check_choice, check_group_size, check_int, is_int, check_linear_group_size, conv_out_size, _pair
from ._dispatch import backend_names
from ._gates import LINEAR_GATES, NOISE_KINDS, GateConfig, compute_dtype, eval_gates_and_grad, prob_open_t
from ._regularizer import LayerSpec, regularizer as _regularizer
from .functional import layer_conv2d, layer_linear

LOG_ALPHA_MIN = math.log(1e-2)  # the authors clamp log_alpha to [log 0.01, log 100] after each step
LOG_ALPHA_MAX = math.log(1e2)


def _check_droprate(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"droprate_init must be a float in (0, 1), got {type(p).__name__}")
    if not 0.0 < float(p) < 1.0:
        raise ValueError(f"droprate_init must be in (0, 1), got {p}")
    return float(p)


def _check_positive_int(v, name: str) -> int:
    v = check_int(v, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _check_dtype(dtype) -> Optional[torch.dtype]:
    """A layer's ``dtype=``: None (PyTorch's default) or a floating dtype its parameters can learn in."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be None or a floating dtype (float16, bfloat16, float32 or float64), got {dtype!r}")
    return dtype


class _GateOwner(nn.Module):
    """Gate bookkeeping shared by every module that owns gates (``log_alpha``, one entry per gate): the L0
    layers and the structure gates (:class:`l0kernels.structure.StructureGate`). ``params_per_gate`` and
    ``ungated_params`` say what the gates control; :func:`l0_gates` yields every such module."""

    log_alpha: nn.Parameter

    def _init_gate_options(self, noise, droprate_init, beta, gamma, zeta, backend):
        check_choice(noise, "noise", NOISE_KINDS)
        check_choice(backend, "backend", backend_names())
        self.noise = noise
        self.backend = backend
        self.droprate_init = _check_droprate(droprate_init)
        self.cfg = GateConfig(beta=beta, gamma=gamma, zeta=zeta)

    def reset_gates(self) -> None:
        """``log_alpha ~ N(log(1-p) - log(p), 0.01)`` with ``p = droprate_init`` (docs/design.md §1)."""
        if self.log_alpha.is_meta:  # no values to draw (and meta normal_ would import torch._dynamo)
            return
        p = self.droprate_init
        with torch.no_grad():
            self.log_alpha.normal_(math.log(1 - p) - math.log(p), 1e-2)

    # -- gates -------------------------------------------------------------------------------------------
    def deterministic_gates(self) -> torch.Tensor:
        """``z_eval`` per gate (log_alpha's shape), detached."""
        with torch.no_grad():
            return eval_gates_and_grad(self.log_alpha, self.cfg, need_grad=False)[0].to(self.log_alpha.dtype)

    def active_mask(self) -> torch.Tensor:
        """Boolean mask of the gates that are open at test time (``z_eval > 0``)."""
        return self.deterministic_gates() > 0

    def expand_gates(self, t: torch.Tensor) -> torch.Tensor:
        """Per-gate values (last dim = number of gates) as per-feature values: gate ``j`` repeated for the
        ``group_size`` features ``j*g ... j*g+g-1`` it controls (the identity for ``group_size=1``)."""
        g = self.group_size
        return t if g == 1 else t.repeat_interleave(g, dim=-1)

    def feature_gates(self) -> torch.Tensor:
        """``z_eval`` per gated feature (input/output feature, output channel or weight), detached."""
        return self.expand_gates(self.deterministic_gates())

    def num_active(self) -> int:
        return int(self.active_mask().sum())

    def num_gates(self) -> int:
        return self.log_alpha.numel()

    def prob_open(self) -> torch.Tensor:
        """P(z != 0) per gate; differentiable."""
        return prob_open_t(self.log_alpha, self.cfg)

    def expected_l0(self) -> torch.Tensor:
        """Expected number of open gates (the paper's L0 penalty of this layer); differentiable."""
        return self.prob_open().sum()

    def counted_parameters(self):
        """The parameters the gates' counts cover (``expected_params`` counts these; the rest of a model is
        counted whole)."""
        return [p for n, p in self.named_parameters(recurse=False) if n != "log_alpha"]

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clamp ``log_alpha`` to ``[log 0.01, log 100]`` in place, as the authors do after each optimizer step."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def expected_params(self) -> torch.Tensor:
        """Expected number of non-zero parameters: ``sum(p_open * params_per_gate) +`` ungated parameters."""
        return (self.prob_open() * self.params_per_gate).sum() + self.ungated_params


class _L0Layer(_GateOwner):
    """An L0 layer: a weight layer whose own gates act on its inputs, outputs or weights."""

    weight: nn.Parameter
    bias: Optional[nn.Parameter]

    # (axis, bias_gated) of the gated features in the weight viewed as (rows, features): 1 = columns,
    # 0 = rows, None = every weight (see l0kernels/_regularizer.py)
    _reg_layout: Tuple[Optional[int], bool]

    def regularizer(self, lamba: float, weight_decay: float = 0.0, N: int = 1) -> torch.Tensor:
        """The paper's per-layer term ``(1/N) sum_g p_g (lamba * |g| + 0.5 wd ||theta_g||^2)`` plus
        ``0.5 wd ||theta||^2 / N`` for ungated parameters (the authors' bias term). One fused pass over the
        weight forward and backward (:mod:`l0kernels._regularizer`); a 0-d tensor in float32 for half
        parameters, else in their dtype.

        ``weight_decay`` is divided by ``N`` like ``lamba``: it is *not* the usual per-parameter weight
        decay. For the usual term ``0.5 * wd * p_g * ||theta_g||^2`` (what ``wd`` means in the authors'
        ``L0MLP`` / ``L0WideResNet``, which hand ``N * wd`` to their layers) pass ``weight_decay=wd * N``;
        ``weight_decay=wd`` gives a term N times weaker (the authors' ``L0LeNet5``)."""
        _check_coef(lamba, "lamba")
        _check_coef(weight_decay, "weight_decay")
        N = _check_n(N)
        return _regularizer((self._reg_spec(lamba),), self._reg_tensors(), weight_decay, N,
                            compute_dtype(self.weight.dtype))

    def _reg_spec(self, lamba: float) -> LayerSpec:
        axis, bias_gated = self._reg_layout
        return LayerSpec(axis, bias_gated, lamba * self.params_per_gate, self.cfg)

    def _reg_tensors(self):
        return (self.log_alpha, self.weight, self.bias)

    def _gate_repr(self) -> str:
        c = self.cfg
        s = f"noise={self.noise!r}, droprate_init={self.droprate_init}"
        if self.group_size != 1:
            s += f", group_size={self.group_size}"
        if (c.beta, c.gamma, c.zeta) != (2.0 / 3.0, -0.1, 1.1):
            s += f", beta={c.beta:g}, gamma={c.gamma:g}, zeta={c.zeta:g}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


def _check_n(N) -> int:
    if not is_int(N) or N < 1:
        raise ValueError(f"N (training-set size) must be an int >= 1, got {N!r}")
    return int(N)


def _check_coef(v, name: str) -> None:
    """A regularizer coefficient: a finite real number >= 0."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {type(v).__name__}")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")


class L0Linear(_L0Layer):
    """``nn.Linear`` with hard-concrete gates on its inputs (``gate="in"``, the paper's dense layer),
    outputs (``"out"``, gating the bias too) or weights (``"weight"``).

    Parameters: ``weight (out_features, in_features)``, ``bias (out_features,)`` or None, and
    ``log_alpha`` of shape ``(in_features // group_size,)``, ``(out_features // group_size,)`` or
    ``(out_features, in_features)``. ``group_size=g`` (``gate="in"``/``"out"``): gate ``j`` controls the
    ``g`` features ``j*g ... j*g+g-1`` (e.g. an attention head of the output projection).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, gate: str = "in",
                 noise: str = "batch", droprate_init: float = 0.5, beta: float = 2.0 / 3.0, gamma: float = -0.1,
                 zeta: float = 1.1, backend: str = "auto", group_size: int = 1, device=None, dtype=None):
        super().__init__()
        self.in_features = _check_positive_int(in_features, "in_features")
        self.out_features = _check_positive_int(out_features, "out_features")
        check_choice(gate, "gate", LINEAR_GATES)
        if gate == "weight" and noise == "sample":
            raise ValueError("noise='sample' is not defined for gate='weight'; use noise='batch'")
        group_size = check_linear_group_size(group_size, gate, in_features, out_features)
        self.gate = gate
        self.group_size = group_size
        self._init_gate_options(noise, droprate_init, beta, gamma, zeta, backend)
        fk = {"device": device, "dtype": _check_dtype(dtype)}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        la_shape = {"in": (in_features // group_size,), "out": (out_features // group_size,),
                    "weight": (out_features, in_features)}[gate]
        self.log_alpha = nn.Parameter(torch.empty(la_shape, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and bias as ``nn.Linear``; gates as docs/design.md §1."""
        nn.Linear.reset_parameters(self)
        self.reset_gates()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_linear(self, x)

    @property
    def params_per_gate(self) -> int:
        """Parameters one gate controls (docs/design.md §1's "group size"): ``group_size`` weight columns,
        ``group_size`` weight rows (+ their biases), or one weight."""
        if self.gate == "in":
            return self.out_features * self.group_size
        if self.gate == "out":
            return (self.in_features + (self.bias is not None)) * self.group_size
        return 1

    @property
    def ungated_params(self) -> int:
        return self.out_features if (self.bias is not None and self.gate != "out") else 0

    @property
    def _reg_layout(self) -> Tuple[Optional[int], bool]:
        return {"in": (1, False), "out": (0, True), "weight": (None, False)}[self.gate]

    def expected_flops(self, batch: int = 1) -> torch.Tensor:
        """Expected FLOPs of one forward at test-time sparsity in expectation: multiply-adds count 2, the bias add 1.

        in: ``N * (2 E[K'] - 1 + bias)``; out: ``E[N'] * (2K - 1 + bias)``; weight: ``2 E[nnz] - N + bias*N``
        (``E[K']``, ``E[N']``: ``group_size`` features per expected open gate).
        """
        p = self.prob_open() * self.group_size
        b = 1 if self.bias is not None else 0
        if self.gate == "in":
            f = self.out_features * (2 * p.sum() - 1 + b)
        elif self.gate == "out":
            f = p.sum() * (2 * self.in_features - 1 + b)
        else:
            f = 2 * p.sum() - self.out_features + b * self.out_features
        return f.clamp_min(0) * batch

    def dense_flops(self, batch: int = 1) -> int:
        return batch * self.out_features * (2 * self.in_features - 1 + (self.bias is not None))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gate={self.gate!r}, " + self._gate_repr())


class L0Conv2d(_L0Layer):
    """``nn.Conv2d`` with one hard-concrete gate per output channel (the channel and its bias), or per
    ``group_size`` consecutive output channels (``log_alpha`` of shape ``(out_channels // group_size,)``)."""

    gate = "out"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, noise: str = "batch", droprate_init: float = 0.5,
                 beta: float = 2.0 / 3.0, gamma: float = -0.1, zeta: float = 1.1, backend: str = "auto",
                 group_size: int = 1, device=None, dtype=None):
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.out_channels = _check_positive_int(out_channels, "out_channels")
        if self.out_channels == 0:
            raise ValueError("out_channels must be >= 1 (PyTorch's convolution has no form without output channels)")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        if not is_int(groups) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        groups = int(groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                             f"by groups ({groups})")
        self.groups = groups
        self.group_size = group_size = check_group_size(group_size, out_channels, "out_channels")
        self._init_gate_options(noise, droprate_init, beta, gamma, zeta, backend)
        fk = {"device": device, "dtype": _check_dtype(dtype)}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **fk))
        self.bias = nn.Parameter(torch.empty(out_channels, **fk)) if bias else None
        self.log_alpha = nn.Parameter(torch.empty(out_channels // group_size, **fk))
        self.input_hw: Optional[Tuple[int, int]] = None  # last input size seen, for FLOP counts
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and bias as ``nn.Conv2d``; gates as docs/design.md §1."""
        nn.Conv2d.reset_parameters(self)
        self.reset_gates()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = layer_conv2d(self, x)
        self.input_hw = (int(x.shape[2]), int(x.shape[3]))  # only after a call that passed its checks
        return y

    @property
    def fan_in(self) -> int:
        return (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]

    @property
    def params_per_gate(self) -> int:
        """Parameters one gate controls: ``group_size`` channels of ``in_channels/groups * kh * kw`` (+1 with
        a bias)."""
        return (self.fan_in + (self.bias is not None)) * self.group_size

    @property
    def ungated_params(self) -> int:
        return 0

    _reg_layout = (0, True)

    def output_hw(self, input_hw: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        hw = input_hw or self.input_hw
        if hw is None:
            raise ValueError("input_hw is needed (the layer has not seen an input yet): pass input_hw=(H, W)")
        return tuple(conv_out_size(hw[d], self.kernel_size[d], self.stride[d], self.padding[d], self.dilation[d])
                     for d in range(2))

    def expected_flops(self, batch: int = 1, input_hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Expected FLOPs: ``E[C_out'] * H_out * W_out * (2 * fan_in - 1 + bias)``, with the real output size
        (stride, padding, dilation) and ``fan_in = C_in/groups * kh * kw``."""
        ho, wo = self.output_hw(input_hw)
        per_channel = ho * wo * (2 * self.fan_in - 1 + (self.bias is not None))
        return self.prob_open().sum() * self.group_size * per_channel * batch

    def dense_flops(self, batch: int = 1, input_hw: Optional[Tuple[int, int]] = None) -> int:
        ho, wo = self.output_hw(input_hw)
        return batch * self.out_channels * ho * wo * (2 * self.fan_in - 1 + (self.bias is not None))

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}, " + self._gate_repr()


L0_LAYER_TYPES = (L0Linear, L0Conv2d)


def l0_layers(model: nn.Module) -> Iterator[Tuple[str, _L0Layer]]:
    """``(name, layer)`` for every L0 layer in ``model`` (including ``model`` itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, _L0Layer):
            yield name, m


def l0_gates(model: nn.Module) -> Iterator[Tuple[str, _GateOwner]]:
    """``(name, module)`` for every module of ``model`` that owns gates (a parameter ``log_alpha``): the L0
    layers and the structure gates (docs/design.md §11). The model-level penalties, ``constrain_``,
    ``expected_params`` and ``SparsityTarget`` count these."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, _GateOwner):
            yield name, m


_NO_GATES = "model has no gates (L0Linear / L0Conv2d layers or structure gates)"


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of expected L0 (expected open gates) over the modules that own gates; differentiable."""
    terms = [m.expected_l0() for _, m in l0_gates(model)]
    if not terms:
        raise ValueError(_NO_GATES)
    return torch.stack([t.float() for t in terms]).sum()


def l0_regularizer(model: nn.Module, lamba=0.1, weight_decay: float = 0.0, N: int = 1) -> torch.Tensor:
    """The paper's full regularizer: sum over the modules that own gates (:func:`l0_gates`) of
    ``module.regularizer(lamba, weight_decay, N)``.

    ``lamba`` is one float or a sequence with one value per such module (in ``named_modules`` order), as
    in the L0-sep setting ``[10, 0.5, 0.1, 10]``; ``N`` is the training-set size.

    The whole term is divided by ``N``, ``weight_decay`` included: the L2 part is
    ``(1/N) * sum_g p_g * 0.5 * weight_decay * ||theta_g||^2``. The usual per-parameter weight decay
    ``wd`` (L2 term ``0.5 * wd * p_g * ||theta_g||^2``, the authors' ``L0MLP``) is ``weight_decay=wd * N``.
    """
    layers = [m for _, m in l0_gates(model)]
    if not layers:
        raise ValueError(_NO_GATES)
    N = _check_n(N)
    lambdas = list(lamba) if isinstance(lamba, (list, tuple)) else [lamba] * len(layers)
    if len(lambdas) != len(layers):
        raise ValueError(f"lamba has {len(lambdas)} values but the model has {len(layers)} modules with gates")
    for lam in lambdas:
        _check_coef(lam, "lamba")
    _check_coef(weight_decay, "weight_decay")
    # one autograd node for the built-in layers; structure gates and a subclass with its own ``regularizer``
    # keep theirs
    own = [(m, lam) for m, lam in zip(layers, lambdas) if type(m).regularizer is not _L0Layer.regularizer]
    fused = [(m, lam) for m, lam in zip(layers, lambdas) if type(m).regularizer is _L0Layer.regularizer]
    terms = [m.regularizer(lam, weight_decay, N).float() for m, lam in own]
    if fused:
        tensors = [t for m, _ in fused for t in m._reg_tensors()]
        terms.append(_regularizer(tuple(m._reg_spec(lam) for m, lam in fused), tensors, weight_decay, N,
                                  torch.float32))
    return terms[0] if len(terms) == 1 else torch.stack([t.to(terms[-1].device) for t in terms]).sum()


def constrain_(model: nn.Module) -> None:
    """``constrain_()`` on every module of ``model`` that owns gates (call after each optimizer step)."""
    for _, m in l0_gates(model):
        m.constrain_()


def expected_params(model: nn.Module) -> torch.Tensor:
    """Expected non-zero parameters: each gate-owning module's count of the parameters its gates control
    (a structure gate's over every layer it spans), plus every other parameter whole."""
    owners = [m for _, m in l0_gates(model)]
    total = sum(m.expected_params() for m in owners)
    counted = {id(p) for m in owners for p in m.counted_parameters()} | {id(m.log_alpha) for m in owners}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    return total + rest
