"""Backend registry and dispatch (xformers style): the one route of every gated op, training and eval.

``l0_linear`` / ``l0_conv2d`` and the layers' forward (:mod:`l0kernels.functional`) check their arguments
once (:mod:`l0kernels._checks`) into a :class:`LinearCall` / :class:`Conv2dCall`, and :func:`dispatch` hands
it to one backend: its ``run`` in training, its ``eval`` with ``training=False`` (the built-in backends
serve a layer's eval calls from its cached eval plan, :mod:`l0kernels.backends._plans`; any other backend
runs the call with the deterministic gates).

Each backend states, for a concrete call, every reason it cannot take it (:meth:`Backend.explain`, xformers
style: an empty list where it can) and, for a call it can run, why each of its own paths does not take it
(:meth:`Backend.explain_paths`); :func:`explain` gathers both over the registered backends.
``backend="auto"`` asks the registered backends in priority order and, where more than one can run a call
on a GPU, lets the autotuner (:mod:`l0kernels._autotune`) time them once per call signature; under
``torch.compile`` ``auto`` is the torch backend (nothing can be timed in a trace, and inductor fuses its
plain ops). Naming a backend that cannot run the call raises ``ValueError`` with its reasons.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import _active
from ._autotune import AUTOTUNER
from ._gates import GateConfig

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")


def run_dtype(t: torch.Tensor, autocast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype ``t`` runs in: under autocast (``autocast`` is its dtype) floating tensors other than
    float64 are cast to it, as autocast's lower-precision ops (``F.linear``, ``F.conv2d``) cast them."""
    if autocast is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return autocast


