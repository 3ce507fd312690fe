"""Eval plans: the compact eval form of a gated layer, cached for the backends that serve eval calls from it.

At test time the gates ``z_eval`` are deterministic and many are exactly 0 (docs/design.md §1): an eval
plan is the layer's open set (found by ``l0kernels._active.open_index``, as a training step that skips
closed groups finds its own) with the deterministic gates folded in -- a :class:`LinearPlan` /
:class:`ConvPlan` holding the active input columns and/or output rows, the gate-prescaled compact
weight and bias. A built-in backend's ``eval`` (``Backend.eval``) calls :func:`serve`: for an eval call
made by a layer's forward (``call.owner``) it builds the layer's plan on the first call and caches it
here, keyed by the layer; other backends run the call itself. The cache is rebuilt only when ``weight``,
``bias`` or ``log_alpha`` change, so calls after the first do no host-device synchronisation. A change is
seen through the tensors' identity and storage pointer (a new Parameter, a ``.data`` swap, FSDP's
resharding), their version counters (``t._version``: every in-place op on the parameter or a view of it,
``load_state_dict``, ``copy_``, the for-loop and foreach optimizers, ``constrain_()``), and a count of
optimizer steps: every ``step()`` of any ``torch.optim.Optimizer`` (a global post-step hook) makes every
plan stale, because fused optimizers (``fused=True``) and optimizers that write through ``param.data`` leave
the version counters alone. What none of these sees -- a write through ``param.data`` outside an optimizer
step, or a kernel writing the parameter's memory directly -- needs :func:`clear_eval_cache`.

* linear, ``gate="in"``: ``y = x[:, active] @ (W[:, active] * z[active]).T + b``
* linear, ``gate="out"``: only the active rows are computed and scattered into a zero output
* linear, ``gate="weight"``: ``W * Z`` (dense), minus the rows/columns that are entirely zero
  (a zero row's output is its ungated bias)
* conv2d: a convolution with the active output channels only, scattered into a zero output

Each built-in backend runs a linear plan its own way (:func:`serve`'s ``run_linear``): the torch backend
in PyTorch (:func:`linear_plan_torch`, cuBLAS on CUDA), the Triton backend with the kernels of
:mod:`l0kernels.backends.triton.sparse_eval`, the CUDA backend with ``torch.ops.l0kernels.sparse_linear``
or cuBLAS; conv plans run in PyTorch on every backend.

No plan serves a call that needs autograd (something requires a gradient while autograd records: the
backend's differentiable op runs, so eval-mode fine-tuning works), nor a call under ``torch.compile``
(a trace can hold neither the cache nor a plan's data-dependent shapes: the backend's op runs, dense
GEMMs with the deterministic gates that inductor compiles).

Under ``torch.autocast`` a plan is built in the autocast dtype (gates from the float32 ``log_alpha``,
folded into the float32 weight, rounded once) and cached beside the plan of the parameters' own dtype,
keyed by that dtype; ``x`` is cast like ``F.linear``'s input and the output has the autocast dtype.
The cache lives outside the layer, so ``state_dict``, ``torch.save``, pickling and ``deepcopy`` never
carry it.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import _active
from .._gates import eval_gates_and_grad

# layer -> {plan dtype: (key, plan)}, the latest used last; kept outside the layer so that torch.save /
# deepcopy of a model never carry it
_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class LinearPlan:
    """Compact eval form of a gated linear layer.

    ``y[:, out_idx] = x[:, in_idx] @ weight.T + bias``; the other outputs are ``fill`` (zeros when None).
    ``in_idx`` / ``out_idx`` None mean all columns / all rows (no gather / no scatter).
    """

    in_idx: Optional[torch.Tensor]
    out_idx: Optional[torch.Tensor]
    weight: torch.Tensor  # (N_active, K_active), contiguous, gates folded in
    bias: Optional[torch.Tensor]  # (N_active,)
    fill: Optional[torch.Tensor]  # (N,) value of the rows that are not computed; None = 0
    out_features: int
    in_features: int
    idle_idx: Optional[torch.Tensor] = None  # the outputs not in out_idx (given with out_idx), for one-launch kernels

    @property
    def density(self) -> float:
        full = self.out_features * self.in_features
        return self.weight.numel() / full if full else 1.0


@dataclass
class ConvPlan:
    """Compact eval form of a gated conv: ``y[:, out_idx] = conv2d(x, weight, bias)``, zeros elsewhere."""

    out_idx: Optional[torch.Tensor]
    weight: torch.Tensor  # (C_active, C_in/groups, kh, kw), gates folded in
    bias: Optional[torch.Tensor]
    out_channels: int


# Steps taken by any torch.optim.Optimizer in this process; part of every plan's key (see the module docstring).
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _tensor_key(t: Optional[torch.Tensor]) -> Tuple:
    # identity + storage + version: a new Parameter, a `.data = ...` swap or any tracked in-place update
    return (None,) if t is None else (id(t), t.data_ptr(), t._version)


def _cache_key(call) -> Tuple:
    """What a plan depends on: the op, its options and the parameters' identity and versions."""
    return (call.op, getattr(call, "gate", "out"), call.cfg, getattr(call, "groups", 1), call.group_size,
            _tensor_key(call.weight), _tensor_key(call.bias), _tensor_key(call.log_alpha), _OPTIMIZER_STEPS[0])


