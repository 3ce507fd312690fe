"""``compact(model)``: an ordinary ``torch.nn`` model with every zero-gated group removed, and ``summary(model)``.

The model is read as a chain of layers (nested ``nn.Sequential``, or any module whose forward
``torch.fx.symbolic_trace`` turns into a chain). Gates are folded into the weights (``z_eval``, SPEC
section 1) and units are removed where that cannot change the output:

* forward: a unit is *constant* when every input its weight row reads is a constant that passes through
  the layer exactly (0 always; any constant when the layer is a ``Linear`` or a conv without zero padding):
  a closed output gate or channel, a row of zeros, a row reading only closed channels. Elementwise
  activations, BatchNorm (eval statistics), max/adaptive pooling, dropout and ``Flatten`` carry the
  constant along (``f(0)`` need not be 0: sigmoid, a BatchNorm shift);
* backward: a unit is removed when the next weight layer does not read it (closed input gates, zero
  columns) or reads a constant that can be folded into that layer's bias exactly (always for
  ``Linear``; for ``Conv2d`` when the constant is 0 or the conv has no zero padding).

Grouped convolutions (``groups > 1``) stay valid grouped convolutions: only whole groups go, output block
and input block together, and ``groups`` becomes the number of kept groups. A group goes when none of its
output channels is needed (each is removable by the backward rule above, e.g. all its gates closed, or it
reads only closed channels and the next layer folds the constant it gives); its input channels are then
not read and the producer may drop them. A kept group stays whole and reads its whole input block, so
partly needed groups keep their zero or constant channels, and so do their producers. Groups reading the
model input stay; in grouped convs in a row, groups sharing a group of the producer go only together.

The model's input and output keep their sizes (so the first layer keeps zero columns for closed input
gates). ``L0Linear`` becomes ``nn.Linear``, ``L0Conv2d`` becomes ``nn.Conv2d``; BatchNorm layers are
sliced; everything else is copied. The result matches the eval model up to float rounding.

Devices and dtypes: every tensor compact() and summary() make is on the device of the parameters it meets
(nothing comes from the default device), the gates are the eval path's (``eval_gates_and_grad`` on
``log_alpha`` as it is, folded into the weights in its compute dtype and rounded to the weight dtype, as
the eval forward does), the analysis runs in float64 on that device (float32 where the device has no
float64), and the compacted layers have the dtype and device of the layers they replace.
"""
from __future__ import annotations

import copy
import operator
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._gates import eval_gates_and_grad

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
               nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
               nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.Identity)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
POOL_KEEP_CONST = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)


def _l0_types():
    from .modules import L0Conv2d, L0Linear
    return L0Linear, L0Conv2d


def _is_weight_layer(m) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d) + _l0_types())


def _is_supported_leaf(m) -> bool:
    if _is_weight_layer(m) or isinstance(m, ELEMENTWISE + DROPOUT + POOL_KEEP_CONST + BATCHNORM):
        return True
    if isinstance(m, nn.PReLU):
        return m.num_parameters == 1
    return isinstance(m, (nn.AvgPool2d, nn.Flatten))


# -- the chain ---------------------------------------------------------------------------------------------

@dataclass
class _Leaf:
    name: str
    module: nn.Module
    new: Optional[nn.Module] = None


