"""One small rule per ATen op: how the units of an op's inputs map to those of its output (docs/compact.md,
"Rules").

The exported graph holds ATen ops with concrete sizes, so the rules cover ops, not architectures. A rule
``rule(ctx, node) -> Units | list | None`` reads its inputs' units with ``ctx.units``, ties units that must
shrink together, and returns the output's units (None: the output carries none). An op without a rule keeps
every unit of its inputs (exact: nothing it reads is removed) and its output carries no units; so do ops
none of whose inputs carry units (size arithmetic, masks, parameters only).
"""
from __future__ import annotations

import operator
from typing import Any, Dict

import torch

from .dense import Dense
from .units import CPU, CompactContext, Units, WeightUse

aten = torch.ops.aten
_RULES: Dict[Any, Any] = {}  # registered by users: op overload or packet -> rule


def register_compact_rule(target, rule) -> None:
    """Teach :func:`compact` an ATen op of the exported graph. ``target``: an op overload
    (``torch.ops.aten.hardtanh.default``) or packet (``torch.ops.aten.hardtanh``, every overload), or a custom
    op (``torch.ops.mylib.op``). ``rule``:

    * ``"elementwise"``: output unit i depends on input unit i only (the constants of dead units are passed
      through the op itself, with its other arguments);
    * ``"passthrough"``: like ``"elementwise"`` and the op is the identity on constants;
    * ``"frozen"``: the op keeps every unit of its tensor inputs and its output carries none (what an op
      without a rule gets);
    * a callable ``rule(ctx, node) -> Units | None`` with ``ctx`` a :class:`CompactContext`: full control.
    """
    if isinstance(target, type) or isinstance(target, str) or not callable(target):
        raise TypeError("target must be an ATen or custom op (torch.ops.<namespace>.<op>[.<overload>]): compact() "
                        f"works on the graph torch.export captures, got {target!r}")
    if not (rule in ("elementwise", "passthrough", "frozen") or callable(rule)):
        raise ValueError(f"rule must be 'elementwise', 'passthrough', 'frozen' or a callable, got {rule!r}")
    _RULES[target] = rule


def frozen(ctx: CompactContext, node):
    for a in node.all_input_nodes:
        ctx.freeze(ctx.env.get(a))
        ctx.claimed.add(a)
    return None


def check_only(ctx, node):
    """Checks the exported graph records (``_assert_tensor_metadata``): the compacted model runs its own
    forward, not the graph, so they neither keep nor carry units."""
    for a in node.all_input_nodes:
        ctx.claimed.add(a)
    return None


def passthrough(ctx, node):
    return ctx.units(node.args[0]) if node.args else None


def _tensor_nodes(node):
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _const_of(ctx, node, units: Dict[Any, Units]):
    """The op of ``node`` on the constants of its unit-carrying inputs ``units`` and the values of the
    parameters and buffers it reads (None when it takes another tensor, whose values the analysis does not
    have, or when the result does not have one value per unit)."""
    base = next(iter(units.values()))

    def placed(u):  # the constants in the tensor's rank: 1 on the dims without units
        shape = [1] * u.rank
        for d, s in zip(u.dims, u.ids.shape):
            shape[u.rank + d] = s
        return u.const.clone().view(shape)

    def sub(a):
        if isinstance(a, torch.fx.Node):
            if a in units:
                return placed(units[a])
            owner = ctx.parameter(a)
            if owner is not None:
                return getattr(owner[0], owner[1]).detach().to(device=CPU, dtype=torch.float64)
            raise KeyError
        if isinstance(a, (list, tuple)):
            return type(a)(sub(b) for b in a)
        return a
    try:
        args = [sub(a) for a in node.args]
        kwargs = {k: sub(v) for k, v in node.kwargs.items()}
        with torch.no_grad():
            out = node.target(*args, **kwargs)
    except Exception:  # another tensor, or an op that does not run on a tensor of constants
        return None
    if not isinstance(out, torch.Tensor) or out.numel() != base.const.numel():
        return None
    return out.to(torch.float64).reshape(base.const.shape)


