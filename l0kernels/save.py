"""Saving and loading a compacted model without pickle: :func:`save_compact` / :func:`load_compact`.

A directory holds:

* ``model.safetensors``: the state dict. Entries that are the same tensor (tied weights such as
  ``lm_head.weight`` / ``model.embed_tokens.weight``, the keys of a module held by several parents) are
  stored once; the other names are recorded as aliases.
* ``compact.json``: ``{"format": "l0kernels.compact", "version": 1, "class": {"module", "qualname"},
  "transformers": {"class", "attn_implementation"} | null, "modules": {path: entry}, "shared_modules":
  {path: first path}, "tied": {state-dict key: stored key}}``. One entry per module (pre-order, ``""`` is the
  model; a module held by several parents is listed once, its other paths are in ``shared_modules``):
  ``type`` (``module.qualname``; the input-selection step of :func:`l0kernels.compact.input_select` is
  ``"l0kernels.compact.input_select"``), ``children`` (names in order, with the shared ones),
  ``empty_children`` (children registered as ``None``), ``params`` / ``buffers`` (name: ``{"shape",
  "dtype"[, "requires_grad"]}`` or ``null``; persistent buffers only), ``attrs`` (the plain scalar attributes
  of the module's ``__dict__``: int, float, bool, str, None; not ``training``, not names starting with
  ``_``) and, for the types the loader can rebuild, ``init`` (their constructor arguments).
* ``config.json`` (and ``generation_config.json`` when the model has one) for a ``transformers`` model.

Loading takes a freshly built dense instance of the saved model's class (or, for a ``transformers`` model,
builds one from ``config.json``: the class is looked up only as an attribute of the ``transformers`` package),
makes its module tree the recorded one (a module whose type, tensor shapes or constructor arguments differ
is rebuilt from its entry, or, for a type the loader cannot rebuild whose own tensors differ only in size,
given tensors of the recorded sizes; a missing one is built, children are put in the recorded order and children the
record does not have are dropped; a module shared by several parents stays one object), sets the scalar
attributes that differ (e.g. an attention block's ``num_heads`` / ``all_head_size`` that compact updated),
loads the safetensors state dict strictly with ``assign=True`` (dtypes as saved, on the device of the given
model's first tensor), re-ties the aliases (one Parameter again) and returns the model in eval mode.
Nothing is unpickled: only safetensors and JSON are read.

Not saved: a ``torch.fx.GraphModule`` (what compact returns for a model that is not a chain): its generated
code cannot be rebuilt without pickle; ``torch.export.export`` + ``torch.export.save`` hold such a model.
"""
from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

FORMAT = "l0kernels.compact"
VERSION = 1
WEIGHTS = "model.safetensors"
RECORD = "compact.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
INPUT_SELECT = "l0kernels.compact.input_select"
_MISSING = object()

__all__ = ["save_compact", "load_compact"]


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("l0kernels.save_compact / load_compact need the safetensors package "
                          "(pip install 'safetensors>=0.4')") from e
    return st


# -- module types ------------------------------------------------------------------------------------------

def _cls_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _attrs(*names: str) -> Callable[[nn.Module], Dict[str, Any]]:
    return lambda m: {n: getattr(m, n) for n in names}


def _attrs_bias(*names: str) -> Callable[[nn.Module], Dict[str, Any]]:
    return lambda m: dict(_attrs(*names)(m), bias=m.bias is not None)


def _bn_args(m: nn.Module) -> Dict[str, Any]:
    args = _attrs(*_BN)(m)
    if m.affine and m.bias is None:  # BatchNorm(bias=False), where torch has it
        args["bias"] = False
    return args


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_POOL_MAX = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_POOL_AVG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

