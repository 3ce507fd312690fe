"""Units of the tensors of an exported graph, and which of them compact() keeps (docs/compact.md, "Units").

Every tensor of the graph carries the state of its *units* (:class:`Units`: the features of a ``Linear``'s
output, the channels of a conv's output, ``(heads, head_dim)`` after an attention reshape): a global id per
unit, and whether the unit is *dead* -- the same known constant for every input (``const``). Ids are merged
where units must shrink together (union-find, :meth:`CompactContext.tie`). :func:`decide` then keeps the least
set of unit classes that holds the model outputs, the frozen units, and every unit a kept row of a weight
layer reads and cannot fold into its bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .dense import Dense

CPU = torch.device("cpu")


@dataclass
class Units:
    """The units of one tensor of the graph.

    ``ids`` (int64, shape = the sizes of the unit dims ``dims``, negative tensor dims in ascending order): a
    global id per unit; units with the same (merged) id are kept or removed together. ``dead``/``const`` (same
    shape): the unit is the constant ``const`` for every input. ``rank``: the tensor's rank."""
    ids: torch.Tensor
    dims: Tuple[int, ...]
    dead: torch.Tensor
    const: torch.Tensor
    rank: Optional[int] = None

    def like(self, const=None, dead=None, ids=None) -> "Units":
        return Units(self.ids if ids is None else ids, self.dims, self.dead if dead is None else dead,
                     self.const if const is None else const, self.rank)


@dataclass
class WeightUse:
    """One call of a weight layer: ``key`` names the weight Parameter (calls of one Parameter share units)."""
    node: Any
    key: str
    d: Dense
    inp: Units  # (n_in,) on the input's unit dim
    out: Units


class CompactContext:
    """What a rule (:func:`l0kernels.register_compact_rule`) works with while ``compact`` walks the graph.

    ``units(arg)`` -> :class:`Units` or None (a value without tracked units: a constant, a shape, a parameter,
    an opaque tensor); ``tie(a, b)`` merges two id tensors; ``freeze(units)`` keeps every unit; ``fresh(shape)``
    makes new ids; ``shape(arg)`` the shape of a graph value; ``parameter(arg)`` the module and attribute name
    holding a parameter input of the graph (None for anything else)."""

    def __init__(self, graph: torch.fx.Graph, params: Dict[str, Tuple[Any, str]]):
        self.graph = graph
        self.params = params  # placeholder name -> (module, attribute) of the model
        self.env: Dict[Any, Any] = {}
        self.parent: List[int] = []
        self.frozen: List[torch.Tensor] = []
        self.weights: List[WeightUse] = []
        self.bns: List[Tuple[Any, Any, Units]] = []  # (node, module, units)
        self.multi: List[Units] = []
        self.resize: Dict[Any, Units] = {}
        self.claimed: set = set()
        self.discover = False  # finding blocks for structure gates (l0kernels.compact.blocks): no shape changes

    # ids
    def fresh(self, shape) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long, device=CPU).view(tuple(int(s) for s in shape))

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def tie(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for i, j in zip(a.flatten().tolist(), b.flatten().tolist()):
            ri, rj = self.find(i), self.find(j)
            if ri != rj:
                self.parent[max(ri, rj)] = min(ri, rj)

    def tie_along(self, u: Units, ax: int) -> None:
        """Units on the lines along axis ``ax`` of ``u`` go together (each line whole or not at all)."""
        ids = u.ids.movedim(ax, -1).reshape(-1, u.ids.shape[ax])
        if ids.shape[1] > 1:
            self.tie(ids[:, :1].expand(ids.shape), ids)

    def freeze(self, u) -> None:
        if isinstance(u, Units):
            self.frozen.append(u.ids.flatten())
        elif isinstance(u, (list, tuple)):
            for v in u:
                self.freeze(v)

    def new_units(self, shape, dims, rank=None) -> Units:
        ids = self.fresh(shape)
        return Units(ids, tuple(dims), torch.zeros(ids.shape, dtype=torch.bool, device=CPU),
                     torch.zeros(ids.shape, dtype=torch.float64, device=CPU), rank)

    # values
    def value(self, arg):
        """The example value of a graph value (a fake tensor: shapes and dtypes only) or the literal."""
        if isinstance(arg, torch.fx.Node):
            return arg.meta.get("val")
        return arg

    def shape(self, arg) -> Optional[Tuple[int, ...]]:
        v = self.value(arg)
        return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None

    def parameter(self, arg) -> Optional[Tuple[Any, str]]:
        return self.params.get(arg.name) if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" else None

    def units(self, arg) -> Optional[Units]:
        if not isinstance(arg, torch.fx.Node):
            return None
        self.claimed.add(arg)
        u = self.env.get(arg)
        return u if isinstance(u, Units) else None


def decide(ctx: CompactContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """Which unit classes stay: the least set that holds the frozen units (model outputs, ops that keep their
    units), every unit a kept row of a weight layer reads and cannot fold, whole groups of grouped convs,
    rectangular blocks of multi-dim units, and one channel per conv. Returns ``keep(ids) -> bool mask``."""
    n = len(ctx.parent)
    root = torch.tensor([ctx.find(i) for i in range(n)], dtype=torch.long, device=CPU) if n else \
        torch.zeros(0, dtype=torch.long, device=CPU)
    kept = torch.zeros(n, dtype=torch.bool, device=CPU)
    for f in ctx.frozen:
        kept[root[f]] = True
    fold_ok = [w.inp.dead & ((w.inp.const == 0) | (not w.d.pads_with_zeros())) for w in ctx.weights]
    last: List[Optional[torch.Tensor]] = [None] * len(ctx.weights)  # rows kept at the last visit
    changed = True

    def mark(ids):
        nonlocal changed
        r = root[ids]
        if not bool(kept[r].all()):
            kept[r] = True
            changed = True
    while changed:
        changed = False
        for i, w in enumerate(ctx.weights):
            d = w.d
            out_keep = kept[root[w.out.ids]]
            if d.groups > 1:
                g_out = out_keep.view(d.groups, -1).any(1)
                in_k = kept[root[w.inp.ids]].view(d.groups, -1).any(1)
                mark(w.out.ids.view(d.groups, -1)[in_k].flatten())  # a group whose inputs stay, stays
                mark(w.inp.ids.view(d.groups, -1)[g_out].flatten())  # a kept group reads its whole block
            elif last[i] is None or not torch.equal(last[i], out_keep):
                last[i] = out_keep
                if bool(out_keep.any()):
                    mark(w.inp.ids[d.needed(out_keep) & ~fold_ok[i]])
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
    return lambda ids: kept[root[ids]] if ids.numel() else torch.zeros(ids.shape, dtype=torch.bool, device=CPU)