_MUL = {aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.mul_.Scalar}


def pointwise(ctx, node):
    """An element-wise op: its unit-carrying inputs share units (tied); an input without units that varies
    along a unit dim (a parameter, a position table) ties the units along that dim (lines go whole); the
    output's unit is constant where the op maps constants to a constant (a product with an exact zero is 0)."""
    ins = _tensor_nodes(node)
    us = {a: ctx.units(a) for a in ins}
    with_u = [(a, u) for a, u in us.items() if u is not None]
    if not with_u:
        return None
    base = with_u[0][1]
    rank = len(ctx.shape(node) or ()) or base.rank
    if any(u.dims != base.dims or u.ids.shape != base.ids.shape for _, u in with_u) or rank != base.rank:
        # a broadcast across unit dims (a per-head statistic against the head's units): it ties what it spreads over
        return _broadcast_ties(ctx, node, [u for _, u in with_u], rank)
    for _, u in with_u[1:]:
        ctx.tie(base.ids, u.ids)
    others = [a for a, u in us.items() if u is None]
    full = set()
    for a in others:
        s = ctx.shape(a) or ()
        for ax, d in enumerate(base.dims):
            if len(s) >= -d and s[len(s) + d] != 1:
                full.add(ax)
    for ax in full:
        ctx.tie_along(base, ax)
    dead = torch.ones_like(base.dead)
    for _, u in with_u:
        dead &= u.dead
    const = None
    if bool(dead.any()) and all(ctx.parameter(a) is not None for a in others):
        const = _const_of(ctx, node, dict(with_u))
    if const is None:
        dead = torch.zeros_like(dead)
        const = torch.zeros_like(base.const)
    if node.target in _MUL:  # a factor that is exactly 0 makes the product 0
        zero = torch.zeros_like(dead)
        for _, u in with_u:
            zero |= u.dead & (u.const == 0)
        dead, const = dead | zero, torch.where(zero, torch.zeros_like(const), const)
    return base.like(const=const, dead=dead)


