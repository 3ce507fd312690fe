"""The attention of a head-gated block over its open heads only, in the device form (docs/design.md §11).

In the device form (``convert(..., structure="heads", backend="triton" | "cuda")``) nothing is read on the
host, so the attention cannot shrink to the open heads as the narrow form's does. Instead a ``transformers``
model gets an attention implementation of its own, registered through transformers' ``AttentionInterface``
(and ``AttentionMaskInterface``, with the masks of the implementation it had), named ``"l0k_heads_<base>"``
(``base``: ``"sdpa"`` or ``"eager"``): for the attention modules of head-gated blocks it runs the Triton kernels
of ``backends/triton/attention.py`` with the block call's gates (a closed head's programs compute nothing,
forward and backward); every other call, and a call those kernels cannot take (:func:`reasons`), runs the base
implementation. ``compact()`` puts the base implementation back.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from . import _active

BASES = ("sdpa", "eager")
PREFIX = "l0k_heads_"


def reasons(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
            kwargs) -> List[str]:
    """Why this attention call does not run over the open heads on the device (empty: it does)."""
    st = module.__dict__.get("_l0_heads")
    if st is None:
        return ["no head gates on this attention module"]
    gate, consumer = st
    out = []
    if not _active.ENABLED:
        out.append("skipping closed groups is off (L0K_SKIP_CLOSED=0)")
    if dropout:
        out.append(f"attention dropout {dropout}")
    for k in ("softcap", "position_bias", "sinks", "s_aux"):
        if kwargs.get(k) is not None:
            out.append(f"{k} is not supported by the open-heads kernels")
    if kwargs.get("output_attentions"):
        out.append("output_attentions")
    if query.dim() != 4 or key.dim() != 4 or value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1] \
            or query.shape[1] % max(key.shape[1], 1):
        out.append("query/key/value are not (B, H, S, D) with one head size and H a multiple of the key/value heads")
    elif consumer.col_gates.numel() != query.shape[1] * query.shape[-1]:
        out.append("the output projection's columns are not the heads of this call")
    if torch.compiler.is_compiling():
        out.append("inside torch.compile the base implementation runs")
    if not out:
        from ._dispatch import get_backend
        out += get_backend("triton").rows_reasons(query, key, gate.log_alpha if gate.training else None)
    return out


def _forward(base_name: str):
    def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        if reasons(module, query, key, value, dropout, kwargs):
            base = ALL_ATTENTION_FUNCTIONS[base_name] if base_name != "eager" else _eager(module)
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)
        from .backends.triton.attention import attention
        gate, consumer = module.__dict__["_l0_heads"]
        h, d = query.shape[1], query.shape[-1]
        head_open = (gate.state().z != 0)[consumer.col_gates.view(h, d)[:, 0]]
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(q_len > 1 and attention_mask is None and causal)
        if causal and kv_len > q_len:  # as the sdpa implementation: the causal mask aligned to the top left
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, :, :key.shape[2]]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = attention(query, key, value, head_open, mask, causal, scale)
        _active.count_path("structure-attention", "fwd", "skip")
        return out.transpose(1, 2).contiguous(), None
    return attention_forward


def _eager(module):
    """The model's own eager attention function (its modeling file's ``eager_attention_forward``)."""
    import sys
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in its module")
    return fn


def install(model: nn.Module) -> Optional[str]:
    """Give a ``transformers`` model the open-heads attention (module doc); returns the base implementation it
    had, or None where the model does not take one (not a transformers model, or another implementation)."""
    cfg = getattr(model, "config", None)
    base = getattr(cfg, "_attn_implementation", None)
    if base not in BASES or not hasattr(model, "set_attn_implementation"):
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    name = PREFIX + base
    AttentionInterface.register(name, _forward(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
    if getattr(model.config, "_attn_implementation", None) != name:
        return None
    model.__dict__["_l0k_attn_base"] = base
    return base


def uninstall(model: nn.Module) -> None:
    """Put back the base implementation and drop the head references (compact())."""
    base = model.__dict__.pop("_l0k_attn_base", None)
    if base is not None:
        model.set_attn_implementation(base)
    for m in model.modules():
        m.__dict__.pop("_l0_heads", None)


__all__ = ["install", "uninstall", "reasons"]
