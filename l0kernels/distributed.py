"""Gate seeds across processes.

An L0 layer in training draws its gates' seed from PyTorch's default generator, like dropout draws its
mask. So in a data-parallel run the gates of the ranks are independent exactly when their generators are
seeded differently, and identical when they are seeded alike (and the ranks draw the same sequence of
random numbers). PyTorch seeds every process with the same default value, so without a call to
``torch.manual_seed`` all ranks draw the same gates (and dropout masks). :func:`seed_gates` states the
choice in one line.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.distributed as dist


def seed_gates(seed: int, *, shared: bool = False, group: Optional["dist.ProcessGroup"] = None) -> int:
    """Seed this process's generators (``torch.manual_seed``) for the gates of the coming training steps.

    ``shared=False`` (the usual choice, like dropout): each rank gets ``seed + rank`` and draws its own gates.
    ``shared=True``: every rank gets ``seed`` and draws the same gates as long as the ranks make the same
    random calls. Call it after the model is built (its initialisation uses the generator too) on every
    rank. Without ``torch.distributed`` initialised, the rank is 0. Returns the seed used.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(shared, bool):
        raise TypeError(f"shared must be a bool, got {type(shared).__name__}")
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    used = int(seed) if shared else int(seed) + rank
    if not 0 <= used < 2 ** 63:
        raise ValueError(f"seed (+ rank) must be in [0, 2**63), got {used}")
    torch.manual_seed(used)
    return used


__all__ = ["seed_gates"]