@dataclass
class _Seq:
    """A container to rebuild as ``nn.Sequential``: children are ``(name, _Seq | _Leaf)``."""
    children: List[Tuple[str, Any]] = field(default_factory=list)


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _l0_types()) or super().is_leaf_module(m, qualname)


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _fx_op_module(node) -> Optional[nn.Module]:
    """A module equivalent to a call_function / call_method node on one tensor, or None if unknown."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    name = name.lstrip("_")
    simple = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "relu6": nn.ReLU6,
              "hardswish": nn.Hardswish, "mish": nn.Mish, "softsign": nn.Softsign}
    if name in simple:
        return simple[name]()
    if name == "gelu":
        return nn.GELU(approximate=node.kwargs.get("approximate", "none"))
    if name == "leaky_relu":
        return nn.LeakyReLU(_arg(node, 1, "negative_slope", 0.01))
    if name == "elu":
        return nn.ELU(_arg(node, 1, "alpha", 1.0))
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
        return nn.AdaptiveAvgPool2d(_arg(node, 1, "output_size", None))
    if name == "adaptive_max_pool2d":
        return nn.AdaptiveMaxPool2d(_arg(node, 1, "output_size", None))
    if name == "flatten":
        start = _arg(node, 1, "start_dim", 0 if not isinstance(t, str) else 0)
        end = _arg(node, 2, "end_dim", -1)
        return nn.Flatten(start, end)
    if name in ("view", "reshape"):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if len(dims) == 2 and (dims[0] == -1 or isinstance(dims[0], torch.fx.Node)) and \
                (dims[1] == -1 or isinstance(dims[1], int)):
            return nn.Flatten(1)  # x.view(x.size(0), -1) / x.view(-1, C*H*W)
    return None


def _is_shape_node(node, src) -> bool:
    """``x.size(0)`` / ``x.shape[0]`` / ``x.shape`` helper nodes that only feed a view/reshape."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target in (getattr, operator.getitem):
        return node.args[0] is src and node.args[1] == "shape" or (
            isinstance(node.args[0], torch.fx.Node) and _is_shape_node(node.args[0], src))
    return False


def _trace_chain(module: nn.Module, prefix: str) -> _Seq:
    try:
        gm = torch.fx.GraphModule(module, _LeafTracer().trace(module))
    except Exception as e:  # symbolic tracing failed (data-dependent control flow and the like)
        raise ValueError(f"compact: cannot trace module {prefix or type(module).__name__!r} "
                         f"({type(module).__name__}) with torch.fx: {e}") from e
    seq = _Seq()
    cur = None
    shape_nodes = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if cur is not None:
                raise ValueError(f"compact: module {type(module).__name__} takes more than one input")
            cur = node
            continue
        if node.op == "get_attr":
            raise ValueError(f"compact: module {type(module).__name__} reads attribute {node.target!r} in forward "
                             f"(only chains of layers are supported)")
        if node.op == "output":
            if node.args[0] is not cur:
                raise ValueError(f"compact: module {type(module).__name__} does not return the end of a chain")
            continue
        if _is_shape_node(node, cur) or (node.args and node.args[0] in shape_nodes):
            shape_nodes.add(node)
            continue
        tensor_inputs = [a for a in node.all_input_nodes if a not in shape_nodes]
        label = f"{node.op} {node.target if isinstance(node.target, str) else getattr(node.target, '__name__', node.target)}"
        if tensor_inputs != [cur] or (node.args and node.args[0] is not cur):
            raise ValueError(f"compact: unsupported op '{label}' in {type(module).__name__}: only chains "
                             f"(each op reads the previous op's output only) are supported")
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            if not _is_supported_leaf(sub):
                raise ValueError(f"compact: unsupported module {node.target!r} ({type(sub).__name__})")
            seq.children.append((node.target.replace(".", "_"), _Leaf(f"{prefix}{node.target}", sub)))
        else:
            op = _fx_op_module(node)
            if op is None:
                raise ValueError(f"compact: unsupported op '{label}' in {type(module).__name__}")
            seq.children.append((node.name, _Leaf(f"{prefix}{node.name}", op)))
        cur = node
    return seq


def _structure(module: nn.Module, prefix: str = "") -> Any:
    if isinstance(module, nn.Sequential):
        seq = _Seq()
        for name, child in module.named_children():
            seq.children.append((name, _structure(child, f"{prefix}{name}.")))
        return seq
    if _is_supported_leaf(module):
        return _Leaf(prefix[:-1] if prefix else type(module).__name__, module)
    if type(module).__module__.startswith("torch.nn"):
        raise ValueError(f"compact: unsupported module {prefix[:-1] or 'model'!r} ({type(module).__name__})")
    return _trace_chain(module, prefix)


def _leaves(node) -> List[_Leaf]:
    if isinstance(node, _Leaf):
        return [node]
    return [leaf for _, child in node.children for leaf in _leaves(child)]


def _rebuild(node) -> nn.Module:
    if isinstance(node, _Leaf):
        return node.new
    return nn.Sequential(OrderedDict((name, _rebuild(child)) for name, child in node.children))


# -- gates folded into weights -----------------------------------------------------------------------------