def clear_eval_cache(module) -> None:
    """Drop the cached eval plans of ``module`` and its submodules (needed only after writes that neither a
    version counter nor an optimizer step records, e.g. ``param.data`` edits outside ``optimizer.step()``)."""
    for m in module.modules():
        _CACHES.pop(m, None)


def _cached(call, build, dtype: torch.dtype):
    """The plan of ``call.owner`` in ``dtype`` (the parameters' own, or the autocast dtype), built by
    ``build`` when missing or stale. Plans in other dtypes stay cached while the parameters do not change,
    so calls that alternate autocast on and off do not rebuild."""
    key = _cache_key(call)
    plans = _CACHES.get(call.owner)
    if plans is None:
        plans = _CACHES[call.owner] = {}
    entry = plans.pop(dtype, None)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, build())
        for d in [d for d, e in plans.items() if e[0] != key]:  # stale: built from other parameters
            del plans[d]
    plans[dtype] = entry  # last: the latest used
    return entry[1]


def cached_plan(module, dtype: Optional[torch.dtype] = None):
    """The plan cached for ``module`` in ``dtype`` (default: the one used last); None before its first
    eval call in that dtype or after a change."""
    plans = _CACHES.get(module)
    if not plans:
        return None
    if dtype is None:
        return next(reversed(plans.values()))[1]
    entry = plans.get(dtype)
    return None if entry is None else entry[1]


def _z_eval(module) -> torch.Tensor:
    """``z_eval`` per gated feature: a grouped layer's gate repeated over the features of its group.
    ``module``: a layer or a call (both hold ``log_alpha``, ``cfg`` and ``group_size``)."""
    z = eval_gates_and_grad(module.log_alpha.detach(), module.cfg, need_grad=False)[0]
    g = getattr(module, "group_size", 1)
    return z if g == 1 else z.repeat_interleave(g, dim=-1)


def fold_gates(module, dtype: Optional[torch.dtype] = None):
    """``(weight, bias, z)`` of an L0 layer or call with its eval gates folded in: ``w * z`` (``"in"``: per
    column, ``"out"`` and convolutions: per row or channel, bias too; ``"weight"``: per weight, bias ungated)
    in the gate compute dtype, rounded once to ``dtype`` (default the weight's). ``z`` per gated feature."""
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else None
    out = w.dtype if dtype is None else dtype
    z = _z_eval(module)  # float32/float64 gate math
    cd = z.dtype
    gate = "out" if w.dim() == 4 else module.gate
    if gate == "out":
        wz = (w.to(cd) * z.view((-1,) + (1,) * (w.dim() - 1))).to(out)
        return wz, (b.to(cd) * z).to(out) if b is not None else None, z
    return (w.to(cd) * z).to(out), b.to(out) if b is not None else None, z


