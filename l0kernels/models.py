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
    (a compacted model may keep zero units, e.g. closed query heads in an open key/value group)."""
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
