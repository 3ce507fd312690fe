"""The one autotuner: "measured, not guessed", like ``cudnn.benchmark``.

Every choice between implementations that ``auto`` makes goes through :data:`AUTOTUNER`: the backend
``backend="auto"`` runs a call on (training and eval, :func:`l0kernels._dispatch.select_backend`) and the
CUDA backend's forward kernel (``L0K_CUDA_GEMM=auto``: its fused kernel or cuBLAS, training and eval).
Given a key and named candidates (callables taking no argument), it times each once on the GPU --
a warm-up call, then a few calls between two ``torch.cuda.synchronize`` -- and remembers the fastest
under the key. It never times where timing means nothing or cannot happen, and then returns the
caller's ``fallback`` (the first candidate: the callers list them in their order of preference):

* on a CPU (or any device but CUDA);
* while ``torch.compile`` traces (the remembered picks are not read either: a trace must not depend on
  what happened to be timed before);
* while a CUDA graph is being captured (a pick remembered before the capture is used);
* with ``L0K_AUTO_TUNE=0`` (nothing is timed or read).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Hashable, Optional, Union

import torch
from . import config

Key = Union[Hashable, Callable[[], Hashable]]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Autotuner:
    """Picks among candidates by their measured time, once per key. ``reps``: timed calls per candidate."""

    reps = 5

    def __init__(self) -> None:
        self.best: Dict[Hashable, str] = {}

    def clear(self) -> None:
        self.best.clear()

    def can_time(self, device: torch.device) -> bool:
        """Whether picks for ``device`` may be measured (and read): a CUDA device, no trace, tuning on."""
        return (device.type == "cuda" and config.auto_tune()
                and not torch.compiler.is_compiling())

    def measure(self, fn: Callable[[], object], device: torch.device) -> float:
        """Seconds per call of ``fn`` on ``device``, after one warm-up call (compiles, autotunes kernels)."""
        with torch.no_grad():
            fn()
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(self.reps):
                fn()
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / self.reps

    def pick(self, key: Key, candidates: Dict[str, Callable[[], object]], device: torch.device,
             fallback: Optional[str] = None) -> str:
        """The name of the candidate to run. ``key`` (or a callable giving it, called only when the key is
        needed) names the problem; the candidates' names are part of it. ``fallback``: the pick where
        nothing is measured (default: the first candidate)."""
        names = tuple(candidates)
        if fallback is None:
            fallback = names[0]
        if len(names) == 1 or not self.can_time(device):
            return names[0] if len(names) == 1 else fallback
        full = ((key() if callable(key) else key), names)
        hit = self.best.get(full)
        if hit is None:
            if _capturing():  # nothing can be timed inside a graph capture
                return fallback
            times = {name: self.measure(fn, device) for name, fn in candidates.items()}
            hit = self.best[full] = min(times, key=times.get)
        return hit


AUTOTUNER = Autotuner()

__all__ = ["Autotuner", "AUTOTUNER"]
