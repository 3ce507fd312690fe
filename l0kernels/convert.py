"""``convert()``: put hard-concrete gates into an existing model, in place (docs/design.md §8).

Every ``nn.Linear`` and ``nn.Conv2d`` whose qualified name matches ``include`` and not ``exclude`` becomes
an :class:`~l0kernels.L0Linear` / :class:`~l0kernels.L0Conv2d` that holds the layer's own ``weight`` and
``bias`` Parameters (the same objects: an optimizer built before the call, weights tied to another module
and ``state_dict`` keys ``weight``/``bias`` all carry over; the layer only gains ``log_alpha``, on the
weight's device and in its dtype).

Choices (see README, "Converting a model"):

* ``droprate_init=None`` sets every ``log_alpha`` to :data:`OPEN_LOG_ALPHA` (3.0, above the
  ``z_eval == 1`` threshold ``log((1 - gamma) / (zeta - 1)) ~= 2.398`` by a margin that survives float16 /
  bfloat16), so in eval mode the converted model computes exactly what it computed before. In training the
  gates are then open with ``p_open = sigmoid(3 - beta log(-gamma / zeta)) ~= 0.990`` and equal 1 with
  probability ``~0.80`` (they dip below 1 otherwise), and ``l0_penalty`` starts at ``~0.99`` per gate. The
  value is deterministic (no random numbers are drawn); the layers' ``droprate_init`` is recorded as
  ``sigmoid(-3)``, so ``reset_gates()`` redraws around the same mean. A float ``droprate_init`` uses the
  initialisation of docs/design.md §1 instead (the eval output then changes).
* Only exact ``nn.Linear`` / ``nn.Conv2d`` and subclasses that keep their ``forward`` (e.g.
  ``NonDynamicallyQuantizableLinear``) are converted. Subclasses with their own ``forward`` compute
  something else than ``F.linear`` / ``F.conv2d``: they are skipped by the default ``include=None`` and raise
  ``ValueError`` when an explicit ``include`` names them. The same holds for the children of
  ``nn.MultiheadAttention``: it reads ``out_proj.weight`` directly, so gates there would be bypassed.
* ``nn.TransformerEncoderLayer``'s eval fast path (``torch._transformer_encoder_layer_fwd``) reads
  ``linear1.weight`` / ``linear2.weight`` directly; torch skips it when a submodule has a forward hook, so
  the L0 layers that replace them get a no-op forward pre-hook (:func:`_keep_slow_path`).
* transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_fc``, ``c_proj``: a linear layer storing its weight
  ``(in, out)``) becomes an ``L0Linear`` holding the transposed weight as a new Parameter (build the optimizer
  after ``convert``); the bias stays the same object.
* A layer whose weight Parameter another module holds too (tied weights: a language model's output layer and
  its input embedding) is left alone by ``include=None`` and raises when ``include`` names it: its gates could
  not shrink the other holder with it, and ``compact`` keeps tied weights tied.
* Layers whose gates would be bypassed in ways no rule here knows -- a parent reading ``self.proj.weight`` in
  its own forward -- are found by running the model once (see :func:`convert`).
  ``include`` matching no layer at all warns.
* Routed MoE experts held as 3-D Parameters (transformers' experts layout) have no linear layer to replace:
  with input gates (``gate="in"``, ``group_size=1``, batch noise) each unit of every expert -- a down
  projection input -- gets a gate (:mod:`l0kernels.experts`); with other gate kinds they stay ungated.
* Layers held by several parents (one module registered twice) become one L0 layer held by all of them.
  A module matches when any of its qualified names matches ``include`` and none matches ``exclude``.
* Everything is checked before anything is replaced: a call that raises leaves the model as it was.
  Hooks registered on a replaced layer are not carried over.
* ``model`` itself may be an ``nn.Linear`` / ``nn.Conv2d`` (qualified name ``""``): it cannot be replaced in
  place, so the new layer is returned.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import check_choice, check_int
from ._dispatch import backend_names
from ._gates import LINEAR_GATES, NOISE_KINDS
from .modules import L0Conv2d, L0Linear, _L0Layer

OPEN_LOG_ALPHA = 3.0  # z_eval == 1 exactly (threshold ~2.398); inside constrain_()'s [log 0.01, log 100]

Matcher = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


def _matcher(spec: Matcher, name: str) -> Optional[Callable[[str, nn.Module], bool]]:
    if spec is None:
        return None
    if isinstance(spec, str):
        pats = [spec]
    elif callable(spec):
        return spec
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, str) for p in spec):
        pats = list(spec)
    else:
        raise TypeError(f"{name} must be a glob pattern (str), a list of them, a callable (name, module) -> bool "
                        f"or None, got {type(spec).__name__}")
    return lambda qual, mod: any(fnmatch.fnmatchcase(qual, p) for p in pats)


def _call_matcher(fn, qual: str, mod: nn.Module, name: str) -> bool:
    r = fn(qual, mod)
    if not isinstance(r, bool):
        raise TypeError(f"{name} callable must return a bool, got {type(r).__name__} for module '{qual}'")
    return r


def _keep_slow_path(module, args):
    """No-op forward pre-hook: its presence keeps ``nn.TransformerEncoderLayer``'s fused eval path, which
    would read the weights and bypass the gates, off."""
    return None


def _keeps_forward(m: nn.Module, base) -> bool:
    return type(m).forward is base.forward


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT): a linear layer whose weight is stored ``(in, out)``."""
    cls = type(m)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(m, "nf", None), int) and isinstance(getattr(m, "nx", None), int))


