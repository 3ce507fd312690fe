"""Eval-mode forward of the L0 modules: structured-sparse paths that skip the zero-gated groups.

At test time the gates ``z_eval`` are deterministic and many are exactly 0 (SPEC section 1). On the
first eval call a module builds a :class:`LinearPlan` / :class:`ConvPlan` -- the active input columns
and/or output rows, the gate-prescaled compact weight and bias -- and caches it on itself. The cache
is rebuilt only when ``weight``, ``bias`` or ``log_alpha`` change, detected through the tensors'
identity, storage pointer and version counter (``t._version``; every in-place update through
autograd-visible ops, ``optimizer.step()``, ``load_state_dict`` and ``constrain_()`` bumps it), so
calls after the first do no host-device synchronisation. Updates made through ``param.data`` are not
seen by version counters: call :func:`clear_eval_cache` after those.

* linear, ``gate="in"``: ``y = x[:, active] @ (W[:, active] * z[active]).T + b``
* linear, ``gate="out"``: only the active rows are computed and scattered into a zero output
* linear, ``gate="weight"``: ``W * Z`` (dense), minus the rows/columns that are entirely zero
  (a zero row's output is its ungated bias)
* conv2d: a convolution with the active output channels only, scattered into a zero output

On CUDA the linear plans have three paths: the Triton kernels of
:mod:`l0kernels.backends.triton.sparse_eval` (``backend="triton"``; the gather of ``x``'s columns happens
inside the GEMM loads; a GEMV kernel serves batches of 1-16 rows), the CUDA extension's
``torch.ops.l0kernels.sparse_linear`` (``backend="cuda"``; the tensor-core GEMM of ``csrc/l0_gemm.cuh``
with the gather in its loads and the scatter of the active outputs in its epilogue; float16 / bfloat16,
sm_80+, else cuBLAS on the plan) and PyTorch (cuBLAS on the compact weight). ``backend="auto"`` times
those that can run once per call signature and keeps the fastest. On CPU the plans run in PyTorch, or
in the Triton interpreter when ``backend="triton"`` and ``TRITON_INTERPRET=1``.
A named backend (not ``auto`` / ``torch``) is asked the dispatcher's question on the checked eval call,
once per call signature (:func:`_named_backend_route`): where it cannot run the call, eval raises its
``ValueError`` as training does; a user-registered backend serves eval through its own ``run``.

When autograd is recording and something requires a gradient, the differentiable
``l0_linear(..., training=False)`` / ``l0_conv2d`` path runs instead, so eval-mode fine-tuning works.
Under ``torch.compile`` that path runs too (a trace can hold neither the cache nor a plan's
data-dependent shapes): dense GEMMs with the deterministic gates, fused by inductor.

Under ``torch.autocast`` a plan is built in the autocast dtype (gates from the float32 ``log_alpha``,
folded into the float32 weight, rounded once) and cached beside the plan of the parameters' own dtype,
keyed by that dtype; ``x`` is cast like ``F.linear``'s input and the output has the autocast dtype.
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import math

import torch
import torch.nn.functional as F

from ._checks import autocast_dtype, conv2d_call, linear_call, run_dtype
from ._dispatch import select_backend
from ._gates import eval_gates_and_grad
from .functional import l0_conv2d, l0_linear

# module -> {plan dtype: (key, plan)}, the latest used last; kept outside the module so that torch.save /
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


def _tensor_key(t: Optional[torch.Tensor]) -> Tuple:
    # identity + storage + version: a new Parameter, a `.data = ...` swap or any tracked in-place update
    return (None,) if t is None else (id(t), t.data_ptr(), t._version)


def _cache_key(module, kind: str) -> Tuple:
    # straight from the instance dicts: nn.Module.__getattr__ (and getattr with a default, which raises
    # inside) cost microseconds per call, which a batch-1 eval call cannot spare
    d = module.__dict__
    p = d["_parameters"]
    return (kind, d.get("gate", "out"), d["cfg"], d.get("groups", 1), d.get("group_size", 1),
            _tensor_key(p["weight"]), _tensor_key(p.get("bias")), _tensor_key(p["log_alpha"]))


def clear_eval_cache(module) -> None:
    """Drop the cached eval plans of ``module`` and its submodules (needed only after ``.data`` edits)."""
    for m in module.modules():
        _CACHES.pop(m, None)
        _ROUTES.pop(m, None)


def _cached(module, kind: str, build, dtype: torch.dtype):
    """The plan of ``module`` in ``dtype`` (the parameters' own, or the autocast dtype), built by ``build``
    when missing or stale. Plans in other dtypes stay cached while the parameters do not change, so
    calls that alternate autocast on and off do not rebuild."""
    key = _cache_key(module, kind)
    plans = _CACHES.get(module)
    if plans is None:
        plans = _CACHES[module] = {}
    entry = plans.pop(dtype, None)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, build(module))
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
    """``z_eval`` per gated feature: a grouped layer's gate repeated over the features of its group."""
    z = eval_gates_and_grad(module.log_alpha.detach(), module.cfg, need_grad=False)[0]
    g = getattr(module, "group_size", 1)
    return z if g == 1 else z.repeat_interleave(g, dim=-1)


def build_linear_plan(module, dtype: Optional[torch.dtype] = None) -> LinearPlan:
    """The compact eval form of an ``L0Linear`` (see :class:`LinearPlan`). Synchronises once (``nonzero``).

    ``dtype``: the plan's dtype (default the weight's; under autocast the autocast dtype). The gates come
    from ``log_alpha`` as it is and are folded into the weight in the gate compute dtype, then rounded once."""
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else None
    out = w.dtype if dtype is None else dtype
    n, k = w.shape
    z = _z_eval(module)  # float32/float64 gate math
    cd = z.dtype
    gate = module.gate
    in_idx = out_idx = fill = None
    if gate == "in":
        keep = z != 0  # a NaN gate is kept: its NaN reaches the output, as in the gated op
        wz = (w.to(cd) * z).to(out)
        if bool(keep.all()):
            wc = wz
        else:
            in_idx = keep.nonzero().flatten()
            wc = wz.index_select(1, in_idx)
        bc = b.to(out) if b is not None else None
    elif gate == "out":
        keep = z != 0  # a NaN gate is kept: its NaN reaches the output, as in the gated op
        wz = (w.to(cd) * z[:, None]).to(out)
        bz = (b.to(cd) * z).to(out) if b is not None else None
        if bool(keep.all()):
            wc, bc = wz, bz
        else:
            out_idx = keep.nonzero().flatten()
            wc = wz.index_select(0, out_idx)
            bc = bz.index_select(0, out_idx) if bz is not None else None
    else:
        nz = z != 0
        wz = (w.to(cd) * z).to(out)
        b = b.to(out) if b is not None else None
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
        idle = torch.ones(n, dtype=torch.bool, device=w.device)
        idle[out_idx] = False
        idle_idx = idle.nonzero().flatten()
    return LinearPlan(in_idx, out_idx, wc.contiguous(), None if bc is None else bc.contiguous(), fill, n, k,
                      idle_idx)


def build_conv_plan(module, dtype: Optional[torch.dtype] = None) -> ConvPlan:
    """The compact eval form of an ``L0Conv2d``: active output channels, gates folded into weight and bias
    (``dtype`` as in :func:`build_linear_plan`)."""
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else None
    out = w.dtype if dtype is None else dtype
    z = _z_eval(module)
    cd = z.dtype
    wz = (w.to(cd) * z[:, None, None, None]).to(out)
    bz = (b.to(cd) * z).to(out) if b is not None else None
    keep = z != 0  # a NaN gate is kept: its NaN reaches the output, as in the gated op
    out_idx = None
    if module.groups == 1 and not bool(keep.all()):
        # grouped convs keep every channel (the groups must stay equal); their gates are folded in
        out_idx = keep.nonzero().flatten()
        wz = wz.index_select(0, out_idx)
        bz = bz.index_select(0, out_idx) if bz is not None else None
    return ConvPlan(out_idx, wz.contiguous(), bz, w.shape[0])


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


_TRITON_EVAL = None  # (module or None, reason)


def _triton_eval():
    """The Triton eval kernels module, or ``(None, reason)`` when it cannot be imported."""
    global _TRITON_EVAL
    if _TRITON_EVAL is None:
        try:
            from .backends.triton import sparse_eval
            _TRITON_EVAL = (sparse_eval, None)
        except ImportError as e:  # triton missing or broken
            _TRITON_EVAL = (None, f"l0kernels.backends.triton.sparse_eval could not be imported ({e})")
    return _TRITON_EVAL


def _use_triton_linear(backend: str, x: torch.Tensor) -> bool:
    """Whether the Triton eval kernels run this call. With ``backend="triton"`` the dispatcher has already
    asked the Triton backend (:func:`_named_backend_route`; its conditions are the eval kernels'), so only
    a failed import of the eval kernels is left to raise; ``auto`` takes them for CUDA tensors they support."""
    if backend == "triton":
        mod, reason = _triton_eval()
        if mod is None:
            raise ValueError(f"backend='triton' cannot run this linear call: {reason}")
        return True
    if backend != "auto" or not x.is_cuda:
        return False
    mod = _triton_eval()[0]
    return mod is not None and x.dtype in mod.SUPPORTED_DTYPES


def _cuda_eval_why_not(x: torch.Tensor) -> Optional[str]:
    """Why the CUDA extension's eval kernel (``torch.ops.l0kernels.sparse_linear``) cannot run ``x``, or None."""
    if not x.is_cuda:
        return "the CUDA eval kernel needs a CUDA tensor"
    try:
        from .backends import cuda as cuda_backend
    except ImportError as e:
        return str(e)
    return cuda_backend.fused_why_not(x)


def _cuda_sparse_linear(x2: torch.Tensor, plan: LinearPlan) -> torch.Tensor:
    return torch.ops.l0kernels.sparse_linear(x2, plan.weight, plan.bias, plan.in_idx, plan.out_idx, plan.idle_idx,
                                             plan.fill, plan.out_features)


def _triton_sparse_linear(x2: torch.Tensor, plan: LinearPlan) -> torch.Tensor:
    return _triton_eval()[0].sparse_linear(x2, plan)


def _linear_runners(backend: str, x: torch.Tensor) -> dict:
    """The eval paths that may run this call, by name, in the order ``auto`` prefers untimed.

    ``torch``: the reference (PyTorch on the compact plan, cuBLAS on CUDA); ``triton``: the Triton
    kernels (``backend="triton"`` raises when they cannot run); ``cuda``: the extension's kernel (the
    GEMV for 1-16 rows in any dtype, the tensor-core GEMM above for float16 / bfloat16 on sm_80+).
    ``backend="cuda"`` is the extension plus cuBLAS, as in training: the CUDA backend's forward choice
    (``L0K_CUDA_GEMM`` / ``gemm_impl``) applies, ``fused`` taking the kernel where it can run,
    ``two_pass`` the cuBLAS plan path, ``auto`` the faster of the two (timed once)."""
    if backend == "torch":
        return {"torch": linear_plan_torch}
    runners = {}
    if _use_triton_linear(backend, x):
        runners["triton"] = _triton_sparse_linear
    if backend in ("auto", "cuda") and _cuda_eval_why_not(x) is None:
        runners["cuda"] = _cuda_sparse_linear
        if backend == "cuda":
            from .backends import cuda as cuda_backend
            if cuda_backend.GEMM_IMPL == "fused":
                return runners
            if cuda_backend.GEMM_IMPL == "two_pass":
                return {"torch": linear_plan_torch}
    if backend != "triton":
        runners["torch"] = linear_plan_torch
    return runners


_AUTO_CHOICE = {}  # CUDA call signature -> name of the eval path that won the timing


def _time_ms(fn, x, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize(x.device)
    return (time.perf_counter() - t0) / reps


def _auto_pick(x2: torch.Tensor, plan: LinearPlan, runners: dict) -> str:
    """``backend="auto"`` with more than one path: measured once per signature (like the dispatcher's
    auto: "measured, not guessed"); ``L0K_AUTO_TUNE=0`` takes the first path untimed."""
    if os.environ.get("L0K_AUTO_TUNE", "1") == "0" or not x2.is_cuda:
        return next(iter(runners))
    key = (x2.device, x2.dtype, x2.shape[0], tuple(plan.weight.shape), plan.in_idx is not None,
           plan.out_idx is not None, plan.fill is not None, plan.out_features, tuple(runners))
    if key not in _AUTO_CHOICE:
        times = {name: _time_ms(lambda fn=fn: fn(x2, plan), x2) for name, fn in runners.items()}
        _AUTO_CHOICE[key] = min(times, key=times.get)
    return _AUTO_CHOICE[key]


def _needs_autograd(x, module) -> bool:
    """True where eval runs the gated op itself: with autograd, and under ``torch.compile`` (the plan cache
    keys on storage addresses and version counters and builds data-dependent shapes, none of which a
    trace can hold; the traced op, dense GEMM and deterministic gates, is what inductor compiles)."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p is not None and p.requires_grad
                                  for p in (module.weight, module.bias, module.log_alpha))


# module -> {(backend, x's device/dtype/shape, autocast dtype): (parameter key, served by the plan)}
_ROUTES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _named_backend_route(module, kind: str, x: torch.Tensor, ac: Optional[torch.dtype], make_call) -> bool:
    """Eval with a named backend (not ``auto`` / ``torch``): asks it the dispatcher's question on the checked
    eval call (``make_call()``), so a backend that cannot run the call raises
    ``ValueError("backend='X' cannot run this ... call: <why>")`` as in training, before any kernel runs.
    Returns True where the eval plan serves the call (the built-in backends: their eval kernels, or the plan
    in PyTorch), False where the backend's own ``run`` must (a user-registered backend). Asked once per
    call signature and parameter state."""
    backend = module.__dict__["backend"]
    sig = (backend, x.device, x.dtype, x.shape, ac)
    key = _cache_key(module, kind)
    routes = _ROUTES.get(module)
    if routes is None:
        routes = _ROUTES[module] = {}
    hit = routes.get(sig)
    if hit is not None and hit[0] == key:
        return hit[1]
    b = select_backend(make_call(), backend)  # raises with the backend's reason
    plan = type(b).__module__.startswith("l0kernels.")
    routes[sig] = (key, plan)
    return plan


def _validate_linear(module, x, autocast: Optional[torch.dtype] = None):
    c = module.cfg
    return linear_call(x, module.weight, module.log_alpha, module.bias, seed=None, gate=module.gate,
                       noise=module.noise, training=False, backend=module.backend, beta=c.beta, gamma=c.gamma,
                       zeta=c.zeta, eps=c.eps, autocast=autocast, group_size=module.group_size)


def _build_checked_linear_plan(module, x, autocast: Optional[torch.dtype] = None):
    _validate_linear(module, x, autocast)  # the full check of the layer's tensors, once per plan
    if autocast is None:
        return build_linear_plan(module)
    return build_linear_plan(module, run_dtype(module.weight, autocast))


def eval_linear(module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode ``L0Linear`` forward; equals ``l0_linear(..., training=False)`` up to rounding."""
    w = module.__dict__["_parameters"]["weight"]
    ac = autocast_dtype(x)
    # per-call checks of x (the layer's own tensors are checked when its plan is built); the full check
    # runs, and raises with its message, when one fails
    if ac is None:
        pdt = w.dtype
        if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == w.shape[1] and x.dtype == pdt
                and x.device == w.device):
            _validate_linear(module, x)
    else:  # torch.autocast: x and the plan in the dtype autocast runs them in
        pdt = run_dtype(w, ac)
        if not (x.dim() >= 1 and x.shape[-1] == w.shape[1] and run_dtype(x, ac) == pdt and x.device == w.device):
            _validate_linear(module, x, ac)
    backend = module.__dict__["backend"]
    if _needs_autograd(x, module) or (
            backend not in ("auto", "torch")
            and not _named_backend_route(module, "linear", x, ac, lambda: _validate_linear(module, x, ac))):
        c = module.cfg
        return l0_linear(x, module.weight, module.log_alpha, module.bias, gate=module.gate, noise=module.noise,
                         training=False, backend=module.backend, beta=c.beta, gamma=c.gamma, zeta=c.zeta,
                         eps=c.eps, group_size=module.group_size)
    plan = _cached(module, "linear", lambda mod: _build_checked_linear_plan(mod, x, ac), pdt)
    if ac is None:
        return _run_linear_plan(module, x, plan)
    with torch.autocast(x.device.type, enabled=False):
        return _run_linear_plan(module, x.to(pdt), plan)


def _run_linear_plan(module, x: torch.Tensor, plan: LinearPlan) -> torch.Tensor:
    runners = _linear_runners(module.__dict__["backend"], x)
    if x.dim() == 2:  # the common case, without reshapes
        name = next(iter(runners)) if len(runners) == 1 else _auto_pick(x, plan, runners)
        return runners[name](x, plan)
    x2 = x.reshape(math.prod(x.shape[:-1]), plan.in_features)  # -1 fails when k == 0
    name = next(iter(runners)) if len(runners) == 1 else _auto_pick(x2, plan, runners)
    return runners[name](x2, plan).reshape(*x.shape[:-1], plan.out_features)


def eval_conv2d(module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode ``L0Conv2d`` forward: a convolution over the active output channels only."""
    c = module.cfg
    ac = autocast_dtype(x)
    call = conv2d_call(x, module.weight, module.log_alpha, module.bias, module.stride, module.padding,
                       module.dilation, module.groups, seed=None, noise=module.noise, training=False,
                       backend=module.backend, beta=c.beta, gamma=c.gamma, zeta=c.zeta, eps=c.eps, autocast=ac,
                       group_size=module.group_size)
    if _needs_autograd(x, module) or (module.backend not in ("auto", "torch")
                                      and not _named_backend_route(module, "conv2d", x, ac, lambda: call)):
        return l0_conv2d(x, module.weight, module.log_alpha, module.bias, module.stride, module.padding,
                         module.dilation, module.groups, noise=module.noise, training=False,
                         backend=module.backend, beta=c.beta, gamma=c.gamma, zeta=c.zeta, eps=c.eps,
                         group_size=module.group_size)
    if ac is None:
        plan = _cached(module, "conv2d", build_conv_plan, module.weight.dtype)
        return conv_plan_torch(x, plan, call.stride, call.padding, call.dilation, call.groups)
    pdt = run_dtype(module.weight, ac)
    plan = _cached(module, "conv2d", lambda mod: build_conv_plan(mod, pdt), pdt)
    with torch.autocast(x.device.type, enabled=False):
        return conv_plan_torch(x.to(pdt), plan, call.stride, call.padding, call.dilation, call.groups)


__all__ = ["eval_linear", "eval_conv2d", "clear_eval_cache", "cached_plan", "build_linear_plan", "build_conv_plan",
           "LinearPlan", "ConvPlan", "linear_plan_torch", "conv_plan_torch"]
