"""Structure gates on mixture-of-experts FFNs (docs/design.md §11): one gate per hidden unit of every expert.

A routed experts module holds its experts as 3-D parameters and runs them in a loop over the experts a batch
hits (or a grouped GEMM), data-dependent code whose exported graph says nothing about units. Such a module is
recognised by the experts protocol of ``transformers`` (``use_experts_implementation``): the flags ``has_gate``,
``has_bias``, ``is_transposed``, ``is_concatenated``, ``num_experts``, and the 3-D Parameters ``gate_up_proj``
(``(E, 2F, H)``: each expert's gate rows then up rows, or interleaved, ``(E, H, 2F)`` transposed) or ``up_proj``
(without a gate), ``down_proj`` (``(E, H, F)``, ``(E, F, H)`` transposed) and their biases. Any module with this
layout is taken, whatever its class.

:class:`ExpertGate` owns ``log_alpha`` of ``E * F`` entries (unit ``f`` of expert ``e`` at ``e * F + f``) and is
registered as ``experts.l0_gate``; the module's forward becomes :func:`gated_experts_forward` (an instance
attribute: the class is kept). One draw per call of the module. The unit's hidden activation is multiplied
by its gate; a closed unit's gate and up rows and its down column are neither read nor computed (each hit
expert runs its open units only, gathered on the host) once at most ``L0K_SKIP_DENSE_ABOVE`` of the units are
open; above, the module's own forward runs with each down column times its gate (a grouped GEMM beats a loop
over the experts). With every gate exactly 1 (open gates in eval) the module's own forward runs unchanged, so
the model computes what it computed before ``convert``.
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _active
from .structure import StructureGate

ALIGN = 8  # units per expert after compact(): a multiple of this (16-byte rows in half precision)
PROTOCOL = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "num_experts")


def _param3(m: nn.Module, name: str) -> Optional[nn.Parameter]:
    p = m._parameters.get(name)
    return p if isinstance(p, nn.Parameter) and p.dim() == 3 else None


def experts_refusal(m: nn.Module) -> Optional[str]:
    """None where ``m`` is a routed experts module this file can gate (the protocol above), else why not (a
    module without the protocol gives ``""``)."""
    if not all(hasattr(m, a) for a in PROTOCOL) or _param3(m, "down_proj") is None:
        return ""
    if isinstance(getattr(m, "l0_gate", None), ExpertGate):
        return "its experts are gated already"
    up = _param3(m, "gate_up_proj" if m.has_gate else "up_proj")
    if up is None:
        return f"it has no 3-D {'gate_up_proj' if m.has_gate else 'up_proj'} Parameter"
    e, f = _shape(m)
    d = m.down_proj
    if up.shape[0] != e or d.shape[0] != e or int(m.num_experts) != e:
        return "its expert counts disagree"
    if getattr(m, "_is_expert_parallel", False):
        return "it runs expert parallel (each process holds part of the experts)"
    if getattr(m, "has_post_expert_norm", False):
        return "a norm follows each expert"  # its running over the open units only is not checked
    return None


def _shape(m: nn.Module):
    """``(E, F)``: experts and hidden units per expert."""
    d = m.down_proj
    return d.shape[0], (d.shape[1] if m.is_transposed else d.shape[2])


def _up_rows(m: nn.Module, idx: torch.Tensor, f: int) -> torch.Tensor:
    """Indices into the up projection's output features for the units ``idx``, in its layout."""
    if not m.has_gate:
        return idx
    if m.is_concatenated:
        return torch.cat([idx, idx + f])
    return torch.stack([2 * idx, 2 * idx + 1], 1).flatten()