def weight(ctx, node):
    """``aten.linear`` / ``aten.conv2d`` on a parameter of an ``nn.Linear`` / ``nn.Conv2d`` (or subclass) whose
    parameters nothing else reads: rows and inputs can go. Anything else keeps its units."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    owner = ctx.parameter(w)
    is_conv = node.target in (aten.conv2d.default, aten.conv2d.padding)
    kind = torch.nn.Conv2d if is_conv else torch.nn.Linear
    if owner is None or owner[1] != "weight" or not isinstance(owner[0], kind) or \
            (b is None) != (owner[0].bias is None) or (b is not None and ctx.parameter(b) != (owner[0], "bias")) or \
            any(u.target not in WEIGHT_OPS or u.args[1] is not w for u in w.users) or \
            (b is not None and any(u.target not in WEIGHT_OPS or u.args[2] is not b for u in b.users)):
        return frozen(ctx, node)
    m = owner[0]
    d = Dense(m)
    u = ctx.units(x)
    dims = (-3,) if is_conv else (-1,)
    if u is None or u.dims != dims or u.ids.numel() != d.n_in:
        ctx.freeze(u)
        u = ctx.new_units((d.n_in,), dims, len(ctx.shape(x) or ()))
        ctx.freeze(u)
    dead, const = u.dead.flatten(), u.const.flatten()
    passes = dead & ((const == 0) | (not d.pads_with_zeros()))
    out_dead = d.reads_none(~passes)
    out_const = d.bias64()
    if bool(passes.any()):
        out_const = out_const + d.through(torch.where(passes, const, torch.zeros_like(const)))
    out = Units(ctx.fresh((d.n_out,)), dims, out_dead.cpu(), out_const.to(device=CPU, dtype=torch.float64),
                len(ctx.shape(node) or ()))
    if d.groups > 1:  # a group's output channels go together
        blocks = out.ids.view(d.groups, -1)
        for g in range(d.groups):
            ctx.tie(blocks[g, :1].expand(blocks.shape[1]), blocks[g])
    use = WeightUse(node, w.name, d, Units(u.ids.flatten(), dims, dead, const, u.rank), out)
    for prev in ctx.weights:  # a layer called twice keeps the same units at both calls
        if prev.key == use.key:
            ctx.tie(prev.inp.ids, use.inp.ids)
            ctx.tie(prev.out.ids, use.out.ids)
            # one compacted layer folds one constant per removed input: fold only where the calls agree
            same = (prev.inp.dead == use.inp.dead) & (~use.inp.dead | (prev.inp.const == use.inp.const))
            prev.inp.dead = prev.inp.dead & same
            use.inp.dead = use.inp.dead & same
    ctx.weights.append(use)
    return out


WEIGHT_OPS = (aten.linear.default, aten.conv2d.default, aten.conv2d.padding)


def batch_norm(ctx, node):
    """Eval ``aten.batch_norm`` of an ``nn.BatchNorm*`` with running statistics: entries go with their channel;
    a constant channel stays constant."""
    x, w, b, rm, rv = node.args[:5]
    eps = node.args[7] if len(node.args) > 7 else 1e-5
    u = ctx.units(x)
    if u is None:
        return None
    owner = ctx.parameter(rm)
    mod = owner[0] if owner is not None else None
    ok = mod is not None and isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and owner[1] == "running_mean" \
        and ctx.parameter(rv) == (mod, "running_var") and u.dims == (1 - (u.rank or 2),) and \
        u.ids.numel() == mod.num_features and all(
            a is None or ctx.parameter(a) == (mod, n) and len(a.users) == 1
            for a, n in ((w, "weight"), (b, "bias"), (rm, "running_mean"), (rv, "running_var")))
    if not ok:
        return frozen(ctx, node)
    for prev_node, prev_mod, pu in ctx.bns:  # a BatchNorm called twice keeps the same units at both calls
        if prev_mod is mod:
            ctx.tie(pu.ids, u.ids)
    ctx.bns.append((node, mod, u))
    as_c = lambda t: t.detach().to(device=CPU, dtype=torch.float64)
    out = (u.const - as_c(mod.running_mean)) / torch.sqrt(as_c(mod.running_var) + eps)
    if mod.affine:
        out = out * as_c(mod.weight) + as_c(mod.bias)
    return u.like(const=out)


def pool2d(ctx, node):
    """2-D pooling: channels (dim -3) pass, with their constants (padding in an average changes them)."""
    u = ctx.units(node.args[0])
    if u is None:
        return None
    if u.dims != (-3,):
        return frozen(ctx, node)
    res = u
    if node.target in (aten.avg_pool2d.default,):
        a = lambda i, dflt: node.args[i] if len(node.args) > i else dflt
        pad, cip, div = a(3, 0), a(5, True), a(6, None)
        pad = pad if isinstance(pad, (tuple, list)) else (pad,)
        if (any(p != 0 for p in pad) and cip) or div is not None:
            res = u.like(dead=u.dead & (u.const == 0))  # borders average the constant with padding zeros
    if isinstance(node.meta.get("val"), (tuple, list)):  # (values, indices)
        return [res, None]
    return res


def _broadcast_ties(ctx, node, us, rank):
    """An element-wise op whose unit-carrying inputs broadcast (a per-head statistic against the head's units,
    ``x * rsqrt(mean(x^2))`` in a per-head norm): each input's units are tied to the units they meet; the
    output carries the widest input's units, none of them constant."""
    base = max(us, key=lambda u: len(u.dims))
    for u in us:
        if u is base:
            continue
        if not set(u.dims) <= set(base.dims) or u.rank != rank or \
                any(u.ids.shape[i] != base.ids.shape[base.dims.index(d)] for i, d in enumerate(u.dims)):
            return frozen(ctx, node)
        view = [base.ids.shape[i] if d in u.dims else 1 for i, d in enumerate(base.dims)]
        ctx.tie(u.ids.reshape(view).expand(base.ids.shape), base.ids)
    return base.like(dead=torch.zeros_like(base.dead), const=torch.zeros_like(base.const))