@dataclass
class _Dense:
    kind: str  # "linear" | "conv"
    weight: torch.Tensor  # float64, gates folded
    bias: torch.Tensor  # float64 (zeros when the layer has none)
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
        if isinstance(pad, str):
            padded = pad != "valid"
        else:
            padded = any(int(p) != 0 for p in pad)
        return padded and getattr(self.src, "padding_mode", "zeros") == "zeros"


def _work_dtype(device: torch.device) -> torch.dtype:
    """The analysis dtype on ``device``: float64, or float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _z_eval(m) -> torch.Tensor:
    """``z_eval`` of an L0 layer as its eval forward computes it (``_inference``): ``log_alpha`` as it is, in
    the gate compute dtype (float32 for half types and float32, float64 for float64), on its device. The
    gate helpers are run with ``log_alpha``'s device as the default device so that none of their
    allocations can come from the caller's default device."""
    la = m.log_alpha.detach()
    with torch.device(la.device):
        z = eval_gates_and_grad(la, m.cfg, need_grad=False)[0]
    g = getattr(m, "group_size", 1)  # grouped gates: one value per gated feature / channel
    return z if g == 1 else z.repeat_interleave(g, dim=-1)


def _dense(m) -> _Dense:
    L0Linear, L0Conv2d = _l0_types()
    w = m.weight.detach()
    b = m.bias.detach() if m.bias is not None else None
    kind = "conv" if isinstance(m, (nn.Conv2d, L0Conv2d)) else "linear"
    if isinstance(m, (L0Linear, L0Conv2d)):
        # the eval path's folding: (w * z) in the gate compute dtype, rounded to the weight dtype
        z = _z_eval(m)
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


# -- unit states -------------------------------------------------------------------------------------------

@dataclass
class _State:
    """Units of the tensor between layers: ``kind`` "feat" (B, N), "chan" (B, C, H, W) or "flat" (a
    flattened feature map whose H*W is known only at the next Linear). ``dead`` marks units that are a
    known constant ``const`` for every input."""
    kind: str
    dead: torch.Tensor
    const: torch.Tensor

    @property
    def n(self) -> int:
        return self.dead.numel()


def _apply_elementwise(m: nn.Module, const: torch.Tensor) -> torch.Tensor:
    mm = copy.deepcopy(m).to(device=const.device, dtype=const.dtype).eval()
    with torch.no_grad():
        return mm(const.view(1, -1)).view(-1)


def _bn_const(bn, const: torch.Tensor, name: str) -> torch.Tensor:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"compact: BatchNorm {name!r} has no running statistics (track_running_stats=False); "
                         f"its eval output depends on the batch")
    as_const = lambda t: t.detach().to(device=const.device, dtype=const.dtype)
    rm, rv = as_const(bn.running_mean), as_const(bn.running_var)
    out = (const - rm) / torch.sqrt(rv + bn.eps)
    if bn.affine:
        out = out * as_const(bn.weight) + as_const(bn.bias)
    return out


def _forward_op(leaf: _Leaf, st: Optional[_State]) -> Optional[_State]:
    m = leaf.module
    if st is None:
        return None
    if isinstance(m, DROPOUT) or isinstance(m, nn.Identity):
        return st
    if isinstance(m, ELEMENTWISE) or isinstance(m, nn.PReLU):
        return _State(st.kind, st.dead, _apply_elementwise(m, st.const))
    if isinstance(m, BATCHNORM):
        want = "chan" if isinstance(m, nn.BatchNorm2d) else "feat"
        if st.kind != want:
            raise ValueError(f"compact: {type(m).__name__} {leaf.name!r} follows a {st.kind} tensor; only "
                             f"BatchNorm2d after conv channels and BatchNorm1d after features are supported")
        if m.num_features != st.n:
            raise ValueError(f"compact: {leaf.name!r} has {m.num_features} features, its input {st.n}")
        return _State(st.kind, st.dead, _bn_const(m, st.const, leaf.name))
    if isinstance(m, POOL_KEEP_CONST):
        return st
    if isinstance(m, nn.AvgPool2d):
        pad = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,)
        if (any(p != 0 for p in pad) and m.count_include_pad) or m.divisor_override is not None:
            # borders average the constant with padding zeros: only zero constants stay constant
            return _State(st.kind, st.dead & (st.const == 0), st.const)
        return st
    if isinstance(m, nn.Flatten):
        if (m.start_dim, m.end_dim) != (1, -1):
            raise ValueError(f"compact: Flatten {leaf.name!r} must flatten dims 1..-1, got "
                             f"start_dim={m.start_dim}, end_dim={m.end_dim}")
        return _State("flat", st.dead, st.const) if st.kind == "chan" else st
    raise ValueError(f"compact: unsupported module {leaf.name!r} ({type(m).__name__})")


