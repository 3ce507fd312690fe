"""Public functional API of docs/design.md §4: gates, penalties and the gated ops."""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence, Union

import torch

from ._checks import autocast_dtype, check_tensor, conv2d_call, draw_seed, linear_call, make_config
from . import _active
from ._dispatch import backend_names, dispatch, explain, get_backend, is_backend_name
from ._gates import (compute_dtype, eval_gates_and_grad, gates_from_uniform, noise_uniform, prob_open_t)
from ._philox import check_seed
from ._replay import replay_grads

_BETA, _GAMMA, _ZETA = 2.0 / 3.0, -0.1, 1.1


def _shape_for(log_alpha: torch.Tensor, shape) -> tuple:
    if shape is None:
        return tuple(log_alpha.shape)
    if isinstance(shape, int):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a sequence of ints or None, got {shape!r}")
    shape = tuple(shape)
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"shape must be a sequence of ints or None, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    la = tuple(log_alpha.shape)
    if len(shape) < len(la) or (la and shape[len(shape) - len(la):] != la):
        raise ValueError(f"shape must end with log_alpha's shape {la} (the noise tensor's trailing "
                         f"dims are the gates), got {shape}")
    return shape


def sample_gates(log_alpha: torch.Tensor, seed: Union[int, torch.Tensor], shape: Optional[Sequence[int]] = None, *,
                 beta: float = _BETA, gamma: float = _GAMMA, zeta: float = _ZETA, eps: float = 1e-6) -> torch.Tensor:
    """Training gates ``z`` for a noise tensor of ``shape`` (default: ``log_alpha``'s shape).

    ``shape`` must end with ``log_alpha.shape``; e.g. ``(M, G)`` for per-example gates. Offsets
    are the row-major index into ``shape`` (docs/design.md §2). Differentiable in ``log_alpha``.
    ``seed``: an int in ``[0, 2**63)`` or a 0-d int64 tensor on any device (docs/design.md §10).
    """
    check_tensor(log_alpha, "log_alpha")
    cfg = make_config(beta, gamma, zeta, eps)
    seed = check_seed(seed)
    shape = _shape_for(log_alpha, shape)
    u = noise_uniform(seed, shape, log_alpha.device)
    if not log_alpha.requires_grad:
        return gates_from_uniform(log_alpha, u, cfg, need_grad=False)[0].to(log_alpha.dtype)
    return _GateFromUniform.apply(log_alpha, u, cfg)


class _GateFromUniform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_alpha, u, cfg):
        z, dz = gates_from_uniform(log_alpha, u, cfg)
        ctx.save_for_backward(dz, log_alpha, u)
        ctx.shape = log_alpha.shape
        ctx.cfg = cfg
        return z.to(log_alpha.dtype)

    @staticmethod
    def backward(ctx, gz):
        dz, log_alpha, u = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gate formula through autograd (l0kernels/_replay.py)
            formula = lambda: gates_from_uniform(log_alpha, u, ctx.cfg, need_grad=False)[0].to(log_alpha.dtype)  # noqa: E731
            return replay_grads(formula, (log_alpha,), (True,), gz) + (None, None)
        g = gz.to(dz.dtype) * dz
        extra = g.dim() - len(ctx.shape)
        if extra:
            g = g.sum(tuple(range(extra)))
        return g.to(gz.dtype), None, None


def deterministic_gates(log_alpha: torch.Tensor, *, beta: float = _BETA, gamma: float = _GAMMA,
                        zeta: float = _ZETA) -> torch.Tensor:
    """Test-time gates ``z_eval = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``.

    Exactly 0 for ``log_alpha <= log(-gamma/zeta)``, exactly 1 for ``log_alpha >= log((1-gamma)/(zeta-1))``.
    (``beta`` is accepted for a uniform signature and validated; the test-time gate does not use it.)
    """
    check_tensor(log_alpha, "log_alpha")
    cfg = make_config(beta, gamma, zeta)
    la = log_alpha.to(compute_dtype(log_alpha.dtype))  # half types: float32 math, as every backend's eval gates
    s_bar = torch.sigmoid(la) * (cfg.zeta - cfg.gamma) + cfg.gamma
    return torch.nn.functional.hardtanh(s_bar, 0.0, 1.0).to(log_alpha.dtype)