def _base_of(m: nn.Module) -> Optional[type]:
    """The layer type ``m`` converts as (``nn.Linear``, ``nn.Conv2d`` or transformers' ``Conv1D``), or None."""
    if isinstance(m, nn.Linear):
        return nn.Linear
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d
    if _is_conv1d(m):
        return type(m)
    return None


def _check_param(m: nn.Module, qual: str) -> None:
    if hasattr(m, "parametrizations"):
        raise ValueError(f"module '{qual}' ({type(m).__name__}) has parametrizations (torch.nn.utils.parametrize); "
                         "remove them before convert()")
    for pname in ("weight", "bias"):
        p = m._parameters.get(pname)
        if p is None:
            if pname == "weight":
                raise ValueError(f"module '{qual}' ({type(m).__name__}) has no weight Parameter")
            continue
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(f"module '{qual}' ({type(m).__name__}) is not initialised yet (lazy module): run it "
                             "once before convert()")
        if not p.is_floating_point():
            raise ValueError(f"module '{qual}' ({type(m).__name__}) has a {p.dtype} {pname}; convert() needs a "
                             "floating-point weight")
        if p.device.type == "meta":
            raise ValueError(f"module '{qual}' ({type(m).__name__}) has its {pname} on the meta device")


def _conv_padding(m: nn.Conv2d, qual: str) -> Tuple[int, int]:
    if m.padding_mode != "zeros":
        raise ValueError(f"module '{qual}' (Conv2d) has padding_mode={m.padding_mode!r}; L0Conv2d pads with zeros "
                         "only")
    pad = m.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        out = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(f"module '{qual}' (Conv2d) has padding='same' with an even dilated kernel "
                                 f"(asymmetric padding), which L0Conv2d does not support")
            out.append(total // 2)
        return tuple(out)
    return tuple(int(p) for p in pad)


def _new_layer(m: nn.Module, qual: str, *, gate, group_size, noise, droprate_init, backend) -> _L0Layer:
    """The L0 layer for ``m`` (on the meta device until its parameters are attached; raises ValueError
    naming ``qual`` when the layer cannot be converted)."""
    _check_param(m, qual)
    w = m.weight
    open_init = droprate_init is None
    p = 1.0 / (1.0 + math.exp(OPEN_LOG_ALPHA)) if open_init else droprate_init
    try:
        if isinstance(m, nn.Linear) or _is_conv1d(m):
            k, n = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.nx, m.nf)
            new = L0Linear(k, n, bias=m.bias is not None, gate=gate, noise=noise,
                           droprate_init=p, backend=backend, group_size=group_size, device="meta", dtype=w.dtype)
        else:
            new = L0Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, _conv_padding(m, qual),
                           m.dilation, m.groups, bias=m.bias is not None, noise=noise, droprate_init=p,
                           backend=backend, group_size=group_size, device="meta", dtype=w.dtype)
    except (ValueError, TypeError) as e:
        if str(e).startswith(f"module '{qual}'"):
            raise
        raise type(e)(f"module '{qual}' ({type(m).__name__}) cannot be converted: {e}") from e
    if _is_conv1d(m):  # stored (in, out): the L0 layer holds the transposed copy, a new Parameter
        w = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    new.weight = w  # otherwise the same Parameter objects (optimizer state, tied weights survive)
    new.bias = m.bias
    new.log_alpha = nn.Parameter(torch.empty(new.log_alpha.shape, device=w.device, dtype=w.dtype))
    with torch.no_grad():
        if open_init:
            new.log_alpha.fill_(OPEN_LOG_ALPHA)
        else:
            new.reset_gates()
    new.train(m.training)
    return new


