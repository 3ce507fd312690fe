"""The paper's MNIST models built from :class:`L0Linear` / :class:`L0Conv2d`, and cost accounting.

Gate placement and initialisation follow the authors' code (Louizos et al. 2018): every dense
layer gates its *input* neurons, every convolution its *output* channels; ``droprate_init`` is
0.2 for the dense layer that sees the pixels (LeNet-300-100) and 0.5 everywhere else.
The architecture the paper reports (e.g. ``219-214-100``) is the number of open test-time gates
per L0 layer, in order.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .modules import L0Conv2d, L0Linear, l0_layers


class LeNet300100(nn.Sequential):
    """784-300-100-10 MLP with input gates on every layer (paper: 219-214-100 with L0, lambda=0.1/N)."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (300, 100), num_classes: int = 10,
                 droprate_init: Sequence[float] = (0.2, 0.5, 0.5), noise: str = "batch", backend: str = "auto",
                 device=None, dtype=None):
        dims = [in_features, *hidden, num_classes]
        if len(droprate_init) != len(dims) - 1:
            raise ValueError(f"droprate_init needs {len(dims) - 1} values, got {len(droprate_init)}")
        layers: List[nn.Module] = [nn.Flatten()]
        for i in range(len(dims) - 1):
            layers.append(L0Linear(dims[i], dims[i + 1], gate="in", noise=noise, droprate_init=droprate_init[i],
                                   backend=backend, device=device, dtype=dtype))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.dense_architecture = tuple(dims[:-1])


class LeNet5Caffe(nn.Sequential):
    """LeNet-5-Caffe 20-50-800-500: two 5x5 convs (channel gates) with max-pooling, two dense layers
    (input gates). Paper: 20-25-45-462 with L0 (lambda=0.1/N), 9-18-65-25 with L0-sep."""

    def __init__(self, in_channels: int = 1, convs: Sequence[int] = (20, 50), fc: int = 500, num_classes: int = 10,
                 input_hw: Tuple[int, int] = (28, 28), droprate_init: Sequence[float] = (0.5, 0.5, 0.5, 0.5),
                 noise: str = "batch", backend: str = "auto", device=None, dtype=None):
        if len(droprate_init) != 4:
            raise ValueError(f"droprate_init needs 4 values, got {len(droprate_init)}")
        fk = dict(noise=noise, backend=backend, device=device, dtype=dtype)
        h, w = input_hw
        for _ in range(2):  # conv 5x5 (no padding) then 2x2 max-pool
            h, w = (h - 4) // 2, (w - 4) // 2
        flat = convs[1] * h * w
        super().__init__(
            L0Conv2d(in_channels, convs[0], 5, droprate_init=droprate_init[0], **fk), nn.ReLU(), nn.MaxPool2d(2),
            L0Conv2d(convs[0], convs[1], 5, droprate_init=droprate_init[1], **fk), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            L0Linear(flat, fc, gate="in", droprate_init=droprate_init[2], **fk), nn.ReLU(),
            L0Linear(fc, num_classes, gate="in", droprate_init=droprate_init[3], **fk),
        )
        self.input_hw = tuple(input_hw)
        self.dense_architecture = (convs[0], convs[1], flat, fc)


PAPER_TABLE1 = {
    # model: {method: (architecture, test error %)}; Louizos et al. 2018, Table 1
    "lenet300": {"L0 (lambda=0.1/N)": ("219-214-100", 1.4)},
    "lenet5": {"L0 (lambda=0.1/N)": ("20-25-45-462", 0.9), "L0-sep": ("9-18-65-25", 1.0)},
}


def architecture(model: nn.Module) -> List[int]:
    """Open test-time gates per L0 layer, in module order (the paper's architecture string)."""
    return [m.num_active() for _, m in l0_layers(model)]


def arch_str(arch: Sequence[int]) -> str:
    return "-".join(str(int(a)) for a in arch)