# the types the loader rebuilds from their record: class -> constructor arguments read from a module. The
# layers compact() builds or slices (Linear, Conv2d, BatchNorm, Identity for an emptied BatchNorm) and the
# modules its nn.Sequential output uses for functional ops (activations, pools, Flatten), plus common layers.
_REBUILD: Dict[str, Tuple[type, Callable[[nn.Module], Dict[str, Any]]]] = {}
for _cls, _fn in [
        (nn.Linear, _attrs_bias("in_features", "out_features")),
        (nn.Conv1d, _attrs_bias(*_CONV)), (nn.Conv2d, _attrs_bias(*_CONV)),
        (nn.BatchNorm1d, _bn_args), (nn.BatchNorm2d, _bn_args),
        (nn.LayerNorm, _attrs_bias("normalized_shape", "eps", "elementwise_affine")),
        (nn.Embedding, _attrs("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                              "scale_grad_by_freq", "sparse")),
        (nn.Identity, _attrs()), (nn.Flatten, _attrs("start_dim", "end_dim")),
        (nn.ReLU, _attrs("inplace")), (nn.ReLU6, _attrs("inplace")), (nn.SiLU, _attrs("inplace")),
        (nn.Hardswish, _attrs("inplace")), (nn.Mish, _attrs("inplace")), (nn.Tanh, _attrs()),
        (nn.Sigmoid, _attrs()), (nn.Softsign, _attrs()), (nn.GELU, _attrs("approximate")),
        (nn.LeakyReLU, _attrs("negative_slope", "inplace")), (nn.ELU, _attrs("alpha", "inplace")),
        (nn.MaxPool2d, _attrs(*_POOL_MAX)), (nn.AvgPool2d, _attrs(*_POOL_AVG)),
        (nn.AdaptiveAvgPool2d, _attrs("output_size")),
        (nn.AdaptiveMaxPool2d, _attrs("output_size", "return_indices")),
        (nn.Dropout, _attrs("p", "inplace")), (nn.Dropout1d, _attrs("p", "inplace")),
        (nn.Dropout2d, _attrs("p", "inplace"))]:
    _REBUILD[_cls_name(_cls)] = (_cls, _fn)
if getattr(nn, "RMSNorm", None) is not None:
    _REBUILD[_cls_name(nn.RMSNorm)] = (nn.RMSNorm, _attrs("normalized_shape", "eps", "elementwise_affine"))


def _input_select_dim(m: nn.Module) -> Optional[int]:
    """``dim`` when ``m`` is the input-selection step of ``compact`` (``x.index_select(dim, self.index)``),
    else None."""
    if not isinstance(m, torch.fx.GraphModule) or m._modules or m._parameters or set(m._buffers) != {"index"}:
        return None
    nodes = list(m.graph.nodes)
    if [n.op for n in nodes] != ["placeholder", "get_attr", "call_method", "output"]:
        return None
    ph, idx, call, out = nodes
    if idx.target != "index" or call.target != "index_select" or call.kwargs or len(call.args) != 3 or \
            call.args[0] is not ph or call.args[2] is not idx or type(call.args[1]) is not int or \
            out.args[0] is not call:
        return None
    return call.args[1]


def _type_name(m: nn.Module) -> str:
    return INPUT_SELECT if _input_select_dim(m) is not None else _cls_name(type(m))


def _jsonable(v) -> bool:
    if v is None or type(v) in (bool, int, float, str):
        return True
    return isinstance(v, (tuple, list)) and all(_jsonable(x) for x in v)


def _to_json(v):
    return [_to_json(x) for x in v] if isinstance(v, (tuple, list)) else v


def _from_json(v):
    return tuple(_from_json(x) for x in v) if isinstance(v, list) else v


def _init_args(m: nn.Module) -> Optional[Dict[str, Any]]:
    """The constructor arguments of a module the loader can rebuild (None: it cannot)."""
    dim = _input_select_dim(m)
    if dim is not None:
        return {"dim": dim, "size": int(m.index.numel())}
    entry = _REBUILD.get(_cls_name(type(m)))
    if entry is None:
        return None
    args = entry[1](m)
    if not all(_jsonable(v) for v in args.values()):
        return None
    return {k: _to_json(v) for k, v in args.items()}


def _rebuild(entry: Dict[str, Any]) -> nn.Module:
    """A module of ``entry``'s type and constructor arguments, its tensors on the meta device (the state dict
    is assigned afterwards)."""
    init = entry.get("init")
    if entry["type"] == INPUT_SELECT:
        from .compact.core import input_select
        return input_select(torch.empty(int(init["size"]), dtype=torch.long, device="meta"), int(init["dim"]))
    cls = _REBUILD[entry["type"]][0]
    with torch.device("meta"):
        return cls(**{k: _from_json(v) for k, v in init.items()})


def _rebuildable(entry: Dict[str, Any]) -> bool:
    return entry.get("init") is not None and (entry["type"] == INPUT_SELECT or entry["type"] in _REBUILD)


# -- records -----------------------------------------------------------------------------------------------

def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _spec(t: Optional[torch.Tensor], param: bool) -> Optional[Dict[str, Any]]:
    if t is None:
        return None
    s = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if param:
        s["requires_grad"] = bool(t.requires_grad)
    return s


def _own_tensors(m: nn.Module) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    params = {k: _spec(v, True) for k, v in m._parameters.items()}
    skip = getattr(m, "_non_persistent_buffers_set", set())
    buffers = {k: _spec(v, False) for k, v in m._buffers.items() if k not in skip}
    return params, buffers


def _shapes(specs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (None if v is None else list(v["shape"])) for k, v in specs.items()}


def _scalars(m: nn.Module) -> Dict[str, Any]:
    return {k: v for k, v in vars(m).items()
            if type(v) in (int, float, bool, str, type(None)) and k != "training" and not k.startswith("_")}


def _refuse_graph_module(path: str) -> ValueError:
    where = "the model" if not path else f"module {path!r}"
    return ValueError(f"{where} is a torch.fx.GraphModule (what compact() returns for a model that is not a chain): "
                      f"its generated code cannot be rebuilt without pickle; save it with torch.export.save("
                      f"torch.export.export(model, example_inputs), path) instead")


def _describe(m: nn.Module, path: str) -> Dict[str, Any]:
    t = type(m)
    if t.__module__.startswith("l0kernels"):
        where = "the model" if not path else f"module {path!r}"
        raise ValueError(f"save_compact: {where} ({t.__name__}) is an l0kernels layer: save the compacted model "
                         f"(l0k.compact(model)), not the gated one")
    if isinstance(m, torch.fx.GraphModule) and _input_select_dim(m) is None:
        raise _refuse_graph_module(path)
    params, buffers = _own_tensors(m)
    entry = {"type": _type_name(m),
             "children": [k for k, v in m._modules.items() if v is not None],
             "empty_children": [k for k, v in m._modules.items() if v is None],
             "params": params, "buffers": buffers, "attrs": _scalars(m)}
    init = _init_args(m)
    if init is not None:
        entry["init"] = init
    return entry


def _walk(model: nn.Module) -> Tuple[Dict[str, Any], Dict[str, str]]:
    modules: Dict[str, Any] = {}
    shared: Dict[str, str] = {}
    seen: Dict[int, str] = {}

    def visit(m: nn.Module, path: str):
        if id(m) in seen:
            shared[path] = seen[id(m)]
            return
        seen[id(m)] = path
        modules[path] = _describe(m, path)
        for name, child in m._modules.items():
            if child is not None:
                visit(child, _join(path, name))
    visit(model, "")
    return modules, shared


def _transformers_model(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    return isinstance(base, type) and isinstance(model, base)


def _tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The state dict with every tensor stored once: (stored tensors on the CPU, {alias key: stored key})."""
    sd = model.state_dict(keep_vars=True)
    first: Dict[Any, str] = {}
    tied: Dict[str, str] = {}
    kept: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"save_compact: state dict entry {k!r} is a {type(v).__name__} (a module's extra "
                             f"state), which safetensors cannot hold")
        t = v.detach()
        if t.is_meta:
            raise ValueError(f"save_compact: {k!r} is on the meta device (no values to save)")
        keys = [("object", id(v))]
        if t.numel():
            keys.append(("view", t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                         tuple(t.stride()), t.dtype))
        hit = next((first[x] for x in keys if x in first), None)
        if hit is not None:
            tied[k] = hit
            continue
        for x in keys:
            first[x] = k
        kept[k] = t
    storages: Dict[Any, int] = {}
    for t in kept.values():
        if t.numel():
            s = (t.device, t.untyped_storage().data_ptr())
            storages[s] = storages.get(s, 0) + 1
    out = {}
    for k, t in kept.items():
        # distinct views of one storage (and non-contiguous tensors) are stored as copies of their own
        own = not t.numel() or storages[(t.device, t.untyped_storage().data_ptr())] == 1
        c = t.to("cpu")
        if not own or not c.is_contiguous() or (c.data_ptr() == t.data_ptr() and c.numel() and
                                                c.untyped_storage().nbytes() != c.numel() * c.element_size()):
            c = c.contiguous().clone()
        out[k] = c
    return out, tied


def save_compact(model: nn.Module, directory) -> None:
    """Save a compacted model (what :func:`l0kernels.compact` returns, or any plain ``nn.Module``) in
    ``directory`` (created if needed): ``model.safetensors``, ``compact.json`` (module docstring) and, for a
    ``transformers`` model, ``config.json`` (and ``generation_config.json``). Load with :func:`load_compact`.

    Raises ``ValueError`` for a ``torch.fx.GraphModule`` (its generated code cannot be rebuilt without pickle;
    use ``torch.export.save``), for a model that still holds l0kernels layers (save ``compact(model)``, not the
    gated model) and for state dict entries that are not tensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_compact: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):
        raise _refuse_graph_module("")
    st = _safetensors()
    modules, shared = _walk(model)
    tensors, tied = _tensors(model)
    cls = type(model)
    record: Dict[str, Any] = {"format": FORMAT, "version": VERSION,
                              "class": {"module": cls.__module__, "qualname": cls.__qualname__},
                              "transformers": None, "modules": modules, "shared_modules": shared, "tied": tied}
    hf = _transformers_model(model)
    if hf:
        tf = sys.modules["transformers"]
        attn = getattr(model.config, "_attn_implementation", None)
        record["transformers"] = {
            "class": cls.__name__ if getattr(tf, cls.__name__, None) is cls else None,
            "attn_implementation": attn if isinstance(attn, str) else None}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    st.save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    if hf:
        model.config.to_json_file(os.path.join(directory, CONFIG))
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_file"):
            gen.to_json_file(os.path.join(directory, GENERATION_CONFIG))
    with open(os.path.join(directory, RECORD), "w") as f:
        json.dump(record, f, indent=1)


# -- loading -----------------------------------------------------------------------------------------------

def _build_transformers(directory: str, record: Dict[str, Any]) -> nn.Module:
    info = record.get("transformers")
    saved = record["class"]
    if not info:
        raise ValueError(f"load_compact: model=None builds transformers models only; {directory!r} holds a "
                         f"{saved['module']}.{saved['qualname']}: pass a freshly built dense instance as model=")
    name = info.get("class")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"load_compact: the saved model's class {saved['module']}.{saved['qualname']} is not a "
                         f"class of the transformers package: pass a freshly built dense instance as model=")
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"load_compact: {directory!r} has no {CONFIG} (needed to build the transformers model "
                         f"when model=None)")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_compact: building a transformers model needs the transformers package") from e
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"load_compact: {name!r} is not a model class of the transformers package")
    if (cls.__module__, cls.__qualname__) != (saved["module"], saved["qualname"]):
        raise ValueError(f"load_compact: transformers.{name} is {cls.__module__}.{cls.__qualname__}, but the saved "
                         f"model's class is {saved['module']}.{saved['qualname']}")
    config = cls.config_class.from_json_file(path)
    attn = info.get("attn_implementation")
    if isinstance(attn, str):
        try:
            config._attn_implementation = attn
        except (AttributeError, TypeError, ValueError):  # a transformers version without the setter
            pass
    model = cls(config)
    gen_path = os.path.join(directory, GENERATION_CONFIG)
    if os.path.isfile(gen_path) and getattr(model, "generation_config", None) is not None:
        with open(gen_path) as f:
            model.generation_config = transformers.GenerationConfig.from_dict(json.load(f))
    return model