def convert(model: nn.Module, *, gate: str = "in", include: Matcher = None, exclude: Matcher = None,
            group_size: int = 1, noise: str = "batch", droprate_init: Optional[float] = None,
            backend: str = "auto", example_inputs=None, structure=None) -> nn.Module:
    """Replace ``nn.Linear`` / ``nn.Conv2d`` (and transformers' ``Conv1D``) layers of ``model`` by ``L0Linear`` /
    ``L0Conv2d``, in place.

    ``include`` / ``exclude``: a glob pattern (``fnmatch`` on the qualified name from ``named_modules()``),
    a list of them, or a callable ``(name, module) -> bool``; ``include=None`` takes every such layer.
    ``gate`` (``"in"``, ``"out"``, ``"weight"``) applies to the linear layers; convolutions get
    output-channel gates. ``group_size``: features (channels) per gate, for every converted layer.
    ``droprate_init=None``: gates start open, so the eval output is unchanged. Already-converted layers
    are left alone. Returns ``model`` (or the new layer when ``model`` itself is converted). See the module
    docstring for what is skipped, what raises and why.

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs): the converted model
    is run on them once (eval mode, no grad) to find layers whose ``weight``/``bias`` something else reads during
    the forward (a parent calling ``F.linear(x, self.proj.weight)``) and that are never called themselves: their
    gates would never act. Such a layer
    raises ``ValueError`` when ``include`` names it explicitly, else it is left unconverted with a warning naming
    it. Without ``example_inputs`` the run uses an input made as :func:`l0kernels.compact` makes one (a
    transformers model's token ids, a batch for a model whose first layer is a Linear or a Conv2d); a model
    that runs on none is converted unchecked.

    ``structure="ffn"`` / ``"heads"`` (or both, as a tuple) puts structure gates instead (docs/design.md §11,
    :mod:`l0kernels.structure`): one gate per hidden unit of every feed-forward block, or per query head of
    every attention block, found in the model's exported graph (on ``example_inputs``, or an input made as
    above); ``include``/``exclude`` then select blocks by the qualified name of the module holding the block
    (e.g. ``"model.layers.0.mlp"``), and ``gate``/``group_size`` do not apply.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if structure is not None:
        if gate != "in" or group_size != 1:
            raise ValueError("gate and group_size do not apply with structure=...: a structure gate spans its "
                             "block's layers")
        return _convert_structure(model, structure, include=include, exclude=exclude, noise=noise,
                                  droprate_init=droprate_init, backend=backend, example_inputs=example_inputs)
    check_choice(gate, "gate", LINEAR_GATES)
    check_choice(noise, "noise", NOISE_KINDS)
    check_choice(backend, "backend", backend_names())
    group_size = check_int(group_size, "group_size")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if gate == "weight" and noise == "sample":
        raise ValueError("noise='sample' is not defined for gate='weight'; use noise='batch'")
    if droprate_init is not None:
        if isinstance(droprate_init, bool) or not isinstance(droprate_init, numbers.Real):
            raise TypeError(f"droprate_init must be None or a float in (0, 1), got {type(droprate_init).__name__}")
        if not 0.0 < float(droprate_init) < 1.0:
            raise ValueError(f"droprate_init must be None or in (0, 1), got {droprate_init}")
        droprate_init = float(droprate_init)
    inc = _matcher(include, "include")
    exc = _matcher(exclude, "exclude")

    # every (parent, attribute, qualified name) slot holding a module; a module may sit in several
    slots: List[Tuple[Optional[nn.Module], str, str, nn.Module]] = [(None, "", "", model)]
    names: Dict[int, List[str]] = {id(model): [""]}
    in_mha, in_encoder = set(), set()
    for pname, parent in model.named_modules(remove_duplicate=False):
        for cname, child in parent._modules.items():
            if child is None:
                continue
            qual = f"{pname}.{cname}" if pname else cname
            slots.append((parent, cname, qual, child))
            names.setdefault(id(child), []).append(qual)
            if isinstance(parent, nn.MultiheadAttention):
                in_mha.add(id(child))
            if isinstance(parent, nn.TransformerEncoderLayer):
                in_encoder.add(id(child))

    new_of: Dict[int, _L0Layer] = {}
    rng = _rng_state(model) if droprate_init is not None else None  # the new gates draw from the global RNG
    try:
        _build_layers(slots, names, new_of, in_mha, inc, exc, gate=gate, group_size=group_size, noise=noise,
                      droprate_init=droprate_init, backend=backend)
        # routed experts (3-D parameters, no linear layer): their units, the down projection's inputs, get gates
        # as a linear layer's inputs do (l0kernels/experts.py)
        experts = _find_experts(model, inc, exc) if gate == "in" and group_size == 1 and noise == "batch" else []
        expert_gates = _expert_gates(experts, droprate_init, backend)
        # everything is built: only now is the model changed (and put back if the example run fails)
        for key in new_of.keys() & in_encoder:
            new_of[key].register_forward_pre_hook(_keep_slow_path)
        _swap(slots, new_of)
        if new_of:
            _drop_bypassed(model, slots, names, new_of, inc, example_inputs)
    except BaseException:
        if rng is not None:  # a failed call changes nothing, the random streams included
            _restore_rng_state(rng)
        raise
    from .experts import attach
    for m, g in expert_gates:
        attach(m, g)
    if inc is not None and not expert_gates and not _matched_any(slots, names, inc):
        warnings.warn(f"convert(): include={include!r} matched no nn.Linear, nn.Conv2d or Conv1D layer (nor an L0 "
                      "layer); nothing was converted", UserWarning, stacklevel=2)
    return new_of.get(id(model), model)


def _swap(slots, new_of, back: bool = False) -> None:
    """Put the layers of ``new_of`` (original module id -> new layer) in their slots; ``back``: put the
    original modules back where those new layers sit."""
    old_of = {id(new_of[id(m)]): m for _, _, _, m in slots if id(m) in new_of}
    for parent, cname, _, m in slots:
        if parent is None:
            continue
        if not back and id(m) in new_of:
            parent._modules[cname] = new_of[id(m)]
        elif back and id(parent._modules[cname]) in old_of:
            parent._modules[cname] = old_of[id(parent._modules[cname])]


def _matched_any(slots, names, inc) -> bool:
    for _, _, _, m in slots:
        if isinstance(m, _L0Layer) or _base_of(m) is not None:
            if any(_call_matcher(inc, q, m, "include") for q in names[id(m)]):
                return True
    return False


class _ReadWatch:
    """Records reads of the new layers' ``weight``/``bias`` made from outside their own forward, while the
    model runs on the example inputs. ``nn.Module.__getattr__`` serves parameter reads, so the watched layers
    get a subclass for the run whose ``__getattr__`` records; their own forward reads the parameter dict
    directly (``l0kernels.functional``) and is marked as inside."""

    def __init__(self):
        self.read: Dict[int, str] = {}
        self.called: set = set()
        self.inside = 0
        self.classes: Dict[type, type] = {}

    def watched_class(self, cls: type) -> type:
        if cls not in self.classes:
            watch = self

            def __getattr__(layer, name):
                if name in ("weight", "bias") and not watch.inside:
                    watch.read.setdefault(id(layer), name)
                return cls.__getattr__(layer, name)

            def forward(layer, *args, **kwargs):
                watch.called.add(id(layer))
                watch.inside += 1
                try:
                    return cls.forward(layer, *args, **kwargs)
                finally:
                    watch.inside -= 1

            self.classes[cls] = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "forward": forward})
        return self.classes[cls]


def _drop_bypassed(model, slots, names, new_of, inc, example_inputs) -> None:
    """Run the converted model on ``example_inputs`` and undo the conversion of every layer whose parameters
    were read from outside its forward (see :func:`convert`); on any error put every original layer back.
    Without ``example_inputs`` the run uses an input made as ``compact()`` makes one (a transformers model's
    main input, a batch for a model whose first layer is a Linear or a Conv2d); a model that runs on none of
    them is left as converted, unchecked."""
    from .compact.core import example_call
    made = example_inputs is None
    if made:
        try:
            args, kwargs, _ = example_call(model, None)
        except ValueError:
            return  # no input can be made for this model
        tries = args if args and isinstance(args[0], tuple) else (args,)
    else:
        args, kwargs, _ = example_call(model, example_inputs)
        tries = (args,)
    watch = _ReadWatch()
    layers = list(new_of.values())
    classes = [type(m) for m in layers]
    modes = [(m, m.training) for m in model.modules()]
    from .backends._plans import no_plans
    try:
        for m in layers:
            m.__class__ = watch.watched_class(type(m))
        try:
            for i, a in enumerate(tries):
                try:
                    with torch.no_grad(), no_plans():  # no eval plans kept from a one-off run
                        model.eval()(*a, **kwargs)
                    break
                except Exception:
                    if not made:
                        raise
                    watch.read.clear()
                    watch.called.clear()
                    if i == len(tries) - 1:
                        return  # the model runs on no input made for it: nothing found, nothing undone
        finally:
            for m, cls in zip(layers, classes):
                m.__class__ = cls
            for m, t in modes:
                m.training = t
        old_of = {id(new): m for _, _, _, m in slots for new in [new_of.get(id(m))] if new is not None}
        # read from outside and never called: the gates would never act (a layer that is called and whose
        # weight is also looked at, e.g. for its dtype as T5's feed-forward does, keeps its gates)
        bypassed = {key: new for key, new in new_of.items() if id(new) in watch.read and id(new) not in watch.called}
        if not bypassed:
            return
        labels = [f"'{names[key][0]}' ({watch.read[id(new)]})" for key, new in bypassed.items()]
        explicit = [names[key][0] for key in bypassed
                    if inc is not None and any(_call_matcher(inc, q, old_of[id(new_of[key])], "include")
                                               for q in names[key])]
        why = ("its parent reads the layer's parameters directly during the forward (e.g. F.linear(x, "
               "layer.weight)), so gates there would never act")
        if explicit:
            raise ValueError(f"cannot convert {', '.join(labels)}: {why}")
        warnings.warn(f"convert(): left {', '.join(labels)} unconverted: {why}", UserWarning, stacklevel=3)
        _swap(slots, bypassed, back=True)
        for key in bypassed:
            del new_of[key]
    except BaseException:
        _swap(slots, new_of, back=True)
        new_of.clear()
        raise


def _rng_state(model: nn.Module):
    """PyTorch's default generators that drawing the model's new gates can advance: the CPU one and those of
    the CUDA devices its parameters are on."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in cuda]