def _resolve_input(st: Optional[_State], d: _Dense, name: str) -> Tuple[Optional[_State], int]:
    """The state at the input of weight layer ``d`` in its own unit space (and on its device), and H*W of a
    flatten (else 1)."""
    if st is not None and st.dead.device != d.weight.device:
        st = _State(st.kind, st.dead.to(d.weight.device), st.const.to(d.weight.device))
    if d.kind == "conv":
        cin = d.n_in
        if st is not None and st.kind != "chan":
            raise ValueError(f"compact: Conv2d {name!r} follows a flattened/feature tensor")
        if st is not None and st.n != cin:
            raise ValueError(f"compact: {name!r} expects {cin} channels, its input has {st.n}")
        return st, 1
    k = d.weight.shape[1]
    if st is None:
        return None, 1
    if st.kind == "chan":
        raise ValueError(f"compact: Linear {name!r} applied to a 4-D feature map is not supported "
                         f"(add a Flatten)")
    if st.kind == "flat":
        if k % st.n:
            raise ValueError(f"compact: Linear {name!r} has {k} inputs, not a multiple of the {st.n} "
                             f"flattened channels")
        hw = k // st.n
        return _State("feat", st.dead.repeat_interleave(hw), st.const.repeat_interleave(hw)), hw
    if st.n != k:
        raise ValueError(f"compact: {name!r} expects {k} features, its input has {st.n}")
    return st, 1


def _per_input(d: _Dense, m: torch.Tensor) -> torch.Tensor:
    """``m`` (one value per weight row and input of its group) as (rows, d.n_in): zero outside the group."""
    if d.groups == 1:
        return m
    return torch.block_diag(*m.view(d.groups, -1, m.shape[1]))


def _reads(d: _Dense) -> torch.Tensor:
    """(rows, inputs): which inputs each weight row reads (a nonzero weight)."""
    nonzero = d.weight != 0
    return _per_input(d, nonzero.any((2, 3)) if d.kind == "conv" else nonzero)


def _through(d: _Dense, c: torch.Tensor) -> torch.Tensor:
    """Per weight row, what inputs that are the constants ``c`` everywhere add to its output (no bias)."""
    w = d.weight.sum((2, 3)) if d.kind == "conv" else d.weight
    return _per_input(d, w) @ c


def _passes_const(d: _Dense, st: Optional[_State]) -> torch.Tensor:
    """Inputs of ``d`` that are constants it sees unchanged everywhere (zero padding only keeps 0)."""
    if st is None:
        return torch.zeros(d.n_in, dtype=torch.bool, device=d.weight.device)
    return st.dead & ((st.const == 0) | (not d.pads_with_zeros()))


def _out_state(d: _Dense, st: Optional[_State]) -> _State:
    """Units of ``d``'s output: constant when every input its row reads is a constant ``d`` passes on."""
    c_in = _passes_const(d, st)
    dead = ~(_reads(d) & ~c_in[None, :]).any(1)
    const = d.bias.clone()
    if bool(c_in.any()):
        const += _through(d, torch.where(c_in, st.const, torch.zeros_like(st.const)))
    return _State("chan" if d.kind == "conv" else "feat", dead, const)