def _first_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def _matches(m: nn.Module, entry: Dict[str, Any]) -> bool:
    if _type_name(m) != entry["type"]:
        return False
    params, buffers = _own_tensors(m)
    if _shapes(params) != _shapes(entry["params"]) or _shapes(buffers) != _shapes(entry["buffers"]):
        return False
    return entry.get("init") is None or _init_args(m) == entry["init"]


def _describe_tensors(specs: Dict[str, Any]) -> str:
    return ", ".join(f"{k}: {'None' if v is None else tuple(v)}" for k, v in _shapes(specs).items()) or "none"


class _Tree:
    """Makes the given model's module tree the recorded one (module docstring)."""

    def __init__(self, record: Dict[str, Any]):
        self.modules: Dict[str, Any] = record["modules"]
        self.shared: Dict[str, str] = record.get("shared_modules", {})
        self.built: Dict[str, nn.Module] = {}
        self.used: set = set()

    def resolve(self, path: str, candidate: Optional[nn.Module]) -> nn.Module:
        entry = self.modules.get(path)
        if entry is None:
            raise ValueError(f"load_compact: the record has no entry for module {path!r} (corrupt {RECORD})")
        if candidate is not None and _matches(candidate, entry):
            # a module the given model shares but the saved one does not is copied
            m = candidate if id(candidate) not in self.used else _copy(candidate)
        elif _rebuildable(entry):
            m = _rebuild(entry)
        elif candidate is not None and _resizable(candidate, entry):
            m = _resized(candidate if id(candidate) not in self.used else _copy(candidate), entry)
        else:
            where = f"module {path!r} of the saved model" if path else "the saved model"
            if candidate is None:
                why = "is missing in the given model"
            elif _type_name(candidate) != entry["type"]:
                why = f"is a {_type_name(candidate)} in the given model"
            else:
                params, buffers = _own_tensors(candidate)
                why = (f"has parameters ({_describe_tensors(params)}) and buffers ({_describe_tensors(buffers)}) "
                       f"in the given model, the record ({_describe_tensors(entry['params'])}) and "
                       f"({_describe_tensors(entry['buffers'])})")
            raise ValueError(f"load_compact: {where} (type {entry['type']}) {why}, and that type "
                             f"cannot be rebuilt from the record (rebuilt: {', '.join(sorted(_REBUILD))}, "
                             f"{INPUT_SELECT}); pass a model whose module has the saved type and shapes")
        self.used.add(id(m))
        self.built[path] = m
        children: "OrderedDict[str, Optional[nn.Module]]" = OrderedDict()
        for name in entry["children"]:
            child_path = _join(path, name)
            if child_path in self.shared:
                first = self.built.get(self.shared[child_path])
                if first is None:
                    raise ValueError(f"load_compact: shared module {child_path!r} refers to "
                                     f"{self.shared[child_path]!r}, which comes later (corrupt {RECORD})")
                children[name] = first
            else:
                children[name] = self.resolve(child_path, m._modules.get(name))
        for name in entry.get("empty_children", []):
            children[name] = None
        if list(m._modules.items()) != list(children.items()):
            m._modules.clear()
            m._modules.update(children)
        return m