def _restore_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in cuda:
        torch.cuda.set_rng_state(s, d)


def _build_layers(slots, names, new_of, in_mha, inc, exc, **options) -> None:
    """The L0 layer of every matching ``nn.Linear`` / ``nn.Conv2d`` into ``new_of`` (by the module's id); raises
    ``ValueError`` for an explicitly included layer that cannot be converted. Changes nothing in the model."""
    seen = set()
    shared: Dict[int, List[str]] = {}  # Parameter id -> the modules holding it
    for _, _, qual, m in slots:
        for p in m._parameters.values():
            if p is not None and qual not in shared.setdefault(id(p), []):
                shared[id(p)].append(qual)
    for _, _, qual, m in slots:
        if id(m) in seen:
            continue
        seen.add(id(m))
        base = None if isinstance(m, _L0Layer) else _base_of(m)
        if base is None:
            continue
        quals = names[id(m)]
        if inc is None:
            explicit, hit = False, True
        else:
            explicit = hit = any(_call_matcher(inc, q, m, "include") for q in quals)
        if not hit or (exc is not None and any(_call_matcher(exc, q, m, "exclude") for q in quals)):
            continue
        why = None
        tied = [q for q in shared.get(id(m._parameters.get("weight")), ()) if q not in quals]
        if tied:
            why = (f"its weight is the Parameter of '{tied[0]}' too (tied weights), which its gates could not "
                   "shrink with it")
        elif id(m) in in_mha:
            why = ("nn.MultiheadAttention reads this layer's weight directly (F.multi_head_attention_forward), "
                   "so its gates would be bypassed")
        elif not _keeps_forward(m, base):
            why = (f"{type(m).__name__} overrides {base.__name__}.forward, so an L0 layer would not compute "
                   "what it computes")
        if why is not None:
            if explicit:
                raise ValueError(f"module '{qual}' ({type(m).__name__}) cannot be converted: {why}")
            continue
        new_of[id(m)] = _new_layer(m, qual, **options)


