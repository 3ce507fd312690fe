"""Blocks for structure gates (docs/design.md §11), found in the exported graph with compact()'s analysis.

compact()'s analysis (:func:`l0kernels.compact.core.analyse`) merges the units that must go together into
classes: a hidden unit of a feed-forward block is one class spanning its rows in every producer (``gate_proj``
and ``up_proj`` are tied by their product; both halves of a fused ``gate_up_proj`` by the split), and its
column in the consumer; an attention head is one class spanning its query, key and value rows and its columns
of the output projection (with grouped-query attention, the query heads of one key/value head form one class).

A *block* is a linear consumer whose input classes are read by no other weight layer, reach no model output
and no op that keeps its units, and are written only by linear layers whose every output row is in them (the
producers). Then:

* every class is one consumer column: a feed-forward block, one gate per column (``"ffn"``);
* every class is ``c`` consecutive consumer columns: an attention block (``"heads"``). The head size ``d`` is
  the last dim of the model's attention calls (``scaled_dot_product_attention``) when they all share one and
  it divides ``c``, else the smallest number of rows any producer gives a class (the key/value projections);
  a class holds ``r = c / d`` query heads (one gate each). A producer giving a class ``c`` rows (a query
  projection) has ``r`` runs of ``d`` rows, one per head in order; one giving ``d`` rows (a key or value
  projection) keeps them while any of the ``r`` heads is open; one giving ``c + m d`` (a fused projection)
  has its query rows first, then ``m`` key/value runs. Any other count makes one gate per class (``r = 1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .core import _capture, _folded_copy, analyse, example_call
from .dense import plain_layer


@dataclass
class Block:
    """One block: ``kind`` (``"ffn"``/``"heads"``), the consumer's and producers' qualified names, the gate of
    each consumer column (``col_gates``, ``(K,)``) and of each producer row (``row_gates``, ``(N, R)``: the row
    stays while any of its ``R`` gates is open), and the number of gates."""
    kind: str
    consumer: str
    producers: List[str]
    col_gates: torch.Tensor
    row_gates: Dict[str, torch.Tensor]
    num_gates: int
    col_classes: torch.Tensor  # (K,) the unit class of each consumer column (an FFN unit, a head or a KV group)
    row_classes: Dict[str, torch.Tensor]  # (N,) per producer
    class_gates: torch.Tensor  # (C, r) the gates of each class

    @property
    def layers(self) -> List[str]:
        return self.producers + [self.consumer]

    @property
    def name(self) -> str:
        """The qualified name of the lowest module holding every layer of the block."""
        parts = [n.split(".")[:-1] for n in self.layers]
        common = []
        for seg in zip(*parts):
            if len(set(seg)) != 1:
                break
            common.append(seg[0])
        return ".".join(common)


def find_blocks(model: nn.Module, example_inputs=None) -> Tuple[List[Block], tuple, dict]:
    """Every feed-forward and attention block of ``model`` (see the module docstring), in graph order (a layer
    is in one block at most: the first that takes it), and the call ``(args, kwargs)`` the graph was captured on."""
    args, kwargs, made = example_call(model, example_inputs)
    tries = args if made and args and isinstance(args[0], tuple) else (args,)
    flags = [(m, m.training) for m in model.modules()]
    try:
        work = _folded_copy(model)
    finally:
        for m, t in flags:
            m.training = t
    _linear_conv1d(work)
    names = {id(m): n for n, m in work.named_modules()}
    ep, err = None, None
    for a in tries:
        try:
            ep = _capture(work, a, kwargs)
            args = a
            break
        except ValueError as e:
            err = e
    if ep is None:
        raise ValueError(f"convert(structure=...): blocks are found in the model's exported graph and "
                         f"{err}") from err
    ctx = analyse(work, ep, discover=True)
    head_dims = {int(n.args[0].meta["val"].shape[-1]) for n in ep.graph_module.graph.nodes
                 if n.op == "call_function" and "scaled_dot_product" in str(n.target)
                 and isinstance(n.args[0], torch.fx.Node) and "val" in n.args[0].meta}
    head_dim = head_dims.pop() if len(head_dims) == 1 else None
    n = len(ctx.parent)
    root = torch.tensor([ctx.find(i) for i in range(n)], dtype=torch.long) if n else torch.zeros(0, dtype=torch.long)
    frozen = torch.zeros(n, dtype=torch.bool)
    for f in ctx.frozen:
        frozen[root[f]] = True
    uses = []
    for w in ctx.weights:  # linear calls of a weight only (calls of one weight share their units)
        if w.d.kind != "linear":
            continue
        owner = ctx.params.get(w.key)
        if owner is None or id(owner[0]) not in names:
            continue
        uses.append((names[id(owner[0])], root[w.inp.ids.flatten()], root[w.out.ids.flatten()]))
    blocks: List[Block] = []
    taken = set()
    for cname, cin, _ in uses:
        if cname in taken or cin.numel() == 0 or bool(frozen[cin].any()):
            continue
        classes = cin.unique()
        readers = {name for name, inp, _ in uses if bool(torch.isin(inp, classes).any())}
        if readers != {cname}:
            continue
        writers: Dict[str, torch.Tensor] = {}
        ok = True
        for name, _, out in uses:
            hit = torch.isin(out, classes)
            if bool(hit.any()):
                if not bool(hit.all()) or name == cname:
                    ok = False
                    break
                writers[name] = out
        if not ok or not writers or any(w in taken for w in writers):
            continue
        block = _block(cname, cin, writers, head_dim)
        if block is None:
            continue
        blocks.append(block)
        taken.update(block.layers)
    return blocks, args, kwargs


def _linear_conv1d(work: nn.Module) -> None:
    """transformers' ``Conv1D`` layers of the copy (GPT-2) as the ``nn.Linear`` they compute (``addmm`` is not
    a linear call the analysis follows); convert() turns them into linear layers too."""
    from ..convert import _is_conv1d
    for parent in list(work.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and _is_conv1d(child):
                parent._modules[name] = plain_layer(child, child.weight.detach().t(),
                                                    child.bias.detach() if child.bias is not None else None)


def _block(cname: str, cin: torch.Tensor, writers: Dict[str, torch.Tensor],
           head_dim: Optional[int] = None) -> Optional[Block]:
    """The gates of one block, or None when its classes are not runs of consecutive consumer columns.
    ``head_dim``: the head size of the model's attention calls, when they all have one."""
    k = cin.numel()
    order: List[int] = []
    for c in cin.tolist():
        if not order or order[-1] != c:
            order.append(c)
    if len(order) != len(set(order)):
        return None  # a class in several places of the consumer's input
    c = k // len(order)
    if c * len(order) != k:
        return None
    index = {cls: i for i, cls in enumerate(order)}
    classes = {name: torch.tensor([index[x] for x in out.tolist()], dtype=torch.long) for name, out in writers.items()}
    if c == 1:
        cols = torch.arange(k)
        rows = {name: cls[:, None] for name, cls in classes.items()}
        return Block("ffn", cname, list(writers), cols, rows, k, cols, classes, cols[:, None])
    counts = {name: torch.bincount(torch.tensor([index[x] for x in out.tolist()]), minlength=len(order))
              for name, out in writers.items()}
    if any(int(v.min()) != int(v.max()) for v in counts.values()):
        return None  # producers give the classes unequal numbers of rows
    per = {name: int(v[0]) for name, v in counts.items()}
    d = head_dim if head_dim is not None and c % head_dim == 0 else min(per.values())
    # a producer gives a class its query rows (c), its key or value rows (d), or both, fused (c + m d)
    if c % d or any(p != d and (p < c or (p - c) % d) for p in per.values()):
        d = c
    r = c // d
    heads = len(order) * r
    cols = torch.arange(k) // d
    rows = {}
    for name, out in writers.items():
        cls = torch.tensor([index[x] for x in out.tolist()], dtype=torch.long)
        if r == 1:
            rows[name] = cls[:, None]
            continue
        g = torch.empty(cls.numel(), r, dtype=torch.long)
        for i in range(len(order)):
            at = (cls == i).nonzero().squeeze(1)
            q = 0 if per[name] == d else c  # query rows first (a fused projection's layout), r runs of d rows
            g[at[:q]] = (i * r + torch.arange(q) // d)[:, None].expand(q, r)
            # key/value rows: they stay while any head of the class is open
            g[at[q:]] = (i * r + torch.arange(r))[None, :].expand(per[name] - q, r)
        rows[name] = g
    class_gates = torch.arange(heads).view(len(order), r)
    return Block("heads", cname, list(writers), cols, rows, heads, torch.arange(k) // c, classes, class_gates)


__all__ = ["Block", "find_blocks"]
