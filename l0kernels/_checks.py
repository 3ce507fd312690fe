"""Argument checks shared by every public entry point (docs/design.md §5). Nothing here launches a kernel."""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from ._dispatch import Conv2dCall, LinearCall, backend_names, is_backend_name, run_dtype
from ._gates import LINEAR_GATES, NOISE_KINDS, GateConfig
from ._philox import SEED_MAX, check_seed

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str, *, float_only: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")
    return t


def is_int(v) -> bool:
    """An integer as PyTorch takes one: a Python int or a numpy integer scalar (``numbers.Integral``), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(v, name: str, what: str = "an int") -> int:
    """``v`` as a Python int (see :func:`is_int`), else a ``TypeError`` naming ``name``."""
    if not is_int(v):
        raise TypeError(f"{name} must be {what}, got {type(v).__name__}")
    return int(v)


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_backend(value) -> str:
    """``backend=``: one of :func:`l0kernels._dispatch.backend_names` (the list is built only to name them)."""
    return value if is_backend_name(value) else check_choice(value, "backend", backend_names())


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs ``x``'s device type in, or None where autocast is off (or ``x`` is
    no tensor, or its device type has no autocast)."""
    if not isinstance(x, torch.Tensor):
        return None
    dev = x.device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return None
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return torch.get_autocast_dtype(dev)


def _same(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str,
          autocast: Optional[torch.dtype] = None) -> None:
    if autocast is None:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    elif run_dtype(t, autocast) != run_dtype(ref, autocast):
        raise TypeError(f"{name} must have the dtype of {ref_name} once torch.autocast casts them, got {name} "
                        f"{t.dtype} and {ref_name} {ref.dtype} (under autocast float16, bfloat16 and float32 "
                        f"tensors run in {autocast}, float64 tensors are not cast)")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def resolve_seed(seed, training: bool, device):
    """Validate ``seed`` (an int or a 0-d int64 tensor, docs/design.md §10); in training draw one on
    ``device`` when it is None (:func:`draw_seed`)."""
    if seed is not None:
        seed = check_seed(seed)
    if not training:
        return None
    if seed is None:
        seed = draw_seed(device)
    return seed


def draw_seed(device) -> torch.Tensor:
    """A fresh seed: a 0-d int64 tensor in [0, 2**63 - 1) on ``device``, drawn by a tensor op from PyTorch's
    default generator for that device (``torch.manual_seed`` repeats it). No host sync and no Python
    state: ``torch.compile`` traces it as a random op, and a CUDA graph captures it with the generator's
    offset advancing on every replay, so every replay draws fresh gates."""
    return torch.randint(0, SEED_MAX - 1, (), dtype=torch.int64, device=device)


_CONFIGS = {}


def make_config(beta, gamma, zeta, eps=1e-6) -> GateConfig:
    """A validated ``GateConfig``; configs already built are reused (a call validates once per set of
    constants; the types are part of the key, so ``beta=True`` still fails like any bool). Not inside a
    ``torch.compile`` trace: a cache read there is a guard that fails once the trace has filled it."""
    if torch.compiler.is_compiling():
        return GateConfig(beta=beta, gamma=gamma, zeta=zeta, eps=eps)
    key = (type(beta), beta, type(gamma), gamma, type(zeta), zeta, type(eps), eps)
    try:
        cfg = _CONFIGS.get(key)
    except TypeError:  # unhashable: let GateConfig name the argument
        cfg, key = None, None
    if cfg is None:
        cfg = GateConfig(beta=beta, gamma=gamma, zeta=zeta, eps=eps)
        if key is not None and len(_CONFIGS) < 256:
            _CONFIGS[key] = cfg
    return cfg


def check_group_size(group_size, features: int, what: str) -> int:
    """``group_size``: an int >= 1 that divides ``features`` (the number of ``what`` the gates group)."""
    group_size = check_int(group_size, "group_size")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if features % group_size:
        raise ValueError(f"group_size ({group_size}) must divide {what} ({features}): gate j controls "
                         f"features j*group_size ... j*group_size+group_size-1")
    return group_size


def check_linear_group_size(group_size, gate: str, in_features: int, out_features: int) -> int:
    """``group_size`` of a linear layer's gates: 1 for ``gate="weight"``, else a divisor of the gated features."""
    if gate == "weight":
        group_size = check_int(group_size, "group_size")
        if group_size != 1:
            raise ValueError(f"group_size must be 1 for gate='weight' (one gate per weight), got {group_size}")
        return group_size
    return check_group_size(group_size, in_features if gate == "in" else out_features,
                            "in_features" if gate == "in" else "out_features")