def build_linear_plan(module, dtype: Optional[torch.dtype] = None) -> LinearPlan:
    """The compact eval form of an ``L0Linear`` or of a ``LinearCall`` (see :class:`LinearPlan`).
    Synchronises once (``nonzero``).

    ``dtype``: the plan's dtype (default the weight's; under autocast the autocast dtype). The gates come
    from ``log_alpha`` as it is and are folded into the weight in the gate compute dtype, then rounded once."""
    wz, bz, z = fold_gates(module, dtype)
    n, k = wz.shape
    gate = module.gate
    in_idx = out_idx = fill = None
    if gate == "in":
        # the open set of the eval gates, found as a training step finds its own (l0kernels._active); a
        # NaN gate is open: its NaN reaches the output, as in the gated op
        idx = _active.open_index(z)
        if idx.numel() == k:
            wc = wz
        else:
            in_idx = idx
            wc = wz.index_select(1, in_idx)
        bc = bz
    elif gate == "out":
        idx = _active.open_index(z)
        if idx.numel() == n:
            wc, bc = wz, bz
        else:
            out_idx = idx
            wc = wz.index_select(0, out_idx)
            bc = bz.index_select(0, out_idx) if bz is not None else None
    else:
        nz = z != 0
        b = bz  # ungated
        rows, cols = nz.any(1), nz.any(0)
        wc, bc = wz, b
        if not bool(cols.all()):
            in_idx = cols.nonzero().flatten()
            wc = wc.index_select(1, in_idx)
        if not bool(rows.all()):
            out_idx = rows.nonzero().flatten()
            wc = wc.index_select(0, out_idx)
            bc = b.index_select(0, out_idx) if b is not None else None
            fill = b  # a row without any open weight outputs its (ungated) bias
    idle_idx = None
    if out_idx is not None:
        idle = torch.ones(n, dtype=torch.bool, device=wz.device)
        idle[out_idx] = False
        idle_idx = idle.nonzero().flatten()
    return LinearPlan(in_idx, out_idx, wc.contiguous(), None if bc is None else bc.contiguous(), fill, n, k,
                      idle_idx)


def build_conv_plan(module, dtype: Optional[torch.dtype] = None) -> ConvPlan:
    """The compact eval form of an ``L0Conv2d`` or a ``Conv2dCall``: active output channels, gates folded into weight and bias
    (``dtype`` as in :func:`build_linear_plan`)."""
    wz, bz, z = fold_gates(module, dtype)
    out_idx = None
    if module.groups == 1:  # grouped convs keep every channel (the groups must stay equal); gates folded in
        idx = _active.open_index(z)  # a NaN gate is open: its NaN reaches the output, as in the gated op
        out_idx = idx if idx.numel() < z.numel() else None
    if out_idx is not None:
        wz = wz.index_select(0, out_idx)
        bz = bz.index_select(0, out_idx) if bz is not None else None
    return ConvPlan(out_idx, wz.contiguous(), bz, z.numel())


# -- running a plan ---------------------------------------------------------------------------------------

def linear_plan_torch(x2: torch.Tensor, plan: LinearPlan) -> torch.Tensor:
    """Run ``plan`` on ``x2`` of shape ``(M, K)`` in PyTorch; returns ``(M, N)``."""
    xg = x2 if plan.in_idx is None else x2.index_select(1, plan.in_idx)
    yc = F.linear(xg, plan.weight, plan.bias)
    if plan.out_idx is None:
        return yc
    m = x2.shape[0]
    if plan.fill is None:
        y = yc.new_zeros(m, plan.out_features)
    else:
        y = plan.fill.expand(m, plan.out_features).clone()
    return y.index_copy_(1, plan.out_idx, yc)


