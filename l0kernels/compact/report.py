"""compare(original, compacted, example_inputs) and summary(model): what compact() changed, measured."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .core import _outputs, compact_plan
from ..structure import StructureLinear
from .dense import is_weight_layer, l0_types, z_eval


def _as_tuple(example_inputs) -> Optional[tuple]:
    if example_inputs is None:
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def compare(original: nn.Module, compacted: nn.Module, example_inputs) -> Dict[str, float]:
    """Run both models (eval, no grad) on ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of
    keyword inputs) and
    report the largest differences over their tensor outputs: ``max_abs`` (max |a - b|), ``max_rel``
    (max_abs / max |original|) and ``norm_rel`` (||a - b|| / ||original||, docs/design.md §6's measure). A NaN in
    either output makes the measures NaN, and an infinity where the other output differs makes them inf or
    NaN: a difference that cannot be measured is never reported as 0 (equal infinities differ by 0)."""
    ex, kw = ((), dict(example_inputs)) if isinstance(example_inputs, dict) else (_as_tuple(example_inputs), {})
    res = {"max_abs": 0.0, "max_rel": 0.0, "norm_rel": 0.0}
    states = [(m, m.training) for m in (original, compacted)]
    try:
        with torch.no_grad():
            ya = _outputs(original.eval()(*ex, **kw))
            yb = _outputs(compacted.eval()(*ex, **kw))
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
        if is_weight_layer(m) and getattr(m, "weight", None) is not None and m.weight.dim() == 4:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args: seen.__setitem__(id(mod), tuple(args[0].shape[2:]))))
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    device = p.device if p is not None else torch.device("cpu")
    kw = dict(example_inputs) if isinstance(example_inputs, dict) else {}
    ex = () if kw else _as_tuple(example_inputs) if example_inputs is not None else (
        torch.zeros(tuple(input_shape), device=device, dtype=p.dtype if p is not None else torch.float32),)
    was = model.training
    try:
        model.eval()
        # the model's own forward runs with its device as the default device (summary() makes no
        # tensor from the caller's default device, and neither should the eval path it runs)
        with torch.no_grad(), torch.device(device):
            model(*ex, **kw)
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
    L0Linear, L0Conv2d = l0_types()
    hw_seen = _record_conv_hw(model, input_shape, example_inputs) \
        if (input_shape is not None or example_inputs is not None) else {}
    note = ""
    try:
        info = compact_plan(model, example_inputs).layer_info
        compacted = True
    except ValueError as e:
        info, compacted = {}, False
        note = f"(compact() cannot follow this model: 'after' counts each layer's own gates only: {e})"
    layers = []
    for name, m in model.named_modules():
        if not is_weight_layer(m) or isinstance(m, nn.Sequential):
            continue
        is_l0 = isinstance(m, (L0Linear, L0Conv2d))
        is_conv = isinstance(m, (nn.Conv2d, L0Conv2d))
        w = m.weight
        gate = (getattr(m, "gate", "out") if not is_conv else "channel") if is_l0 else "-"
        owner = None  # a structure gate, shown once: on its consumer
        if isinstance(m, StructureLinear):
            g = m._col_gate or m._row_gate
            gate = f"{g.kind}:{'cols' if m._col_gate is not None else 'rows'}"
            owner = m._col_gate
        z = zf = z_eval(m) if is_l0 else None  # the eval path's gates per feature (open: z > 0)
        groups = getattr(m, "groups", 1)
        n, kk = w.shape[0], w.shape[1] * groups
        hw_in = hw_seen.get(id(m)) or (getattr(m, "input_hw", None) if is_conv else None)
        hw_out = _out_hw(m, hw_in) if is_conv else None
        entry = None
        for key, v in info.items():  # leaf names are the qualified names
            if key == name or (name == "" and key == type(m).__name__):
                entry = v
        if entry is not None:
            new = entry["module"]
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
            per = w[0].numel() // max(w.shape[1], 1) if is_conv else 1
            params_after = n2 * (k2 // groups) * per + (n2 if has_b else 0)
        has_b = m.bias is not None
        params_before = sum(p.numel() for p in (m.weight, m.bias) if p is not None)
        if is_conv:
            fb = _conv_flops(m, n, kk, hw_out, has_b, groups)
            fa = _conv_flops(m, n2, k2, hw_out, has_b, entry["module"].groups if entry is not None else groups)
        else:
            fb = _linear_flops(n, kk, has_b)
            if is_l0 and m.gate == "weight" and entry is None:
                nnz = int((z > 0).sum())
                fa = max(2 * nnz - n, 0) + (n if has_b else 0)
            else:
                fa = _linear_flops(n2, k2, has_b)
        layers.append(LayerSummary(
            name=name or type(m).__name__, type=type(m).__name__, gate=gate,
            gates_active=int(m.active_mask().sum()) if is_l0 else int(owner.active_mask().sum()) if owner else None,
            gates_total=m.num_gates() if is_l0 else owner.num_gates() if owner else None,
            expected_l0=float((m if is_l0 else owner).expected_l0().detach()) if (is_l0 or owner) else None,
            shape_before=tuple(m.weight.shape),
            shape_after=tuple(entry["module"].weight.shape) if entry is not None else None,
            params_before=params_before, params_after=params_after, flops_before=fb, flops_after=fa))
    layers += _expert_rows(model)
    return ModelSummary(layers, compacted, note)


def _expert_rows(model: nn.Module) -> List[LayerSummary]:
    """One row per routed experts module with expert gates (l0kernels/experts.py): its 3-D parameters, before and
    after compact() packs each expert's open units (the same with or without the analysis: the width comes from
    the gates); FLOPs per token and expert it is routed to."""
    from ..experts import ExpertGate
    rows = []
    for name, m in model.named_modules():
        g = m._modules.get("l0_gate")
        if not isinstance(g, ExpertGate):
            continue
        e, f = g.experts_shape
        width = g.packed_width()
        h = m.down_proj.shape[2] if m.is_transposed else m.down_proj.shape[1]
        k = 2 if m.has_gate else 1
        before = sum(p.numel() for p in g.counted_parameters())
        flops = lambda units: _linear_flops(k * units, h, m.has_bias) + _linear_flops(h, units, m.has_bias)  # noqa: E731
        shape = tuple(m.down_proj.shape)
        rows.append(LayerSummary(
            name=name, type=type(m).__name__, gate="ffn:experts", gates_active=g.num_active(), gates_total=e * f,
            expected_l0=float(g.expected_l0().detach()), shape_before=shape,
            shape_after=(e, width, h) if m.is_transposed else (e, h, width), params_before=before,
            params_after=before - e * (f - width) * g.unit_params(), flops_before=flops(f), flops_after=flops(width)))
    return rows