def reduce(ctx, node):
    """``mean`` / ``sum`` / ``amax`` over dims without units: units pass (constants too, except for a sum)."""
    x = node.args[0]
    u = ctx.units(x)
    if u is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rank = len(ctx.shape(x))
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return frozen(ctx, node)
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = [d - rank if d >= 0 else d for d in dims]
    if any(d in u.dims for d in dims):
        if all(d in dims for d in u.dims):
            return frozen(ctx, node)
        # a reduction over some unit dims (a per-head norm over the head dim) ties those lines and keeps the
        # other unit dims: they go whole
        axes = sorted((u.dims.index(d) for d in dims if d in u.dims), reverse=True)
        ids = u.ids
        for ax in axes:
            ctx.tie_along(u, ax)
            ids = ids.select(ax, 0)
        left = tuple(d for d in u.dims if d not in dims)
        if not keep:
            left = tuple(d + sum(1 for e in dims if e > d) for d in left)
        zero = torch.zeros(ids.shape, dtype=torch.bool, device=CPU)
        return Units(ids, left, zero, torch.zeros(ids.shape, dtype=torch.float64, device=CPU),
                     rank if keep else rank - len(dims))
    if node.target is aten.sum.dim_IntList:
        u = u.like(dead=torch.zeros_like(u.dead))
    if keep:
        return u
    new_dims = tuple(d + sum(1 for e in dims if e > d) for d in u.dims)
    return Units(u.ids, new_dims, u.dead, u.const, rank - len(dims))


def cat(ctx, node):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    us = [ctx.units(t) for t in tensors]
    if any(u is None for u in us):
        return frozen(ctx, node)
    rank = len(ctx.shape(node))
    dim = dim - rank if dim >= 0 else dim
    if any(u.dims != us[0].dims for u in us):
        return frozen(ctx, node)
    if dim in us[0].dims:
        ax = us[0].dims.index(dim)
        if any(u.ids.shape[:ax] + u.ids.shape[ax + 1:] != us[0].ids.shape[:ax] + us[0].ids.shape[ax + 1:]
               for u in us):
            return frozen(ctx, node)
        c = lambda ts: torch.cat(ts, ax)
        res = Units(c([u.ids for u in us]), us[0].dims, c([u.dead for u in us]), c([u.const for u in us]), rank)
        if len(res.dims) > 1:
            ctx.multi.append(res)
        return res
    for u in us[1:]:  # joined along another dim: unit i of every input is the same unit
        if u.ids.shape != us[0].ids.shape:
            return frozen(ctx, node)
        ctx.tie(us[0].ids, u.ids)
    dead = us[0].dead.clone()
    for u in us[1:]:
        dead &= u.dead & (u.const == us[0].const)
    return us[0].like(dead=dead)


def split(ctx, node):
    """``split`` / ``split_with_sizes`` / ``chunk``: on a unit dim, piece k gets its slice of the
    units; pieces of equal size shrink alike (unit j of every piece goes together) so that one split size
    still cuts them; unequal pieces keep their units."""
    x = node.args[0]
    u = ctx.units(x)
    if u is None:
        return None
    vals = node.meta.get("val")
    rank = len(ctx.shape(x))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim - rank if dim >= 0 else dim
    if dim not in u.dims:
        return [u] * len(vals)  # split along another dim: every piece has all the units
    ax = u.dims.index(dim)
    sizes = [int(v.shape[dim]) for v in vals]
    if len(set(sizes)) != 1:
        ctx.freeze(u)
        return [None] * len(vals)
    pieces = []
    start = 0
    for s in sizes:
        pieces.append(Units(u.ids.narrow(ax, start, s), u.dims, u.dead.narrow(ax, start, s),
                            u.const.narrow(ax, start, s), rank))
        start += s
    for p in pieces[1:]:
        ctx.tie(pieces[0].ids, p.ids)
    ctx.resize[node] = pieces[0]
    if len(u.dims) > 1:
        ctx.multi.extend(pieces)
    return pieces