def conv_plan_torch(x: torch.Tensor, plan: ConvPlan, stride, padding, dilation, groups) -> torch.Tensor:
    if plan.out_idx is None:
        return F.conv2d(x, plan.weight, plan.bias, stride, padding, dilation, groups)
    if plan.out_idx.numel() == 0:  # every channel closed: the output is zero (conv2d needs >= 1 channel)
        kh, kw = plan.weight.shape[2:]
        ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return x.new_zeros(x.shape[0], plan.out_channels, ho, wo)
    yc = F.conv2d(x, plan.weight, plan.bias, stride, padding, dilation, groups)
    y = yc.new_zeros(yc.shape[0], plan.out_channels, yc.shape[2], yc.shape[3])
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y.index_copy_(1, plan.out_idx, yc)


_OFF = [0]  # > 0 inside no_plans()


@contextlib.contextmanager
def no_plans():
    """Eval calls inside build no plan (each runs its op with the deterministic gates): for a one-off run of
    a whole model (convert's and compact's check runs), whose plans -- folded weights -- would hold up to the
    model's size again."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


def plan_reasons(call) -> List[str]:
    """Why no eval plan serves ``call`` (empty: one does). A plan serves a layer's eval call that needs no
    autograd, outside a trace (the cache keys on storage addresses and version counters and builds
    data-dependent shapes, none of which a trace can hold; the traced op, dense GEMM and deterministic gates,
    is what inductor compiles)."""
    out = []
    if _OFF[0]:
        out.append("plans are off for this run (backends._plans.no_plans: a one-off check run of a model)")
    if call.training:
        out.append("a training call: plans serve eval calls")
    if call.owner is None:
        out.append("a functional call: plans serve the eval calls of a layer (L0Linear / L0Conv2d)")
    if torch.compiler.is_compiling():
        out.append("inside a torch.compile trace")
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                         for t in (call.x, call.weight, call.bias, call.log_alpha)):
        out.append("autograd records and a tensor requires grad: the differentiable op runs")
    return out


def plan_for(call):
    """The cached plan that serves ``call`` (built on a miss), or None where no plan may serve it."""
    if plan_reasons(call):
        return None
    dtype = call.run_dtype
    if call.op == "linear":
        if call.autocast is None:
            return _cached(call, lambda: build_linear_plan(call), dtype)
        return _cached(call, lambda: build_linear_plan(call, dtype), dtype)
    if call.autocast is None:
        return _cached(call, lambda: build_conv_plan(call), dtype)
    return _cached(call, lambda: build_conv_plan(call, dtype), dtype)


def plan_signature(call) -> Tuple:
    """The shape of the plan that serves ``call`` (part of the autotuner's key), or ``()`` where none does."""
    plan = plan_for(call)
    if plan is None:
        return ()
    if isinstance(plan, ConvPlan):
        return (tuple(plan.weight.shape),)
    return (tuple(plan.weight.shape), plan.in_idx is not None, plan.out_idx is not None, plan.fill is not None)


LinearRunner = Callable[[torch.Tensor, LinearPlan], torch.Tensor]


def serve(backend, call, run_linear: LinearRunner = linear_plan_torch) -> torch.Tensor:
    """The eval forward of a built-in backend: ``call`` on its owner's cached plan -- a linear plan run by
    ``run_linear(x2, plan)`` on ``x`` viewed as ``(M, K)``, a conv plan in PyTorch -- or, where no plan may
    serve it, the backend's own op on the (cast) call."""
    plan = plan_for(call)
    if plan is None:
        return backend.run(call.cast())
    x = call.x if call.autocast is None else call.x.to(plan.weight.dtype)
    if call.op == "conv2d":
        return conv_plan_torch(x, plan, call.stride, call.padding, call.dilation, call.groups)
    if x.dim() == 2:  # the common case, without reshapes
        return run_linear(x, plan)
    x2 = x.reshape(math.prod(x.shape[:-1]), plan.in_features)  # -1 fails when k == 0
    return run_linear(x2, plan).reshape(*x.shape[:-1], plan.out_features)


__all__ = ["serve", "plan_for", "plan_reasons", "no_plans", "plan_signature", "clear_eval_cache", "cached_plan",
           "build_linear_plan", "build_conv_plan", "LinearPlan", "ConvPlan", "linear_plan_torch", "conv_plan_torch"]