def linear_call(x, weight, log_alpha, bias, *, seed, gate, noise, training, backend, beta, gamma, zeta,
                eps=1e-6, autocast: Optional[torch.dtype] = None, group_size: int = 1, owner=None) -> LinearCall:
    """The checked call. ``autocast``: the dtype of an enclosing ``torch.autocast`` (see
    :func:`autocast_dtype`); the dtypes then must agree once cast (:func:`run_dtype`), and the call
    still holds the tensors as given. ``owner``: the layer making the call (see ``LinearCall``)."""
    check_choice(gate, "gate", LINEAR_GATES)
    check_choice(noise, "noise", NOISE_KINDS)
    check_backend(backend)
    check_bool(training, "training")
    if gate == "weight" and noise == "sample":
        raise ValueError("noise='sample' is not defined for gate='weight' (one gate per weight is "
                         "already per-call noise); use noise='batch'")
    cfg = make_config(beta, gamma, zeta, eps)
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_tensor(log_alpha, "log_alpha")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., in_features={k}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    _same(weight, "weight", x, "x", autocast)
    _same(log_alpha, "log_alpha", x, "x", autocast)
    check_linear_group_size(group_size, gate, k, n)
    want = {"in": (k // group_size,), "out": (n // group_size,), "weight": (n, k)}[gate]
    if tuple(log_alpha.shape) != want:
        grouped = f" and group_size={group_size}" if group_size != 1 else ""
        raise ValueError(f"log_alpha must have shape {want} for gate={gate!r} with weight "
                         f"{tuple(weight.shape)}{grouped}, got {tuple(log_alpha.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
        _same(bias, "bias", x, "x", autocast)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},) (out_features), got {tuple(bias.shape)}")
    seed = resolve_seed(seed, training, x.device)
    return LinearCall(x, weight, log_alpha, bias, seed, gate, noise, training, cfg, group_size, autocast, owner)


def _pair(v, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got bool")
    if is_int(v):
        v = (v, v)
    if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(is_int(i) for i in v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def conv2d_call(x, weight, log_alpha, bias, stride, padding, dilation, groups, *, seed, noise, training,
                backend, beta, gamma, zeta, eps=1e-6, autocast: Optional[torch.dtype] = None,
                group_size: int = 1, owner=None) -> Conv2dCall:
    """The checked call; ``autocast`` and ``owner`` as in :func:`linear_call`."""
    check_choice(noise, "noise", NOISE_KINDS)
    check_backend(backend)
    check_bool(training, "training")
    cfg = make_config(beta, gamma, zeta, eps)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    groups = check_int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_tensor(log_alpha, "log_alpha")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (batch, channels, height, width), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kh, kw), got shape "
                         f"{tuple(weight.shape)}")
    _same(weight, "weight", x, "x", autocast)
    _same(log_alpha, "log_alpha", x, "x", autocast)
    c_out, c_in_g, kh, kw = weight.shape
    if c_out == 0:
        raise ValueError("weight must have at least one output channel (PyTorch's convolution has no form "
                         "without output channels), got shape " + str(tuple(weight.shape)))
    if c_out % groups:
        raise ValueError(f"weight's out_channels ({c_out}) must be divisible by groups ({groups})")
    if x.shape[1] != c_in_g * groups:
        raise ValueError(f"x must have {c_in_g * groups} channels (weight in_channels/groups={c_in_g} "
                         f"x groups={groups}), got {x.shape[1]}")
    check_group_size(group_size, c_out, "out_channels")
    if tuple(log_alpha.shape) != (c_out // group_size,):
        per = "one gate per output channel" if group_size == 1 else f"one gate per {group_size} output channels"
        raise ValueError(f"log_alpha must have shape ({c_out // group_size},) ({per}), got "
                         f"{tuple(log_alpha.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
        _same(bias, "bias", x, "x", autocast)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},) (out_channels), got {tuple(bias.shape)}")
    for d, size in enumerate(x.shape[2:]):
        eff = dilation[d] * ((kh, kw)[d] - 1) + 1
        if size + 2 * padding[d] < eff:
            raise ValueError(f"x's spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than "
                             f"the dilated kernel ({dilation[0] * (kh - 1) + 1}, {dilation[1] * (kw - 1) + 1})")
    seed = resolve_seed(seed, training, x.device)
    return Conv2dCall(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, noise, training, cfg,
                      group_size, autocast, owner)


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1