def autocast_cast(t: Optional[torch.Tensor], autocast: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """``t`` in :func:`run_dtype` (differentiable: gradients reach ``t`` in its own dtype)."""
    if t is None:
        return None
    dt = run_dtype(t, autocast)
    return t if dt == t.dtype else t.to(dt)


class _Call:
    """What both calls share: the dtype they run in and the autocast cast."""

    x: torch.Tensor
    weight: torch.Tensor
    log_alpha: torch.Tensor
    bias: Optional[torch.Tensor]
    autocast: Optional[torch.dtype]

    def cast(self):
        """The call as it runs: under ``torch.autocast`` (``autocast`` set) ``x``, ``weight``, ``bias`` and
        ``log_alpha`` cast like ``F.linear``'s inputs (float64 is not cast; differentiable casts, so the
        gradients reach float32 parameters in float32); else the call itself."""
        if self.autocast is None:
            return self
        ac = self.autocast
        return dataclasses.replace(self, x=autocast_cast(self.x, ac), weight=autocast_cast(self.weight, ac),
                                   log_alpha=autocast_cast(self.log_alpha, ac), bias=autocast_cast(self.bias, ac),
                                   autocast=None)

    @property
    def run_dtype(self) -> torch.dtype:
        """The dtype the op runs in (the weight's, or the autocast dtype)."""
        return run_dtype(self.weight, self.autocast)


@dataclass
class LinearCall(_Call):
    """A validated ``l0_linear`` call. ``seed`` (when ``training``, else None): an int in [0, 2**63) or a
    0-d int64 tensor (any device; its low 63 bits are the key, ``_philox.seed_bits``). ``autocast``: the
    dtype of an enclosing ``torch.autocast`` (the tensors are held as given; :meth:`cast` casts them).
    ``owner``: the layer whose forward made an eval call (its cached eval plans may serve it), else None."""

    x: torch.Tensor
    weight: torch.Tensor
    log_alpha: torch.Tensor
    bias: Optional[torch.Tensor]
    seed: Optional[Union[int, torch.Tensor]]
    gate: str
    noise: str
    training: bool
    cfg: GateConfig
    group_size: int = 1  # features (input or output) per gate; gate j controls j*g ... j*g+g-1
    autocast: Optional[torch.dtype] = None
    owner: Optional[torch.nn.Module] = None

    op = "linear"

    def signature(self) -> Tuple:
        rows = self.x.numel() // max(self.x.shape[-1], 1) if self.x.dim() else 0
        return (self.op, self.x.device.type, self.x.dtype, self.autocast, rows, tuple(self.weight.shape), self.gate,
                self.noise, self.training, self.bias is not None, self.group_size)


@dataclass
class Conv2dCall(_Call):
    """A validated ``l0_conv2d`` call; stride/padding/dilation are int pairs; ``seed``, ``autocast`` and
    ``owner`` as in :class:`LinearCall`."""

    x: torch.Tensor
    weight: torch.Tensor
    log_alpha: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    seed: Optional[Union[int, torch.Tensor]]
    noise: str
    training: bool
    cfg: GateConfig
    group_size: int = 1  # output channels per gate
    autocast: Optional[torch.dtype] = None
    owner: Optional[torch.nn.Module] = None

    op = "conv2d"

    def signature(self) -> Tuple:
        cl = self.x.is_contiguous(memory_format=torch.channels_last) and not self.x.is_contiguous()
        return (self.op, self.x.device.type, self.x.dtype, self.autocast, tuple(self.x.shape), tuple(self.weight.shape),
                self.stride, self.padding, self.dilation, self.groups, self.noise, self.training,
                self.bias is not None, cl, self.group_size)


class Backend:
    """Interface of a backend. Subclasses set ``name``/``priority``, override ``linear`` / ``conv2d`` and say
    which calls they decline: :meth:`explain` (every reason), or for one reason per op the hooks
    ``unsupported_linear`` / ``unsupported_conv2d`` that the default ``explain`` reads. They may override
    ``eval`` and :meth:`explain_paths`.

    ``priority``: higher is preferred by ``auto`` when timing is not possible (CPU) or disabled.
    ``auto_eligible``: False keeps a backend out of ``auto`` (the Triton interpreter, for one).
    ``linear`` / ``conv2d`` take a call whose tensors share one dtype (:meth:`_Call.cast` has run).
    """

    name = "?"
    priority = 0

    def unsupported_linear(self, call: LinearCall) -> Optional[str]:
        """The reason this backend declines a linear call, or None (read by the default :meth:`explain` only:
        a backend that overrides ``explain`` need not define it; ask ``explain`` or ``why_not``)."""
        return f"backend '{self.name}' does not implement l0_linear"

    def unsupported_conv2d(self, call: Conv2dCall) -> Optional[str]:
        """As :meth:`unsupported_linear`, for a conv2d call."""
        return f"backend '{self.name}' does not implement l0_conv2d"

    def explain(self, call) -> List[str]:
        """Every reason this backend declines ``call`` (a checked call, before the autocast cast); empty where
        it can run it. The one source of :meth:`why_not` and of the errors of ``backend=`` and ``auto``."""
        why = self.unsupported_linear(call) if call.op == "linear" else self.unsupported_conv2d(call)
        return [] if why is None else [why]

    def explain_paths(self, call) -> Dict[str, List[str]]:
        """For a call this backend runs (``call`` cast, as its ``linear`` / ``conv2d`` get it): per path of its
        own (fast path, kernel variant, eval plan), why that path does not take the call, ``[]`` where it
        does (or may: a choice the autotuner makes when the call runs). Predicted from the call and the state
        the backend keeps (the layer's last known open fraction), nothing run. Default: no paths."""
        return {}

    def linear(self, call: LinearCall) -> torch.Tensor:  # pragma: no cover - interface
        raise RuntimeError(self.unsupported_linear(call))

    def conv2d(self, call: Conv2dCall) -> torch.Tensor:  # pragma: no cover - interface
        raise RuntimeError(self.unsupported_conv2d(call))

    def auto_eligible(self, call) -> bool:
        return True

    def rows_reasons(self, x: torch.Tensor, weight: torch.Tensor,
                     log_alpha: Optional[torch.Tensor] = None) -> List[str]:
        """Why this backend does not run a structure gate's producer over its open rows on the device
        (:meth:`rows_linear`, docs/design.md §11) for input ``x`` and ``weight``; empty where it does.
        ``log_alpha``: the structure gate's, whose last known open fraction the backend's skip threshold reads
        (as for ``l0_linear``'s open-set path). Default: no such kernels."""
        return [f"backend '{self.name}' has no device kernels for a structure gate's producer"]

    def rows_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    open_rows) -> torch.Tensor:
        """``x @ W.T + b`` with only the rows of ``open_rows`` (an :class:`l0kernels._active.OpenSet`) computed,
        the others exact zeros, forward and backward; nothing read on the host. Called where
        :meth:`rows_reasons` gives none."""
        raise RuntimeError("; ".join(self.rows_reasons(x, weight)))

    def why_not(self, call) -> Optional[str]:
        """:meth:`explain`'s reasons in one string, or None where the backend can run ``call``."""
        reasons = self.explain(call)
        return "; ".join(reasons) if reasons else None

    def run(self, call) -> torch.Tensor:
        return self.linear(call) if call.op == "linear" else self.conv2d(call)

    def tune_key(self, call) -> Tuple:
        """What, beyond ``call.signature()``, decides how fast this backend runs ``call`` (part of the
        autotuner's key for ``auto``). The built-in backends add the shape of the eval plan that serves an
        eval call (how much it skips)."""
        return ()

    def eval(self, call) -> torch.Tensor:
        """An eval call (``training=False``, deterministic gates), as it was checked (before the autocast
        cast). Default: the backend's own ``linear`` / ``conv2d`` on the cast call. The built-in backends
        run the owner's cached eval plan where one may serve (:func:`l0kernels.backends._plans.serve`)."""
        return self.run(call.cast())


_REGISTRY: Dict[str, Backend] = {}
_LOADERS: Dict[str, Callable[[], Optional[Backend]]] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    AUTOTUNER.clear()  # picks made without it (or with a backend it replaces) are stale
    return backend


