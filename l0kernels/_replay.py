"""Second-order backward: gradients that are differentiable themselves.

The package's autograd Functions compute first-order gradients with fused formulas and kernels whose
results autograd cannot differentiate again. When autograd asks for a differentiable backward
(``torch.autograd.grad(..., create_graph=True)``, e.g. a gradient penalty: grad mode is on inside
``backward`` exactly then), a Function's backward calls :func:`replay_grads` instead: the op's formula is
run again in plain differentiable PyTorch ops on the saved inputs (the gates regenerated from the seed),
and its gradients are taken with ``create_graph=True``, so they carry a graph back to every input.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch


def replay_grads(formula: Callable[[], torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
                 needs: Sequence[bool], grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    """``d formula() / d inputs[i]`` contracted with ``grad_out``, for the ``i`` with ``needs[i]`` (None for
    the others), as tensors with a graph (``create_graph=True``). ``formula`` computes the op's output from
    ``inputs`` (the tensors autograd saved: the caller's own, so the graph reaches them)."""
    wrt = [t for t, need in zip(inputs, needs) if need and t is not None]
    with torch.enable_grad():
        y = formula()
    if not wrt or not y.requires_grad:
        return tuple(None for _ in inputs)
    grads = iter(torch.autograd.grad(y, wrt, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(inputs, needs))


__all__ = ["replay_grads"]