def getitem(ctx, node):
    src, i = node.args
    v = ctx.env.get(src)
    ctx.claimed.add(src)
    if isinstance(v, (list, tuple)):
        return v[i]
    return frozen(ctx, node)


def sdpa(ctx, node):
    """``scaled_dot_product_attention``: a query head, its key/value head and its output go together (with
    grouped-query attention a key/value head goes only with all the query heads that read it)."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    uq, uk, uv = ctx.units(a["query"]), ctx.units(a["key"]), ctx.units(a["value"])
    mask = a.get("attn_mask")
    if isinstance(mask, torch.fx.Node):
        ctx.freeze(ctx.units(mask))
    if uq is None or uk is None or uv is None:
        return frozen(ctx, node)

    def per_head(u, arg):
        """``(ids, zero)`` as (heads, head dim); units on the head size only (one key/value head, multi-query
        attention, repeated over the query heads) count as one head."""
        if u.dims == (-3, -1):
            return u.ids, u.dead & (u.const == 0)
        shape = ctx.shape(arg)
        if u.dims == (-1,) and shape is not None and len(shape) == 4:  # the same units in every head
            return u.ids.reshape(1, -1), (u.dead & (u.const == 0)).reshape(1, -1)
        return None
    pq, pk, pv = per_head(uq, a["query"]), per_head(uk, a["key"]), per_head(uv, a["value"])
    if pq is None or pk is None or pv is None or uq.dims != (-3, -1):
        return frozen(ctx, node)
    (q_ids, _), (k_ids, _), (v_ids, v_zero) = pq, pk, pv
    h, hk = q_ids.shape[0], k_ids.shape[0]
    if v_ids.shape[0] != hk or h % max(hk, 1):
        return frozen(ctx, node)
    r = h // hk
    for i in range(h):
        j = i // r
        anchor = q_ids[i, :1]
        ctx.tie(anchor.expand(q_ids.shape[1]), q_ids[i])
        ctx.tie(anchor.expand(k_ids.shape[1]), k_ids[j])
        ctx.tie(anchor.expand(v_ids.shape[1]), v_ids[j])
    ids = v_ids.repeat_interleave(r, 0)
    # an output unit is 0 where its value unit is 0 for every key (a weighted sum of zeros)
    zero = v_zero.repeat_interleave(r, 0)
    return Units(ids, (-3, -1), zero, torch.zeros(ids.shape, dtype=torch.float64, device=CPU), uq.rank)



def matmul(ctx, node):
    """Batched ``matmul`` of attention computed by hand (``q @ k^T``, ``weights @ v``, rank 4): units on the
    head dim (-3) and on the right operand's columns pass; a head goes only with its whole rows and columns
    in both operands (its contraction is then gone entirely); anything else keeps its units."""
    a, b = node.args[:2]
    ua, ub = ctx.units(a), ctx.units(b)
    sa, sb = ctx.shape(a), ctx.shape(b)
    if (ua is None and ub is None) or sa is None or sb is None:
        return frozen(ctx, node)
    if len(sa) != 4 or len(sb) != 4 or (ua is not None and not set(ua.dims) <= {-3, -1}) or \
            (ub is not None and not set(ub.dims) <= {-3, -2, -1}):
        return frozen(ctx, node)
    ha = ua is not None and -3 in ua.dims
    hb = ub is not None and -3 in ub.dims
    if ha != hb and not ((ha and sb[-3] == 1) or (hb and sa[-3] == 1)):
        return frozen(ctx, node)
    for u in (ua, ub):  # the contraction axis: whole lines, and only under a head
        if u is None:
            continue
        c = -1 if u is ua else -2
        if c in u.dims:
            if -3 not in u.dims:
                return frozen(ctx, node)
            ctx.tie_along(u, u.dims.index(c))
    heads = []
    for u in (ua, ub):
        if u is not None and -3 in u.dims:
            ids = u.ids if u.ids.dim() > 1 else u.ids[:, None]
            ctx.tie(ids[:, :1].expand(ids.shape), ids)  # a head's units go together
            heads.append(ids[:, 0])
    if len(heads) == 2:
        ctx.tie(heads[0], heads[1])
    if ub is not None and -1 in ub.dims:
        ids = ub.ids if ub.ids.dim() > 1 or not heads else None
        if ids is None or ub.dims != (-3, -1) and ub.dims != (-1,):
            return frozen(ctx, node)
        zero = ub.dead & (ub.const == 0)  # a column of zeros gives zeros, whatever the weights
        res = Units(ub.ids, ub.dims, zero, torch.zeros_like(ub.const), 4)
        if len(res.dims) > 1:
            ctx.multi.append(res)
        return res
    if not heads:
        return None
    h = heads[0]
    return Units(h, (-3,), torch.zeros(h.shape, dtype=torch.bool), torch.zeros(h.shape, dtype=torch.float64), 4)


def softmax(ctx, node):
    """``softmax`` / ``log_softmax`` over a dim without units: units pass (a constant row stays constant only
    in the softmax's own terms, so none is kept as a constant)."""
    u = ctx.units(node.args[0])
    if u is None:
        return None
    rank = len(ctx.shape(node.args[0]))
    dim = node.args[1]
    dim = dim - rank if dim >= 0 else dim
    if dim in u.dims:
        return frozen(ctx, node)
    return u.like(dead=torch.zeros_like(u.dead), const=torch.zeros_like(u.const))

_SELECT = {aten.select.int, aten.index_select.default, aten.unbind.int}


def layout(ctx, node):
    """Ops that only move data (view, reshape, permute, transpose, expand, slice, ...): run the op itself on a
    tensor of unit positions and read the output's units from it. A unit dim a slice cuts ties its lines
    (they go whole); a selection that drops a unit dim keeps the units."""
    x = node.args[0]
    u = ctx.units(x)
    if u is None:
        return None
    shape = ctx.shape(x)
    rank = len(shape)
    n = u.ids.numel()
    view_shape = [1] * rank
    for d, s in zip(u.dims, u.ids.shape):
        view_shape[rank + d] = s
    grid = torch.arange(n, dtype=torch.long, device=CPU).view(view_shape).expand(shape).contiguous()

    def sub(a):
        if isinstance(a, torch.fx.Node):
            if a is x:
                return grid
            raise KeyError(a.name)
        if isinstance(a, (list, tuple)):
            return type(a)(sub(b) for b in a)
        return a
    try:
        out = node.target(*[sub(a) for a in node.args], **{k: sub(v) for k, v in node.kwargs.items()})
    except Exception:  # another tensor argument (an index), or an op that does not run on int64
        return frozen(ctx, node)
    if not isinstance(out, torch.Tensor) or node.target in _SELECT:
        return frozen(ctx, node)
    if out.numel() == 0 and node.target is aten.slice.Tensor:  # an empty slice of a unit dim (x[..., d:] at d)
        d = node.args[1] if len(node.args) > 1 else 0
        d = d - rank if d >= 0 else d
        if d in u.dims:
            ax = u.dims.index(d)
            ctx.tie_along(u, ax)
            return Units(u.ids.narrow(ax, 0, 0), u.dims, u.dead.narrow(ax, 0, 0), u.const.narrow(ax, 0, 0), rank)
    r = out.dim()
    udims = [d for d in range(r) if out.shape[d] > 1 and bool((out != out.narrow(d, 0, 1)).any())]
    idx = out
    for d in range(r - 1, -1, -1):
        if d not in udims:
            idx = idx.narrow(d, 0, 1).squeeze(d) if idx.shape[d] > 0 else idx
    bshape = [out.shape[d] if d in udims else 1 for d in range(r)]
    if out.numel() == 0 or not udims or not torch.equal(idx.reshape(bshape).expand(out.shape), out):
        return frozen(ctx, node)  # units mixed with other dims
    flat = idx.reshape(-1)
    seen = torch.zeros(n, dtype=torch.bool)
    seen[flat] = True
    # a slice: the unit dims it cuts keep their lines whole (compact cannot rewrite the literal bounds); when
    # blocks are only found (ctx.discover, shapes stay), the slice just takes its units
    if not bool(seen.all()) and not ctx.discover:
        pos = torch.arange(n).view(u.ids.shape)
        for ax in range(u.ids.dim()):
            covered = torch.zeros(u.ids.shape[ax], dtype=torch.bool)
            covered[_axis_index(pos, flat, ax)] = True
            if not bool(covered.all()):
                ctx.tie_along(u, ax)
        if len(u.dims) == 1:
            ctx.freeze(u)
    res = Units(u.ids.reshape(-1)[flat].reshape(idx.shape), tuple(d - r for d in udims),
                u.dead.reshape(-1)[flat].reshape(idx.shape), u.const.reshape(-1)[flat].reshape(idx.shape), r)
    if len(udims) > 1:
        ctx.multi.append(res)
    if node.target in _RESIZE:  # sizes in its arguments may need rewriting
        ctx.resize[node] = res
    return res


def _axis_index(pos: torch.Tensor, flat: torch.Tensor, ax: int) -> torch.Tensor:
    """The index along axis ``ax`` of each flat unit position in ``flat``."""
    stride = 1
    for s in pos.shape[ax + 1:]:
        stride *= s
    return torch.div(flat, stride, rounding_mode="floor") % pos.shape[ax]


_RESIZE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
           aten.unflatten.int, aten.view.dtype}