class ExpertGate(StructureGate):
    """``E * F`` structure gates on a routed experts module: unit ``f`` of expert ``e`` spans that expert's gate
    and up rows (with their bias) and its down column. Counts, regularizer and folding over those."""

    def __init__(self, experts: nn.Module, **kw):
        e, f = _shape(experts)
        super().__init__(e * f, "ffn", **kw)
        object.__setattr__(self, "_experts", experts)  # a reference: the gate is the module's child
        self.experts_shape = (e, f)
        self._count()

    # -- what the gates span -------------------------------------------------------------------------------
    def _parts(self) -> List[tuple]:
        """``(tensor, role)`` per parameter spanned: ``"up"`` (rows of the up projection), ``"down"`` (columns of the
        down projection), ``"up_bias"``, ``"down_bias"`` (ungated)."""
        m = self._experts
        up = "gate_up_proj" if m.has_gate else "up_proj"
        out = [(getattr(m, up), "up"), (m.down_proj, "down")]
        if m.has_bias:
            out += [(getattr(m, up + "_bias"), "up_bias"), (m.down_proj_bias, "down_bias")]
        return out

    def counted_parameters(self):
        return [p for p, _ in self._parts()]

    def layers(self):
        return []

    def _per_unit(self, t: torch.Tensor, role: str) -> torch.Tensor:
        """``(E, F)`` sums over each unit's entries of ``t`` (one value per element of the parameter)."""
        m = self._experts
        e, f = self.experts_shape
        if role == "down":  # (E, H, F) or transposed (E, F, H)
            return t.sum(2) if m.is_transposed else t.sum(1)
        if role == "up":  # (E, kF, H) or transposed (E, H, kF): per output feature, then per unit
            per = t.sum(1) if m.is_transposed else t.sum(2)
        else:  # up bias (E, kF)
            per = t
        if not m.has_gate:
            return per
        if m.is_concatenated:
            return per[:, :f] + per[:, f:]
        return per[:, 0::2] + per[:, 1::2]

    def _count(self) -> None:
        """Per unit: its rows of the up projection (gate and up: ``2H``, up only: ``H``; with their bias entries) and
        its down column (``H``); the down bias is ungated."""
        m = self._experts
        e, f = self.experts_shape
        h = m.down_proj.shape[2] if m.is_transposed else m.down_proj.shape[1]
        k = 2 if m.has_gate else 1
        per = k * h + h + (k if m.has_bias else 0)
        self.params_per_gate = torch.full((e * f,), float(per), dtype=torch.float64)
        self.ungated_params = m.down_proj_bias.numel() if m.has_bias else 0

    def _squares(self, p: torch.Tensor):
        sq = torch.zeros(self.experts_shape, dtype=torch.float32, device=p.device)
        rest = p.new_zeros(())
        for t, role in self._parts():
            t2 = t.float().square()
            if role == "down_bias":
                rest = rest + t2.sum()
            else:
                sq = sq + self._per_unit(t2, role)
        return sq.flatten(), rest

    @torch.no_grad()
    def packed_width(self) -> int:
        """Units per expert after :meth:`packed`."""
        e, f = self.experts_shape
        width = max(int((self.eval_gates() != 0).view(e, f).sum(1).max()), 1)
        return min(f, -(-width // ALIGN) * ALIGN)

    def unit_params(self) -> int:
        """Parameters of one unit of one expert (``params_per_gate``)."""
        return int(self.params_per_gate[0]) if self.params_per_gate.numel() else 0

    @torch.no_grad()
    def packed(self) -> dict:
        """The experts' parameters with the gates folded in and the closed units removed: each expert's open units
        first (in order), every expert cut to ``F'`` units, the most any expert keeps rounded up to a multiple of
        :data:`ALIGN` (grouped GEMMs need 16-byte strides; at most ``F``). A unit an
        expert keeps only to reach ``F'`` is closed: its down column is 0, so it adds nothing. Units are
        independent within an expert, so reordering them changes nothing else. ``{name: tensor}`` for
        ``down_proj``, the up projection and their biases that change."""
        m = self._experts
        e, f = self.experts_shape
        z = self.eval_gates().detach().to(m.down_proj.dtype).view(e, f)
        keep = z != 0
        width = self.packed_width()
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (E, F')
        zs = torch.gather(z, 1, order)
        down = m.down_proj.detach()
        if m.is_transposed:  # (E, F, H)
            down = torch.gather(down, 1, order[:, :, None].expand(-1, -1, down.shape[2])) * zs[:, :, None]
        else:  # (E, H, F)
            down = torch.gather(down, 2, order[:, None, :].expand(-1, down.shape[1], -1)) * zs[:, None, :]
        up_name = "gate_up_proj" if m.has_gate else "up_proj"
        rows = torch.stack([_up_rows(m, order[i], f) for i in range(e)])  # (E, kF')
        up = getattr(m, up_name).detach()
        if m.is_transposed:  # (E, H, kF)
            up = torch.gather(up, 2, rows[:, None, :].expand(-1, up.shape[1], -1))
        else:  # (E, kF, H)
            up = torch.gather(up, 1, rows[:, :, None].expand(-1, -1, up.shape[2]))
        out = {"down_proj": down, up_name: up}
        if m.has_bias:
            out[up_name + "_bias"] = torch.gather(getattr(m, up_name + "_bias").detach(), 1, rows)
        return out

    def extra_repr(self) -> str:
        e, f = self.experts_shape
        return f"{e} experts x {f} units, kind='ffn', noise={self.noise!r}"


def attach(experts: nn.Module, gate: ExpertGate) -> None:
    """Register ``gate`` as ``experts.l0_gate`` and make :func:`gated_experts_forward` the module's forward."""
    experts.add_module("l0_gate", gate)
    experts.forward = types.MethodType(gated_experts_forward, experts)


def detach(experts: nn.Module) -> None:
    """Undo :func:`attach` (compact() folds the gates into ``down_proj`` first)."""
    experts.__dict__.pop("forward", None)
    experts._modules.pop("l0_gate", None)


def _scaled_forward(self, own, z, hidden_states, top_k_index, top_k_weights):
    """The module's own forward with ``down_proj``'s column of each unit times its gate, ``down (h * z)`` written
    as ``(down * z) h``: the same gated output, nothing skipped."""
    e_count, f = self.l0_gate.experts_shape
    z = z.view(e_count, f).to(self.down_proj.dtype)
    held = self._parameters["down_proj"]
    self._parameters["down_proj"] = held * (z[:, :, None] if self.is_transposed else z[:, None, :])
    try:
        return own(self, hidden_states, top_k_index, top_k_weights)
    finally:
        self._parameters["down_proj"] = held


def gated_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' forward with each unit's activation times its gate, closed units skipped (module doc)."""
    g: ExpertGate = self.l0_gate
    z = g.state().z
    own = type(self).forward
    if torch.compiler.is_compiling():  # no host reads under a trace
        return _scaled_forward(self, own, z, hidden_states, top_k_index, top_k_weights)
    all_one, n_open = torch.stack([(z == 1).all().long(), (z != 0).sum()]).tolist()  # one host read
    if all_one:
        return own(self, hidden_states, top_k_index, top_k_weights)
    if not _active.ENABLED or n_open > _active.DENSE_ABOVE * z.numel():
        # most units open: the module's own forward (a grouped GEMM) with each down column times its gate costs
        # less than running every expert's open units apart
        return _scaled_forward(self, own, z, hidden_states, top_k_index, top_k_weights)
    e_count, f = g.experts_shape
    z = z.view(e_count, f)
    up_w = self.gate_up_proj if self.has_gate else self.up_proj
    up_b = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=e_count + 1).permute(2, 1, 0)
        hit = [e for e in (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist() if e < e_count]
        open_ = z != 0
        units = [open_[e].nonzero().flatten() for e in hit]  # each hit expert's open units
        rows = [_up_rows(self, u, f) for u in units]
        # one gather per parameter for every hit expert (a gather per expert would give each backward a zero
        # tensor of the whole parameter): (rows, H) matrices, split per expert below
    if not hit:
        return out
    dev = up_w.device
    n_rows, n_units = [r.numel() for r in rows], [u.numel() for u in units]
    experts = torch.tensor(hit, device=dev)
    e_up, r_up = experts.repeat_interleave(torch.tensor(n_rows, device=dev)), torch.cat(rows).to(dev)
    e_dn, f_dn = experts.repeat_interleave(torch.tensor(n_units, device=dev)), torch.cat(units).to(dev)
    w_up = (up_w[e_up, :, r_up] if self.is_transposed else up_w[e_up, r_up, :]).split(n_rows)
    b_up = up_b[e_up, r_up].split(n_rows) if up_b is not None else None
    w_dn = (self.down_proj[e_dn, f_dn, :] if self.is_transposed else self.down_proj[e_dn, :, f_dn]).split(n_units)
    z_dn = z[e_dn, f_dn].split(n_units)
    for i, e in enumerate(hit):
        if n_units[i] == 0 and not self.has_bias:
            continue  # every unit closed: the expert adds nothing
        pos, tok = torch.where(mask[e])
        x = hidden_states[tok]
        proj = F.linear(x, w_up[i], b_up[i] if b_up is not None else None)
        h = (self._apply_gate(proj) if self.has_gate else self.act_fn(proj)) * z_dn[i].to(proj.dtype)
        y = h @ w_dn[i]
        if self.has_bias:
            y = y + self.down_proj_bias[e]
        y = y * top_k_weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


__all__ = ["ExpertGate", "experts_refusal", "attach", "detach", "gated_experts_forward"]
