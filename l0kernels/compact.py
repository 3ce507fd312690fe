"""``compact(model)``: an ordinary ``torch.nn`` model with every zero-gated unit removed; ``summary(model)``;
``compare(original, compacted, example_inputs)``.

Graph core (models ``torch.fx`` traces; L0 layers, ``torch.nn`` layers and modules with a registered rule are
leaves). Every tensor of the traced graph carries the state of its *units* (:class:`Units`: the features of a
``Linear``'s output, the channels of a conv's output, ``(heads, head_dim)`` after an attention reshape): a
global id per unit, and whether the unit is *dead* -- the same known constant for every input (``const``).
Ids are merged where units must shrink together (union-find): a residual add or an element-wise product ties
its operands' units, ``scaled_dot_product_attention`` ties a query head to its key/value head (with
grouped-query attention all query heads of a key/value head), a grouped conv ties the channels of a group.
One small rule per op type (:func:`register_compact_rule`) maps the units of an op's inputs to those of its
output. Then the units each weight layer needs are marked, to a fixed point, starting from the model outputs
and from units an op cannot shrink (normalisations over the unit dim, ops without a unit rule): a weight
layer needs an input unit when one of its kept rows reads it (a nonzero weight) and it is not a dead constant
the layer can fold into its bias exactly (always for ``Linear``; for a conv when the constant is 0 or there is
no zero padding). Everything not needed is removed: rows of the producers, columns of the consumers (their
constants folded into the bias: ``sigmoid(0)``, a BatchNorm shift), BatchNorm entries (a BatchNorm that loses
every entry becomes ``nn.Identity``: its input has no channels left), attention heads (the
sizes in ``view``/``reshape``/``expand`` are rewritten), and closed inputs of the model (a plain
input-selection step, ``index_select`` on a buffer, as the first module).

Exactness: removed units are either never read by what is kept or are constants that are folded exactly; the
result matches the gated eval model up to float rounding. Forward constants: a unit is dead when every input
its weight row reads is a constant that passes through the layer exactly (a closed output gate or channel, a
zero row, a row reading only dead units); element-wise ops, BatchNorm (eval statistics), max/adaptive pooling,
dropout and reshapes carry constants (``f(0)`` need not be 0); a product is 0 where a factor is 0.

The graph is traced from the eval forward (a ``self.training`` branch takes its eval side; torchvision's
``stochastic_depth`` is then the identity). An op none of whose inputs carries units (size arithmetic such as
``h // 2``, input checks such as ``torch._assert(h == 224)``, helpers of parameters only) gives an output
without units, whatever it is; splits (``chunk``, ``split``, ``unbind``) keep their input's units whole.

Grouped convolutions (``groups > 1``) stay valid grouped convolutions: a group goes whole (outputs and input
block) or stays whole (reading its whole input block). A conv keeps at least one output channel.

Hugging Face ``transformers`` models, which ``torch.fx`` does not trace, go through module rules
(:mod:`l0kernels._compact_hf`) that shrink the layers of Llama-style and BERT-style attention and FFN blocks
in place on a deep copy.

Devices and dtypes: every tensor compact() and summary() make is on the device of the parameters it meets
(nothing comes from the default device), the gates are the eval path's (``eval_gates_and_grad`` on
``log_alpha`` as it is, folded into the weights in its compute dtype and rounded to the weight dtype, as the
eval forward does), the analysis runs in float64 (float32 on devices without float64), and the compacted
layers have the dtype and device of the layers they replace.
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._gates import eval_gates_and_grad

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
               nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
               nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
POOL_KEEP_CONST = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
NORMS = tuple(c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm, nn.LocalResponseNorm,
                          nn.InstanceNorm1d, nn.InstanceNorm2d) if c is not None)
_CPU = torch.device("cpu")


def _l0_types():
    from .modules import L0Conv2d, L0Linear
    return L0Linear, L0Conv2d


def _is_weight_layer(m) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d) + _l0_types())


# -- gates folded into weights -----------------------------------------------------------------------------

@dataclass
class _Dense:
    kind: str  # "linear" | "conv"
    weight: torch.Tensor  # analysis dtype, gates folded, on the layer's device
    bias: torch.Tensor  # analysis dtype (zeros when the layer has none)
    has_bias: bool
    src: nn.Module

    @property
    def groups(self) -> int:
        return getattr(self.src, "groups", 1)

    @property
    def n_in(self) -> int:
        """Input units (a conv's input channels: ``weight.shape[1]`` per group)."""
        return self.weight.shape[1] * self.groups

    def pads_with_zeros(self) -> bool:
        if self.kind != "conv":
            return False
        pad = self.src.padding
        padded = pad != "valid" if isinstance(pad, str) else any(int(p) != 0 for p in pad)
        return padded and getattr(self.src, "padding_mode", "zeros") == "zeros"


def _work_dtype(device: torch.device) -> torch.dtype:
    """The analysis dtype on ``device``: float64, or float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _z_eval(m) -> torch.Tensor:
    """``z_eval`` per gate of an L0 layer as its eval forward computes it (``backends._plans``): ``log_alpha`` as it
    is, in the gate compute dtype, on its device (the gate helpers run with that device as the default device
    so that none of their allocations come from the caller's default device)."""
    la = m.log_alpha.detach()
    with torch.device(la.device):
        z = eval_gates_and_grad(la, m.cfg, need_grad=False)[0]
    g = getattr(m, "group_size", 1)  # grouped gates: one value per gated feature / channel
    return z if g == 1 else z.repeat_interleave(g, dim=-1)


def _feature_gates(m) -> torch.Tensor:
    """``z_eval`` per gated feature (input column, output row or channel): a grouped gate (``group_size`` g,
    ``log_alpha`` of ``features // g`` gates) is repeated over its g features."""
    z = _z_eval(m)
    gate = getattr(m, "gate", "out")
    if gate == "weight" or z.dim() != 1:
        return z
    n = m.weight.shape[1] if gate == "in" else m.weight.shape[0]  # (conv: output channels)
    if z.numel() != n:
        if z.numel() == 0 or n % z.numel():
            raise ValueError(f"compact: {type(m).__name__} has {z.numel()} gates for {n} features")
        z = z.repeat_interleave(n // z.numel())
    return z


def _dense(m) -> _Dense:
    L0Linear, L0Conv2d = _l0_types()
    w = m.weight.detach()
    b = m.bias.detach() if m.bias is not None else None
    kind = "conv" if isinstance(m, (nn.Conv2d, L0Conv2d)) else "linear"
    if isinstance(m, (L0Linear, L0Conv2d)):
        # the eval path's folding: (w * z) in the gate compute dtype, rounded to the weight dtype
        z = _feature_gates(m)
        cd = z.dtype
        gate = "out" if kind == "conv" else getattr(m, "gate", "out")
        if gate == "out":
            zw = z.view((-1,) + (1,) * (w.dim() - 1))
            w = (w.to(cd) * zw).to(w.dtype)
            b = (b.to(cd) * z).to(b.dtype) if b is not None else None
        elif gate == "in":
            w = (w.to(cd) * z[None, :]).to(w.dtype)
        else:  # "weight": the bias is not gated
            w = (w.to(cd) * z).to(w.dtype)
    work = _work_dtype(w.device)
    w = w.to(work)
    b = b.to(work) if b is not None else w.new_zeros(w.shape[0])
    return _Dense(kind, w, b, m.bias is not None, m)


def _per_input(d: _Dense, m: torch.Tensor) -> torch.Tensor:
    """``m`` (one value per weight row and input of its group) as (rows, d.n_in): zero outside the group."""
    if d.groups == 1:
        return m
    return torch.block_diag(*m.view(d.groups, -1, m.shape[1]))


def _reads(d: _Dense) -> torch.Tensor:
    """(rows, inputs): which inputs each weight row reads (a nonzero weight)."""
    nonzero = d.weight != 0
    return _per_input(d, nonzero.any(3).any(2) if d.kind == "conv" else nonzero)


def _through(d: _Dense, c: torch.Tensor) -> torch.Tensor:
    """Per weight row, what inputs that are the constants ``c`` everywhere add to its output (no bias)."""
    w = d.weight.sum((2, 3)) if d.kind == "conv" else d.weight
    return _per_input(d, w) @ c.to(device=w.device, dtype=w.dtype)


# -- units -------------------------------------------------------------------------------------------------

@dataclass
class Units:
    """The units of one tensor of the traced graph.

    ``ids`` (int64, shape = the sizes of the unit dims ``dims``, negative tensor dims in ascending order): a
    global id per unit; units with the same (merged) id are kept or removed together. ``dead``/``const`` (same
    shape): the unit is the constant ``const`` for every input. ``rank``: the tensor's rank when known.
    ``flat``: a flattened feature map whose H*W is known only at the next ``Linear`` (``ids`` per channel)."""
    ids: torch.Tensor
    dims: Tuple[int, ...]
    dead: torch.Tensor
    const: torch.Tensor
    rank: Optional[int] = None
    flat: bool = False

    def like(self, const=None, dead=None, ids=None) -> "Units":
        return Units(self.ids if ids is None else ids, self.dims, self.dead if dead is None else dead,
                     self.const if const is None else const, self.rank, self.flat)


@dataclass
class _WeightUse:
    node: Any
    d: _Dense
    inp: Units  # flat (K,) positions for linear, (C_in,) for conv
    out: Units


def _label(node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"{node.op} {name}"


class CompactContext:
    """What a rule (:func:`register_compact_rule`) works with while ``compact`` walks the traced graph.

    ``units(arg)`` -> :class:`Units` or None (a value without tracked units: a constant, a shape, an opaque
    tensor); ``tie(a, b)`` merges two id tensors; ``freeze(units)`` keeps every unit; ``fresh(shape)`` makes
    new ids; ``module(node)`` the module of a ``call_module`` node; ``value(arg)`` the example value (with
    ``example_inputs``; else None)."""

    def __init__(self, gm: torch.fx.GraphModule, values: Optional[Dict[Any, Any]]):
        self.gm = gm
        self.values = values
        self.env: Dict[Any, Units] = {}
        self.parent: List[int] = []
        self.frozen: List[torch.Tensor] = []
        self.weights: List[_WeightUse] = []
        self.bns: Dict[Any, Units] = {}
        self.multi: List[Units] = []
        self.resize: Dict[Any, Units] = {}
        self.claimed: set = set()
        self.opaque: set = set()

    # ids
    def fresh(self, shape) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long, device=_CPU).view(tuple(int(s) for s in shape))

    def _find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def tie(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for i, j in zip(a.flatten().tolist(), b.flatten().tolist()):
            ri, rj = self._find(i), self._find(j)
            if ri != rj:
                self.parent[max(ri, rj)] = min(ri, rj)

    def freeze(self, u: Optional[Units]) -> None:
        if u is not None:
            self.frozen.append(u.ids.flatten())

    def new_units(self, shape, dims, rank=None) -> Units:
        ids = self.fresh(shape)
        return Units(ids, tuple(dims), torch.zeros(ids.shape, dtype=torch.bool, device=_CPU),
                     torch.zeros(ids.shape, dtype=torch.float64, device=_CPU), rank)

    # values
    def module(self, node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def value(self, arg):
        if isinstance(arg, torch.fx.Node):
            return None if self.values is None else self.values.get(arg)
        return arg

    def shape(self, arg) -> Optional[Tuple[int, ...]]:
        v = self.value(arg)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def units(self, arg, dims: Optional[Tuple[int, ...]] = None, size: Optional[int] = None) -> Optional[Units]:
        """The units of ``arg``; ``dims``/``size`` say what a weight layer expects (to start the units of a
        model input seen without example inputs, and to resolve a pending flatten)."""
        if not isinstance(arg, torch.fx.Node):
            return None
        self.claimed.add(arg)
        u = self.env.get(arg)
        if u is None and arg.op == "placeholder" and dims is not None and arg not in self.opaque:
            u = self.env[arg] = self.new_units((size,), dims)
        if u is None:
            self.opaque.add(arg)
            return None
        if u.flat and size is not None and dims == (-1,):
            c = u.ids.numel()
            if c == 0 or size % c:
                raise ValueError(f"compact: a Linear with {size} inputs follows a flatten of {c} channels "
                                 f"(node {arg.name!r})")
            hw = size // c
            u = self.env[arg] = Units(u.ids.repeat_interleave(hw), (-1,), u.dead.repeat_interleave(hw),
                                      u.const.repeat_interleave(hw), u.rank, False)
        elif u.flat:
            raise ValueError(f"compact: the flattened feature map {arg.name!r} is read by something other than a "
                             f"Linear; pass example_inputs so that compact() knows its size")
        return u


# -- rules -------------------------------------------------------------------------------------------------

_RULES: Dict[Any, Any] = {}


def register_compact_rule(target, rule) -> None:
    """Teach :func:`compact` an op. ``target``: an ``nn.Module`` subclass (its ``call_module`` nodes; the
    class becomes a leaf of the trace), a function (``call_function`` nodes, e.g. ``torch.special.expit``)
    or a method name (``call_method`` nodes, e.g. ``"clamp"``). ``rule``:

    * ``"elementwise"``: output unit i depends on input unit i only (the constants of dead units are passed
      through the op itself, with its other arguments);
    * ``"passthrough"``: like ``"elementwise"`` and the op is the identity on constants (eval dropout);
    * ``"frozen"``: the op keeps every unit of its tensor inputs (they are never removed) and its output has
      units that cannot be removed either;
    * a callable ``rule(ctx, node) -> Units | None`` with ``ctx`` a :class:`CompactContext`: full control
      (return None for an output without tracked units).

    Modules registered as ``"elementwise"``/``"passthrough"``/``"frozen"`` are copied unchanged into the
    compacted model, so their own parameters must not depend on the unit count (else write a callable rule,
    or keep the units with ``"frozen"``).
    """
    if not (isinstance(target, str) or callable(target)):
        raise TypeError(f"target must be a module class, a function or a method name, got {type(target).__name__}")
    if not (rule in ("elementwise", "passthrough", "frozen") or callable(rule)):
        raise ValueError(f"rule must be 'elementwise', 'passthrough', 'frozen' or a callable, got {rule!r}")
    _RULES[target] = rule


def _rule_frozen(ctx: CompactContext, node):
    for a in node.all_input_nodes:
        ctx.freeze(ctx.units(a))
    return None


def _apply_const(node, const: torch.Tensor, ctx) -> torch.Tensor:
    """The op of ``node`` applied to the constants of its first tensor argument (other arguments as traced)."""
    def sub(a):
        if isinstance(a, torch.fx.Node):
            return const if a is node.args[0] else ctx.value(a)
        return a
    args = [sub(a) for a in node.args]
    kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    if any(isinstance(a, torch.fx.Node) or a is None and isinstance(b, torch.fx.Node)
           for a, b in zip(args, node.args)):
        raise ValueError(f"compact: '{_label(node)}' takes other traced values; pass example_inputs")
    with torch.no_grad():
        if node.op == "call_module":
            m = copy.deepcopy(ctx.module(node)).to(device=const.device, dtype=const.dtype).eval()
            return m(const.reshape(1, -1)).reshape(const.shape)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs).reshape(const.shape)
        return node.target(*args, **kwargs).reshape(const.shape)


def _rule_elementwise(ctx, node):
    u = ctx.units(node.args[0]) if node.args else None
    if u is None:
        return None
    return u.like(const=_apply_const(node, u.const, ctx).to(torch.float64))


def _rule_passthrough(ctx, node):
    return ctx.units(node.args[0]) if node.args else None


def _rule_avgpool(ctx, node):
    u = ctx.units(node.args[0])
    if u is None:
        return None
    if node.op == "call_module":
        m = ctx.module(node)
        pad, cip, div = m.padding, m.count_include_pad, m.divisor_override
    else:
        def a(i, k, dflt):
            return node.args[i] if len(node.args) > i else node.kwargs.get(k, dflt)
        pad, cip, div = a(3, "padding", 0), a(5, "count_include_pad", True), a(6, "divisor_override", None)
    pad = pad if isinstance(pad, (tuple, list)) else (pad,)
    if (any(p != 0 for p in pad) and cip) or div is not None:
        # borders average the constant with padding zeros: only zero constants stay constant
        return u.like(dead=u.dead & (u.const == 0))
    return u


def _rule_weight(ctx, node):
    m = ctx.module(node)
    d = _dense(m)
    dims = (-1,) if d.kind == "linear" else (-3,)
    u = ctx.units(node.args[0], dims=dims, size=d.n_in)
    if u is None:  # an input without tracked units: its units are all kept
        u = ctx.new_units((d.n_in,), dims)
        ctx.freeze(u)
    if u.dims != dims or u.ids.numel() != d.n_in:
        raise ValueError(f"compact: {type(m).__name__} {node.target!r} reads {d.n_in} units on dim {dims[0]}, but "
                         f"its input's units are {tuple(u.ids.shape)} on dims {u.dims}")
    dead, const = u.dead.flatten(), u.const.flatten()
    passes = dead & ((const == 0) | (not d.pads_with_zeros()))
    dev = d.weight.device
    reads = _reads(d)
    out_dead = ~(reads & ~passes.to(dev)[None, :]).any(1)
    out_const = d.bias.clone()
    if bool(passes.any()):
        out_const += _through(d, torch.where(passes, const, torch.zeros_like(const)))
    n_out = d.weight.shape[0]
    rank = u.rank if d.kind == "linear" else (u.rank or 4)
    out = Units(ctx.fresh((n_out,)), dims, out_dead.cpu(), out_const.to(device=_CPU, dtype=torch.float64), rank)
    if d.groups > 1:  # a group's output channels go together
        blocks = out.ids.view(d.groups, -1)
        for g in range(d.groups):
            ctx.tie(blocks[g, :1].expand(blocks.shape[1]), blocks[g])
    use = _WeightUse(node, d, Units(u.ids.flatten(), dims, dead, const, u.rank), out)
    for prev in ctx.weights:  # a layer called twice keeps the same units at both calls
        if prev.node.target == node.target:
            ctx.tie(prev.inp.ids, use.inp.ids)
            ctx.tie(prev.out.ids, use.out.ids)
            # one compacted layer folds one constant per removed input: fold only where the calls agree
            same = (prev.inp.dead == use.inp.dead) & (~use.inp.dead | (prev.inp.const == use.inp.const))
            prev.inp.dead = prev.inp.dead & same
            use.inp.dead = use.inp.dead & same
    ctx.weights.append(use)
    return out


def _channel_dim(m) -> int:
    return -3 if isinstance(m, nn.BatchNorm2d) else -1


def _rule_batchnorm(ctx, node):
    m = ctx.module(node)
    u = ctx.units(node.args[0])
    if u is None:
        return None
    want = _channel_dim(m)
    if isinstance(m, nn.BatchNorm1d) and u.rank == 3:
        want = -2
    if u.dims != (want,) or u.ids.numel() != m.num_features:
        raise ValueError(f"compact: {type(m).__name__} {node.target!r} normalises {m.num_features} features on dim "
                         f"{want}; its input's units are {tuple(u.ids.shape)} on dims {u.dims}")
    if m.running_mean is None or m.running_var is None:
        raise ValueError(f"compact: BatchNorm {node.target!r} has no running statistics (track_running_stats="
                         f"False); its eval output depends on the batch")
    for prev, pu in ctx.bns.items():  # a BatchNorm called twice keeps the same units at both calls
        if prev.target == node.target:
            ctx.tie(pu.ids, u.ids)
    ctx.bns[node] = u
    c = u.const
    as_c = lambda t: t.detach().to(device=_CPU, dtype=torch.float64)
    out = (c - as_c(m.running_mean)) / torch.sqrt(as_c(m.running_var) + m.eps)
    if m.affine:
        out = out * as_c(m.weight) + as_c(m.bias)
    return u.like(const=out)


def _binary_const(op, a, b):
    if op in ("add", "sub", "mul", "div"):
        return {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[op](a, b)
    raise AssertionError(op)


def _make_binary(op: str):
    def rule(ctx, node):
        a = node.args[0] if node.args else node.kwargs.get("input")
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        alpha = node.kwargs.get("alpha", 1)
        ua, ub = ctx.units(a), ctx.units(b)
        if ua is None and ub is None:
            return None
        num = (int, float, bool)
        if ua is not None and ub is not None:
            if ua.dims != ub.dims or ua.ids.shape != ub.ids.shape:
                raise ValueError(f"compact: '{_label(node)}' ({node.name}) combines tensors whose units do not line "
                                 f"up: {tuple(ua.ids.shape)} on dims {ua.dims} and {tuple(ub.ids.shape)} on {ub.dims}")
            ctx.tie(ua.ids, ub.ids)
            cb = ub.const * alpha if op in ("add", "sub") else ub.const
            const = _binary_const(op, ua.const, cb)
            dead = ua.dead & ub.dead
            if op == "mul":  # a factor that is exactly 0 makes the product 0
                zero = (ua.dead & (ua.const == 0)) | (ub.dead & (ub.const == 0))
                dead = dead | zero
                const = torch.where(zero, torch.zeros_like(const), const)
            return ua.like(const=const, dead=dead)
        u, other, first = (ua, b, True) if ua is not None else (ub, a, False)
        if isinstance(other, num) and not (op in ("add", "sub") and alpha != 1 and not first):
            o = other * alpha if (op in ("add", "sub") and not first) else other
            const = _binary_const(op, u.const, o) if first else _binary_const(op, o, u.const)
            return u.like(const=const)
        # a tensor without units (a parameter, a mask, an opaque value): it may differ per unit
        ctx.freeze(u)
        return u.like(dead=torch.zeros_like(u.dead))
    return rule


def _rule_cat(ctx, node):
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    us = [ctx.units(t) for t in tensors]
    if any(u is None for u in us):
        for u in us:
            ctx.freeze(u)
        return None
    rank = next((len(s) for s in (ctx.shape(t) for t in tensors) if s is not None), us[0].rank)
    if dim >= 0:
        if rank is None:
            raise ValueError(f"compact: torch.cat on dim {dim} at {node.name!r}: the tensors' rank is unknown; "
                             f"pass example_inputs")
        dim -= rank
    if any(u.dims != us[0].dims for u in us):
        raise ValueError(f"compact: torch.cat at {node.name!r} joins tensors with units on different dims")
    if dim in us[0].dims:
        ax = us[0].dims.index(dim)
        cat = lambda ts: torch.cat(ts, ax)
        return Units(cat([u.ids for u in us]), us[0].dims, cat([u.dead for u in us]), cat([u.const for u in us]),
                     rank)
    for u in us[1:]:  # joined along another dim: unit i of every input is the same unit
        if u.ids.shape != us[0].ids.shape:
            raise ValueError(f"compact: torch.cat at {node.name!r} joins tensors of different unit counts")
        ctx.tie(us[0].ids, u.ids)
    dead = us[0].dead.clone()
    for u in us[1:]:
        dead &= u.dead & (u.const == us[0].const)
    return us[0].like(dead=dead)


def _rule_sdpa(ctx, node):
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    uq, uk, uv = ctx.units(a["query"]), ctx.units(a["key"]), ctx.units(a["value"])
    mask = a.get("attn_mask")
    if isinstance(mask, torch.fx.Node):
        ctx.freeze(ctx.units(mask))
    if uq is None or uk is None or uv is None:
        for u in (uq, uk, uv):
            ctx.freeze(u)
        return None
    for u, nm in ((uq, "query"), (uk, "key"), (uv, "value")):
        if u.dims != (-3, -1):
            raise ValueError(f"compact: scaled_dot_product_attention {node.name!r}: the {nm}'s units are on dims "
                             f"{u.dims}, not (heads, head_dim) = (-3, -1); pass example_inputs")
    h, hk = uq.ids.shape[0], uk.ids.shape[0]
    if uv.ids.shape[0] != hk or h % max(hk, 1):
        raise ValueError(f"compact: scaled_dot_product_attention {node.name!r}: {h} query heads, {hk} key heads, "
                         f"{uv.ids.shape[0]} value heads")
    r = h // hk
    for i in range(h):  # a query head, its key/value head and its output go together
        j = i // r
        anchor = uq.ids[i, :1]
        ctx.tie(anchor.expand(uq.ids.shape[1]), uq.ids[i])
        ctx.tie(anchor.expand(uk.ids.shape[1]), uk.ids[j])
        ctx.tie(anchor.expand(uv.ids.shape[1]), uv.ids[j])
    ids = uv.ids.repeat_interleave(r, 0)
    # an output unit is 0 where its value unit is 0 for every key (a weighted sum of zeros)
    zero = (uv.dead & (uv.const == 0)).repeat_interleave(r, 0)
    return Units(ids, (-3, -1), zero, torch.zeros(ids.shape, dtype=torch.float64, device=_CPU), uq.rank)


_FLATTEN_FUNCS = (torch.flatten,)  # (no shapes known)


def _flatten_like_no_shapes(node) -> bool:
    """``flatten(x, 1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)`` / ``reshape(-1, K)`` seen without shapes."""
    t = node.target
    if node.op == "call_module":
        return False
    if t in ("flatten",) or t in _FLATTEN_FUNCS:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if t in ("view", "reshape") or t is torch.reshape:
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return len(dims) == 2 and (dims[0] == -1 or isinstance(dims[0], torch.fx.Node)) and \
            (dims[1] == -1 or isinstance(dims[1], int))
    return False


def _rule_layout(ctx, node):
    """Ops that only move data (view, reshape, flatten, transpose, permute, expand, repeat_interleave, indexing,
    contiguous): run the op itself on a tensor of unit positions and read the output's units from it."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    u = ctx.units(x)
    if u is None:
        return None
    if node.op == "call_method" and node.target == "contiguous":
        return u
    shape = ctx.shape(x)
    if shape is None:
        m = ctx.module(node) if node.op == "call_module" else None
        flat = _flatten_like_no_shapes(node) or (isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1))
        if flat and u.dims == (-3,):
            return Units(u.ids, (-1,), u.dead, u.const, 2, True)
        if flat and u.dims == (-1,) and u.rank in (None, 2):
            return u
        raise ValueError(f"compact: '{_label(node)}' ({node.name}) needs the tensor shapes to follow its units: call "
                         f"compact(model, example_inputs)")
    rank = len(shape)
    n = u.ids.numel()
    view_shape = [1] * rank
    for d, s in zip(u.dims, u.ids.shape):
        view_shape[rank + d] = s
    grid = torch.arange(n, dtype=torch.long, device=_CPU).view(view_shape).expand(shape).contiguous()

    def sub(a):
        if isinstance(a, torch.fx.Node):
            return grid if a is x else ctx.value(a)
        if isinstance(a, (list, tuple)):
            return type(a)(sub(b) for b in a)
        return a
    args = [sub(a) for a in node.args]
    kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    if node.op == "call_module":
        out = ctx.module(node)(grid)
    elif node.op == "call_method":
        out = getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        out = node.target(*args, **kwargs)
    if not isinstance(out, torch.Tensor):
        ctx.freeze(u)
        return None
    r = out.dim()
    udims = []
    for d in range(r):
        if out.shape[d] > 1 and bool((out != out.narrow(d, 0, 1)).any()):
            udims.append(d)
    idx = out
    for d in range(r - 1, -1, -1):
        if d not in udims:
            idx = idx.narrow(d, 0, 1).squeeze(d) if idx.shape[d] > 0 else idx
    bshape = [out.shape[d] if d in udims else 1 for d in range(r)]
    if out.numel() == 0 or not torch.equal(idx.reshape(bshape).expand(out.shape), out):
        raise ValueError(f"compact: '{_label(node)}' ({node.name}) mixes units with other dims")
    if not udims or torch.unique(idx).numel() != n:  # a selection of units: the op indexes them, keep them all
        ctx.freeze(u)
        if not udims:
            return None
    flat = idx.reshape(-1)
    res = Units(u.ids.reshape(-1)[flat].reshape(idx.shape), tuple(d - r for d in udims),
                u.dead.reshape(-1)[flat].reshape(idx.shape), u.const.reshape(-1)[flat].reshape(idx.shape), r)
    if len(udims) > 1:
        ctx.multi.append(res)
    if node.op != "call_module" and node.target not in _SIZE_FREE:  # sizes in its arguments may need rewriting
        ctx.resize[node] = res
    return res


_SIZE_FREE = {"transpose", "permute", "flatten", "contiguous", "unsqueeze", "squeeze", "movedim", "swapaxes",
              "repeat_interleave", torch.flatten, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
              torch.repeat_interleave, torch.movedim, torch.swapaxes, operator.getitem}


def _rule_shape(ctx, node):
    for a in node.all_input_nodes:
        ctx.claimed.add(a)
    return None


def _rule_mean(ctx, node):
    """``x.mean(dims)`` over dims without units (global average pooling): units and constants pass."""
    x = node.args[0]
    u = ctx.units(x)
    if u is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rank = len(ctx.shape(x)) if ctx.shape(x) is not None else u.rank
    if dim is None or rank is None:
        ctx.freeze(u)
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = [d - rank if d >= 0 else d for d in dims]
    if any(d in u.dims for d in dims):
        ctx.freeze(u)
        return None
    if keep:
        return u
    new_dims = tuple(d + sum(1 for e in dims if e > d) for d in u.dims)
    return Units(u.ids, new_dims, u.dead, u.const, rank - len(dims))


def _builtin_rules():
    L0Linear, L0Conv2d = _l0_types()
    r: Dict[Any, Any] = {}
    for c in (nn.Linear, nn.Conv2d, L0Linear, L0Conv2d):
        r[c] = _rule_weight
    for c in BATCHNORM:
        r[c] = _rule_batchnorm
    for c in ELEMENTWISE:
        r[c] = "elementwise"
    r[nn.PReLU] = lambda ctx, node: (_rule_elementwise(ctx, node) if ctx.module(node).num_parameters == 1 else
                                     _rule_frozen(ctx, node))
    for c in DROPOUT + POOL_KEEP_CONST + (nn.Identity,):
        r[c] = "passthrough"
    r[nn.AvgPool2d] = _rule_avgpool
    r[nn.Flatten] = _rule_layout
    r[nn.Unflatten] = _rule_layout
    for c in NORMS + (nn.Softmax, nn.LogSoftmax, nn.Embedding, nn.MultiheadAttention):
        r[c] = "frozen"
    # functions
    for f in (F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.elu,
              F.leaky_relu, F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.softsign, F.selu, F.celu,
              F.hardtanh, F.logsigmoid, torch.exp, torch.abs, torch.neg, torch.square, torch.clamp,
              torch.nn.functional.tanhshrink, torch.erf, torch.special.expit):
        r[f] = "elementwise"
    for f in (F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout, F.max_pool2d,
              F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        r[f] = "passthrough"
    r[F.avg_pool2d] = _rule_avgpool
    for f in (torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
              torch.repeat_interleave, torch.movedim, torch.swapaxes):
        r[f] = _rule_layout
    r[operator.getitem] = lambda ctx, node: (_rule_layout(ctx, node) if ctx.units(node.args[0]) is not None
                                             else _rule_shape(ctx, node))
    for f, op in ((operator.add, "add"), (operator.iadd, "add"), (torch.add, "add"), (operator.sub, "sub"),
                  (torch.sub, "sub"), (operator.mul, "mul"), (operator.imul, "mul"), (torch.mul, "mul"),
                  (operator.truediv, "div"), (torch.div, "div")):
        r[f] = _make_binary(op)
    r[torch.cat] = _rule_cat
    r[torch.concat] = _rule_cat
    r[F.scaled_dot_product_attention] = _rule_sdpa
    for f in (F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.matmul, torch.bmm,
              operator.matmul, torch.einsum):
        r[f] = "frozen"
    if hasattr(F, "rms_norm"):
        r[F.rms_norm] = "frozen"
    # splits into several tensors: a unit dim cut into equal chunks would no longer split the same way once
    # units go, so the input keeps its units (exact; the layers after a split keep what they read)
    for f in (torch.chunk, torch.split, torch.tensor_split, torch.unbind):
        r[f] = "frozen"
    r[getattr] = _rule_shape
    r[torch.mean] = _rule_mean
    # methods
    for m in ("relu", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "square"):
        r[m] = "elementwise"
    for m in ("to", "float", "double", "half", "bfloat16", "type_as", "detach", "clone"):
        r[m] = "passthrough"  # casts: constants are tracked in float64
    for m in ("view", "reshape", "flatten", "transpose", "permute", "unsqueeze", "squeeze", "expand",
              "repeat_interleave", "contiguous", "movedim", "swapaxes", "unflatten"):
        r[m] = _rule_layout
    for m, op in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"), ("__add__", "add"),
                  ("__mul__", "mul")):
        r[m] = _make_binary(op)
    r["size"] = _rule_shape
    r["dim"] = _rule_shape
    r["mean"] = _rule_mean
    for m in ("softmax", "log_softmax", "matmul", "chunk", "split", "tensor_split", "unbind"):
        r[m] = "frozen"
    return r


def _rule_for(ctx, node):
    key = None
    if node.op == "call_module":
        mod = ctx.module(node)
        for cls in type(mod).__mro__:
            if cls in _RULES:
                key = cls
                break
            if cls in _BUILTIN:
                return _BUILTIN[cls], type(mod).__name__
        return (_RULES.get(key), type(mod).__name__) if key is not None else (None, type(mod).__name__)
    t = node.target
    if t in _RULES:
        return _RULES[t], None
    if _is_stochastic_depth(t):
        return _rule_stochastic_depth, None
    return _BUILTIN.get(t), None


def _is_stochastic_depth(target) -> bool:
    """torchvision's ``stochastic_depth`` (EfficientNet, ConvNeXt), recognised without importing torchvision."""
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision.")


def _rule_stochastic_depth(ctx, node):
    """``stochastic_depth(x, p, mode, training)``: the identity when ``training`` is False (the eval model
    compact works on); a traced ``training=True`` drops rows at random, which no compacted model can match."""
    training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
    if training is not False:
        raise ValueError(f"compact: '{_label(node)}' ({node.name}) was traced in training mode; compact the model "
                         "in eval mode (model.eval())")
    return _rule_passthrough(ctx, node)


_BUILTIN: Dict[Any, Any] = {}


def _resolve(rule):
    return {"elementwise": _rule_elementwise, "passthrough": _rule_passthrough, "frozen": _rule_frozen}.get(rule, rule) \
        if isinstance(rule, str) else rule


# -- tracing -----------------------------------------------------------------------------------------------

class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        if isinstance(m, _l0_types()) or any(isinstance(k, type) and isinstance(m, k) for k in _RULES):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    """The model's graph as its eval forward runs (compact works on the eval model: a forward that reads
    ``self.training`` is traced with False); the modules' training flags are put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        graph = _LeafTracer().trace(model)
    except Exception as e:  # data-dependent control flow and the like
        raise ValueError(f"compact: cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                         f"a module that does not trace can be made a leaf with register_compact_rule") from e
    finally:
        for m, t in modes:
            m.training = t
    return torch.fx.GraphModule(model, graph)


def _as_tuple(example_inputs) -> Optional[tuple]:
    if example_inputs is None:
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _record_values(gm: torch.fx.GraphModule, example_inputs: tuple) -> Dict[Any, Any]:
    """Run the traced graph once (eval, no grad) and keep every node's value: tensors as meta tensors of the
    same shape (only the shape is used), other values as they are."""
    vals: Dict[Any, Any] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            vals[n] = torch.empty(out.shape, dtype=out.dtype, device="meta") if isinstance(out, torch.Tensor) else out
            return out

    flags = [(m, m.training) for m in gm.modules()]  # the model's own modules: restored one by one
    gm.eval()
    try:
        with torch.no_grad():
            Rec(gm).run(*example_inputs)
    finally:
        for m, t in flags:
            m.training = t
    return vals


def _analyse(gm: torch.fx.GraphModule, values) -> CompactContext:
    global _BUILTIN
    if not _BUILTIN:
        _BUILTIN = _builtin_rules()
    ctx = CompactContext(gm, values)
    with torch.no_grad():
        for node in gm.graph.nodes:
            ctx.claimed = set()
            if node.op == "placeholder":
                v = ctx.value(node)
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1:
                    dims = (-3,) if v.dim() == 4 else (-1,)
                    ctx.env[node] = ctx.new_units((v.shape[dims[0]],), dims, v.dim())
                continue
            if node.op == "get_attr":
                continue
            if node.op == "output":
                for a in node.all_input_nodes:
                    ctx.freeze(ctx.env.get(a))
                continue
            rule, what = _rule_for(ctx, node)
            if rule is None and node.op in ("call_function", "call_method") and not any(
                    a in ctx.env or a.op == "placeholder" for a in node.all_input_nodes):
                rule = _rule_shape  # no input carries units, so neither does the output: size arithmetic
                # (``h // 2``), input checks (``torch._assert(h == 224)``), helpers of parameters only
            if rule is None:
                where = f"module {node.target!r} ({what})" if node.op == "call_module" else f"'{_label(node)}'"
                raise ValueError(f"compact: no rule for {where} at node {node.name!r}: register one with "
                                 f"l0kernels.register_compact_rule")
            out = _resolve(rule)(ctx, node)
            for a in node.all_input_nodes:  # units an op did not look at cannot shrink
                if a not in ctx.claimed and a in ctx.env:
                    ctx.freeze(ctx.env[a])
            if out is not None:
                ctx.env[node] = out
    return ctx


# -- decisions ---------------------------------------------------------------------------------------------

def _decide(ctx: CompactContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """Which unit classes stay: the least set that holds the model outputs and frozen units, every unit a kept
    row of a weight layer reads and cannot fold, whole groups of grouped convs, rectangular blocks of
    multi-dim units, and one channel per conv."""
    n = len(ctx.parent)
    root = torch.tensor([ctx._find(i) for i in range(n)], dtype=torch.long, device=_CPU) if n else \
        torch.zeros(0, dtype=torch.long, device=_CPU)
    kept = torch.zeros(n, dtype=torch.bool, device=_CPU)
    for f in ctx.frozen:
        kept[root[f]] = True
    prep = []
    for w in ctx.weights:
        d = w.d
        reads = _reads(d).cpu()
        fold_ok = w.inp.dead & ((w.inp.const == 0) | (not d.pads_with_zeros()))
        prep.append((reads, fold_ok))
    changed = True

    def mark(ids):
        nonlocal changed
        r = root[ids]
        if not bool(kept[r].all()):
            kept[r] = True
            changed = True
    while changed:
        changed = False
        for w, (reads, fold_ok) in zip(ctx.weights, prep):
            d = w.d
            out_keep = kept[root[w.out.ids]]
            if d.groups > 1:
                g_out = out_keep.view(d.groups, -1).any(1)
                in_k = kept[root[w.inp.ids]].view(d.groups, -1).any(1)
                mark(w.out.ids.view(d.groups, -1)[in_k].flatten())  # a group whose inputs stay, stays
                mark(w.inp.ids.view(d.groups, -1)[g_out].flatten())  # a kept group reads its whole block
            else:
                need = reads[out_keep].any(0) & ~fold_ok
                mark(w.inp.ids[need])
        for u in ctx.multi:  # units removed through a reshape must leave a rectangular block
            m = kept[root[u.ids]]
            closure = torch.ones_like(m)
            for ax in range(m.dim()):
                other = tuple(a for a in range(m.dim()) if a != ax)
                along = m.any(other) if other else m
                shape = [1] * m.dim()
                shape[ax] = -1
                closure = closure & along.view(shape)
            mark(u.ids[closure & ~m])
        if not changed:  # at the fixed point: nn.Conv2d needs at least one output channel
            for w in ctx.weights:
                if w.d.kind == "conv" and w.out.ids.numel() and not bool(kept[root[w.out.ids]].any()):
                    mark(w.out.ids[:1])
    return lambda ids: kept[root[ids]] if ids.numel() else torch.zeros(ids.shape, dtype=torch.bool, device=_CPU)


# -- building ----------------------------------------------------------------------------------------------

def _new_linear(d: _Dense, out_keep, in_keep, fold) -> nn.Linear:
    src = d.src
    w = d.weight[out_keep][:, in_keep]
    b = d.bias[out_keep] + fold
    has_bias = d.has_bias or bool((fold != 0).any())
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op" for emptied layers
        warnings.simplefilter("ignore", UserWarning)
        m = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=has_bias,
                                     device=src.weight.device, dtype=src.weight.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        if has_bias:
            m.bias.copy_(b)
    return m


def _kept_groups(d: _Dense, out_keep: torch.Tensor, in_keep: torch.Tensor) -> int:
    kept = out_keep.view(d.groups, -1).any(1)
    if not (torch.equal(kept, out_keep.view(d.groups, -1).all(1)) and
            torch.equal(kept.repeat_interleave(d.n_in // d.groups), in_keep)):
        raise RuntimeError(f"compact: internal error: grouped conv {type(d.src).__name__} would lose part of a group")
    return int(kept.sum())


def _new_conv(d: _Dense, out_keep, in_keep, fold) -> nn.Conv2d:
    src = d.src
    w = d.weight[out_keep]
    if d.groups == 1:
        w, groups = w[:, in_keep], 1
    else:
        groups = _kept_groups(d, out_keep, in_keep)  # weight columns are per group: nothing to slice
    b = d.bias[out_keep] + fold
    has_bias = d.has_bias or bool((fold != 0).any())
    cin = w.shape[1] * groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = torch.nn.utils.skip_init(nn.Conv2d, cin, w.shape[0], tuple(w.shape[2:]), stride=src.stride,
                                     padding=src.padding, dilation=src.dilation, groups=groups, bias=has_bias,
                                     padding_mode=getattr(src, "padding_mode", "zeros"),
                                     device=src.weight.device, dtype=src.weight.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        if has_bias:
            m.bias.copy_(b)
    return m


def _slice_bn(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(m)
    if bool(keep.all()):
        return new
    idx = keep.nonzero().flatten()
    new.num_features = int(idx.numel())
    with torch.no_grad():
        for pname in ("weight", "bias"):
            p = getattr(m, pname)
            if p is not None:
                sel = p.detach().index_select(0, idx.to(p.device))
                setattr(new, pname, nn.Parameter(sel, p.requires_grad))
        for bname in ("running_mean", "running_var"):
            t = getattr(m, bname)
            setattr(new, bname, t.index_select(0, idx.to(t.device)))
    return new


def input_select(index: torch.Tensor, dim: int) -> nn.Module:
    """A plain module computing ``x.index_select(dim, index)`` (``index`` a registered buffer): an
    ``torch.fx.GraphModule``, whose code is pickled with it, so ``torch.load`` needs no l0kernels."""
    holder = nn.Module()
    holder.register_buffer("index", index.detach().clone().long())
    g = torch.fx.Graph()
    x = g.placeholder("x")
    idx = g.get_attr("index")
    g.output(g.call_method("index_select", (x, dim, idx)))
    return torch.fx.GraphModule(holder, g, class_name="InputSelect")


@dataclass
class _Plan:
    model: nn.Module
    layer_info: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def _new_sizes(node, res: Units, keep_fn) -> Optional[list]:
    """New int size args of a view/reshape/expand node whose output lost units (None: unchanged)."""
    m = keep_fn(res.ids)
    if bool(m.all()):
        return None
    r = res.rank
    new = {}
    for ax, d in enumerate(res.dims):
        other = tuple(a for a in range(m.dim()) if a != ax)
        along = m.any(other) if other else m
        new[r + d] = int(along.sum())
    return new


def _rewrite_sizes(node, new_sizes: Dict[int, int], old_shape) -> Tuple[tuple, dict]:
    t = node.target
    if t not in ("view", "reshape", "expand") and t is not torch.reshape:
        raise ValueError(f"compact: '{_label(node)}' ({node.name}) changes units that are removed; only view, reshape "
                         f"and expand sizes are rewritten")
    if node.op == "call_method":
        sizes = node.args[1:]
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
        sizes = list(sizes[0]) if packed else list(sizes)
    else:
        sizes, packed = list(node.args[1]), True
    if len(sizes) != len(old_shape):
        raise ValueError(f"compact: cannot rewrite the sizes of {node.name!r}")
    for d, s in new_sizes.items():
        a = sizes[d]
        if isinstance(a, int) and a != -1:
            sizes[d] = s  # (-1 and traced sizes, read from tensor shapes at run time, follow by themselves)
    if node.op == "call_method":
        args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
    else:
        args = (node.args[0], tuple(sizes)) + tuple(node.args[2:])
    return args, dict(node.kwargs)


def _compact_graph(model: nn.Module, example_inputs) -> _Plan:
    gm = _trace(model)
    ex = _as_tuple(example_inputs)
    values = _record_values(gm, ex) if ex is not None else None
    ctx = _analyse(gm, values)
    keep_fn = _decide(ctx)
    redo = False
    for node in gm.graph.nodes:  # an input that loses all its units, or cannot be selected from, stays whole
        u = ctx.env.get(node) if node.op == "placeholder" else None
        if u is not None and not bool(keep_fn(u.ids).all()) and (
                u.flat or len(u.dims) != 1 or not bool(keep_fn(u.ids).any())):
            ctx.freeze(u)
            redo = True
    if redo:
        keep_fn = _decide(ctx)
    root: Dict[str, Any] = {}
    info: Dict[str, Dict[str, Any]] = {}
    with torch.no_grad():
        for w in ctx.weights:
            d = w.d
            in_keep = keep_fn(w.inp.ids).to(d.weight.device)
            out_keep = keep_fn(w.out.ids).to(d.weight.device)
            removed = ~in_keep
            if bool(removed.any()):
                c = torch.where(removed.cpu() & w.inp.dead, w.inp.const, torch.zeros_like(w.inp.const))
                fold = _through(d, c)[out_keep]
            else:
                fold = d.bias.new_zeros(int(out_keep.sum()))
            make = _new_linear if d.kind == "linear" else _new_conv
            new = make(d, out_keep, in_keep, fold)
            if w.node.target in root:  # a shared layer: its calls must fold the same constants
                old = root[w.node.target]
                if not (torch.equal(old.weight, new.weight) and (old.bias is None) == (new.bias is None) and
                        (old.bias is None or torch.equal(old.bias, new.bias))):
                    raise ValueError(f"compact: layer {w.node.target!r} is called more than once with different "
                                     f"removed constants at its inputs; it cannot be compacted to one layer")
                continue
            root[w.node.target] = new
            info[w.node.target] = {"in_keep": in_keep, "out_keep": out_keep, "new": new}
        for node, u in ctx.bns.items():
            keep = keep_fn(u.ids)
            if not bool(keep.any()):
                # every channel removed: its input has no channels left, and a BatchNorm of 0 features raises
                # when called; the identity maps the empty tensor to the same empty tensor (the channels'
                # constants are folded where they are read, as for any removed unit)
                root[node.target] = nn.Identity()
                continue
            bn = ctx.module(node)
            root[node.target] = _slice_bn(bn, keep.to(bn.running_mean.device))
    graph = torch.fx.Graph()
    remap: Dict[Any, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in root:
            root[node.target] = copy.deepcopy(ctx.module(node))
        if node.op == "get_attr":
            root[node.target] = copy.deepcopy(_get_attr(gm, node.target))
        if node.op in ("call_method", "call_function") and node in ctx.resize:
            res = ctx.resize[node]
            new_sizes = _new_sizes(node, res, keep_fn)
            if new_sizes is not None:
                args, kwargs = _rewrite_sizes(node, new_sizes, ctx.shape(node))
                new_node = graph.create_node(node.op, node.target, torch.fx.map_arg(args, lambda a: remap[a]),
                                             torch.fx.map_arg(kwargs, lambda a: remap[a]), node.name)
                new_node.meta = copy.copy(node.meta)
                remap[node] = new_node
                continue
        new_node = graph.node_copy(node, lambda a: remap[a])
        remap[node] = new_node
        if node.op == "placeholder" and node in ctx.env:
            u = ctx.env[node]
            keep = keep_fn(u.ids)
            if bool(keep.all()):
                continue
            name = f"input_select_{node.name}"
            dev = _first_device(model)
            root[name] = input_select(keep.nonzero().flatten().to(dev), u.dims[0])
            sel = graph.call_module(name, (new_node,))
            remap[node] = sel
    out = torch.fx.GraphModule(root, graph, class_name=type(model).__name__)
    out.graph.lint()
    out.recompile()
    seq = _as_sequential(out)
    return _Plan(seq if seq is not None else out, info)


def _get_attr(gm, target):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def _first_device(model) -> torch.device:
    p = next((t for t in list(model.parameters()) + list(model.buffers())), None)
    return p.device if p is not None else _CPU


def _fx_op_module(node) -> Optional[nn.Module]:
    """A module equivalent to a call_function / call_method node on one tensor, or None if unknown."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    name = name.lstrip("_")
    if len(node.all_input_nodes) != 1 and name not in ("view", "reshape"):
        return None

    def arg(i, k, dflt):
        return node.args[i] if len(node.args) > i else node.kwargs.get(k, dflt)
    simple = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "relu6": nn.ReLU6,
              "hardswish": nn.Hardswish, "mish": nn.Mish, "softsign": nn.Softsign}
    if name in simple and len(node.args) == 1 and not node.kwargs.get("inplace", False) and \
            set(node.kwargs) <= {"inplace"}:
        return simple[name]()
    if name == "gelu":
        return nn.GELU(approximate=node.kwargs.get("approximate", "none"))
    if name == "leaky_relu":
        return nn.LeakyReLU(arg(1, "negative_slope", 0.01))
    if name == "elu":
        return nn.ELU(arg(1, "alpha", 1.0))
    if name in ("dropout", "dropout1d", "dropout2d", "alpha_dropout", "feature_alpha_dropout"):
        return nn.Identity()  # eval
    if name in ("max_pool2d", "max_pool2d_with_indices"):
        kw = dict(node.kwargs)
        if kw.get("return_indices") or (len(node.args) > 6 and node.args[6]):
            return None
        kw.pop("return_indices", None)
        return nn.MaxPool2d(*node.args[1:6], **kw)
    if name == "avg_pool2d":
        return nn.AvgPool2d(*node.args[1:], **node.kwargs)
    if name == "adaptive_avg_pool2d":
        return nn.AdaptiveAvgPool2d(arg(1, "output_size", None))
    if name == "adaptive_max_pool2d":
        return nn.AdaptiveMaxPool2d(arg(1, "output_size", None))
    if name == "flatten":
        return nn.Flatten(arg(1, "start_dim", 0), arg(2, "end_dim", -1))
    if name in ("view", "reshape"):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if len(dims) == 2 and (dims[0] == -1 or isinstance(dims[0], torch.fx.Node)) and \
                (dims[1] == -1 or isinstance(dims[1], int)):
            return nn.Flatten(1)  # x.view(x.size(0), -1) / x.view(-1, C*H*W)
    return None


def _is_shape_node(node) -> bool:
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target in (getattr, operator.getitem):
        return node.args[1] == "shape" or (isinstance(node.args[0], torch.fx.Node) and _is_shape_node(node.args[0]))
    return False


def _as_sequential(gm: torch.fx.GraphModule) -> Optional[nn.Sequential]:
    """The compacted graph as an ``nn.Sequential`` when it is a chain of modules and simple ops."""
    nodes = [n for n in gm.graph.nodes]
    ph = [n for n in nodes if n.op == "placeholder"]
    if len(ph) != 1:
        return None
    cur = ph[0]
    mods: List[Tuple[str, nn.Module]] = []
    shape_nodes = set()
    names = {n.target.replace(".", "_") if n.op == "call_module" else n.name for n in nodes}
    used: set = set()

    def unique(name: str) -> str:
        """A module called more than once (``Sequential(a, act, a)``, a shared activation) appears once per call,
        under its own name at its first call and a new one after: one ``OrderedDict`` key per call."""
        new, k = name, 1
        while new in used or (new != name and new in names):
            new, k = f"{name}_{k}", k + 1
        used.add(new)
        return new
    for n in nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            return nn.Sequential(OrderedDict(mods)) if n.args[0] is cur else None
        if _is_shape_node(n):
            shape_nodes.add(n)
            continue
        ins = [a for a in n.all_input_nodes if a not in shape_nodes]
        if ins != [cur] or not n.args or n.args[0] is not cur:
            return None
        if n.op == "call_module":
            mods.append((unique(n.target.replace(".", "_")), gm.get_submodule(n.target)))
        elif n.op in ("call_function", "call_method"):
            m = _fx_op_module(n)
            if m is None:
                return None
            mods.append((unique(n.name), m))
        else:
            return None
        cur = n
    return None


# -- public ------------------------------------------------------------------------------------------------

def _uses_transformers(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("transformers.") for m in model.modules())


def _compact_plan(model: nn.Module, example_inputs=None) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _uses_transformers(model):
        from ._compact_hf import compact_modules
        return compact_modules(model)
    return _compact_graph(model, example_inputs)


def compact(model: nn.Module, example_inputs=None) -> nn.Module:
    """A plain ``torch.nn`` copy of ``model`` (in eval mode) with the units that closed gates make dead removed
    and the gates folded in; same eval outputs up to float rounding. ``model`` is not modified.

    Models that ``torch.fx`` traces go through the graph core (module docstring): residual adds,
    concatenation, BatchNorm (sliced), LayerNorm/RMSNorm (their units stay), element-wise products (SwiGLU),
    head reshapes and ``scaled_dot_product_attention`` (whole heads; with grouped-query attention a
    key/value head goes only with all its query heads). ``example_inputs`` (a tensor or a tuple) gives the
    shapes that reshapes, transposes and attention need; chains of layers need none. The model's closed
    inputs are removed by an input-selection step (an ``index_select`` module); the output keeps its size.
    A chain becomes an ``nn.Sequential`` (a module called more than once -- a shared activation,
    ``Sequential(a, act, a)`` -- is one object listed once per call), any other graph a
    ``torch.fx.GraphModule``; both load with ``torch.load`` without l0kernels and run under ``torch.export``.

    Hugging Face ``transformers`` models are compacted by module rules (Llama-style and BERT-style attention
    and FFN blocks) on a deep copy. What cannot be compacted raises ``ValueError`` naming the module or op.
    """
    plan = _compact_plan(model, example_inputs)  # checks model; works on a deep copy
    _retie(plan.model, _shared_parameters(model))
    return plan.model.eval()


def _shared_parameters(model: nn.Module) -> List[List[Tuple[str, str]]]:
    """Groups of ``(module name, parameter name)`` that hold one Parameter object (tied weights), by the
    qualified names of ``named_modules``."""
    holders: Dict[int, List[Tuple[str, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, pname))
    return [h for h in holders.values() if len(h) > 1]


def _retie(compacted: nn.Module, shared: List[List[Tuple[str, str]]]) -> None:
    """Parameters tied in the original model stay one Parameter in the compacted one: where compact rebuilt a
    holder (gates folded in) and the tensors are still equal, every holder gets the first one's Parameter; a
    tie the gates broke (a gated layer that changed one holder's weight) raises ``ValueError`` naming them --
    untying would make the model larger. Groups whose names the compacted model does not have (a traced graph
    renames its modules) are left as they are."""
    for group in shared:
        found = []
        for mname, pname in group:
            try:
                mod = compacted.get_submodule(mname)
            except AttributeError:
                break
            p = mod._parameters.get(pname)
            if p is None:
                break
            found.append((mod, pname, p))
        else:
            first = found[0][2]
            if all(p is first for _, _, p in found):
                continue
            if not all(p.shape == first.shape and p.dtype == first.dtype and p.device == first.device
                       and torch.equal(p, first) for _, _, p in found):
                names = ", ".join(f"'{m}.{n}'" if m else f"'{n}'" for m, n in group)
                raise ValueError(f"compact: {names} share one Parameter (tied weights) in the model, but the gates "
                                 "of the layer holding it change it for only some of them; untying them would make "
                                 "the model larger (convert() leaves tied layers ungated)")
            for mod, pname, _ in found:
                mod._parameters[pname] = first


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _first_tensor(o)]
    return []


def compare(original: nn.Module, compacted: nn.Module, example_inputs) -> Dict[str, float]:
    """Run both models (eval, no grad) on ``example_inputs`` (a tensor or a tuple of positional inputs) and
    report the largest differences over their tensor outputs: ``max_abs`` (max |a - b|), ``max_rel``
    (max_abs / max |original|) and ``norm_rel`` (||a - b|| / ||original||, docs/design.md §6's measure). A NaN in
    either output makes the measures NaN, and an infinity where the other output differs makes them inf or
    NaN: a difference that cannot be measured is never reported as 0 (equal infinities differ by 0)."""
    ex = _as_tuple(example_inputs)
    res = {"max_abs": 0.0, "max_rel": 0.0, "norm_rel": 0.0}
    states = [(m, m.training) for m in (original, compacted)]
    try:
        with torch.no_grad():
            ya = _first_tensor(original.eval()(*ex))
            yb = _first_tensor(compacted.eval()(*ex))
    finally:
        for m, t in states:
            m.train(t)
    if len(ya) != len(yb):
        raise ValueError(f"compare: the models return {len(ya)} and {len(yb)} tensors")
    for a, b in zip(ya, yb):
        if a.shape != b.shape:
            raise ValueError(f"compare: output shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
        a64, b64 = a.detach().double(), b.detach().to(device=a.device).double()
        same = a64 == b64  # equal infinities differ by nothing; a NaN on either side is never "the same"
        diff = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs())
        mx = float(diff.max()) if diff.numel() else 0.0
        scale = float(a64.abs().max()) if a64.numel() else 0.0
        dn = float(torch.where(same, torch.zeros_like(a64), a64 - b64).norm())
        nr = dn / float(a64.norm()) if float(a64.norm()) > 0 else dn
        for key, v in (("max_abs", mx), ("max_rel", mx / scale if scale > 0 else mx), ("norm_rel", nr)):
            res[key] = _nan_max(res[key], v)
    return res


def _nan_max(a: float, b: float) -> float:
    """``max`` that keeps NaN (Python's ``max(0.0, nan)`` is 0.0)."""
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


# -- summary -----------------------------------------------------------------------------------------------

def _linear_flops(n: int, k: int, bias: bool) -> int:
    return n * max(2 * k - 1 + int(bias), 0) if k > 0 else n * int(bias)


def _conv_flops(m, cout: int, cin: int, hw_out: Optional[Tuple[int, int]], bias: bool, groups: int) -> Optional[int]:
    if hw_out is None:
        return None
    kh, kw = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
    fan_in = cin // groups * kh * kw
    return cout * hw_out[0] * hw_out[1] * max(2 * fan_in - 1 + int(bias), 0)


@dataclass
class LayerSummary:
    name: str
    type: str
    gate: str
    gates_active: Optional[int]
    gates_total: Optional[int]
    expected_l0: Optional[float]
    shape_before: Tuple[int, ...]
    shape_after: Optional[Tuple[int, ...]]
    params_before: int
    params_after: Optional[int]
    flops_before: Optional[int]
    flops_after: Optional[int]


@dataclass
class ModelSummary:
    """Per-layer gate and cost statistics (FLOPs per example, multiply-add = 2). ``str()`` is a table."""
    layers: List[LayerSummary]
    compacted: bool  # "after" columns come from compact(model) (else from each layer's own gates)
    note: str = ""

    def totals(self) -> Dict[str, Optional[int]]:
        def tot(attr):
            vals = [getattr(l, attr) for l in self.layers]
            return None if any(v is None for v in vals) else sum(vals)
        return {k: tot(k) for k in ("params_before", "params_after", "flops_before", "flops_after")}

    def __str__(self) -> str:
        def f(v):
            if v is None:
                return "?"
            if isinstance(v, float):
                return f"{v:.1f}"
            if isinstance(v, tuple):
                return "x".join(str(i) for i in v)
            return str(v)
        head = ["layer", "type", "gate", "active/total", "E[L0]", "shape", "shape after", "params", "params after",
                "FLOPs", "FLOPs after"]
        rows = [[l.name, l.type, l.gate,
                 "-" if l.gates_total is None else f"{l.gates_active}/{l.gates_total}",
                 "-" if l.expected_l0 is None else f(l.expected_l0), f(l.shape_before), f(l.shape_after),
                 f(l.params_before), f(l.params_after), f(l.flops_before), f(l.flops_after)] for l in self.layers]
        t = self.totals()
        rows.append(["total", "", "", "", "", "", "", f(t["params_before"]), f(t["params_after"]),
                     f(t["flops_before"]), f(t["flops_after"])])
        widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
        line = lambda r: "  ".join(s.ljust(w) if c < 3 else s.rjust(w) for c, (s, w) in enumerate(zip(r, widths)))
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        if self.note:
            out.append(self.note)
        return "\n".join(out)


def _record_conv_hw(model: nn.Module, input_shape, example_inputs=None) -> Dict[int, Tuple[int, int]]:
    seen: Dict[int, Tuple[int, int]] = {}
    hooks = []
    for m in model.modules():
        if _is_weight_layer(m) and getattr(m, "weight", None) is not None and m.weight.dim() == 4:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args: seen.__setitem__(id(mod), tuple(args[0].shape[2:]))))
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    device = p.device if p is not None else torch.device("cpu")
    ex = _as_tuple(example_inputs) if example_inputs is not None else (
        torch.zeros(tuple(input_shape), device=device, dtype=p.dtype if p is not None else torch.float32),)
    was = model.training
    try:
        model.eval()
        # the model's own forward runs with its device as the default device (summary() makes no
        # tensor from the caller's default device, and neither should the eval path it runs)
        with torch.no_grad(), torch.device(device):
            model(*ex)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return seen


def _out_hw(m, hw_in: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    if hw_in is None:
        return None
    with torch.no_grad():
        k = tuple(m.weight.shape[2:])
        pad = m.padding
        if isinstance(pad, str):
            if pad == "valid":
                pad = (0, 0)
            else:
                return tuple(hw_in)
        st, dl = m.stride, m.dilation
        return tuple((hw_in[d] + 2 * pad[d] - dl[d] * (k[d] - 1) - 1) // st[d] + 1 for d in range(2))


def summary(model: nn.Module, input_shape: Optional[Sequence[int]] = None, example_inputs=None) -> ModelSummary:
    """Per weight layer: gates active/total, expected L0, parameters and FLOPs before and after :func:`compact`
    (conv FLOPs per example, linear FLOPs per row, i.e. per token of a sequence model). Conv FLOPs need the
    input size: ``input_shape=(1, C, H, W)`` (or ``example_inputs``, also passed to :func:`compact`) runs one
    eval forward to record it; otherwise the last input size each L0Conv2d saw is used (``?`` when none)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    L0Linear, L0Conv2d = _l0_types()
    hw_seen = _record_conv_hw(model, input_shape, example_inputs) \
        if (input_shape is not None or example_inputs is not None) else {}
    note = ""
    try:
        info = _compact_plan(model, example_inputs).layer_info
        compacted = True
    except ValueError as e:
        info, compacted = {}, False
        note = f"(compact() cannot follow this model: 'after' counts each layer's own gates only: {e})"
    layers = []
    for name, m in model.named_modules():
        if not _is_weight_layer(m) or isinstance(m, nn.Sequential):
            continue
        is_l0 = isinstance(m, (L0Linear, L0Conv2d))
        is_conv = isinstance(m, (nn.Conv2d, L0Conv2d))
        d = _dense(m)
        gate = (getattr(m, "gate", "out") if not is_conv else "channel") if is_l0 else "-"
        z = _z_eval(m) if is_l0 else None  # the eval path's gates (open: z > 0)
        zf = _feature_gates(m) if is_l0 else None  # per feature
        groups = getattr(m, "groups", 1)
        n, kk = d.weight.shape[0], d.weight.shape[1] * groups
        hw_in = hw_seen.get(id(m)) or (getattr(m, "input_hw", None) if is_conv else None)
        hw_out = _out_hw(m, hw_in) if is_conv else None
        entry = None
        for key, v in info.items():  # leaf names are the qualified names
            if key == name or (name == "" and key == type(m).__name__):
                entry = v
        if entry is not None:
            new = entry["new"]
            out_keep, in_keep = entry["out_keep"], entry["in_keep"]
            n2, k2 = int(out_keep.sum()), int(in_keep.sum())
            params_after = sum(p.numel() for p in new.parameters())
        else:
            if is_l0 and not is_conv and m.gate == "in":
                n2, k2 = n, int((zf > 0).sum())
            elif is_l0 and (is_conv or m.gate == "out"):
                n2, k2 = int((zf > 0).sum()), kk
            else:
                n2, k2 = n, kk
            has_b = m.bias is not None
            per = d.weight[0].numel() // max(d.weight.shape[1], 1) if is_conv else 1
            params_after = n2 * (k2 // groups) * per + (n2 if has_b else 0)
        has_b = m.bias is not None
        params_before = sum(p.numel() for p in (m.weight, m.bias) if p is not None)
        if is_conv:
            fb = _conv_flops(m, n, kk, hw_out, has_b, groups)
            fa = _conv_flops(m, n2, k2, hw_out, has_b, entry["new"].groups if entry is not None else groups)
        else:
            fb = _linear_flops(n, kk, has_b)
            if is_l0 and m.gate == "weight" and entry is None:
                nnz = int((z > 0).sum())
                fa = max(2 * nnz - n, 0) + (n if has_b else 0)
            else:
                fa = _linear_flops(n2, k2, has_b)
        layers.append(LayerSummary(
            name=name or type(m).__name__, type=type(m).__name__, gate=gate,
            gates_active=int(m.active_mask().sum()) if is_l0 else None, gates_total=m.num_gates() if is_l0 else None,
            expected_l0=float(m.expected_l0().detach()) if is_l0 else None, shape_before=tuple(m.weight.shape),
            shape_after=tuple(entry["new"].weight.shape) if entry is not None else None,
            params_before=params_before, params_after=params_after, flops_before=fb, flops_after=fa))
    return ModelSummary(layers, compacted, note)


__all__ = ["compact", "compare", "summary", "register_compact_rule", "CompactContext", "Units", "input_select",
           "ModelSummary", "LayerSummary"]