_LAYOUT = [aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
           aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
           aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.clone.default, aten.alias.default,
           aten.unflatten.int, aten.slice.Tensor, aten.narrow.default, aten.movedim.int,
           aten.repeat_interleave.self_int, aten.contiguous.default, aten.select.int, aten.unbind.int,
           aten.index_select.default]

_PASS = [aten.dropout.default, aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
         aten.to.device, aten.type_as.default, aten.feature_dropout.default, aten.alpha_dropout.default,
         aten.lift_fresh_copy.default]


def _builtin() -> Dict[Any, Any]:
    r: Dict[Any, Any] = {}
    for op in WEIGHT_OPS:
        r[op] = weight
    r[aten.batch_norm.default] = batch_norm
    for op in (aten.max_pool2d.default, aten.max_pool2d_with_indices.default, aten.adaptive_avg_pool2d.default,
               aten.adaptive_max_pool2d.default, aten.avg_pool2d.default):
        r[op] = pool2d
    for op in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
        r[op] = reduce
    r[aten.cat.default] = cat
    for op in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        r[op] = split
    r[operator.getitem] = getitem
    r[aten.scaled_dot_product_attention.default] = sdpa
    r[aten.matmul.default] = matmul
    for op in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default):
        r[op] = softmax
    for op in _LAYOUT:
        r[op] = layout
    for op in _PASS:
        r[op] = passthrough
    for name in ("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size"):
        if hasattr(aten, name):
            for ov in getattr(aten, name).overloads():
                r[getattr(getattr(aten, name), ov)] = check_only
    return r


BUILTIN = _builtin()
# x where x > 0, else weight * x: one weight is element-wise; one weight per channel would need slicing
BUILTIN[aten.prelu.default] = lambda ctx, node: (pointwise(ctx, node) if (ctx.shape(node.args[1]) or (0,)) in
                                                 ((1,), ()) else frozen(ctx, node))


def _resolve(rule):
    if isinstance(rule, str):
        return {"elementwise": pointwise, "passthrough": passthrough, "frozen": frozen}[rule]
    return rule


def rule_for(node):
    t = node.target
    for key in (t, getattr(t, "overloadpacket", None)):
        if key is not None and key in _RULES:
            return _resolve(_RULES[key])
    if t in BUILTIN:
        return BUILTIN[t]
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
        return pointwise
    return frozen
