"""compact(): the exported graph's analysis applied to a copy of the user's model (docs/compact.md).

1. *Fold*: a deep copy of the model with every L0 layer replaced by the plain layer its eval forward computes.
2. *Capture*: ``torch.export`` of that copy (eval mode) on example inputs: ATen ops with concrete sizes.
3. *Analyse*: the units of every tensor (:mod:`.units`, one rule per op in :mod:`.rules`) and which stay.
4. *Surgery* on the copy: rows and inputs of ``nn.Linear`` / ``nn.Conv2d`` sliced in place (the constants of
   removed inputs folded into the bias), BatchNorm entries sliced (an emptied one becomes ``nn.Identity``),
   and, for an ``nn.Sequential``, closed model inputs removed by an input-selection step. The model keeps its
   class and its methods; only the tensors and the sizes of the layers change.
5. *Check*: the copy runs on the example inputs and must give the gated eval model's outputs. A forward that
   computes a size from an attribute (``self.num_heads``, ``self.split_size``) gets the attributes of its
   module that held the old size set to the new one, and is checked again; what still differs raises
   ``ValueError`` naming the modules -- compact never returns a wrong model.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .dense import fold, is_weight_layer, l0_types, plain_layer, slice_bn
from .rules import WEIGHT_OPS, rule_for
from .units import CPU, CompactContext, decide


@dataclass
class Plan:
    model: nn.Module
    layer_info: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # qualified name -> keep masks


def _libc_trim():
    try:
        import ctypes
        import ctypes.util
        name = ctypes.util.find_library("c")
        fn = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        fn = None
    return fn


_TRIM = _libc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). compact() frees
    large temporaries layer by layer; glibc keeps freed blocks below its mmap threshold in the process, so the
    resident memory of a large model's compact() would grow by what it had freed (0.4x the model's size measured,
    docs/benchmarks.md)."""
    if _TRIM is not None:
        _TRIM(0)


# -- 1. fold -------------------------------------------------------------------------------------------------