def _resizable(m: nn.Module, entry: Dict[str, Any]) -> bool:
    """A module of the saved type whose own tensors the record has under the same names and ranks, some with
    other sizes (e.g. routed experts held as 3-D Parameters, with fewer units per expert after compact())."""
    if _type_name(m) != entry["type"] or entry.get("init") is not None:
        return False
    params, buffers = _own_tensors(m)
    for have, want in ((_shapes(params), _shapes(entry["params"])), (_shapes(buffers), _shapes(entry["buffers"]))):
        if have.keys() != want.keys():
            return False
        if any((a is None) != (b is None) or (a is not None and len(a) != len(b)) for a, b in
               ((have[k], want[k]) for k in have)):
            return False
    return True


def _resized(m: nn.Module, entry: Dict[str, Any]) -> nn.Module:
    """``m`` with each own tensor whose size the record gives otherwise replaced by an empty one of that size (on
    the meta device: the state dict is loaded with ``assign=True``)."""
    for store, specs in ((m._parameters, entry["params"]), (m._buffers, entry["buffers"])):
        for k, spec in specs.items():
            t = store.get(k)
            if t is None or spec is None or list(t.shape) == list(spec["shape"]):
                continue
            new = torch.empty(spec["shape"], dtype=t.dtype, device="meta")
            store[k] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return m