def _l0_input_hw(model: nn.Module, input_shape: Tuple[int, ...]) -> None:
    """Run one eval forward on zeros so every L0Conv2d knows its input size (for FLOP counts)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        p = next(model.parameters())
        model(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
    model.train(was)


def expected_cost(model: nn.Module, input_shape: Tuple[int, ...]) -> Dict[str, float]:
    """Expected and dense parameter and FLOP counts (per example) of the L0 layers of ``model``.

    Expected params count ``p_open * params_per_gate`` per gate plus ungated parameters (biases of
    input-gated layers); FLOPs count a multiply-add as 2.
    """
    _l0_input_hw(model, input_shape)
    exp_p = exp_f = dense_p = dense_f = 0.0
    with torch.no_grad():
        for _, m in l0_layers(model):
            exp_p += float(m.expected_params())
            exp_f += float(m.expected_flops(1))
            dense_p += sum(p.numel() for n, p in m.named_parameters(recurse=False) if n != "log_alpha")
            dense_f += float(m.dense_flops(1))
    return {"expected_params": exp_p, "dense_params": dense_p, "expected_flops": exp_f, "dense_flops": dense_f}


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of a plain model (log_alpha excluded if any); with ``nonzero`` only the non-zero ones
    (a compacted model may keep zero columns for closed input gates)."""
    ps = [p for n, p in model.named_parameters() if not n.endswith("log_alpha")]
    if nonzero:
        return int(sum(int((p != 0).sum()) for p in ps))
    return sum(p.numel() for p in ps)