def _slots(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) slot holding it."""
    out: Dict[int, List[Tuple[nn.Module, str]]] = defaultdict(list)
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                out[id(child)].append((parent, name))
    return out


def _folded_copy(model: nn.Module, bypassed: frozenset = frozenset()) -> nn.Module:
    """A deep copy of ``model`` (its modules; the tensors shared, see :func:`unshare`) in eval mode with each L0 layer replaced by its folded plain layer (a layer held
    in several places is replaced in all of them by one object). The layers named in ``bypassed`` (their
    forward never ran: the model reads their weights directly, so their gates never act) keep their weights
    as they are."""
    L0 = l0_types()
    # the copy shares the model's parameters and buffers instead of copying them (memory: the model once, not
    # twice); nothing here writes into them, and compact() clones what its result still shares (unshare)
    work = copy.deepcopy(model, {id(t): t for t in list(model.parameters()) + list(model.buffers())})
    if isinstance(work, L0):
        return fold(work).eval()
    # a deep copy lists its modules in the original's order: the copy's module -> the original's name
    name_of = {id(c): n for (n, _), c in zip(model.named_modules(), work.modules())}
    from ..structure import StructureLinear, strip_rounds
    for key, slots in _slots(work).items():
        m = getattr(slots[0][0], slots[0][1])
        if isinstance(m, StructureLinear):  # gates folded into the layers (and dropped with the consumers)
            new = plain_layer(m, *m.folded())
            for parent, name in slots:
                setattr(parent, name, new)
        elif isinstance(m, L0):
            raw = name_of.get(id(m)) in bypassed
            new = plain_layer(m, m.weight.detach(), m.bias.detach() if m.bias is not None else None) if raw \
                else fold(m)
            for parent, name in slots:
                setattr(parent, name, new)
    from ..attention import uninstall
    from ..experts import ExpertGate, detach
    uninstall(work)
    for m in list(work.modules()):
        strip_rounds(m)
        g = m._modules.get("l0_gate")
        if isinstance(g, ExpertGate):  # routed experts: gates folded, closed units packed out, own forward back
            for pname, t in g.packed().items():
                setattr(m, pname, nn.Parameter(t, requires_grad=getattr(m, pname).requires_grad))
            width = g.experts_shape[1]
            new_width = m.down_proj.shape[1] if m.is_transposed else m.down_proj.shape[2]
            for attr in ("intermediate_dim", "intermediate_size", "moe_intermediate_size"):
                if type(getattr(m, attr, None)) is int and getattr(m, attr) == width:
                    setattr(m, attr, new_width)
            detach(m)
    return work.eval()


def unshare(result: nn.Module, model: nn.Module) -> None:
    """Give ``result`` its own copy of every parameter and buffer it still shares with ``model`` (tensors held
    twice in ``result`` stay one tensor), one at a time."""
    held = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    clones: Dict[int, torch.Tensor] = {}
    for m in result.modules():
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is None or id(t) not in held:
                    continue
                if id(t) not in clones:
                    c = t.detach().clone()
                    clones[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
                store[key] = clones[id(t)]


def _bypassed_layers(model: nn.Module, args, kwargs) -> Tuple[frozenset, List[torch.Tensor]]:
    """Run the gated model once: (names of the L0 layers whose forward did not run, its outputs)."""
    L0 = l0_types()
    called = set()
    hooks = [m.register_forward_pre_hook(lambda mod, a: called.add(id(mod)))
             for m in model.modules() if isinstance(m, L0)]
    from ..backends._plans import no_plans
    seen = [(m, m.__dict__["input_hw"]) for m in model.modules() if "input_hw" in m.__dict__]
    try:
        model.eval()
        with no_plans():  # eval plans (folded weights) would hold up to the model's size again
            out = _run(model, args, kwargs)
    finally:
        for h in hooks:
            h.remove()
        for m, hw in seen:  # the input size a conv layer last saw (summary's FLOPs) is the caller's, not ours
            m.input_hw = hw
    return frozenset(n for n, m in model.named_modules() if isinstance(m, L0) and id(m) not in called), out


# -- 2. capture ----------------------------------------------------------------------------------------------

def _is_transformers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _first_layer(model: nn.Module) -> Optional[nn.Module]:
    return next((m for m in model.modules() if is_weight_layer(m)), None)


def example_call(model: nn.Module, example_inputs) -> Tuple[tuple, dict, bool]:
    """``(args, kwargs, made)``: the call to capture. ``example_inputs``: a tensor, a tuple/list of positional
    inputs or a dict of keyword inputs. Without them, one is made: for a ``transformers`` model its main
    input (token ids or pixels) from its config, for a model whose first layer is a ``Linear`` a batch of 2
    rows; otherwise ``ValueError``. A ``transformers`` model gets ``use_cache=False``."""
    made = example_inputs is None
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif example_inputs is None:
        args, kwargs = _made_inputs(model)  # args: a tuple of candidate argument tuples for a conv model
    else:
        raise TypeError(f"example_inputs must be a tensor, a tuple or list of inputs or a dict of keyword inputs, "
                        f"got {type(example_inputs).__name__}")
    if _is_transformers(model) and _accepts(model, "use_cache") and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs, made


def _made_inputs(model: nn.Module) -> Tuple[tuple, dict]:
    p = next((t for t in model.parameters()), None)
    dev = p.device if p is not None else CPU
    if _is_transformers(model):
        cfg = model.config
        name = getattr(model, "main_input_name", "input_ids")
        gen = torch.Generator().manual_seed(0)
        if name == "pixel_values":
            size = getattr(cfg, "image_size", 32)
            size = size if isinstance(size, int) else size[0]
            dt = p.dtype if p is not None and p.is_floating_point() else torch.float32
            return (), {name: torch.randn(1, getattr(cfg, "num_channels", 3), size, size, generator=gen)
                        .to(device=dev, dtype=dt)}
        vocab = getattr(cfg, "vocab_size", None) or 2
        ids = torch.randint(0, vocab, (1, 8), generator=gen).to(dev)
        kw = {name: ids}
        if getattr(cfg, "is_encoder_decoder", False):
            kw["decoder_input_ids"] = ids
        return (), kw
    first = _first_layer(model)
    L0Linear, _ = l0_types()
    if isinstance(first, (nn.Linear, L0Linear)):
        w = first.weight
        return (torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype),), {}
    if isinstance(first, (nn.Conv2d, l0_types()[1])):
        w = first.weight
        c = w.shape[1] * getattr(first, "groups", 1)
        gen = torch.Generator().manual_seed(0)
        return tuple((torch.randn(1, c, s, s, generator=gen).to(w.device, w.dtype),) for s in _SIZES), {}
    raise ValueError(f"compact: pass example_inputs (a tensor, a tuple or a dict of inputs of "
                     f"{type(model).__name__}): compact() captures the model's graph by running it, and can make an "
                     f"input only for a transformers model or a model whose first layer is a Linear or a Conv2d")


# square image sizes tried in turn for a model whose first layer is a Conv2d: the first it runs on is used
_SIZES = (28, 32, 64, 224) + tuple(s for s in range(1, 225) if s not in (28, 32, 64, 224))


def _capture(work: nn.Module, args: tuple, kwargs: dict):
    try:
        with torch.no_grad():
            return torch.export.export(work, args, kwargs, strict=False)
    except Exception as e:
        raise ValueError(f"compact: torch.export cannot capture {type(work).__name__} on these inputs "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); compact() analyses "
                         f"the exported graph") from e


# -- 3. analyse ----------------------------------------------------------------------------------------------

def _param_owners(work: nn.Module, ep) -> Dict[str, Tuple[nn.Module, str]]:
    """placeholder name -> (module, attribute) for the parameters and buffers of the exported program."""
    sig = ep.graph_signature
    out = {}
    for ph, fqn in list(sig.inputs_to_parameters.items()) + list(sig.inputs_to_buffers.items()):
        mpath, _, attr = fqn.rpartition(".")
        try:
            out[ph] = (work.get_submodule(mpath), attr)
        except AttributeError:
            continue
    return out


def analyse(work: nn.Module, ep, discover: bool = False) -> CompactContext:
    graph = ep.graph_module.graph
    ctx = CompactContext(graph, _param_owners(work, ep))
    ctx.discover = discover
    user = set(ep.graph_signature.user_inputs)
    with torch.no_grad():
        for node in graph.nodes:
            ctx.claimed = set()
            if node.op == "placeholder":
                v = node.meta.get("val")
                if node.name in user and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1:
                    dims = (-3,) if v.dim() == 4 else (-1,)
                    ctx.env[node] = ctx.new_units((v.shape[dims[0]],), dims, v.dim())
                continue
            if node.op == "output":
                for a in node.all_input_nodes:
                    ctx.freeze(ctx.env.get(a))
                continue
            if node.op != "call_function":
                continue
            if node.target not in WEIGHT_OPS and not any(ctx.env.get(a) is not None for a in node.all_input_nodes):
                continue  # no input carries units: neither does the output
            out = rule_for(node)(ctx, node)
            for a in node.all_input_nodes:  # units an op did not look at cannot shrink
                if a not in ctx.claimed and a in ctx.env:
                    ctx.freeze(ctx.env[a])
            if out is not None:
                ctx.env[node] = out
    return ctx


# -- 4. surgery ----------------------------------------------------------------------------------------------

def input_select(index: torch.Tensor, dim: int) -> nn.Module:
    """A plain module computing ``x.index_select(dim, index)`` (``index`` a registered buffer): a
    ``torch.fx.GraphModule``, whose code is pickled with it, so ``torch.load`` needs no l0kernels."""
    holder = nn.Module()
    holder.register_buffer("index", index.detach().clone().long())
    g = torch.fx.Graph()
    x = g.placeholder("x")
    idx = g.get_attr("index")
    g.output(g.call_method("index_select", (x, dim, idx)))
    return torch.fx.GraphModule(holder, g, class_name="InputSelect")


def _set_layer(m: nn.Module, new: nn.Module) -> None:
    """Give layer ``m`` the tensors and sizes of ``new`` (same kind): the module object and its class stay."""
    m.weight = new.weight
    if new.bias is not None:
        m.bias = new.bias
    if isinstance(m, nn.Linear):
        m.in_features, m.out_features = new.in_features, new.out_features
    else:
        m.in_channels, m.out_channels, m.groups = new.in_channels, new.out_channels, new.groups


def _set_bn(m: nn.Module, new: nn.Module) -> None:
    for k in ("weight", "bias"):
        if getattr(m, k) is not None:
            setattr(m, k, getattr(new, k))
    m.running_mean, m.running_var, m.num_features = new.running_mean, new.running_var, new.num_features


def _names(work: nn.Module) -> Dict[int, str]:
    return {id(m): n for n, m in work.named_modules()}


def surgery(work: nn.Module, ctx: CompactContext, keep) -> Dict[str, Dict[str, Any]]:
    """Apply the decisions to ``work`` in place; returns per changed layer name its keep masks and shape."""
    names = _names(work)
    slots = _slots(work)
    info: Dict[str, Dict[str, Any]] = {}
    holders: Dict[int, List[nn.Module]] = defaultdict(list)  # a Parameter shared by several layers
    for m in work.modules():
        if is_weight_layer(m):
            holders[id(m.weight)].append(m)
    uses: Dict[str, List[Any]] = defaultdict(list)  # the calls of one weight Parameter
    for w in ctx.weights:
        uses[w.key].append(w)
    with torch.no_grad():
        for key, ws in uses.items():  # one layer at a time: the old and new tensors of one layer coexist
            d = ws[0].d
            in_keep, out_keep = keep(ws[0].inp.ids), keep(ws[0].out.ids)
            folds = []
            for w in ws:  # a layer called twice: its calls must fold the same constants (one bias)
                removed = ~in_keep
                if bool(removed.any()):
                    c = torch.where(removed & w.inp.dead, w.inp.const, torch.zeros_like(w.inp.const))
                    folds.append(d.through(c)[out_keep.to(d.src.weight.device)])
                else:
                    folds.append(torch.zeros(int(out_keep.sum()), dtype=d.work, device=d.src.weight.device))
            if any(not torch.equal(f, folds[0]) for f in folds[1:]):
                raise ValueError(f"compact: layer {names.get(id(d.src), key)!r} is called more than once with "
                                 f"different removed constants at its inputs; it cannot be compacted to one layer")
            info[names.get(id(d.src), key)] = {"in_keep": in_keep, "out_keep": out_keep, "module": d.src}
            if bool(in_keep.all()) and bool(out_keep.all()) and not bool((folds[0] != 0).any()):
                continue
            new = d.shrink(out_keep, in_keep, folds[0])
            for m in holders[id(d.src.weight)] or [d.src]:
                _set_layer(m, new)
            del new
            release_free_memory()
        seen = set()
        for node, mod, u in ctx.bns:
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            k = keep(u.ids)
            if bool(k.all()):
                continue
            if not bool(k.any()):
                # every channel removed: its input has no channels left, and a BatchNorm of 0 features raises
                # when called; the identity maps the empty tensor to the same empty tensor
                for parent, name in slots[id(mod)]:
                    setattr(parent, name, nn.Identity())
                continue
            _set_bn(mod, slice_bn(mod, k.to(mod.running_mean.device)))
    return info


def _select_inputs(work: nn.Module, ctx: CompactContext, keep) -> nn.Module:
    """An ``nn.Sequential`` whose closed inputs go gets an input-selection step first."""
    node = next((n for n in ctx.graph.nodes if n.op == "placeholder" and n in ctx.env), None)
    u = ctx.env[node]
    k = keep(u.ids)
    p = next((t for t in list(work.parameters()) + list(work.buffers())), None)
    sel = input_select(k.nonzero().flatten().to(p.device if p is not None else CPU), u.dims[0])
    mods = [("input_select", sel)] + [(n, m) for n, m in work._modules.items()]
    out = nn.Sequential()
    for n, m in mods:
        out.add_module(n, m)
    return out


def _freeze_inputs(ctx: CompactContext, sequential: bool, keep) -> bool:
    """Model inputs that cannot lose units keep them all; True when that changed a decision."""
    changed = False
    ph = [n for n in ctx.graph.nodes if n.op == "placeholder" and n in ctx.env]
    for node in ph:
        u = ctx.env[node]
        k = keep(u.ids)
        if bool(k.all()):
            continue
        if not sequential or len(ph) != 1 or len(u.dims) != 1 or not bool(k.any()):
            ctx.freeze(u)
            changed = True
    return changed


# -- 5. check ------------------------------------------------------------------------------------------------

def _outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def _run(model: nn.Module, args, kwargs) -> List[torch.Tensor]:
    with torch.no_grad():
        return [t.detach() for t in _outputs(model(*args, **kwargs))]


def _tolerance(ref: List[torch.Tensor]) -> float:
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in ref)
    return 3e-2 if low else 1e-4


def _differs(ref: List[torch.Tensor], out: List[torch.Tensor]) -> Optional[str]:
    if len(ref) != len(out):
        return f"{len(out)} outputs instead of {len(ref)}"
    tol = _tolerance(ref)
    for i, (a, b) in enumerate(zip(ref, out)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b.to(a.device)):
                return f"output {i} differs"
            continue
        a64, b64 = a.double(), b.to(a.device).double()
        same = (a64 == b64) | (a64.isnan() & b64.isnan())
        diff = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs())
        scale = float(torch.where(a64.isfinite(), a64.abs(), torch.zeros_like(a64)).max()) if a64.numel() else 0.0
        err = float(diff.max()) if diff.numel() else 0.0
        if not err <= tol * max(scale, 1e-30) + 1e-30:
            return f"output {i} differs by {err:.3g} (largest |output| {scale:.3g})"
    return None


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path if isinstance(path, str) else ""


def _size_changes(ctx: CompactContext, keep) -> Dict[Any, Tuple[str, List[Tuple[int, int]]]]:
    """The reshapes and splits whose sizes compact changed: node -> (module path from the graph's module
    stack, [(old size, new size)])."""
    out = {}
    for node, res in ctx.resize.items():
        k = keep(res.ids)
        if bool(k.all()):
            continue
        vals = node.meta.get("val")
        v = vals[0] if isinstance(vals, (list, tuple)) else vals
        pairs = []
        for ax, d in enumerate(res.dims):
            other = tuple(a for a in range(k.dim()) if a != ax)
            new, old = int((k.any(other) if other else k).sum()), int(v.shape[v.dim() + d])
            if new != old:
                pairs.append((old, new))
        if pairs:
            out[node] = (_module_path(node), pairs)
    return out


MAX_TRIES = 64  # assignments of size attributes tried before compact() gives up on them


def _attribute_choices(work: nn.Module, changes) -> List[Tuple[str, List[Tuple[nn.Module, int]]]]:
    """Per (module class, int attribute) that holds an old size in some module whose sizes changed: the
    attribute and, per module, its new size (a module whose sizes give one old value several new ones is
    left out). A forward reads ``self.num_heads`` or ``self.split_size`` to size its reshapes; which attribute
    feeds which size is not visible in the graph, so the choices are tried (per class: set in every module of
    the class, or in none)."""
    per_module: Dict[int, Tuple[nn.Module, Dict[int, set]]] = {}
    for path, pairs in changes.values():
        try:
            mod = work.get_submodule(path) if path else work
        except AttributeError:
            continue
        _, olds = per_module.setdefault(id(mod), (mod, defaultdict(set)))
        for old, new in pairs:
            olds[old].add(new)
    per: Dict[Tuple[type, str], List[Tuple[nn.Module, int]]] = {}
    for mod, olds in per_module.values():
        for k, v in vars(mod).items():
            if not k.startswith("_") and type(v) is int and len(olds.get(v, ())) == 1:
                per.setdefault((type(mod), k), []).append((mod, next(iter(olds[v]))))
    return [(f"{cls.__name__}.{k}", sets) for (cls, k), sets in per.items()]


SIZE_WORDS = ("head", "size", "dim", "features", "channels", "width")  # names of attributes that hold sizes


def _fix_attributes(work, changes, args, kwargs, ref, needed: bool) -> Optional[List[str]]:
    """Set size attributes so that the model keeps checking; returns the attributes set (None: no set checks).

    ``needed`` (the model does not check as it is): the smallest sets first, any int attribute (``self.h``), so
    that an attribute that only happens to equal a size (a layer index) is left alone. Otherwise (it checks):
    only attributes named like sizes (``num_attention_heads``, ``all_head_size``), the largest set that still
    checks, so that they stay true where the forward does not read them."""
    import itertools
    choices = _attribute_choices(work, changes)
    if not needed:
        choices = [(k, sets) for k, sets in choices if any(w in k.rsplit(".", 1)[1].lower() for w in SIZE_WORDS)]
    saved = [(m, k.rsplit(".", 1)[1], getattr(m, k.rsplit(".", 1)[1])) for k, sets in choices for m, _ in sets]
    combos = sorted(itertools.product((False, True), repeat=len(choices)),
                    key=lambda c: sum(c) if needed else -sum(c))
    for combo in combos[:MAX_TRIES]:
        if not any(combo):
            continue
        for (k, sets), on in zip(choices, combo):
            if on:
                for m, new in sets:
                    setattr(m, k.rsplit(".", 1)[1], new)
        if _check(work, args, kwargs, ref) is None:
            return [k for (k, _), on in zip(choices, combo) if on]
        for m, k, v in saved:
            setattr(m, k, v)
    return None


def _meta_shapes(cls, config) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Parameter shapes of ``cls(config)`` built on the meta device (no memory), or None where it does not build."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            m = cls(config)
    except Exception:  # a config value the class rejects
        return None
    return {n: tuple(p.shape) for n, p in m.named_parameters()}


def _moves_to(old, shapes, new) -> bool:
    """Whether ``shapes`` (a trial config's) moves some size of ``old`` and every size it moves to ``new``'s."""
    moved = [(a, t, b) for n in shapes for a, t, b in zip(old[n], shapes[n], new[n]) if t != a]
    return bool(moved) and all(t == b for _, t, b in moved)


def update_config(work: nn.Module, original_config, args, kwargs, ref) -> List[str]:
    """A ``transformers`` model's ``config`` after compact(): the size fields that one value describes for every
    layer get it, so that ``save_pretrained`` / ``from_pretrained`` round-trip where every changed size has one.
    A field is updated when building the class from the changed config (on the meta device) moves parameter
    sizes, each to the compacted model's, alone and together with the other fields updated; the model must still
    check on the example inputs (a forward reading the config). A size the layers differ in (the usual case after training) no value
    describes: its field keeps the original value, and ``from_pretrained`` cannot rebuild the model
    (``save_compact`` records every module's shape). Returns the names of the fields set."""
    cfg = getattr(work, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return []
    cls = type(work)
    old = _meta_shapes(cls, original_config)
    new = {n: tuple(p.shape) for n, p in work.named_parameters()}
    if old is None or set(old) != set(new) or old == new:
        return []
    changed = {n for n in new if new[n] != old[n]}
    dims = {(a, b) for n in changed for a, b in zip(old[n], new[n]) if a != b}
    cands: Dict[str, set] = defaultdict(set)
    for key, v in original_config.to_dict().items():
        if type(v) is not int or v <= 0:
            continue
        for a, b in dims:
            if a == v:
                cands[key].add(b)
            elif a % v == 0 and a // v > 1 and b % (a // v) == 0:
                cands[key].add(b // (a // v))
    fields = {}
    for key, vals in cands.items():
        if len(vals) != 1:
            continue
        trial = copy.deepcopy(original_config)
        setattr(trial, key, next(iter(vals)))
        shapes = _meta_shapes(cls, trial)
        if shapes is None or set(shapes) != set(new):
            continue
        if _moves_to(old, shapes, new):
            fields[key] = next(iter(vals))
    if not fields:
        return []
    trial = copy.deepcopy(original_config)
    for key, val in fields.items():
        setattr(trial, key, val)
    shapes = _meta_shapes(cls, trial)
    if shapes is None or set(shapes) != set(new) or not _moves_to(old, shapes, new):
        return []
    before = {key: getattr(cfg, key) for key in fields}
    for key, val in fields.items():
        setattr(cfg, key, val)
    if _check(work, args, kwargs, ref) is not None:
        for key, val in before.items():
            setattr(cfg, key, val)
        return []
    return sorted(fields)


# -- entry ---------------------------------------------------------------------------------------------------

def compact_plan(model: nn.Module, example_inputs=None) -> Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = [(m, m.training) for m in model.modules()]
    p = next((t for t in list(model.parameters()) + list(model.buffers())), None)
    try:
        # every tensor compact() makes is on the model's device, whatever the caller's default device
        with torch.device(p.device if p is not None else CPU):
            return _compact_plan(model, example_inputs)
    finally:
        for m, t in flags:
            m.training = t


def _compact_plan(model: nn.Module, example_inputs) -> Plan:
    args, kwargs, made = example_call(model, example_inputs)
    tries = args if made and args and isinstance(args[0], tuple) else (args,)
    for i, a in enumerate(tries):
        try:
            bypassed, ref = _bypassed_layers(model, a, kwargs)
            args = a
            break
        except Exception as e:
            if not made:
                raise
            if i == len(tries) - 1:
                raise ValueError(f"compact: pass example_inputs: {type(model).__name__} does not run on the "
                                 f"input compact() made ({type(e).__name__}: {e})") from e
    if bypassed:
        warnings.warn(f"compact: the gates of {', '.join(sorted(bypassed))} never act: the model reads their "
                      f"weights without calling them (convert(..., example_inputs=...) leaves such layers "
                      f"ungated); they are compacted as dense layers", stacklevel=3)
    keep_sizes: set = set()  # reshapes and splits whose sizes stay (names of graph nodes)
    for attempt in range(2):
        work = _folded_copy(model, bypassed)
        work, info, problem, changes = _attempt(work, args, kwargs, ref, keep_sizes)
        if problem is None:
            if _is_transformers(work):
                update_config(work, model.config, args, kwargs, ref)
            return Plan(work.eval(), info)
        if attempt == 0 and changes:
            where = sorted({p or type(model).__name__ for p, _ in changes.values()})
            warnings.warn(f"compact: {type(model).__name__}'s forward computes sizes that compact() cannot update "
                          f"in {', '.join(where)} ({problem}); the units those sizes count are kept",
                          stacklevel=3)
            keep_sizes = {n.name for n in changes}
            continue
        break
    raise ValueError(f"compact: the compacted {type(model).__name__} does not compute what the gated model "
                     f"computes ({problem}). Register a rule for the op involved "
                     f"(l0kernels.register_compact_rule) or keep its units (convert(..., exclude=...))")


def _attempt(work, args, kwargs, ref, keep_sizes):
    """One analysis and surgery of ``work`` (the folded copy) -> (the model, per-layer info, problem or None,
    size changes)."""
    ep = _capture(work, args, kwargs)
    ctx = analyse(work, ep)
    del ep
    release_free_memory()
    for node, res in ctx.resize.items():
        if node.name in keep_sizes:
            ctx.freeze(res)
    keep = decide(ctx)
    sequential = type(work) is nn.Sequential
    if _freeze_inputs(ctx, sequential, keep):
        keep = decide(ctx)
    info = surgery(work, ctx, keep)
    ph = [n for n in ctx.graph.nodes if n.op == "placeholder" and n in ctx.env]
    if sequential and ph and not bool(keep(ctx.env[ph[0]].ids).all()):
        work = _select_inputs(work, ctx, keep)
    changes = _size_changes(ctx, keep)
    problem = _check(work, args, kwargs, ref)
    if changes:  # size attributes: needed where the forward reads them, kept true where it does not
        done = _fix_attributes(work, changes, args, kwargs, ref, needed=problem is not None)
        problem = None if done is not None else problem
    return work, info, problem, changes


def _check(model, args, kwargs, ref) -> Optional[str]:
    """None when ``model`` gives the outputs ``ref`` on the example inputs, else what differs."""
    try:
        out = _run(model, args, kwargs)
    except Exception as e:
        return f"it raises {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return _differs(ref, out)