def prob_open(log_alpha: torch.Tensor, *, beta: float = _BETA, gamma: float = _GAMMA,
              zeta: float = _ZETA) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` per gate; differentiable."""
    check_tensor(log_alpha, "log_alpha")
    return prob_open_t(log_alpha, make_config(beta, gamma, zeta))


def expected_l0(log_alpha: torch.Tensor, *, beta: float = _BETA, gamma: float = _GAMMA,
                zeta: float = _ZETA) -> torch.Tensor:
    """Expected number of open gates, ``sum(prob_open(log_alpha))`` (a 0-d tensor; differentiable)."""
    return prob_open(log_alpha, beta=beta, gamma=gamma, zeta=zeta).sum()


def l0_linear(x: torch.Tensor, weight: torch.Tensor, log_alpha: torch.Tensor, bias: Optional[torch.Tensor] = None,
              *, seed: Optional[Union[int, torch.Tensor]] = None, gate: str = "in", noise: str = "batch",
              training: bool = True, backend: str = "auto", beta: float = _BETA, gamma: float = _GAMMA,
              zeta: float = _ZETA, eps: float = 1e-6, group_size: int = 1) -> torch.Tensor:
    """Hard-concrete gated linear layer (docs/design.md §3).

    ``gate="in"``: ``y = (x * z) @ W.T + b``, ``log_alpha`` is ``(K,)``;
    ``gate="out"``: ``y = (x @ W.T + b) * z``, ``(N,)``; ``gate="weight"``: ``y = x @ (W * Z).T + b``, ``(N, K)``.
    ``noise="batch"`` draws one gate vector per call, ``"sample"`` one per row of ``x.reshape(-1, K)``.
    ``group_size=g`` (``gate="in"``/``"out"``, docs/design.md §8): one gate per ``g`` consecutive features,
    ``log_alpha`` of shape ``(K // g,)`` / ``(N // g,)``; the noise tensor is over the gates.
    ``seed``: an int in ``[0, 2**63)`` or a 0-d int64 tensor (any device; docs/design.md §10). In training with
    ``seed=None`` one is drawn as a 0-d int64 tensor on ``x``'s device from PyTorch's default generator.
    With ``training=False`` the deterministic gates are used and ``seed`` is ignored.
    Under ``torch.autocast`` the op casts like ``F.linear``: float16/bfloat16/float32 ``x``, ``weight``,
    ``bias`` and ``log_alpha`` run in the autocast dtype (float64 is not cast), and so does the output.
    """
    if isinstance(x, torch.Tensor) and x.is_nested:
        return _over_nested_rows(x, lambda x2: l0_linear(x2, weight, log_alpha, bias, seed=seed, gate=gate, noise=noise,
                                                         training=training, backend=backend, beta=beta, gamma=gamma,
                                                         zeta=zeta, eps=eps, group_size=group_size))
    call = linear_call(x, weight, log_alpha, bias, seed=seed, gate=gate, noise=noise, training=training,
                       backend=backend, beta=beta, gamma=gamma, zeta=zeta, eps=eps, autocast=autocast_dtype(x),
                       group_size=group_size)
    return dispatch(call, backend)


def _over_nested_rows(x: torch.Tensor, run) -> torch.Tensor:
    """A linear op on a nested (ragged) ``x``, as ``nn.Linear`` takes one (``nn.TransformerEncoder`` hands its
    layers nested tensors in eval): the rows of every component in one ``(M, K)`` call of ``run`` (one gate
    draw for the whole call, rows numbered component by component for per-row noise), split back into a
    nested tensor of the same layout."""
    parts = x.unbind()
    k = parts[0].shape[-1] if parts else 0
    y = run(torch.cat([p.reshape(-1, k) for p in parts]) if parts else x.new_empty((0, k)))
    n = y.shape[-1]
    outs = [r.reshape(*p.shape[:-1], n) for p, r in zip(parts, y.split([p.numel() // max(k, 1) for p in parts]))]
    return torch.nested.as_nested_tensor(outs, layout=x.layout)


def l0_conv2d(x: torch.Tensor, weight: torch.Tensor, log_alpha: torch.Tensor, bias: Optional[torch.Tensor] = None,
              stride=1, padding=0, dilation=1, groups: int = 1, *,
              seed: Optional[Union[int, torch.Tensor]] = None, noise: str = "batch", training: bool = True,
              backend: str = "auto", beta: float = _BETA, gamma: float = _GAMMA, zeta: float = _ZETA,
              eps: float = 1e-6, group_size: int = 1) -> torch.Tensor:
    """``conv2d(x, W, b, ...) * z[..., c, None, None]`` with one gate per output channel (docs/design.md §3).

    ``x`` is ``(B, C_in, H, W)`` (NCHW or channels_last); ``noise="sample"`` draws gates ``(B, C_out)``.
    ``group_size=g``: one gate per ``g`` consecutive output channels, ``log_alpha`` ``(C_out // g,)``.
    Under ``torch.autocast`` the op casts like ``F.conv2d`` (see :func:`l0_linear`).
    """
    call = conv2d_call(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed=seed, noise=noise,
                       training=training, backend=backend, beta=beta, gamma=gamma, zeta=zeta, eps=eps,
                       autocast=autocast_dtype(x), group_size=group_size)
    return dispatch(call, backend)


def explain_linear(x: torch.Tensor, weight: torch.Tensor, log_alpha: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, *, seed: Optional[Union[int, torch.Tensor]] = None,
                   gate: str = "in", noise: str = "batch", training: bool = True, backend: str = "auto",
                   beta: float = _BETA, gamma: float = _GAMMA, zeta: float = _ZETA, eps: float = 1e-6,
                   group_size: int = 1) -> Dict[str, List[str]]:
    """Why each backend would not run :func:`l0_linear` with these arguments, and why each path of a backend
    that can would not take it: ``{"torch": [], "torch/skip": [...], "cuda": [...], ...}``, ``[]`` where the
    backend runs the call or the path takes it (:func:`l0kernels._dispatch.explain`; ``backend``: one backend,
    or ``"auto"`` for every one). Checks the arguments as ``l0_linear`` does, runs nothing and draws no seed:
    with ``seed=None`` the gates of seed 0 stand in for a training call's."""
    call = linear_call(x, weight, log_alpha, bias, seed=0 if seed is None else seed, gate=gate, noise=noise,
                       training=training, backend=backend, beta=beta, gamma=gamma, zeta=zeta, eps=eps,
                       autocast=autocast_dtype(x), group_size=group_size)
    return explain(call, backend)


def explain_conv2d(x: torch.Tensor, weight: torch.Tensor, log_alpha: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1, *,
                   seed: Optional[Union[int, torch.Tensor]] = None, noise: str = "batch", training: bool = True,
                   backend: str = "auto", beta: float = _BETA, gamma: float = _GAMMA, zeta: float = _ZETA,
                   eps: float = 1e-6, group_size: int = 1) -> Dict[str, List[str]]:
    """:func:`explain_linear` for :func:`l0_conv2d`."""
    call = conv2d_call(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed=0 if seed is None else seed,
                       noise=noise, training=training, backend=backend, beta=beta, gamma=gamma, zeta=zeta, eps=eps,
                       autocast=autocast_dtype(x), group_size=group_size)
    return explain(call, backend)


# -- the layers' forward ----------------------------------------------------------------------------------
# ``L0Linear`` / ``L0Conv2d`` call these: the op above on the layer's parameters and options, checked once
# and dispatched the same way. An eval call is made on the layer's behalf (``owner``), so the built-in
# backends may serve it from the layer's cached eval plan (l0kernels/backends/_plans.py).

def structure_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     rows: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                     cols: Optional[torch.Tensor] = None, open_out: bool = False, host: bool = True,
                     backend: str = "torch", log_alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A linear layer inside a structure gate's span (docs/design.md §11): ``y = (x * scale) @ W.T + b`` with
    the outputs where ``rows`` (bool, ``(N,)``) is False exactly 0 and not computed, and the inputs where
    ``scale`` (``(K,)``, the gates per input feature) is 0 not read. ``rows=None`` / ``scale=None``: every row
    computed / no input scale. A producer of a structure gate passes ``rows`` (the open units' rows), its
    consumer ``scale`` (the gates ``z`` per column). Where ``scale`` is 0 its gradient is 0 when the call skips
    those columns and the product's otherwise (a hard-concrete gate is 0 only where its own derivative is 0, so
    ``log_alpha``'s gradient is the same either way).

    The narrow form, where the tensors between a block's layers hold only its open units: ``open_out=True``
    returns only the rows where ``rows`` is True (in order); ``cols`` (bool, ``(K,)``) says that ``x`` holds only
    those input columns (in order). ``host=False``: nothing is read on the host (a CUDA graph can capture the
    call). Then a producer (``rows`` given, no ``scale``) runs on ``backend``'s device kernels over its open rows
    only (the open set found on the device) where that backend takes the call (``Backend.rows_reasons``;
    ``log_alpha``: the structure gate's, whose last known open fraction the backend's skip threshold reads);
    otherwise, and with ``backend="torch"``, every row is computed and the closed ones multiplied by 0, every
    column multiplied by ``scale``."""
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    width = int(cols.sum()) if isinstance(cols, torch.Tensor) and tuple(cols.shape) == (k,) else k
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"x must have {width} features in its last dim ({'the open columns of ' if width != k else ''}"
                         f"weight's in_features), got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    for name, mask, size in (("rows", rows, n), ("cols", cols, k)):
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != (size,)):
            raise ValueError(f"{name} must be a bool tensor of shape ({size},) or None, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    if open_out and rows is None:
        raise ValueError("open_out=True needs rows (the rows the output holds)")
    if not host and (open_out or cols is not None):
        raise ValueError("host=False keeps every shape: it takes neither open_out nor cols")
    if scale is not None:
        check_tensor(scale, "scale")
        if tuple(scale.shape) != (k,):
            raise ValueError(f"scale must have shape ({k},) or be None, got {tuple(scale.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("rows", rows), ("scale", scale), ("cols", cols)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not is_backend_name(backend) or backend == "auto":
        raise ValueError(f"backend must name a backend ({', '.join(b for b in backend_names() if b != 'auto')}), "
                         f"got {backend!r}")
    if log_alpha is not None:
        check_tensor(log_alpha, "log_alpha")
    if not host and rows is not None and scale is None and backend != "torch":
        b = get_backend(backend)
        if _active.ENABLED and not b.rows_reasons(x, weight, log_alpha):
            _active.count_path("structure-rows", "fwd", "skip")
            return b.rows_linear(x, weight, bias, _active.open_set_of_closed((~rows).to(torch.uint8)))
        _active.count_path("structure-rows", "fwd", "dense")
    from .backends.torch.structure import structure_linear as run
    return run(x, weight, bias, rows, scale, cols, bool(open_out), bool(host))


def _params(layer):
    """``(weight, log_alpha, bias)`` of a layer, straight from its parameter dict where they are there
    (``nn.Module.__getattr__`` costs about a microsecond a name, which a batch-1 eval call notices)."""
    p = layer.__dict__["_parameters"]
    get = lambda name: p[name] if name in p else getattr(layer, name)  # noqa: E731 (parametrized, replaced)
    return get("weight"), get("log_alpha"), get("bias")


def layer_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``L0Linear.forward``: ``l0_linear`` with a fresh seed in training, the deterministic gates in eval."""
    if isinstance(x, torch.Tensor) and x.is_nested:
        seed = draw_seed(x.device) if layer.training else None  # one draw for every component's rows
        return _over_nested_rows(x, lambda x2: l0_linear(
            x2, *_params(layer), seed=seed, gate=layer.gate, noise=layer.noise, training=layer.training,
            backend=layer.backend, beta=layer.cfg.beta, gamma=layer.cfg.gamma, zeta=layer.cfg.zeta, eps=layer.cfg.eps,
            group_size=layer.group_size))
    c, training = layer.cfg, layer.training
    weight, log_alpha, bias = _params(layer)
    call = linear_call(x, weight, log_alpha, bias, seed=None, gate=layer.gate, noise=layer.noise,
                       training=training, backend=layer.backend, beta=c.beta, gamma=c.gamma, zeta=c.zeta, eps=c.eps,
                       autocast=autocast_dtype(x), group_size=layer.group_size, owner=None if training else layer)
    return dispatch(call, layer.backend)


def layer_conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    """``L0Conv2d.forward`` (see :func:`layer_linear`)."""
    c, training = layer.cfg, layer.training
    weight, log_alpha, bias = _params(layer)
    call = conv2d_call(x, weight, log_alpha, bias, layer.stride, layer.padding, layer.dilation,
                       layer.groups, seed=None, noise=layer.noise, training=training, backend=layer.backend,
                       beta=c.beta, gamma=c.gamma, zeta=c.zeta, eps=c.eps, autocast=autocast_dtype(x),
                       group_size=layer.group_size, owner=None if training else layer)
    return dispatch(call, layer.backend)


def gate_derivative_eval(log_alpha: torch.Tensor, *, gamma: float = _GAMMA, zeta: float = _ZETA) -> torch.Tensor:
    """``d z_eval / d log_alpha`` (0 on the clamped region, boundaries included)."""
    check_tensor(log_alpha, "log_alpha")
    return eval_gates_and_grad(log_alpha, make_config(_BETA, gamma, zeta))[1]
