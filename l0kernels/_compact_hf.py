"""Module rules of ``compact()``: models that ``torch.fx`` does not trace (Hugging Face ``transformers``).

A module rule recognises a block by its structure (attribute names), and shrinks its layers in place on the
deep copy ``compact`` works on; afterwards every L0 layer left becomes the plain layer with its gates folded
in (nothing else removed: residual-stream widths stay). Built in:

* Llama-style attention (``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``head_dim``; Mistral, Qwen2, ...):
  a query head is not needed when its columns of ``o_proj`` are zero (closed input gates) or its value head is
  exactly zero; a key/value head goes with its query heads when none of them is needed (grouped-query
  attention keeps a group whole: a single unneeded query head in a kept group stays, as zeros). Rows of
  q/k/v and columns of o go; ``num_heads``/``num_key_value_heads`` attributes are updated where present
  (the forward reshapes with ``-1`` heads).
* BERT-style attention (``self.query``/``key``/``value`` with ``num_attention_heads``,
  ``attention_head_size``, ``all_head_size``, and ``output.dense``): the same per head.
* Gated FFNs (``gate_proj``/``up_proj``/``down_proj`` and ``act_fn``): a unit goes when ``down_proj`` does not
  read it, when its product is exactly 0 (``up_proj`` row zero, or ``gate_proj`` row zero with
  ``act(bias) == 0``), or when both factors are constants (folded into ``down_proj``'s bias).
* BERT-style FFNs (``intermediate.dense`` + ``intermediate_act_fn``, ``output.dense``): a unit goes when the
  output layer does not read it or when it is the constant ``act(bias)`` (folded).

:func:`register_module_rule` adds rules (tried before the built-in ones).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from .compact import _Plan, _dense, _l0_types, _new_conv, _new_linear

_MODULE_RULES: List[Tuple[Callable[[nn.Module], bool], Callable]] = []


def register_module_rule(predicate: Callable[[nn.Module], bool], rule: Callable) -> None:
    """Add a module rule for models ``compact`` handles module by module (``transformers`` models):
    ``predicate(module) -> bool`` recognises a block, ``rule(module, name, info)`` shrinks its layers in place
    (``module`` is on compact's deep copy; ``name`` its qualified name; record each new layer as
    ``info[qualified_name] = {"in_keep": bool mask, "out_keep": bool mask, "new": layer}`` for ``summary``)."""
    if not callable(predicate) or not callable(rule):
        raise TypeError("predicate and rule must be callables")
    _MODULE_RULES.insert(0, (predicate, rule))


def _ones(n, device):
    return torch.ones(n, dtype=torch.bool, device=device)


def _replace(parent: nn.Module, attr: str, d, out_keep, in_keep, fold, info, qual):
    new = _new_linear(d, out_keep, in_keep, fold)
    setattr(parent, attr, new)
    info[qual] = {"in_keep": in_keep, "out_keep": out_keep, "new": new}
    return new


def _heads(parent_q, q_attrs, parent_o, o_attr, hd, name, o_name, info):
    """Shrink q/k/v (attributes ``q_attrs`` of ``parent_q``) and the output projection per head; returns
    (kept query heads, kept key/value heads)."""
    qn, kn, vn = q_attrs
    dq, dk, dv = (_dense(getattr(parent_q, a)) for a in q_attrs)
    do = _dense(getattr(parent_o, o_attr))
    dev = do.weight.device
    h, hk = dq.weight.shape[0] // hd, dk.weight.shape[0] // hd
    if h * hd != dq.weight.shape[0] or hk * hd != dk.weight.shape[0] or dv.weight.shape[0] != hk * hd or \
            hk == 0 or h % hk or do.weight.shape[1] != h * hd:
        raise ValueError(f"compact: attention {name!r}: projections of {tuple(dq.weight.shape)}, "
                         f"{tuple(dk.weight.shape)}, {tuple(dv.weight.shape)}, {tuple(do.weight.shape)} do not "
                         f"make heads of size {hd}")
    r = h // hk
    o_used = (do.weight != 0).view(do.weight.shape[0], h, hd).any(2).any(0)
    v_zero = ((dv.weight == 0).all(1) & (dv.bias == 0)).view(hk, hd).all(1).to(dev)
    needed = o_used & ~v_zero.repeat_interleave(r)
    groups = needed.view(hk, r).any(1)
    if not bool(groups.any()):
        groups[0] = True  # keep one (zero) group so that the reshapes stay valid
    q_rows = groups.repeat_interleave(r * hd)
    kv_rows = groups.repeat_interleave(hd)
    pre = f"{name}." if name else ""
    for attr, d, rows in ((qn, dq, q_rows), (kn, dk, kv_rows), (vn, dv, kv_rows)):
        _replace(parent_q, attr, d, rows.to(d.weight.device), _ones(d.weight.shape[1], d.weight.device),
                 d.bias.new_zeros(int(rows.sum())), info, pre + attr)
    _replace(parent_o, o_attr, do, _ones(do.weight.shape[0], dev), q_rows,
             do.bias.new_zeros(do.weight.shape[0]), info, o_name)
    return int(groups.sum()) * r, int(groups.sum())


def _is_llama_attention(m) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Module) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
        isinstance(getattr(m, "head_dim", None), int)


def _llama_attention(m, name, info):
    pre = f"{name}." if name else ""
    hq, hkv = _heads(m, ("q_proj", "k_proj", "v_proj"), m, "o_proj", m.head_dim, name, pre + "o_proj", info)
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, hq)
    if isinstance(getattr(m, "num_key_value_heads", None), int):
        m.num_key_value_heads = hkv


def _is_bert_attention(m) -> bool:
    s, o = getattr(m, "self", None), getattr(m, "output", None)
    return s is not None and o is not None and isinstance(getattr(o, "dense", None), nn.Module) and \
        all(isinstance(getattr(s, a, None), nn.Module) for a in ("query", "key", "value")) and \
        isinstance(getattr(s, "attention_head_size", None), int)


def _bert_attention(m, name, info):
    pre = f"{name}." if name else ""
    hq, _ = _heads(m.self, ("query", "key", "value"), m.output, "dense", m.self.attention_head_size,
                   pre + "self", pre + "output.dense", info)
    m.self.num_attention_heads = hq
    m.self.all_head_size = hq * m.self.attention_head_size


def _act(fn, t):
    with torch.no_grad():
        return fn(t)


def _ffn(parent_in, in_attrs, act, parent_out, out_attr, name, in_names, out_name, info):
    """Shrink an FFN: ``in_attrs`` = (gate, up) or (up,), hidden = act(gate(x)) * up(x) or act(up(x))."""
    ds = [_dense(getattr(parent_in, a)) for a in in_attrs]
    dd = _dense(getattr(parent_out, out_attr))
    dev = dd.weight.device
    n = dd.weight.shape[1]
    if any(d.weight.shape[0] != n for d in ds):
        raise ValueError(f"compact: FFN {name!r}: {[tuple(d.weight.shape) for d in ds]} and {tuple(dd.weight.shape)}"
                         f" do not line up")
    unread = (dd.weight == 0).all(0)
    zero_row = [(d.weight == 0).all(1).to(dev) for d in ds]
    if len(ds) == 2:  # act(gate) * up
        g_const, u_const = _act(act, ds[0].bias.to(dev)), ds[1].bias.to(dev)
        prod_zero = (zero_row[1] & (u_const == 0)) | (zero_row[0] & (g_const == 0))
        const_unit = zero_row[0] & zero_row[1]
        value = torch.where(prod_zero, torch.zeros_like(g_const), g_const * u_const)
    else:
        prod_zero = torch.zeros_like(unread)
        const_unit = zero_row[0]
        value = _act(act, ds[0].bias.to(dev))
    remove = unread | prod_zero | const_unit
    keep = ~remove
    fold_units = const_unit & ~unread & ~prod_zero
    fold = dd.weight[:, fold_units] @ value[fold_units].to(dd.weight.dtype)
    for attr, d, qual in zip(in_attrs, ds, in_names):
        _replace(parent_in, attr, d, keep.to(d.weight.device), _ones(d.weight.shape[1], d.weight.device),
                 d.bias.new_zeros(int(keep.sum())), info, qual)
    _replace(parent_out, out_attr, dd, _ones(dd.weight.shape[0], dev), keep, fold, info, out_name)
    return int(keep.sum())


def _is_gated_mlp(m) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj")) and \
        callable(getattr(m, "act_fn", None))


def _gated_mlp(m, name, info):
    pre = f"{name}." if name else ""
    k = _ffn(m, ("gate_proj", "up_proj"), m.act_fn, m, "down_proj", name,
             (pre + "gate_proj", pre + "up_proj"), pre + "down_proj", info)
    if isinstance(getattr(m, "intermediate_size", None), int):
        m.intermediate_size = k


def _is_bert_ffn(m) -> bool:
    i, o = getattr(m, "intermediate", None), getattr(m, "output", None)
    return i is not None and o is not None and isinstance(getattr(i, "dense", None), nn.Module) and \
        isinstance(getattr(o, "dense", None), nn.Module) and callable(getattr(i, "intermediate_act_fn", None))


def _bert_ffn(m, name, info):
    pre = f"{name}." if name else ""
    _ffn(m.intermediate, ("dense",), m.intermediate.intermediate_act_fn, m.output, "dense", name,
         (pre + "intermediate.dense",), pre + "output.dense", info)


_BUILTIN_MODULE_RULES = [(_is_llama_attention, _llama_attention), (_is_bert_attention, _bert_attention),
                         (_is_gated_mlp, _gated_mlp), (_is_bert_ffn, _bert_ffn)]


def compact_modules(model: nn.Module) -> _Plan:
    """Apply the module rules on a deep copy of ``model``, then turn every L0 layer left into its plain layer."""
    new = copy.deepcopy(model)
    info: Dict[str, Dict[str, Any]] = {}
    matches = []
    for name, m in new.named_modules():
        for pred, rule in _MODULE_RULES + _BUILTIN_MODULE_RULES:
            if pred(m):
                matches.append((name, m, rule))
                break
    with torch.no_grad():
        for name, m, rule in matches:
            rule(m, name, info)
        L0Linear, L0Conv2d = _l0_types()
        for name, m in list(new.named_modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, (L0Linear, L0Conv2d)):
                    d = _dense(child)
                    dev = d.weight.device
                    ok, ik = _ones(d.weight.shape[0], dev), _ones(d.n_in, dev)
                    make = _new_linear if d.kind == "linear" else _new_conv
                    layer = make(d, ok, ik, d.bias.new_zeros(d.weight.shape[0]))
                    setattr(m, child_name, layer)
                    info[f"{name}.{child_name}" if name else child_name] = {"in_keep": ik, "out_keep": ok, "new": layer}
    for name, m in new.named_modules():
        if type(m).__module__.startswith("l0kernels"):
            raise ValueError(f"compact: module {name!r} ({type(m).__name__}) is an l0kernels module no rule removes")
    return _Plan(new, info)
