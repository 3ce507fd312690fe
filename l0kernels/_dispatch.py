"""Backend registry and dispatch (xformers style).

Each backend states, for a concrete call, why it cannot take it (a string) or ``None`` if it
can. ``backend="auto"`` asks the registered backends in priority order and, where more than
one can run a call on a GPU, times them once per call signature and remembers the winner
("measured, not guessed", like ``cudnn.benchmark``); under ``torch.compile`` ``auto`` is the torch
backend (nothing can be timed in a trace, and inductor fuses its plain ops). Naming a backend that cannot run the
call raises ``ValueError`` with its reason.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ._gates import GateConfig

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")


@dataclass
class LinearCall:
    """A validated ``l0_linear`` call. ``seed`` (when ``training``, else None): an int in [0, 2**63) or a
    0-d int64 tensor (any device; its low 63 bits are the key, ``_philox.seed_bits``)."""

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

    op = "linear"

    def signature(self) -> Tuple:
        rows = self.x.numel() // max(self.x.shape[-1], 1) if self.x.dim() else 0
        return (self.op, self.x.device.type, self.x.dtype, rows, tuple(self.weight.shape), self.gate,
                self.noise, self.training, self.bias is not None, self.group_size)


@dataclass
class Conv2dCall:
    """A validated ``l0_conv2d`` call; stride/padding/dilation are int pairs."""

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

    op = "conv2d"

    def signature(self) -> Tuple:
        cl = self.x.is_contiguous(memory_format=torch.channels_last) and not self.x.is_contiguous()
        return (self.op, self.x.device.type, self.x.dtype, tuple(self.x.shape), tuple(self.weight.shape),
                self.stride, self.padding, self.dilation, self.groups, self.noise, self.training,
                self.bias is not None, cl, self.group_size)


class Backend:
    """Interface of a backend. Subclasses override the four methods and set ``name``/``priority``.

    ``priority``: higher is preferred by ``auto`` when timing is not possible (CPU) or disabled.
    ``auto_eligible``: False keeps a backend out of ``auto`` (the Triton interpreter, for one).
    """

    name = "?"
    priority = 0

    def unsupported_linear(self, call: LinearCall) -> Optional[str]:
        return f"backend '{self.name}' does not implement l0_linear"

    def unsupported_conv2d(self, call: Conv2dCall) -> Optional[str]:
        return f"backend '{self.name}' does not implement l0_conv2d"

    def linear(self, call: LinearCall) -> torch.Tensor:  # pragma: no cover - interface
        raise RuntimeError(self.unsupported_linear(call))

    def conv2d(self, call: Conv2dCall) -> torch.Tensor:  # pragma: no cover - interface
        raise RuntimeError(self.unsupported_conv2d(call))

    def auto_eligible(self, call) -> bool:
        return True

    def why_not(self, call) -> Optional[str]:
        return self.unsupported_linear(call) if call.op == "linear" else self.unsupported_conv2d(call)

    def run(self, call) -> torch.Tensor:
        return self.linear(call) if call.op == "linear" else self.conv2d(call)


_REGISTRY: Dict[str, Backend] = {}
_AUTO_CACHE: Dict[Tuple, str] = {}
_LOADERS: Dict[str, Callable[[], Optional[Backend]]] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    _AUTO_CACHE.clear()
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
    """Names ``backend=`` accepts: SPEC's four plus any backend a user registered."""
    extra = tuple(sorted(n for n in list(_REGISTRY) + list(_LOADERS) if n not in BACKEND_NAMES))
    return BACKEND_NAMES + extra


def available_backends(call=None) -> List[str]:
    """Names of registered backends (that can run ``call``, when given)."""
    _load_all()
    names = sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority)
    if call is None:
        return names
    return [n for n in names if _REGISTRY[n].why_not(call) is None]


def _time_backend(b: Backend, call, reps: int = 3) -> float:
    with torch.no_grad():
        b.run(call)  # warm-up / compile
        if call.x.is_cuda:
            torch.cuda.synchronize(call.x.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            b.run(call)
        if call.x.is_cuda:
            torch.cuda.synchronize(call.x.device)
    return (time.perf_counter() - t0) / reps


def select_backend(call, name: str) -> Backend:
    """The backend that runs ``call``: the named one (or an error saying why it cannot), or auto's pick."""
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
        reasons = "; ".join(f"{n}: {b.why_not(call)}" for n, b in _REGISTRY.items())
        raise ValueError(f"no backend can run this {call.op} call ({reasons})")
    if len(cands) == 1 or not call.x.is_cuda or os.environ.get("L0K_AUTO_TUNE", "1") == "0":
        return cands[0]
    key = call.signature()
    if key not in _AUTO_CACHE:
        times = {b.name: _time_backend(b, call) for b in cands}
        _AUTO_CACHE[key] = min(times, key=times.get)
    return _REGISTRY[_AUTO_CACHE[key]]


def dispatch(call, name: str) -> torch.Tensor:
    return select_backend(call, name).run(call)