def _check_droprate_arg(droprate_init) -> Optional[float]:
    if droprate_init is None:
        return None
    if isinstance(droprate_init, bool) or not isinstance(droprate_init, numbers.Real):
        raise TypeError(f"droprate_init must be None or a float in (0, 1), got {type(droprate_init).__name__}")
    if not 0.0 < float(droprate_init) < 1.0:
        raise ValueError(f"droprate_init must be None or in (0, 1), got {droprate_init}")
    return float(droprate_init)


def _convert_structure(model, structure, *, include, exclude, noise, droprate_init, backend, example_inputs):
    """``convert(model, structure=...)``: see :func:`convert` and :mod:`l0kernels.structure`."""
    from .compact.blocks import find_blocks
    from .structure import STRUCTURES, StructureGate, StructureLinear, attach_gate
    kinds = (structure,) if isinstance(structure, str) else structure
    if not isinstance(kinds, (tuple, list)) or not kinds or any(k not in STRUCTURES for k in kinds):
        raise ValueError(f"structure must be one of {STRUCTURES} or a tuple of them, got {structure!r}")
    if noise != "batch":
        raise ValueError(f"structure gates draw one gate vector per call: noise must be 'batch', got {noise!r}")
    from .structure import STRUCTURE_BACKENDS
    check_choice(backend, "backend", STRUCTURE_BACKENDS)
    if backend not in ("auto", "torch"):
        check_choice(backend, "backend", backend_names())  # registered (it may still decline a call, naming why)
    droprate_init = _check_droprate_arg(droprate_init)
    inc = _matcher(include, "include")
    exc = _matcher(exclude, "exclude")
    found, call_args, call_kwargs = find_blocks(model, example_inputs)
    blocks = [b for b in found if b.kind in kinds]
    chosen = []
    for b in blocks:
        holder = model.get_submodule(b.name)
        explicit = inc is not None and _call_matcher(inc, b.name, holder, "include")
        if (inc is not None and not explicit) or (exc is not None and _call_matcher(exc, b.name, holder, "exclude")):
            continue
        why = _structure_refusal(model, b)
        if why is not None:
            if explicit:
                raise ValueError(f"block '{b.name}' ({b.kind}) cannot take structure gates: {why}")
            continue
        chosen.append(b)
    experts = _find_experts(model, inc, exc) if "ffn" in kinds else []
    if inc is not None and not chosen and not experts:
        warnings.warn(f"convert(): include={include!r} matched no {'/'.join(kinds)} block of the model; nothing "
                      "was converted", UserWarning, stacklevel=3)
    # everything is built before the model changes
    built = []
    rng = _rng_state(model) if droprate_init is not None else None
    try:
        for b in chosen:
            first = model.get_submodule(b.consumer).weight
            p = 1.0 / (1.0 + math.exp(OPEN_LOG_ALPHA)) if droprate_init is None else droprate_init
            g = StructureGate(b.num_gates, b.kind, droprate_init=p, backend=backend, device=first.device,
                              dtype=first.dtype)
            with torch.no_grad():
                if droprate_init is None:
                    g.log_alpha.fill_(OPEN_LOG_ALPHA)
            layers = {}
            for name in b.layers:
                old = model.get_submodule(name)
                w = old.weight
                if _is_conv1d(old):  # stored (in, out): a transposed copy, a new Parameter
                    w = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
                new = StructureLinear(w.shape[1], w.shape[0], bias=old.bias is not None, device="meta",
                                      dtype=w.dtype)
                new.weight, new.bias = w, old.bias
                if name == b.consumer:
                    new._col_gate, new.col_gates = g, b.col_gates.to(w.device)
                    new.col_classes = b.col_classes.to(w.device)
                else:
                    new._row_gate, new.row_gates = g, b.row_gates[name].to(w.device)
                    new.row_classes = b.row_classes[name].to(w.device)
                new.train(old.training)
                layers[name] = (old, new)
                g._layers.append(new)
            g.class_gates = b.class_gates.to(w.device)
            g._count()
            g.train(model.get_submodule(b.name).training)
            built.append((b, g, layers))
        expert_gates = _expert_gates(experts, droprate_init, backend)
    except BaseException:
        if rng is not None:
            _restore_rng_state(rng)
        raise
    for b, g, layers in built:
        swap = {id(old): new for old, new in layers.values()}
        for parent in model.modules():
            for cname, child in list(parent._modules.items()):
                if child is not None and id(child) in swap:
                    parent._modules[cname] = swap[id(child)]
        attach_gate(model.get_submodule(b.name), layers[b.consumer][1], g)
    from .experts import attach
    for m, g in expert_gates:
        attach(m, g)
    from .structure import DEVICE_FORM
    heads = [(b, g, layers) for b, g, layers in built if b.kind == "heads"]
    if heads and backend in DEVICE_FORM:  # the attention over the open heads (l0kernels/attention.py)
        from .attention import install
        for b, g, layers in heads:
            model.get_submodule(b.name).__dict__["_l0_heads"] = (g, layers[b.consumer][1])
        install(model)
    narrowable = [g for _, g, _ in built if backend in ("auto", "torch")]  # the device form never runs narrow
    if narrowable:
        _allow_narrow(model, narrowable, call_args, call_kwargs)
    return model


