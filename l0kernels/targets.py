"""Sparsity targets instead of lambda (docs/design.md §9): a Lagrangian controller with warm-up.

``SparsityTarget`` turns "keep 10% of the parameters" into a penalty whose multipliers are learned by
gradient ascent, as the structured-pruning papers do (Wang, Wohlwend, Lei 2020, "Structured Pruning of
Large Language Models"; Xia, Zhong, Chen 2022, CoFi): the loss gets ``lambda_1 (E - t) + lambda_2 (E - t)^2``
where ``E`` is the expected fraction of the metric (differentiable in ``log_alpha``) and ``t`` the current
target; after each optimizer step ``step()`` moves the multipliers (a proportional-integral rule with
anti-windup near ``t``, geometric steps of ``lambda_1`` far from it when ``E`` is stuck or arrives too
fast, see :class:`SparsityTarget`), so the penalty grows until ``E`` meets ``t``.
``finalize_()`` then makes the deterministic (test-time) gates meet the target.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._checks import conv_out_size
from ._gates import prob_open_t
from .modules import LOG_ALPHA_MAX, LOG_ALPHA_MIN, L0Conv2d, L0Linear, _L0Layer, l0_gates

METRICS = ("params", "flops", "gates")
UNWIND = 0.01  # fraction of lambda_1 dropped per step while E moves further below the target
RATE_EMA = 0.02  # smoothing of the per-step change of E and of the moving share (about 50 steps)
BAND = 0.01  # |E - t| up to which the PI rule alone runs
GROW = 0.02  # relative growth of lambda_1 per step while E is stuck (doubles in 35 steps)
SHRINK = 0.05  # largest relative shrink of lambda_1 per step (braking, or lambda_1 pushing the wrong way)
STALL = 5.0  # E counts as stuck when it would need more than STALL * horizon steps to reach t ...
MOVING = 0.5  # ... and less than this share of the gated mass moves toward t at the optimizer's pace
GROW_LIMIT = 1e4  # no geometric growth beyond this |lambda_1| (a target E cannot reach: constrain_, frozen gates)


def _check_real(v, name: str, *, lo: float, hi: float = math.inf, lo_open: bool = True,
                hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    ok_lo = v > lo if lo_open else v >= lo
    ok_hi = v < hi if hi_open else v <= hi
    if not math.isfinite(v) or not ok_lo or not ok_hi:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {v}")
    return v


def _check_int(v, name: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def _linear_layer_flops(rows: int, n: int, k: int, bias: bool) -> int:
    return rows * n * (2 * k - 1 + bias)


def _plain_flops(m: nn.Module, shape: Tuple[int, ...]) -> int:
    """FLOPs per example of a plain ``nn.Linear`` / ``nn.Conv2d`` for one recorded input shape."""
    if isinstance(m, nn.Linear):
        return _linear_layer_flops(_rows_per_example(shape), m.out_features, m.in_features, m.bias is not None)
    if m.padding == "same":
        ho, wo = int(shape[-2]), int(shape[-1])
    else:
        pad = (0, 0) if m.padding == "valid" else m.padding
        ho, wo = (conv_out_size(shape[-2 + d], m.kernel_size[d], m.stride[d], pad[d], m.dilation[d]) for d in range(2))
    fan_in = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    return m.out_channels * ho * wo * (2 * fan_in - 1 + (m.bias is not None))


def _rows_per_example(shape: Tuple[int, ...]) -> int:
    """Rows a linear layer multiplies per example: 1 for ``(B, K)``, ``T`` for ``(B, T, K)``."""
    return int(math.prod(shape[1:-1])) if len(shape) >= 2 else 1


class SparsityTarget(nn.Module):
    """Drive an L0 model to a target fraction of its parameters, FLOPs or gates (docs/design.md §9).

    ::

        ctl = l0k.SparsityTarget(model, 0.1, metric="params", warmup_steps=3000)
        for x, y in data:
            loss = F.cross_entropy(model(x), y) + ctl.penalty()
            opt.zero_grad(); loss.backward(); opt.step(); ctl.step()
        ctl.finalize_()                      # deterministic gates meet the target within 1 point

    Arguments:
        model: a module holding ``L0Linear`` / ``L0Conv2d`` layers.
        target: the fraction to reach, in (0, 1] (and above the share the gates cannot remove).
        metric: ``"params"``: expected non-zero parameters of the whole model (every parameter but
            ``log_alpha``; parameters no gate controls count as always there) over its dense count;
            ``"flops"``: expected FLOPs per example of the weight layers (L0 layers and plain
            ``nn.Linear`` / ``nn.Conv2d``; a multiply-add counts 2, as :func:`summary`) over their dense
            FLOPs: the input sizes come from ``example_inputs`` (one eval forward) or, without it, from a
            forward pre-hook on each layer's first call; ``"gates"``: open gates over gates.
        warmup_steps: the target moves linearly from 1.0 (dense) to ``target`` over this many ``step()``
            calls. During warm-up the constraint is one-sided (``E <= t``: nothing pushes the model denser
            than it is); afterwards it is an equality, so an overshoot is pulled back.
        lr: ascent rate of the multipliers: ``lambda_2 += lr (E - t)^2``; ``lambda_1`` follows a
            proportional-integral rule (Stooke et al. 2020; Sohrabi et al. 2024): ``lr * damping *
            ((E - t) - (E - t)_previous)`` every step, plus, within 1 point of ``t``, the integral
            ``lr (E - t)``, paused while ``E`` is on course to reach ``t`` within ``horizon`` steps at its
            own recent rate (anti-windup), and a 1% shrink per step while ``E`` moves further below ``t``.
            Further from ``t`` the integral part depends on how ``E`` moves (``lambda_1``'s scale differs
            by orders of magnitude between tasks, so an additive step alone is too slow for some and too
            fast for others):

            * ``E`` closes the gap faster than ``horizon`` steps: ``lambda_1`` shrinks (up to 5% a step;
              braking before ``t``, since a gate once closed reopens slowly);
            * ``E`` stuck (more than ``5 * horizon`` steps to go at its rate) while less than half of the
              gated mass (metric per gate times ``p_open``) moves toward ``t`` at the optimizer's pace
              (the largest ``log_alpha`` step of any gate): the task holds the gates against the
              penalty, and ``lambda_1`` grows by 2% a step on top of ``lr (E - t)`` (up to 1e4: a target
              ``E`` cannot reach, as with ``constrain_()``'s floor or frozen gates, grows it only linearly);
            * otherwise ``lr (E - t)``: in particular while the gates already move as fast as the
              optimizer lets them (Adam moves ``log_alpha`` by about its lr per step), where a larger
              multiplier would close gates the task needs and inflate the optimizer's moment estimates;
            * ``lambda_1`` pushing the wrong way (after an overshoot): it shrinks by 5% a step plus
              ``lr (E - t)``, so it changes sign.
        damping, horizon: see ``lr`` (in steps; ``damping=0`` drops the proportional part, ``horizon=0``
            the anti-windup and the rules far from ``t``: a plain PI rule).
        example_inputs: a tensor or tuple of tensors for ``metric="flops"`` (optional).

    How fast ``E`` can follow is bounded by the optimizer: a gate's ``log_alpha`` moves about Adam's lr per
    step and has to travel from 0 (``droprate_init`` 0.5) to about -4 for ``p_open`` 0.08, so at lr 1e-3 a
    target of 0.1 takes some 3,500 steps without a warm-up (docs/training.md); a larger multiplier would
    close gates the task needs, not move the others faster.

    The multipliers (``lambda_1``, ``lambda_2``), the step count and the controller's memory (rates, the
    gates' last ``log_alpha``) are buffers: ``state_dict()`` / ``load_state_dict()`` resume a run (a state
    dict from before ``moving`` / ``last_log_alpha`` existed loads too); the model is not part of the
    controller's state. All ranks of a data-parallel run compute the same ``E`` and see the same gate steps
    (their gates' parameters are equal), hence the same multipliers, with no communication.
    """

    lambda_1: torch.Tensor
    lambda_2: torch.Tensor
    steps_done: torch.Tensor

    def __init__(self, model: nn.Module, target: float, *, metric: str = "params", warmup_steps: int = 0,
                 lr: float = 0.05, damping: float = 300.0, horizon: float = 100.0,
                 example_inputs: Any = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layers = list(l0_gates(model))
        if not layers:
            raise ValueError("model has no gates (L0Linear / L0Conv2d layers or structure gates): nothing for a "
                             "sparsity target to gate")
        if not isinstance(metric, str) or metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if metric == "flops" and any(not isinstance(m, _L0Layer) for _, m in layers):
            raise ValueError("metric='flops' counts the FLOPs of L0 layers only; this model has structure gates: "
                             "use metric='params' or 'gates'")
        self.target = _check_real(target, "target", lo=0.0, hi=1.0)
        self.metric = metric
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps")
        self.lr = _check_real(lr, "lr", lo=0.0)
        self.damping = _check_real(damping, "damping", lo=0.0, lo_open=False)
        self.horizon = _check_real(horizon, "horizon", lo=0.0, lo_open=False)
        if example_inputs is not None and not (isinstance(example_inputs, torch.Tensor) or (
                isinstance(example_inputs, tuple) and all(isinstance(t, torch.Tensor) for t in example_inputs))):
            raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
        object.__setattr__(self, "model", model)  # not a submodule: its parameters stay out of our state
        self._layers: List[Tuple[str, nn.Module]] = layers
        la = layers[0][1].log_alpha
        self.register_buffer("lambda_1", torch.zeros((), dtype=torch.float32, device=la.device))
        self.register_buffer("lambda_2", torch.zeros((), dtype=torch.float32, device=la.device))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64, device=la.device))
        self.register_buffer("last_deviation", torch.zeros((), dtype=torch.float32, device=la.device))
        self.register_buffer("rate", torch.zeros((), dtype=torch.float32, device=la.device))  # EMA of E's change
        self.register_buffer("last_expected", torch.zeros((), dtype=torch.float32, device=la.device))
        self.register_buffer("moving", torch.zeros((), dtype=torch.float32, device=la.device))  # EMA of the share
        self.register_buffer("last_log_alpha", self._flat_log_alpha().to(torch.float32))
        self._gate_costs: Optional[torch.Tensor] = None  # metric per gate, all layers (cached: constant)
        self._steps = 0  # host copy of steps_done (no device sync per call)
        self.register_load_state_dict_post_hook(lambda mod, keys: setattr(mod, "_steps", int(mod.steps_done)))
        self._shapes: Dict[int, Tuple[int, ...]] = {}
        self._hooks: list = []
        self._flop_layers: List[nn.Module] = []
        if metric == "flops":
            self._flop_layers = [m for m in model.modules()
                                 if isinstance(m, (nn.Linear, nn.Conv2d, L0Linear, L0Conv2d))]
            if example_inputs is not None:
                self._record_shapes(example_inputs)
            else:
                for m in self._flop_layers:
                    self._hooks.append(m.register_forward_pre_hook(self._shape_hook))
        elif example_inputs is not None:
            raise ValueError(f"example_inputs is only used with metric='flops', got metric={metric!r}")
        if metric != "flops" or not self._hooks:
            self._check_reachable()

    # -- input sizes (flops) --------------------------------------------------------------------------------
    def _shape_hook(self, mod, args):
        if args and isinstance(args[0], torch.Tensor):
            self._shapes.setdefault(id(mod), tuple(args[0].shape))
        if len(self._shapes) == len(self._flop_layers):  # every layer seen once: stop listening
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: ``nn.Module`` copies the entries it can before it
        raises for the others, so on an error every buffer (and the host step count) is put back as it was."""
        saved = {name: b.detach().clone() for name, b in self._buffers.items() if b is not None}
        steps = self._steps
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            with torch.no_grad():
                for name, b in saved.items():
                    current = self._buffers.get(name)
                    if current is not None and current.shape == b.shape and current.dtype == b.dtype \
                            and current.device == b.device:
                        current.copy_(b)
                    else:  # ``assign=True`` may have replaced the tensor itself
                        self._buffers[name] = b
            self._steps = steps
            raise

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a state dict saved before the controller kept "moving" and "last_log_alpha" (the gates' last step):
        # start them afresh (the share's average from 0, the gates' step from their values now)
        if prefix + "lambda_1" in state_dict:
            state_dict.setdefault(prefix + "moving", torch.zeros_like(self.moving))
            state_dict.setdefault(prefix + "last_log_alpha", self._flat_log_alpha())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _record_shapes(self, example_inputs) -> None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        hooks = [m.register_forward_pre_hook(self._shape_hook) for m in self._flop_layers]
        was = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(*args)
        finally:
            self.model.train(was)
            for h in hooks:
                h.remove()
        if not self._shapes:
            raise ValueError("example_inputs: the model's forward reached none of its weight layers")

    def _need_shapes(self) -> None:
        if self.metric == "flops" and not self._shapes:
            raise ValueError("metric='flops' needs the layers' input sizes: run one forward of the model before "
                             "penalty() / expected(), or pass example_inputs= to SparsityTarget")

    # -- the metric -----------------------------------------------------------------------------------------
    @staticmethod
    def _p_open(m: nn.Module) -> torch.Tensor:
        """``m.prob_open()``; with FSDP2's sharded parameters (DTensor) from the gathered ``log_alpha``."""
        la = m.log_alpha
        if hasattr(la, "full_tensor"):  # a DTensor outside forward: gather it (differentiably)
            return prob_open_t(la.full_tensor(), m.cfg)
        return m.prob_open()

    def _layer_value(self, m: nn.Module, p: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable expected metric of one L0 layer (absolute units), from the layer's own formula
        evaluated at ``p`` (default: its ``p_open``)."""
        p = self._p_open(m) if p is None else p
        m.prob_open = lambda: p  # instance attribute shadows the method for this one evaluation
        try:
            return self._layer_formula(m)
        finally:
            del m.prob_open

    def _layer_formula(self, m: nn.Module) -> torch.Tensor:
        if self.metric == "params":
            return m.expected_params()
        if self.metric == "gates":
            return m.expected_l0()
        shape = self._shapes.get(id(m))
        if shape is None:
            return m.log_alpha.new_zeros(()).float()
        if isinstance(m, L0Conv2d):
            return m.expected_flops(1, input_hw=(int(shape[-2]), int(shape[-1])))
        return m.expected_flops(_rows_per_example(shape))

    def _layer_dense(self, m: nn.Module) -> float:
        if self.metric == "params":
            return float(sum(p.numel() for p in m.counted_parameters()))
        if self.metric == "gates":
            return float(m.log_alpha.numel())
        shape = self._shapes.get(id(m))
        if shape is None:
            return 0.0
        if isinstance(m, L0Conv2d):
            return float(m.dense_flops(1, input_hw=(int(shape[-2]), int(shape[-1]))))
        return float(m.dense_flops(_rows_per_example(shape)))

    def _constant(self) -> Tuple[float, float]:
        """(always-there amount, dense total) of the metric: the parts no gate controls are counted in both."""
        dense = sum(self._layer_dense(m) for _, m in self._layers)
        rest = 0.0
        if self.metric == "params":
            own = {id(p) for _, m in self._layers for p in m.counted_parameters()} | \
                {id(m.log_alpha) for _, m in self._layers}
            rest = float(sum(p.numel() for p in self.model.parameters() if id(p) not in own))
        elif self.metric == "flops":
            rest = float(sum(_plain_flops(m, self._shapes[id(m)]) for m in self._flop_layers
                             if not isinstance(m, (L0Linear, L0Conv2d)) and id(m) in self._shapes))
        return rest, dense + rest

    def _fraction(self) -> torch.Tensor:
        self._need_shapes()
        rest, total = self._constant()
        if total <= 0:
            raise ValueError(f"the model's dense {self.metric} count is 0: nothing to take a fraction of")
        e = torch.stack([self._layer_value(m).float().reshape(()) for _, m in self._layers]).sum()
        return (e + rest) / total

    def _flat_log_alpha(self) -> torch.Tensor:
        out = []
        for _, m in self._layers:
            la = m.log_alpha.detach()
            out.append((la.full_tensor() if hasattr(la, "full_tensor") else la).reshape(-1).float())
        return torch.cat(out).to(self.lambda_1.device)

    @torch.no_grad()
    def _moving_share(self, d: torch.Tensor) -> torch.Tensor:
        """The share of the gated mass (metric per gate times ``p_open``) whose ``log_alpha`` moved toward the
        target since the last step, each gate counted by its step over the largest step of any gate (the
        optimizer's pace: Adam moves a gate with a steady gradient by about its lr). Near 1 when the gates
        move as fast as the optimizer lets them; near 0 when the task holds them against the penalty."""
        if self._gate_costs is None:  # each layer's metric is linear in p_open: the cost per gate is constant
            self._gate_costs = torch.cat([self._costs(m)[0] for _, m in self._layers]).float().to(d.device)
        la = self._flat_log_alpha()
        step = la - self.last_log_alpha
        self.last_log_alpha.copy_(la)
        pace = step.abs().max()
        p = torch.cat([self._p_open(m).detach().reshape(-1).float().to(d.device) for _, m in self._layers])
        mass = self._gate_costs * p
        toward = (-torch.sign(d) * step / pace.clamp_min(1e-30)).clamp(0.0, 1.0)
        return (mass * toward).sum() / mass.sum().clamp_min(1e-30)

    def _check_reachable(self) -> None:
        floor = self.min_fraction()
        if self.target < floor:
            raise ValueError(f"target {self.target:g} is below the smallest reachable {self.metric} fraction "
                             f"{floor:.4g} (the part no gate controls)")

    # -- public ---------------------------------------------------------------------------------------------
    def current_target(self) -> float:
        """``t`` now: 1.0 moving linearly to ``target`` over ``warmup_steps`` steps."""
        s = self._steps
        if self.warmup_steps == 0 or s >= self.warmup_steps:
            return self.target
        return 1.0 + (self.target - 1.0) * s / self.warmup_steps

    def in_warmup(self) -> bool:
        return self._steps < self.warmup_steps

    def _deviation(self, e: torch.Tensor) -> torch.Tensor:
        d = e - self.current_target()
        return d.clamp_min(0.0) if self.in_warmup() else d

    def penalty(self) -> torch.Tensor:
        """``lambda_1 (E - t) + lambda_2 (E - t)^2`` (0-d float32 tensor, differentiable in ``log_alpha``).

        During warm-up ``E - t`` is replaced by ``max(E - t, 0)``."""
        d = self._deviation(self._fraction())
        return self.lambda_1 * d + self.lambda_2 * d * d

    def forward(self) -> torch.Tensor:  # ctl() == ctl.penalty()
        return self.penalty()

    @torch.no_grad()
    def step(self) -> None:
        """Move the multipliers at the current parameters (see ``lr``), then advance the warm-up one step.

        ``lambda_2`` never decreases (its gradient ``(E - t)^2`` is >= 0); ``lambda_1`` goes negative when the
        model is sparser than the target after warm-up, pulling it back."""
        e = self._fraction().detach().to(self.lambda_1.device)
        d = self._deviation(e)
        delta = d - self.last_deviation
        share = self._moving_share(d)
        if self._steps > 0:  # the first step has no previous E to measure a rate against
            self.rate.mul_(1 - RATE_EMA).add_(RATE_EMA * (e - self.last_expected))
        self.moving.mul_(1 - RATE_EMA).add_(RATE_EMA * share)
        self.last_expected.copy_(e)
        debias = 1.0 - (1.0 - RATE_EMA) ** max(self._steps, 1)  # the averages start at 0 (as Adam's moments)
        rate, moving = self.rate / debias, self.moving / (1.0 - (1.0 - RATE_EMA) ** (self._steps + 1))
        zero = torch.zeros_like(d)
        # near the target: the PI rule. Anti-windup: no integral while E heads for t fast enough to close the
        # gap within `horizon` steps (the gates already move as fast as the optimizer lets them)
        arriving = (d * rate < 0) & (d.abs() < self.horizon * rate.abs())
        # past the target and still moving away from it: lambda_1 is above its equilibrium; shrink it by a
        # fixed fraction per step (an additive lr * (E - t) with |E - t| small would take thousands of steps)
        overshot = (d < 0) & (rate < 0) & (self.lambda_1 > 0)
        l1 = self.lambda_1 * torch.where(overshot, 1.0 - UNWIND, 1.0) + self.lr * torch.where(arriving, zero, d)
        if self.horizon > 0:  # far from the target (horizon=0: the PI rule everywhere)
            closing = -torch.sign(d) * rate * self.horizon / d.abs().clamp_min(1e-12)  # 1: gap closed in `horizon`
            stuck = (closing * STALL < 1) & (moving < MOVING) & (self.lambda_1.abs() < GROW_LIMIT)
            grown = torch.where(stuck, self.lambda_1 * (1.0 + GROW), self.lambda_1) + self.lr * d
            far = torch.where(closing > 1, self.lambda_1 * (1.0 - (GROW * (closing - 1)).clamp_max(SHRINK)), grown)
            wrong = self.lambda_1 * d < 0  # lambda_1 still pushes the other way
            far = torch.where(wrong, self.lambda_1 * (1.0 - SHRINK) + self.lr * d, far)
            l1 = torch.where(d.abs() > BAND, far, l1)
        self.lambda_1.copy_(l1 + self.lr * self.damping * delta)
        self.last_deviation.copy_(d)
        self.lambda_2.add_(self.lr * d * d)
        self.steps_done.add_(1)
        self._steps += 1

    def expected(self) -> float:
        """The expected fraction ``E`` of the metric now (a float)."""
        with torch.no_grad():
            return float(self._fraction())

    def min_fraction(self) -> float:
        """The fraction left with every gate closed (parameters / FLOPs no gate controls)."""
        self._need_shapes()
        rest, total = self._constant()
        with torch.no_grad():
            const = sum(float(self._costs(m)[1]) for _, m in self._layers)
        return (rest + const) / total

    # -- deterministic gates ------------------------------------------------------------------------------
    def _costs(self, m: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """(metric per gate, constant) of one layer, read off the layer's own (linear in p_open) formula."""
        p_true = self._p_open(m).detach()
        p = p_true.double().clone().requires_grad_(True)  # a copy: .double() of a float64 p_true is p_true itself
        with torch.enable_grad():
            v = self._layer_value(m, p).double()
        if not v.requires_grad:
            cost = torch.zeros_like(p)
        else:
            (cost,) = torch.autograd.grad(v, p)
        const = v.detach() - (cost * p.detach()).sum()
        with torch.no_grad():
            check = float(self._layer_value(m))
        if not math.isclose(float(const + (cost * p_true.double()).sum()), check, rel_tol=1e-5, abs_tol=1e-3):
            raise RuntimeError(f"{type(m).__name__}: its expected {self.metric} is not linear in prob_open()")
        return cost.detach().reshape(-1), const

    def _open_value(self, m) -> float:
        c = m.cfg
        return min(max(0.5 * (c.closed_threshold + c.open_threshold), LOG_ALPHA_MIN), LOG_ALPHA_MAX)

    def _closed_value(self, m) -> float:
        return min(LOG_ALPHA_MIN, m.cfg.closed_threshold - 1.0)

    def deterministic(self) -> float:
        """The fraction of the metric with the test-time gates (a gate counts fully when ``z_eval > 0``)."""
        self._need_shapes()
        rest, total = self._constant()
        got = rest
        for _, m in self._layers:
            cost, const = self._costs(m)
            got += float(const) + float((cost * m.active_mask().reshape(-1).double()).sum())
        return got / total

    @torch.no_grad()
    def finalize_(self, target: Optional[float] = None, tol: float = 0.01) -> Dict[str, Any]:
        """Move ``log_alpha`` of the fewest gates so the deterministic gates meet ``target`` within ``tol``.

        Too dense: the open gates with the lowest ``p_open`` (over all layers) are closed (``log_alpha`` set
        to ``min(log 0.01, log(-gamma/zeta) - 1)``), skipping any whose removal would fall below
        ``target - tol``; a layer's last open gate is never closed. Too sparse: the closed gates with the highest ``p_open`` are opened (``log_alpha``
        set to the middle of the test-time gate's ramp, 0 for the default constants). Gates already within
        the tolerance are left alone, so a gate closed by training is only opened when the target needs it.
        Returns ``{"fraction", "target", "closed", "opened"}``; warns when ``tol`` cannot be met (gates too coarse).
        """
        t = self.target if target is None else _check_real(target, "target", lo=0.0, hi=1.0)
        tol = _check_real(tol, "tol", lo=0.0, lo_open=False, hi=1.0)
        self._need_shapes()
        rest, total = self._constant()
        entries = []  # (p_open, cost fraction, layer index, flat gate index, open)
        got = rest
        for li, (_, m) in enumerate(self._layers):
            cost, const = self._costs(m)
            p = self._p_open(m).detach().reshape(-1).double().cpu().tolist()
            act = m.active_mask().reshape(-1).cpu().tolist()
            cost = (cost / total).cpu().tolist()
            got += float(const)
            for gi, (pg, cg, ag) in enumerate(zip(p, cost, act)):
                got += cg * total if ag else 0.0
                if cg > 0:
                    entries.append((pg, cg, li, gi, bool(ag)))
        frac = got / total
        changed: Dict[int, List[Tuple[int, float]]] = {}
        closed = opened = 0
        if frac > t + tol:
            cands = sorted((e for e in entries if e[4]), key=lambda e: (e[0], -e[1]))
            left = {}  # open gates per layer: a layer's last open gate stays (closing it would cut the network)
            for e in cands:
                left[e[2]] = left.get(e[2], 0) + 1
            skipped = []
            for e in cands:
                if frac <= t + tol:
                    break
                if left[e[2]] <= 1:
                    continue
                if frac - e[1] >= t - tol:
                    left[e[2]] -= 1
                    frac -= e[1]
                    changed.setdefault(e[2], []).append((e[3], self._closed_value(self._layers[e[2]][1])))
                    closed += 1
                else:
                    skipped.append(e)
            for e in skipped:  # gates too coarse for the tolerance: undershoot rather than stay above it
                if frac <= t + tol:
                    break
                if left[e[2]] <= 1:
                    continue
                left[e[2]] -= 1
                frac -= e[1]
                changed.setdefault(e[2], []).append((e[3], self._closed_value(self._layers[e[2]][1])))
                closed += 1
        elif frac < t - tol:
            cands = sorted((e for e in entries if not e[4]), key=lambda e: (-e[0], -e[1]))
            for e in cands:
                if frac >= t - tol:
                    break
                if frac + e[1] <= t + tol:
                    frac += e[1]
                    changed.setdefault(e[2], []).append((e[3], self._open_value(self._layers[e[2]][1])))
                    opened += 1
        for li, sets in changed.items():
            la = self._layers[li][1].log_alpha
            flat = la.detach().view(-1) if la.is_contiguous() else None
            idx = torch.tensor([g for g, _ in sets], device=la.device)
            val = torch.tensor([v for _, v in sets], device=la.device, dtype=la.dtype)
            if flat is not None:
                flat.index_copy_(0, idx, val)
            else:
                new = la.detach().reshape(-1).clone()
                new.index_copy_(0, idx, val)
                la.copy_(new.view_as(la))
        frac = self.deterministic()
        if abs(frac - t) > tol + 1e-9:
            warnings.warn(f"finalize_: the deterministic {self.metric} fraction is {frac:.4f}, not within {tol:g} of "
                          f"the target {t:g} (the gates are too coarse or too few for this tolerance)",
                          stacklevel=2)
        return {"fraction": frac, "target": t, "closed": closed, "opened": opened}

    def extra_repr(self) -> str:
        return (f"target={self.target:g}, metric={self.metric!r}, warmup_steps={self.warmup_steps}, lr={self.lr:g}, "
                f"layers={len(self._layers)}")


__all__ = ["SparsityTarget"]
