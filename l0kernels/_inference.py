"""Eval-mode forward of the L0 modules (deterministic gates). Plain version: the eval op on the module's backend."""
from __future__ import annotations

import torch

from .functional import l0_conv2d, l0_linear


def eval_linear(module, x: torch.Tensor) -> torch.Tensor:
    c = module.cfg
    return l0_linear(x, module.weight, module.log_alpha, module.bias, gate=module.gate, noise=module.noise,
                     training=False, backend=module.backend, beta=c.beta, gamma=c.gamma, zeta=c.zeta, eps=c.eps)


def eval_conv2d(module, x: torch.Tensor) -> torch.Tensor:
    c = module.cfg
    return l0_conv2d(x, module.weight, module.log_alpha, module.bias, module.stride, module.padding,
                     module.dilation, module.groups, noise=module.noise, training=False, backend=module.backend,
                     beta=c.beta, gamma=c.gamma, zeta=c.zeta, eps=c.eps)