def _find_experts(model, inc, exc) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of the routed experts modules to gate (l0kernels/experts.py), by ``include``/``exclude``
    on their qualified names; one that ``include`` names but cannot be gated raises ``ValueError``."""
    from .experts import experts_refusal
    out = []
    for name, m in model.named_modules():
        why = experts_refusal(m)
        if why == "":
            continue
        explicit = inc is not None and _call_matcher(inc, name, m, "include")
        if (inc is not None and not explicit) or (exc is not None and _call_matcher(exc, name, m, "exclude")):
            continue
        if why is not None:
            if explicit:
                raise ValueError(f"experts '{name}' ({type(m).__name__}) cannot take unit gates: {why}")
            continue
        out.append((name, m))
    return out


def _expert_gates(experts, droprate_init, backend) -> list:
    """``(module, ExpertGate)`` for each of ``experts``, nothing attached yet."""
    from .experts import ExpertGate
    out = []
    for _, m in experts:
        p = 1.0 / (1.0 + math.exp(OPEN_LOG_ALPHA)) if droprate_init is None else droprate_init
        g = ExpertGate(m, droprate_init=p, backend=backend, device=m.down_proj.device, dtype=m.down_proj.dtype)
        with torch.no_grad():
            if droprate_init is None:
                g.log_alpha.fill_(OPEN_LOG_ALPHA)
        g.train(m.training)
        out.append((m, g))
    return out


def _allow_narrow(model, gates, args, kwargs) -> None:
    """Set ``gate.narrow`` for the blocks whose forward gives the same outputs when the tensors between their
    layers hold only the open units (sizes the forward reads from its input, e.g. ``view(..., -1, head_dim)``)
    as with every unit present: checked on the example call with every other unit class closed, all blocks at
    once and, where that differs, block by block. A block whose forward hard-codes its width stays full width."""
    from .compact.core import _differs, _run
    from .structure import GATE_CLOSED, GATE_OPEN
    gates = [g for g in gates if g.class_gates.shape[0] >= 2]
    if not gates:
        return
    saved = [(g, g.log_alpha.detach().clone()) for g in gates]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for g in gates:
                la = torch.full_like(g.log_alpha, GATE_OPEN)
                la[g.class_gates[1::2].flatten()] = GATE_CLOSED
                g.log_alpha.copy_(la)

            def agrees(trial) -> bool:
                for g in gates:
                    g.narrow = g in trial
                try:
                    return _differs(ref, _run(model, args, kwargs)) is None
                except Exception:
                    return False
            ref = _run(model, args, kwargs)
            ok = list(gates) if agrees(gates) else [g for g in gates if agrees([g])]
        for g in gates:
            g.narrow = g in ok
    finally:
        with torch.no_grad():
            for g, la in saved:
                g.log_alpha.copy_(la)
        for m, t in modes:
            m.training = t


def _structure_refusal(model, b) -> Optional[str]:
    """Why block ``b`` cannot take structure gates, or None."""
    held: Dict[int, set] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                held.setdefault(id(p), set()).add(id(m))
    for name in b.layers:
        m = model.get_submodule(name)
        base = _base_of(m)
        if base is None or isinstance(m, _L0Layer) or not _keeps_forward(m, base):
            return f"its layer '{name}' ({type(m).__name__}) is not a plain linear layer"
        try:
            _check_param(m, name)
        except ValueError as e:
            return str(e)
        if len(held.get(id(m.weight), ())) > 1:
            return f"the weight of '{name}' is held by another module too (tied weights)"
    return None


__all__ = ["convert", "OPEN_LOG_ALPHA"]