def _output_ties(d: _Dense, ties_in: torch.Tensor) -> torch.Tensor:
    """Tie-set ids of ``d``'s outputs (units that can only be removed together; tie-set 0: never), from the
    ids of its input (the model input: all 0). An ordinary layer's outputs are free: one tie-set each. A
    grouped conv removes a group only with its input block, so groups whose blocks share a tie-set go
    together (one tie-set), and groups reading tie-set 0 stay (tie-set 0)."""
    n, g = d.weight.shape[0], d.groups
    dev = ties_in.device
    if g == 1:
        return torch.arange(1, n + 1, dtype=torch.long, device=dev)
    blocks = ties_in.view(g, -1)
    label = torch.arange(1, g + 1, dtype=torch.long, device=dev)
    label[(blocks == 0).any(1)] = 0
    while True:  # each group takes the smallest label of the groups it shares a tie-set with
        low = torch.full((int(ties_in.max()) + 1,), g + 1, dtype=torch.long, device=dev)
        low.scatter_reduce_(0, blocks.flatten(), label.repeat_interleave(blocks.shape[1]), "amin")
        new = torch.minimum(label, low[blocks].min(1).values)
        if torch.equal(new, label):
            return label.repeat_interleave(n // g)
        label = new


def _whole_ties(removable: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """``removable`` where its whole tie-set is removable (tie-set 0: never)."""
    stays = torch.zeros(int(ties.max()) + 1 if ties.numel() else 1, dtype=torch.bool, device=ties.device)
    stays[ties[~removable]] = True
    stays[0] = True
    return ~stays[ties]


# -- building the new layers -------------------------------------------------------------------------------

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
    """How many groups a grouped conv keeps; each is kept or removed whole (output and input block)."""
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


def _slice_op(m: nn.Module, keep: Optional[torch.Tensor]) -> nn.Module:
    new = copy.deepcopy(m)
    if keep is None or not isinstance(m, BATCHNORM) or bool(keep.all()):
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


@dataclass
class _Plan:
    root: Any
    leaves: List[_Leaf]
    layer_info: Dict[str, Dict[str, Any]]


def _compact_plan(model: nn.Module) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root = _structure(model)
    leaves = _leaves(root)
    with torch.no_grad():
        dense: Dict[int, _Dense] = {i: _dense(lf.module) for i, lf in enumerate(leaves) if _is_weight_layer(lf.module)}
        widx = sorted(dense)
        # forward: constant units, and which units can only be removed together
        ins: Dict[int, Tuple[Optional[_State], int]] = {}
        ties: Dict[int, torch.Tensor] = {}
        st: Optional[_State] = None
        ties_now: Optional[torch.Tensor] = None
        for i, lf in enumerate(leaves):
            if i in dense:
                d = dense[i]
                ins[i] = _resolve_input(st, d, lf.name)
                st = _out_state(d, ins[i][0])
                if ties_now is None:  # the model input keeps its size
                    ties_now = torch.zeros(d.n_in, dtype=torch.long, device=d.weight.device)
                ties[i] = ties_now = _output_ties(d, ties_now.to(d.weight.device))
            else:
                st = _forward_op(lf, st)
        # backward: units the next layer does not need
        out_keep: Dict[int, torch.Tensor] = {}
        in_keep: Dict[int, torch.Tensor] = {}
        fold: Dict[int, torch.Tensor] = {}
        for j in range(len(widx) - 1, -1, -1):
            r = widx[j]
            d = dense[r]
            if j == len(widx) - 1:
                out_keep[r] = torch.ones(d.weight.shape[0], dtype=torch.bool, device=d.weight.device)
            st_in, hw = ins[r]
            if j == 0:
                in_keep[r] = torch.ones(d.n_in, dtype=torch.bool, device=d.weight.device)
            else:
                p = widx[j - 1]
                if d.groups > 1:  # a grouped conv reads the input blocks of the groups it keeps
                    gone = ~out_keep[r].view(d.groups, -1).any(1)
                    removable = gone.repeat_interleave(d.n_in // d.groups)
                else:
                    used = _reads(d)[out_keep[r]].any(0)
                    removable = ~used | _passes_const(d, st_in)
                    if hw > 1:  # a flattened channel goes only when all its H*W features can
                        removable = removable.view(-1, hw).all(1)
                removable = _whole_ties(removable.to(ties[p].device), ties[p])
                if dense[p].kind == "conv" and bool(removable.all()):
                    # nn.Conv2d needs at least one output channel (its whole tie-set: a grouped conv's group)
                    removable &= ties[p] != ties[p][0]
                out_keep[p] = ~removable
                in_keep[r] = (~removable).repeat_interleave(hw).to(d.weight.device)
            removed = ~in_keep[r]
            if bool(removed.any()):
                c = torch.where(removed & st_in.dead, st_in.const, torch.zeros_like(st_in.const))
                fold[r] = _through(d, c)[out_keep[r]]
            else:
                fold[r] = d.bias.new_zeros(int(out_keep[r].sum()))
        # build
        layer_info: Dict[str, Dict[str, Any]] = {}
        keep_now: Optional[torch.Tensor] = None
        for i, lf in enumerate(leaves):
            if i in dense:
                d = dense[i]
                make = _new_linear if d.kind == "linear" else _new_conv
                lf.new = make(d, out_keep[i], in_keep[i], fold[i])
                keep_now = out_keep[i]
                layer_info[lf.name] = {"in_keep": in_keep[i], "out_keep": out_keep[i], "new": lf.new}
            else:
                lf.new = _slice_op(lf.module, keep_now)
    return _Plan(root, leaves, layer_info)


def compact(model: nn.Module) -> nn.Module:
    """A plain ``torch.nn`` copy of ``model`` (in eval mode) with zero-gated groups removed and gates folded in.

    ``L0Linear`` -> ``nn.Linear``, ``L0Conv2d`` -> ``nn.Conv2d``; removals propagate through elementwise
    activations, BatchNorm, pooling, dropout and ``Flatten`` (constants such as ``sigmoid(0)`` or a
    BatchNorm shift of a removed unit are folded into the next layer's bias). Grouped convs lose whole
    groups only (see the module docstring). Nested ``nn.Sequential``
    and modules that ``torch.fx`` traces into a chain are supported; anything else raises ``ValueError``
    naming the module or op. The model's input and output sizes are unchanged. ``model`` is not modified.
    """
    plan = _compact_plan(model)
    out = _rebuild(plan.root)
    return out.eval()


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


def _record_conv_hw(model: nn.Module, input_shape) -> Dict[int, Tuple[int, int]]:
    seen: Dict[int, Tuple[int, int]] = {}
    hooks = []
    for m in model.modules():
        if _is_weight_layer(m) and getattr(m, "weight", None) is not None and m.weight.dim() == 4:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args: seen.__setitem__(id(mod), tuple(args[0].shape[2:]))))
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    device = p.device if p is not None else torch.device("cpu")
    x = torch.zeros(tuple(input_shape), device=device, dtype=p.dtype if p is not None else torch.float32)
    was = model.training
    try:
        model.eval()
        # the model's own forward runs with its device as the default device (summary() makes no
        # tensor from the caller's default device, and neither should the eval path it runs)
        with torch.no_grad(), torch.device(device):
            model(x)
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


def summary(model: nn.Module, input_shape: Optional[Sequence[int]] = None) -> ModelSummary:
    """Per weight layer: gates active/total, expected L0, parameters and FLOPs (per example) before and after
    :func:`compact`. Conv FLOPs need the input size: ``input_shape=(1, C, H, W)`` runs one eval forward to
    record it; otherwise the last input size each L0Conv2d saw is used (``?`` when none)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    L0Linear, L0Conv2d = _l0_types()
    hw_seen = _record_conv_hw(model, input_shape) if input_shape is not None else {}
    note = ""
    try:
        info = _compact_plan(model).layer_info
        compacted = True
    except ValueError as e:
        info, compacted = {}, False
        note = f"(not a chain compact() supports: 'after' counts each layer's own gates only: {e})"
    layers = []
    for name, m in model.named_modules():
        if not _is_weight_layer(m) or isinstance(m, nn.Sequential):
            continue
        is_l0 = isinstance(m, (L0Linear, L0Conv2d))
        is_conv = isinstance(m, (nn.Conv2d, L0Conv2d))
        d = _dense(m)
        gate = (getattr(m, "gate", "out") if not is_conv else "channel") if is_l0 else "-"
        z = _z_eval(m) if is_l0 else None  # the eval path's gates (open: z > 0)
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
                n2, k2 = n, int((z > 0).sum())
            elif is_l0 and (is_conv or m.gate == "out"):
                n2, k2 = int((z > 0).sum()), kk
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


__all__ = ["compact", "summary", "ModelSummary", "LayerSummary"]
