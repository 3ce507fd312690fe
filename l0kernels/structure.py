"""Structure gates (docs/design.md §11): one gate per feed-forward unit or attention head, shared by every
linear layer the unit spans.

A :class:`StructureGate` owns ``log_alpha`` (one entry per unit or head) and is registered in the block's
consumer layer (``down_proj.l0_gate``). The block's layers become :class:`StructureLinear` (an ``nn.Linear`` holding the same ``weight``/``bias`` Parameters):

* a *producer* (``gate_proj``/``up_proj``, ``fc1``, a query/key/value projection) computes only the rows of the
  open units: row ``n`` is open when any gate of ``row_gates[n]`` is open (a key/value head's rows stay while
  any query head reading them is open);
* the *consumer* (``down_proj``, ``fc2``, an output projection) multiplies its input column ``k`` by the gate
  ``z[col_gates[k]]`` and reads the open columns only.

So a closed unit costs nothing in any layer it spans, and the block computes what the reference computes:
the hidden activation (the heads' outputs) times ``z``, with the producers' closed rows exactly 0.

One draw per block call: the block module (the lowest module holding all its layers) gets a forward pre-hook that starts a round (the first layer that
needs the gates draws them from a fresh seed, the others reuse them) and a forward hook that ends it. A layer
called outside a round (on its own) draws for itself. In eval mode the gates are ``z_eval``.

How the closed units are skipped (docs/design.md §11): with ``backend="auto"``/``"torch"`` by the torch op,
narrow where ``convert`` found the block's forward allows it (the tensors between the layers hold only the
open units), else full width (gathers); with ``"triton"``/``"cuda"`` the device form, which reads nothing on
the host: the consumer through ``l0_linear``'s kernels, the producers masked.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import _active
from ._checks import draw_seed
from .functional import deterministic_gates, l0_linear, sample_gates, structure_linear
from .modules import _GateOwner, _check_coef, _check_n

STRUCTURES = ("ffn", "heads")
STRUCTURE_BACKENDS = ("auto", "torch", "triton", "cuda")
DEVICE_FORM = ("triton", "cuda")  # backends that run the device form (no host reads)


class GateState(NamedTuple):
    """One block call's gates: ``z``; ``open_classes`` when the call runs narrow; the ``seed`` they came from
    (None in eval)."""
    z: torch.Tensor
    open_classes: Optional[torch.Tensor]
    seed: Optional[torch.Tensor]


GATE_OPEN, GATE_CLOSED = 10.0, -10.0  # log_alpha of a gate surely open / closed (z_eval 1 / 0)


class StructureGate(_GateOwner):
    """``num_gates`` hard-concrete gates shared by the layers of one block (``kind``: ``"ffn"`` units or
    ``"heads"``). ``params_per_gate`` (float, ``(num_gates,)``): the parameters each gate controls over every
    layer it spans (a key/value head's rows are shared equally by the query heads reading them);
    ``ungated_params``: the rest of the spanned layers (the consumer's bias)."""

    def __init__(self, num_gates: int, kind: str, *, noise: str = "batch", droprate_init: float = 0.5,
                 beta: float = 2.0 / 3.0, gamma: float = -0.1, zeta: float = 1.1, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if kind not in STRUCTURES:
            raise ValueError(f"kind must be one of {STRUCTURES}, got {kind!r}")
        if noise != "batch":
            raise ValueError(f"structure gates draw one gate vector per call: noise must be 'batch', got {noise!r}")
        if backend not in STRUCTURE_BACKENDS:
            raise ValueError(f"backend must be one of {STRUCTURE_BACKENDS} for structure gates, got {backend!r}")
        self.kind = kind
        self.group_size = 1
        self._init_gate_options(noise, droprate_init, beta, gamma, zeta, backend)
        self.log_alpha = nn.Parameter(torch.empty(int(num_gates), device=device, dtype=dtype))
        # float64 on the CPU, not a buffer: a model cast to half precision keeps exact counts
        self.params_per_gate = torch.zeros(int(num_gates), dtype=torch.float64)
        self.ungated_params = 0
        self.register_buffer("class_gates", torch.arange(int(num_gates), device=device)[:, None], persistent=False)
        self.narrow = False  # the block's forward runs on tensors holding only the open classes (set by convert)
        self._layers: List["StructureLinear"] = []  # not submodules: they stay where the model holds them
        self._round = False
        self._state: Optional[GateState] = None
        self.reset_gates()

    # -- the gates of this call --------------------------------------------------------------------------
    def state(self) -> GateState:
        """``(z, open_classes, seed)`` for the current call of the block, once per round: ``z`` drawn in training,
        ``z_eval`` in eval; ``open_classes`` (bool per class: an FFN unit, a head, or the query heads of one
        key/value head) when the block runs narrow this call (some but not all classes open, few enough for the
        skip to pay, :func:`l0kernels._active.skip_reasons`' fraction), else None. Only inside a call of the block:
        a layer called on its own keeps its full width."""
        if self._round and self._state is not None:
            return self._state
        cfg = self.cfg
        seed = None
        if self.training:
            seed = draw_seed(self.log_alpha.device)
            z = sample_gates(self.log_alpha, seed, beta=cfg.beta, gamma=cfg.gamma, zeta=cfg.zeta)
        else:
            z = self.eval_gates()
        open_classes = None
        if self.narrow and self._round and self.backend not in DEVICE_FORM and _active.ENABLED and \
                not torch.compiler.is_compiling():
            oc = (z != 0)[self.class_gates].any(-1)
            n_open, n = int(oc.sum()), oc.numel()
            if 0 < n_open < n and n_open <= _active.DENSE_ABOVE * n:
                open_classes = oc
        state = GateState(z, open_classes, seed)
        if self._round:
            self._state = state
        return state

    def eval_gates(self) -> torch.Tensor:
        """``z_eval`` as the eval forward uses it (differentiable in ``log_alpha``)."""
        c = self.cfg
        return deterministic_gates(self.log_alpha, beta=c.beta, gamma=c.gamma, zeta=c.zeta)

    def layers(self) -> List[Tuple[str, "StructureLinear"]]:
        """``(role, layer)`` for every layer the gates span (``"rows"`` for a producer, ``"cols"`` the consumer)."""
        return [(("rows" if m._row_gate is self else "cols"), m) for m in self._layers]

    def counted_parameters(self):
        return [p for m in self._layers for p in (m.weight, m.bias) if p is not None]

    def _count(self) -> None:
        """``params_per_gate`` and ``ungated_params`` from the spanned layers' shapes."""
        per = torch.zeros(self.log_alpha.numel(), dtype=torch.float64)
        ungated = 0
        for role, m in self.layers():
            n, k = m.weight.shape
            if role == "rows":
                per += _rows_to_gates(m.row_gates.cpu(), torch.full((n,), float(k + (m.bias is not None)),
                                                                    dtype=torch.float64), per.numel())
            else:
                per += torch.bincount(m.col_gates.cpu(), minlength=per.numel()).double() * n
                ungated += n if m.bias is not None else 0
        self.params_per_gate = per
        self.ungated_params = ungated

    def expected_params(self) -> torch.Tensor:
        """Expected non-zero parameters over every layer the gates span (float64)."""
        p = self.prob_open().double()
        return (p * self.params_per_gate.to(p.device)).sum() + self.ungated_params

    def regularizer(self, lamba: float, weight_decay: float = 0.0, N: int = 1) -> torch.Tensor:
        """``(1/N) sum_g p_g (lamba |g| + 0.5 wd ||theta_g||^2) + 0.5 wd ||theta_ungated||^2 / N`` over every layer
        the gates span (``|g|``: ``params_per_gate``; ``theta_g``: the gate's rows of the producers, with their
        bias, and its columns of the consumer)."""
        _check_coef(lamba, "lamba")
        _check_coef(weight_decay, "weight_decay")
        N = _check_n(N)
        p = self.prob_open().float()
        term = (p * (lamba * self.params_per_gate.to(p.device).float())).sum()
        if weight_decay:
            sq, rest = self._squares(p)
            term = term + 0.5 * weight_decay * ((p * sq).sum() + rest)
        return term / N

    def _squares(self, p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(||theta_g||^2 per gate, ||theta_ungated||^2)`` in float32 on ``p``'s device."""
        sq = torch.zeros_like(p)
        rest = p.new_zeros(())
        for role, m in self.layers():
            w2 = m.weight.float().square()
            if role == "rows":
                rows = w2.sum(1) + (m.bias.float().square() if m.bias is not None else 0.0)
                sq = sq + _rows_to_gates(m.row_gates, rows, sq.numel())
            else:
                sq = sq.index_add(0, m.col_gates, w2.sum(0))
                if m.bias is not None:
                    rest = rest + m.bias.float().square().sum()
        return sq, rest

    def extra_repr(self) -> str:
        return f"{self.log_alpha.numel()}, kind={self.kind!r}, layers={len(self._layers)}, noise={self.noise!r}"


def _rows_to_gates(row_gates: torch.Tensor, values: torch.Tensor, num_gates: int) -> torch.Tensor:
    """Per gate, the sum of ``values`` (one per row) over the rows it keeps, a row's value shared equally by
    the distinct gates of ``row_gates[n]`` (``(N, R)``); differentiable in ``values``."""
    g = row_gates.sort(1).values
    distinct = torch.ones_like(g, dtype=torch.bool)
    distinct[:, 1:] = g[:, 1:] != g[:, :-1]
    share = distinct.to(values.dtype) / distinct.sum(1, keepdim=True).to(values.dtype)
    return values.new_zeros(num_gates).index_add(0, g[distinct], (share * values[:, None])[distinct])


class StructureLinear(nn.Linear):
    """An ``nn.Linear`` spanned by structure gates: rows kept by ``row_gate`` (``row_gates``: ``(N, R)`` gate
    indices; a row is open when any of its ``R`` gates is) and/or input columns scaled by ``col_gate``
    (``col_gates``: ``(K,)``). Holds the converted layer's own ``weight`` and ``bias`` Parameters."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._row_gate: Optional[StructureGate] = None
        self._col_gate: Optional[StructureGate] = None
        self.register_buffer("row_gates", None, persistent=False)
        self.register_buffer("col_gates", None, persistent=False)
        self.register_buffer("row_classes", None, persistent=False)
        self.register_buffer("col_classes", None, persistent=False)

    def __setattr__(self, name, value):
        if name in ("_row_gate", "_col_gate"):  # a reference, not a submodule: the gate lives in its block
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._col_gate if self._col_gate is not None else self._row_gate
        if gate is not None and gate.backend in DEVICE_FORM:
            return self._device_forward(x)
        rows = scale = cols = closed_within = None
        narrow = False
        if self._row_gate is not None:
            z, open_classes, _ = self._row_gate.state()
            rows = (z != 0)[self.row_gates].any(-1)
            if open_classes is not None:  # the output holds the open classes' rows only
                present = open_classes[self.row_classes]
                keep = rows[present]
                if not bool(keep.all()):  # a closed query head of an open key/value group: rows of exact zeros
                    closed_within = keep
                rows, narrow = present, True
        if self._col_gate is not None:
            z, open_classes, _ = self._col_gate.state()
            scale = z[self.col_gates]
            if open_classes is not None:  # the input holds the open classes' columns only
                cols = open_classes[self.col_classes]
        y = structure_linear(x, self.weight, self.bias, rows=rows, scale=scale, cols=cols, open_out=narrow)
        return y if closed_within is None else y * closed_within.to(y.dtype)

    def _device_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The device form (gate backend ``"triton"``/``"cuda"``): nothing read on the host, so a CUDA graph can
        capture it. The consumer is ``l0_linear(gate="in")`` on the gate's ``log_alpha`` and the block call's
        seed, on that backend: the same ``z``, its closed columns skipped inside the kernels. A producer runs that
        backend's kernels over its open rows (the open set found on the device; the closed rows exact zeros,
        never computed), where the backend takes the call (``structure_linear``), else it computes every row
        and multiplies the closed ones by 0."""
        rows = None
        rg = self._row_gate
        if rg is not None:
            rows = (rg.state().z != 0)[self.row_gates].any(-1)
        g = self._col_gate
        if g is None:
            return structure_linear(x, self.weight, self.bias, rows=rows, host=False, backend=rg.backend,
                                    log_alpha=rg.log_alpha)
        st = g.state()
        y = l0_linear(x, self.weight, g.log_alpha, self.bias, seed=st.seed, gate="in", training=g.training,
                      backend=g.backend, beta=g.cfg.beta, gamma=g.cfg.gamma, zeta=g.cfg.zeta,
                      group_size=self.in_features // g.log_alpha.numel())
        return y if rows is None else y * rows.to(y.dtype)

    @torch.no_grad()
    def folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) of the plain layer this layer's eval forward computes: closed rows zero, columns
        times ``z_eval``."""
        w = self.weight.detach()
        b = self.bias.detach() if self.bias is not None else None
        if self._col_gate is not None:
            w = w * self._col_gate.eval_gates()[self.col_gates].to(w.dtype)
        if self._row_gate is not None:
            keep = (self._row_gate.eval_gates() != 0)[self.row_gates].any(-1)
            w = w * keep[:, None].to(w.dtype)
            b = b * keep.to(b.dtype) if b is not None else None
        return w, b

    def extra_repr(self) -> str:
        roles = [r for r, g in (("rows", self._row_gate), ("cols", self._col_gate)) if g is not None]
        return super().extra_repr() + f", structure={'+'.join(roles) or 'none'}"


def _start_round(module, args):
    for g in module.__dict__.get("_l0_round_gates", ()):
        g._round, g._state = True, None


def _end_round(module, args, output):
    for g in module.__dict__.get("_l0_round_gates", ()):
        g._round, g._state = False, None


def attach_gate(block: nn.Module, consumer: "StructureLinear", gate: StructureGate) -> None:
    """Register ``gate`` as ``consumer.l0_gate`` (a layer's forward never iterates its children, a container's
    would) and give ``block`` (the lowest module holding the block's layers) the round hooks, once."""
    consumer.add_module("l0_gate", gate)
    rounds = block.__dict__.setdefault("_l0_round_gates", [])
    if not rounds:
        block.register_forward_pre_hook(_start_round)
        block.register_forward_hook(_end_round, always_call=True)
    rounds.append(gate)


def strip_rounds(block: nn.Module) -> None:
    """Remove the round hooks and gate list of a block (compact() drops the gates)."""
    block.__dict__.pop("_l0_round_gates", None)
    for hooks, fn in ((block._forward_pre_hooks, _start_round), (block._forward_hooks, _end_round)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            getattr(block, "_forward_hooks_always_called", {}).pop(key, None)


__all__ = ["StructureGate", "StructureLinear", "GateState", "STRUCTURES", "attach_gate", "strip_rounds"]