def _copy(m: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(m)


def _owner(model: nn.Module, key: str) -> Tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def load_compact(directory, model: Optional[nn.Module] = None) -> nn.Module:
    """Load what :func:`save_compact` wrote in ``directory``.

    ``model``: a freshly built dense instance of the saved model's class (its weights are replaced; for what
    ``compact`` returned as an ``nn.Sequential``, an ``nn.Sequential`` built like the original dense one, or an
    empty ``nn.Sequential()`` when every module in it can be rebuilt), or ``None`` for a ``transformers``
    model, which is built from the saved ``config.json``. Returns the model (the given one, unless its own
    tensors had to be rebuilt) with the saved module tree, shapes, scalar attributes, weights (dtypes as saved,
    on the given model's device; tied weights one Parameter again), in eval mode. Reads only safetensors and
    JSON (nothing is unpickled).

    Raises ``ValueError`` when a file is missing, the class differs from the saved one, a module differs and
    its type cannot be rebuilt from the record, or ``model`` is a ``torch.fx.GraphModule``."""
    st = _safetensors()
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"load_compact: {directory!r} is not a directory")
    missing = [f for f in (RECORD, WEIGHTS) if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ValueError(f"load_compact: {directory!r} lacks {' and '.join(missing)} (written by save_compact)")
    with open(os.path.join(directory, RECORD)) as f:
        record = json.load(f)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"load_compact: {RECORD} in {directory!r} is not an l0kernels compact record")
    if record.get("version") != VERSION:
        raise ValueError(f"load_compact: {RECORD} has format version {record.get('version')!r}; this l0kernels "
                         f"reads version {VERSION}")
    saved = record["class"]
    if model is None:
        model = _build_transformers(directory, record)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"load_compact: model must be a torch.nn.Module or None, got {type(model).__name__}")
    elif isinstance(model, torch.fx.GraphModule):
        raise _refuse_graph_module("")
    cls = type(model)
    if (cls.__module__, cls.__qualname__) != (saved["module"], saved["qualname"]):
        raise ValueError(f"load_compact: the saved model is a {saved['module']}.{saved['qualname']}, the given "
                         f"model a {cls.__module__}.{cls.__qualname__}: pass a freshly built instance of the saved "
                         f"class")
    device = _first_device(model)
    if device.type == "meta":
        device = torch.device("cpu")

    tree = _Tree(record)
    model = tree.resolve("", model)
    for path, entry in tree.modules.items():
        m = tree.built[path]
        for k, v in entry.get("attrs", {}).items():
            cur = getattr(m, k, _MISSING)
            if type(cur) is not type(v) or cur != v:
                setattr(m, k, v)

    sd = st.load_file(os.path.join(directory, WEIGHTS), device=str(device))
    # each tensor in its own allocation: the loaded ones share the file's buffer at unaligned offsets, where the
    # CPU matmul kernels take another path and the loaded model would differ from the saved one by rounding
    sd = {k: v.clone() for k, v in sd.items()}
    tied: Dict[str, str] = record.get("tied", {})
    for alias, first in tied.items():
        if first not in sd:
            raise ValueError(f"load_compact: tied entry {alias!r} refers to {first!r}, which {WEIGHTS} lacks")
        sd[alias] = sd[first]
    # the module versions the model's own state dict carries (a module's _load_from_state_dict may read them,
    # as torchvision's MNASNet does)
    sd = OrderedDict(sd)
    sd._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"load_compact: the saved weights do not fit the rebuilt model: {e}") from e
    for alias, first in tied.items():
        owner, attr = _owner(model, first)
        target = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
        a_owner, a_attr = _owner(model, alias)
        if attr in owner._parameters and a_attr in a_owner._parameters:
            a_owner._parameters[a_attr] = target
        elif attr in owner._buffers and a_attr in a_owner._buffers:
            a_owner._buffers[a_attr] = target
    for path, entry in tree.modules.items():
        m = tree.built[path]
        for k, spec in entry["params"].items():
            p = m._parameters.get(k)
            if p is not None and spec is not None and "requires_grad" in spec:
                p.requires_grad_(bool(spec["requires_grad"]))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"load_compact: {name!r} was not loaded (still on the meta device)")
    return model.eval()