def count_flops(model: nn.Module, input_shape: Tuple[int, ...]) -> int:
    """FLOPs of one example through the ``nn.Linear`` / ``nn.Conv2d`` layers of a plain model.

    A multiply-add is 2 FLOPs, a bias add 1 (the same convention as the L0 layers' ``dense_flops``).
    Input columns of an ``nn.Linear`` that are all zero are not counted (they need no work).
    """
    total = [0]

    def lin(m, inp, out):
        rows = out.numel() // out.shape[-1]
        k = int((m.weight != 0).any(0).sum())
        total[0] += rows * m.out_features * max(2 * k - 1, 0) + rows * m.out_features * (m.bias is not None)

    def conv(m, inp, out):
        fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        total[0] += out.numel() * (2 * fan_in - 1 + (m.bias is not None))

    hooks = []
    for m in model.modules():
        if type(m) is nn.Linear:
            hooks.append(m.register_forward_hook(lin))
        elif type(m) is nn.Conv2d:
            hooks.append(m.register_forward_hook(conv))
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def time_inference(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in milliseconds of ``model(x)`` under ``torch.no_grad`` (eval mode)."""
    was = model.training
    model.eval()
    sync: Callable[[], None] = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    model.train(was)
    times.sort()
    return 1e3 * times[len(times) // 2]


def dense_copy(model: nn.Module) -> nn.Module:
    """The same architecture with plain ``nn.Linear`` / ``nn.Conv2d`` and the trained weights, no gates:
    the dense baseline for speed comparisons (outputs differ from the gated model)."""

    def conv(m: nn.Module) -> nn.Module:
        if isinstance(m, L0Linear):
            d = nn.Linear(m.in_features, m.out_features, m.bias is not None, device=m.weight.device,
                          dtype=m.weight.dtype)
        elif isinstance(m, L0Conv2d):
            d = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                          m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        else:
            return m
        with torch.no_grad():
            d.weight.copy_(m.weight)
            if m.bias is not None:
                d.bias.copy_(m.bias)
        return d

    if isinstance(model, nn.Sequential):
        return nn.Sequential(*[conv(m) for m in model]).eval()
    raise TypeError("dense_copy supports nn.Sequential models")


class SelectFeatures(nn.Module):
    """Keeps the given columns of the last dimension (the open input gates of a compacted first layer)."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.clone().long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} features"


_PASS_THROUGH = (nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity, nn.Tanh, nn.Sigmoid, nn.GELU)


def compact_sequential(model: nn.Sequential) -> nn.Sequential:
    """Plain ``torch.nn`` copy of a Sequential of ``L0Linear(gate="in")``, ``L0Conv2d`` (groups=1),
    ``nn.Flatten`` and element-wise/pooling layers, with every zero-gated group removed and the
    test-time gates folded into the weights: same eval outputs as ``model``.

    Used by the demo and the examples when ``l0kernels.compact`` is not available.
    Removes a layer's outputs that the next layer's gates never read, and starts with
    :class:`SelectFeatures` when the first layer's input gates close some inputs.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError("compact_sequential needs an nn.Sequential")
    mods = list(model)
    for m in mods:
        ok = (isinstance(m, L0Linear) and m.gate == "in") or (isinstance(m, L0Conv2d) and m.groups == 1) \
            or isinstance(m, (nn.Flatten,) + _PASS_THROUGH)
        if not ok:
            raise TypeError(f"compact_sequential cannot compact {type(m).__name__}")
    # backward pass: which outputs of each layer are read downstream (bool mask over the full dim, or None=all)
    need_after: List = [None] * len(mods)
    need = None
    channels_before_flatten = None
    for i in range(len(mods) - 1, -1, -1):
        m = mods[i]
        need_after[i] = need
        if isinstance(m, L0Linear):
            need = (m.feature_gates() > 0)
        elif isinstance(m, L0Conv2d):
            need = None
        elif isinstance(m, nn.Flatten):
            if need is not None:
                prev = next((p for p in reversed(mods[:i]) if isinstance(p, L0Conv2d)), None)
                if prev is not None:
                    channels_before_flatten = prev.out_channels
                    need = need.view(channels_before_flatten, -1).any(1)
                else:
                    need = need  # flattening a flat input: feature mask passes through
    out: List[nn.Module] = []
    keep = None  # bool mask over the current (full) feature or channel dim of the activations
    for i, m in enumerate(mods):
        with torch.no_grad():
            if isinstance(m, L0Linear):
                z = m.feature_gates()
                in_keep = (m.feature_gates() > 0) if keep is None else (keep & (m.feature_gates() > 0))
                out_keep = need_after[i] if need_after[i] is not None else torch.ones(
                    m.out_features, dtype=torch.bool, device=z.device)
                if keep is None and not bool(in_keep.all()):
                    out.append(SelectFeatures(in_keep.nonzero().flatten()))
                    cols = in_keep.nonzero().flatten()
                else:
                    cols = (in_keep if keep is None else in_keep[keep]).nonzero().flatten()
                    if keep is not None and not bool(in_keep[keep].all()):
                        out.append(SelectFeatures(cols))
                rows = out_keep.nonzero().flatten()
                w = m.weight[rows][:, in_keep] * z[in_keep]
                d = nn.Linear(w.shape[1], w.shape[0], m.bias is not None, device=w.device, dtype=w.dtype)
                d.weight.copy_(w)
                if m.bias is not None:
                    d.bias.copy_(m.bias[rows])
                out.append(d)
                keep = out_keep
            elif isinstance(m, L0Conv2d):
                z = m.feature_gates()
                in_keep = keep if keep is not None else torch.ones(m.in_channels, dtype=torch.bool, device=z.device)
                out_keep = (m.feature_gates() > 0) if need_after[i] is None else ((m.feature_gates() > 0) & need_after[i])
                if not bool(out_keep.any()):
                    out_keep = out_keep.clone()
                    out_keep[0] = True  # keep one (all-zero) channel so shapes stay valid
                w = m.weight[out_keep][:, in_keep] * z[out_keep, None, None, None]
                d = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1,
                              m.bias is not None, device=w.device, dtype=w.dtype)
                d.weight.copy_(w)
                if m.bias is not None:
                    d.bias.copy_(m.bias[out_keep] * z[out_keep])
                out.append(d)
                keep = out_keep
            elif isinstance(m, nn.Flatten):
                if keep is not None:
                    nxt = next((p for p in mods[i + 1:] if isinstance(p, L0Linear)), None)
                    spatial = nxt.in_features // keep.numel() if nxt is not None else 1
                    keep = keep.repeat_interleave(spatial)
                out.append(nn.Flatten(m.start_dim, m.end_dim))
            else:
                out.append(m)
    return nn.Sequential(*out).eval()


def compact_models(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Compacted plain copies of ``model`` as ``[(how, model), ...]``: ``l0kernels.compact(model)``
    (keeps the input size, so closed input gates of the first layer stay as zero columns) when the
    package has it, and :func:`compact_sequential` (also drops those inputs with an index gather)
    when ``model`` is a Sequential it handles."""
    out: List[Tuple[str, nn.Module]] = []
    try:
        from .compact import compact
    except ImportError:
        compact = None
    if compact is not None:
        out.append(("l0kernels.compact", compact(model)))
    if isinstance(model, nn.Sequential):
        try:
            out.append(("compact_sequential (drops closed inputs)", compact_sequential(model)))
        except TypeError:
            pass
    if not out:
        raise TypeError(f"cannot compact {type(model).__name__}: l0kernels.compact is not available and the model "
                        "is not a Sequential of L0 layers")
    return out
