"""``compact(model)``: the user's model, smaller, with every unit that closed gates make dead removed;
``summary(model)``; ``compare(original, compacted, example_inputs)`` (docs/compact.md).

:mod:`.core` (fold, capture with ``torch.export``, analyse, surgery, check), :mod:`.units` (units and the
decision), :mod:`.rules` (one rule per ATen op), :mod:`.dense` (folding, the plain layers),
:mod:`.report` (compare, summary).
"""
from __future__ import annotations

from torch import nn

from .core import compact_plan, input_select, release_free_memory, unshare
from .report import LayerSummary, ModelSummary, compare, summary
from .rules import register_compact_rule
from .units import CompactContext, Units


def _shared_parameters(model: nn.Module):
    """Groups of ``(module name, parameter name)`` that hold one Parameter object (tied weights)."""
    holders = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, pname))
    return [h for h in holders.values() if len(h) > 1]


def _retie(compacted: nn.Module, shared) -> None:
    """Parameters tied in the original model stay one Parameter in the compacted one: where compact changed a
    holder (gates folded in) and the tensors are still equal, every holder gets the first one's Parameter; a tie
    the gates broke (a gated layer that changed one holder's weight) raises ``ValueError`` naming them --
    untying would make the model larger."""
    import torch
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


def compact(model: nn.Module, example_inputs=None) -> nn.Module:
    """A copy of ``model`` (its own class, in eval mode) with the units that closed gates make dead removed and
    the gates folded in: L0 layers become ``nn.Linear`` / ``nn.Conv2d``, and every layer, BatchNorm and
    attention head that only fed or read removed units shrinks. Same eval outputs up to float rounding;
    ``model`` is not modified.

    The model is captured with ``torch.export`` on ``example_inputs`` (a tensor, a tuple of positional inputs or
    a dict of keyword inputs; made for a ``transformers`` model or a model whose first layer is a ``Linear``
    when omitted) and the surgery applied to a deep copy: a ResNet stays a ResNet, a ``LlamaForCausalLM``
    keeps ``generate()``. An ``nn.Sequential`` whose inputs close gets an input-selection step first; other
    models keep their inputs. Parameters tied in the model stay tied. The result is checked against the gated
    model on the example inputs; what compact() cannot make exact raises ``ValueError`` naming the modules.
    """
    plan = compact_plan(model, example_inputs)  # checks model; works on a deep copy sharing its tensors
    release_free_memory()
    unshare(plan.model, model)
    _retie(plan.model, _shared_parameters(model))
    return plan.model.eval()


__all__ = ["compact", "compare", "summary", "register_compact_rule", "CompactContext", "Units", "input_select",
           "ModelSummary", "LayerSummary"]