def register_lazy(name: str, loader: Callable[[], Optional[Backend]]) -> None:
    """Register a backend whose module is imported on first use (Triton and CUDA are heavy)."""
    _LOADERS[name] = loader


def _load_all() -> None:
    for name, loader in list(_LOADERS.items()):
        if name not in _REGISTRY:
            loader()  # the loader registers the backend itself
        _LOADERS.pop(name, None)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY and name in _LOADERS:
        _LOADERS.pop(name)()  # import only the backend asked for (the torch backend never imports triton)
    if name not in _REGISTRY:
        raise ValueError(f"backend '{name}' is not registered (registered: {sorted(_REGISTRY)})")
    return _REGISTRY[name]


def backend_names() -> Tuple[str, ...]:
    """Names ``backend=`` accepts: the contract's (docs/design.md) four plus any backend a user registered."""
    extra = tuple(sorted(n for n in list(_REGISTRY) + list(_LOADERS) if n not in BACKEND_NAMES))
    return BACKEND_NAMES + extra


def is_backend_name(name) -> bool:
    """Whether ``backend=name`` names a backend (:func:`backend_names`, without building the list)."""
    return isinstance(name, str) and (name in BACKEND_NAMES or name in _REGISTRY or name in _LOADERS)


def available_backends(call=None) -> List[str]:
    """Names of registered backends (that can run ``call``, when given)."""
    _load_all()
    names = sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority)
    if call is None:
        return names
    return [n for n in names if _REGISTRY[n].why_not(call) is None]


def select_backend(call, name: str) -> Backend:
    """The backend that runs ``call``: the named one (or an error giving its reasons), or auto's pick."""
    if name != "auto":
        b = get_backend(name)
        why = b.why_not(call)
        if why is not None:
            raise ValueError(f"backend='{name}' cannot run this {call.op} call: {why}")
        return b
    if torch.compiler.is_compiling():
        # under a trace nothing can be timed or imported: auto runs the torch backend, whose plain ops
        # inductor traces and fuses (a named backend runs its own custom ops)
        return get_backend("torch")
    _load_all()
    cands = [b for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)
             if b.auto_eligible(call) and b.why_not(call) is None]
    if not cands:
        reasons = " | ".join(f"{n}: {b.why_not(call) or 'auto does not pick it for this call'}"
                             for n, b in _REGISTRY.items())
        raise ValueError(f"no backend can run this {call.op} call ({reasons})")
    pick = AUTOTUNER.pick(lambda: _tune_key(call, cands), {b.name: (lambda b=b: forward(b, call)) for b in cands},
                          call.x.device)
    return _REGISTRY[pick]


def explain(call, name: str = "auto") -> Dict[str, List[str]]:
    """Why each backend declines the checked ``call`` and why each path of those that run it does not take it:
    ``{backend: reasons}`` (:meth:`Backend.explain`, ``[]``: it can run the call) and, for a backend that can,
    ``{"backend/path": reasons}`` (:meth:`Backend.explain_paths` of the call as the backend gets it, ``[]``:
    that path takes it). ``name``: one backend, or ``"auto"`` for every registered one, highest priority
    first. No op runs (the torch backend draws a training call's gates to tell whether it skips closed
    groups); the Triton and CUDA backends are imported as ``auto`` would import them."""
    if name == "auto":
        _load_all()
        backends = sorted(_REGISTRY.values(), key=lambda b: -b.priority)
    else:
        backends = [get_backend(name)]
    out: Dict[str, List[str]] = {}
    for b in backends:
        out[b.name] = list(b.explain(call))
        if not out[b.name]:
            for path, reasons in b.explain_paths(call.cast()).items():
                out[f"{b.name}/{path}"] = list(reasons)
    return out


def _tune_key(call, cands: List[Backend]) -> Tuple:
    """The autotuner's key of ``call``: its signature, what else the candidates' speed depends on, and for a
    training call with one gate vector the tenth of the layer's open fraction (``_active.density_tenth``):
    a backend that skips closed groups may win only once the gates have closed, so ``auto`` times the
    candidates again each time a sparsifying layer's density enters another tenth (at most ten times)."""
    return (call.signature(),) + tuple(b.tune_key(call) for b in cands) + (_active.density_tenth(call),)


def forward(backend: Backend, call) -> torch.Tensor:
    """``call`` on ``backend``: its ``run`` in training, its ``eval`` otherwise; under ``torch.autocast``
    with autocast off (the op casts its inputs itself, as ``F.linear`` does)."""
    if call.autocast is None:
        return backend.run(call) if call.training else backend.eval(call)
    with torch.autocast(call.x.device.type, enabled=False):
        return backend.run(call.cast()) if call.training else backend.eval(call)


def dispatch(call, name: str) -> torch.Tensor:
    """Run a checked call on the backend ``name`` (or ``auto``'s pick)."""
    return forward(select_backend(call, name), call)
