"""Real model definitions for the coverage test (tests/compact/test_models_coverage.py) and its results table
(bench/models_coverage.py), one copy: tiny ``transformers`` models built from configs and ``torchvision`` classification
models, randomly initialised (BatchNorm statistics and affine parameters randomised so that they look trained),
in eval mode, with small inputs. Nothing is downloaded.

:func:`run` takes one model through the whole path -- ``convert`` with the defaults, a random 40% of every gate
vector closed (``log_alpha`` -10, the rest +10), ``compact`` with ``example_inputs``, the output check against
the gated eval model, ``save_compact`` / ``load_compact`` and ``torch.export.export`` of the compacted model --
and records every step's outcome (the exception of a step that fails) and the numbers (parameter counts,
compact time, CPU latencies).

:func:`define_torchvision_op_schemas` lets the CPU torch import torchvision's PyPI wheel, whose C++ ops do not load
(see the comment below; tests/conftest.py calls it before anything imports transformers, which imports torchvision),
and ``python tests/_model_zoo.py install-torchvision-hook`` makes every process of a virtual environment do so.
"""
from __future__ import annotations

import importlib.util
import copy
import os
import statistics
import sys
import tempfile
import time
import types
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

# -- torchvision on the CPU torch ------------------------------------------------------------------------------
# torchvision's PyPI wheel is a CUDA build: its C++ library (_C_stable.so) needs libc10_cuda.so, which the CPU torch
# does not have, so its ops do not load. torchvision's import then registers fake kernels for torchvision::nms and
# torchvision::qnms with torch.library.register_fake, which raises for an op that does not exist, and the import
# stops (the other ops' registrations are skipped by torchvision itself when its library did not load). The
# classification models use no C++ op: defining the two schemas before the first ``import torchvision`` is enough.
# transformers imports torchvision once pillow is installed (image_utils, on the first model class), so every
# process that imports transformers needs them too: tests/conftest.py calls define_torchvision_op_schemas() first
# thing, and ``python tests/_model_zoo.py install-torchvision-hook`` (.ci/run) writes this source as a module into
# the virtual environment with a .pth line that installs its import hook at start-up (it defines the schemas when
# something first imports torchvision; processes that never do pay one small module import).

TORCHVISION_SHIM = r'''"""Defines torchvision::nms / qnms before torchvision is imported, when its C++ ops do not load with this torch
(written by l0kernels' tests/_model_zoo.py, install-torchvision-hook)."""
import glob
import importlib.util
import os
import sys

_LIB = None  # the torch.library.Library holding the schemas (kept alive: dropping it removes them)


def define_torchvision_op_schemas():
    """Define the two schemas when torchvision is installed, not imported yet, and its library does not load.
    Returns True when it defined them; False (nothing done) otherwise."""
    global _LIB
    if _LIB is not None or "torchvision" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch
    has = lambda: bool(torch._C._jit_get_schemas_for_operator("torchvision::nms"))
    if has():
        return False  # defined already (its library, or another copy of this code)
    for d in spec.submodule_search_locations:
        for lib in sorted(glob.glob(os.path.join(d, "_C*.so"))) + sorted(glob.glob(os.path.join(d, "_C*.pyd"))):
            try:
                torch.ops.load_library(lib)  # what torchvision's own import tries first (extension.py)
            except (OSError, RuntimeError):
                continue
            if has():
                return False  # its ops load: nothing to do
    # the schemas torchvision's C++ library defines (csrc/ops/nms.cpp, ops/quantized/cpu/qnms_kernel.cpp)
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


class _Hook:
    """A sys.meta_path entry: defines the schemas when something first imports torchvision, then leaves."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                define_torchvision_op_schemas()
            except Exception:  # never break an import: torchvision then fails as it would have
                pass
        return None


def install():
    if not any(type(f).__name__ == "_Hook" and type(f).__module__ == __name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
'''

_shim = types.ModuleType("_l0k_torchvision_shim")
exec(compile(TORCHVISION_SHIM, "<tests/_model_zoo.py: TORCHVISION_SHIM>", "exec"), _shim.__dict__)
define_torchvision_op_schemas = _shim.define_torchvision_op_schemas
HOOK_MODULE = "l0k_torchvision_cpu_ops"


def install_torchvision_hook(site_dir: Optional[str] = None) -> str:
    """Write TORCHVISION_SHIM as ``l0k_torchvision_cpu_ops.py`` and a ``.pth`` line installing its hook into
    ``site_dir`` (this environment's site-packages by default); returns the .pth path."""
    import sysconfig
    site_dir = site_dir or sysconfig.get_paths()["purelib"]
    with open(os.path.join(site_dir, HOOK_MODULE + ".py"), "w") as f:
        f.write(TORCHVISION_SHIM)
    pth = os.path.join(site_dir, HOOK_MODULE + ".pth")
    with open(pth, "w") as f:
        f.write(f"import {HOOK_MODULE}; {HOOK_MODULE}.install()\n")
    return pth


# -- the zoo ---------------------------------------------------------------------------------------------------

VOCAB, SEQ, BATCH = 128, 12, 2
IMAGE = 64  # torchvision models: 1 x 3 x 64 x 64
CLOSED, OPEN, CLOSED_FRACTION = -10.0, 10.0, 0.4


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _ids(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(name) + 1)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)  # 0-2: pad / bos / eos


def _image(name: str, size: int = IMAGE) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(name) + 1)
    return torch.randn(1, 3, size, size, generator=g)


_TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(_TOKENS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, use_cache=False)


def _hf(cls_name: str, cfg_name: str, **cfg) -> Callable[[], nn.Module]:
    def build():
        import transformers
        config = getattr(transformers, cfg_name)(**cfg)
        return getattr(transformers, cls_name)(config)
    return build


def _tv(fn_name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import torchvision
        return getattr(torchvision.models, fn_name)(weights=None, **kw)
    return build


class Entry:
    """One model of the zoo: ``build()`` -> the dense model, ``inputs(name)`` -> a tuple of positional inputs,
    ``family``: "transformers" or "torchvision"."""

    def __init__(self, build, inputs, family):
        self.build, self.inputs, self.family = build, inputs, family


def _text(name):
    return (_ids(name),)


def _t5_inputs(name):
    ids = _ids(name)
    return (ids, None, ids[:, :7])  # input_ids, attention_mask, decoder_input_ids


def _vit_inputs(name):
    return (_image(name, 32),)


def _tv_inputs(name):
    return (_image(name),)


ZOO: Dict[str, Entry] = {}


def _add(name, build, inputs, family):
    ZOO[name] = Entry(build, inputs, family)


# transformers: 2 layers, hidden 32-64, 4 heads, vocab 128
_add("llama", _hf("LlamaForCausalLM", "LlamaConfig", **_DECODER), _text, "transformers")
_add("llama-gqa", _hf("LlamaForCausalLM", "LlamaConfig", **dict(_DECODER, num_key_value_heads=2)), _text,
     "transformers")
_add("qwen2-gqa", _hf("Qwen2ForCausalLM", "Qwen2Config", **dict(_DECODER, num_key_value_heads=2)), _text,
     "transformers")
_add("mistral", _hf("MistralForCausalLM", "MistralConfig", **dict(_DECODER, num_key_value_heads=2, sliding_window=8)),
     _text, "transformers")
_add("gemma", _hf("GemmaForCausalLM", "GemmaConfig", **dict(_DECODER, num_key_value_heads=1, head_dim=16)), _text,
     "transformers")
_add("phi3", _hf("Phi3ForCausalLM", "Phi3Config", **dict(_DECODER, num_key_value_heads=2)), _text, "transformers")
_add("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=64, n_head=4, n_positions=64, use_cache=False,
                 **_TOKENS), _text, "transformers")
_add("gpt-neox", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **_DECODER), _text, "transformers")
_add("opt", _hf("OPTForCausalLM", "OPTConfig", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64, use_cache=False,
                **_TOKENS), _text, "transformers")
_add("mixtral", _hf("MixtralForCausalLM", "MixtralConfig", **dict(_DECODER, num_key_value_heads=2,
                                                                   num_local_experts=4, num_experts_per_tok=2)),
     _text, "transformers")
_add("qwen3-moe", _hf("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                      **dict(_DECODER, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=64, decoder_sparse_step=1)), _text, "transformers")
_ENC = dict(_TOKENS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
_add("bert", _hf("BertModel", "BertConfig", **_ENC), _text, "transformers")
_add("roberta", _hf("RobertaModel", "RobertaConfig", **dict(_ENC, pad_token_id=1)), _text, "transformers")
_add("distilbert", _hf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, pad_token_id=0, dim=64,
                       hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=64), _text, "transformers")
_add("vit-hf", _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=10), _vit_inputs,
     "transformers")
_add("t5", _hf("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
               num_heads=4, use_cache=False), _t5_inputs, "transformers")

# torchvision classification models (10 classes), 1 x 3 x 64 x 64
for _n in ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
           "squeezenet1_0", "densenet121", "regnet_x_400mf", "convnext_tiny", "swin_t", "mnasnet0_5"):
    _add(_n, _tv(_n, num_classes=10), _tv_inputs, "torchvision")
_add("googlenet", _tv("googlenet", num_classes=10, aux_logits=False, init_weights=False), _tv_inputs, "torchvision")
_add("vit_b_16", _tv("vit_b_16", num_classes=10, image_size=32), _vit_inputs, "torchvision")
# MaxViT's block partition needs sides divisible by 7 * 32: it runs at 224 x 224 only (about 1 s a forward here)
_add("maxvit_t", _tv("maxvit_t", num_classes=10), lambda name: (_image(name, 224),), "torchvision")

TRANSFORMERS = [n for n, e in ZOO.items() if e.family == "transformers"]
TORCHVISION = [n for n, e in ZOO.items() if e.family == "torchvision"]


def available(name: str) -> Optional[str]:
    """None when ``name`` can be built here, else why not (a missing package)."""
    pkg = ZOO[name].family
    return None if importlib.util.find_spec(pkg) is not None else f"{pkg} is not installed"


def _randomise_norms(model: nn.Module, g: torch.Generator) -> None:
    """BatchNorm running statistics and affine parameters that look trained (random init leaves mean 0, var 1,
    weight 1, bias 0: closed channels would then be exactly 0 after BN + ReLU, an easier case than a trained
    model's)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.2 * torch.randn(n, generator=g))


def build(name: str) -> Tuple[nn.Module, tuple]:
    """The dense model (random init, eval mode) and its example inputs."""
    e = ZOO[name]
    torch.manual_seed(_seed(name))
    model = e.build()
    _randomise_norms(model, torch.Generator().manual_seed(_seed(name) + 2))
    return model.eval(), e.inputs(name)


def close_gates(model: nn.Module, name: str, fraction: float = CLOSED_FRACTION) -> int:
    """Close a random ``fraction`` of every gate vector (``log_alpha`` -10), open the rest (+10); returns the
    number of modules owning gates (L0 layers, experts' unit gates)."""
    import l0kernels as l0k
    g = torch.Generator().manual_seed(_seed(name) + 3)
    n = 0
    with torch.no_grad():
        for _, m in l0k.l0_gates(model):
            la = m.log_alpha
            flat = torch.full((la.numel(),), OPEN, dtype=la.dtype)
            flat[torch.randperm(la.numel(), generator=g)[:round(fraction * la.numel())]] = CLOSED
            la.copy_(flat.view(la.shape))
            n += 1
    return n


def n_params(model: nn.Module) -> int:
    """Parameters without the gates' ``log_alpha`` (shared ones once)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("log_alpha"))


def main_output(out) -> torch.Tensor:
    """A model output's main tensor: the tensor itself, the first of a tuple, ``logits`` or ``last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    return out.to_tuple()[0]


def outputs(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """The model's main output on ``inputs`` (eval mode as set, no grad)."""
    with torch.no_grad():
        return main_output(model(*inputs))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (inf for a NaN or a shape mismatch)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    d = float((a - b).norm())
    return d / float(b.norm()) if float(b.norm()) > 0 else d


def latencies(models: Dict[str, nn.Module], inputs: tuple, runs: int = 5) -> Dict[str, float]:
    """Median seconds of ``runs`` timed eval forwards of each model (after two warm-up calls each), the models' calls
    interleaved so that other load on the machine hits them alike."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            for m in models.values():
                m(*inputs)
        for _ in range(runs):
            for k, m in models.items():
                t = time.perf_counter()
                m(*inputs)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def failure(e: BaseException) -> str:
    """``Type: first line`` of an exception (for the table and the xfail reasons)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


STEPS = ("build", "convert", "compact", "exact", "save_load", "export")


def run(name: str, *, latency_runs: int = 0, save_dir: Optional[str] = None) -> Dict[str, Any]:
    """Take ``name`` through build, convert, close gates, compact, save/load and export. Returns a record:
    ``errors`` {step: exception} for the steps that failed (a step after a failed one is not run; save_load and
    export both run once the compacted model computes), and the numbers: ``gated_layers``, ``params_dense``,
    ``params_compact``, ``kept`` (fraction of the dense model's parameters), ``rel_err`` (compacted vs gated eval
    model), ``compact_s``, ``result_class``, ``same_class``, ``save_load_rel_err``,
    ``export_rel_err`` and, with ``latency_runs``, ``latency_s`` {"dense", "gated"[, "compact"]: median seconds}."""
    import l0kernels as l0k
    r: Dict[str, Any] = {"name": name, "family": ZOO[name].family, "errors": {}}
    timed: Dict[str, nn.Module] = {}

    def step(key, fn):
        try:
            return fn()
        except Exception as e:  # recorded: the test re-raises it, the bench reports it
            r["errors"][key] = _bare(e)
            raise _Stop() from None

    try:
        model, inputs = step("build", lambda: build(name))
        r["params_dense"] = n_params(model)
        if latency_runs:
            timed["dense"] = copy.deepcopy(model)
        step("convert", lambda: l0k.convert(model))
        r["gated_layers"] = close_gates(model, name)
        model.eval()
        ref = step("convert", lambda: outputs(model, inputs))
        timed["gated"] = model
        t = time.perf_counter()
        small = step("compact", lambda: l0k.compact(model, example_inputs=inputs))
        r["compact_s"] = time.perf_counter() - t
        r["result_class"] = type(small).__name__
        r["same_class"] = type(small) is type(model)
        r["params_compact"] = n_params(small)
        r["kept"] = r["params_compact"] / r["params_dense"]
        out = step("exact", lambda: outputs(small, inputs))
        r["rel_err"] = rel_err(out, ref)
        timed["compact"] = small
        try:
            step("save_load", lambda: _save_load(r, small, inputs, out, save_dir))
        except _Stop:
            pass
        step("export", lambda: _export(r, small, inputs, out))
    except _Stop:
        pass
    if latency_runs and "gated" in timed:
        r["latency_s"] = latencies(timed, inputs, latency_runs)
    return r


class _Stop(Exception):
    pass


def _bare(e: BaseException) -> BaseException:
    """``e`` without tracebacks along its cause / context chain (they hold the models' frames alive)."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        x.__traceback__ = None
        x = x.__cause__ or x.__context__
    return e


def _save_load(r, small, inputs, out, save_dir):
    import l0kernels as l0k
    with tempfile.TemporaryDirectory(dir=save_dir) as d:
        l0k.save_compact(small, d)
        if r["family"] == "transformers":
            loaded = l0k.load_compact(d)
        else:  # a freshly built dense model of the same class: the modules compact changed are rebuilt
            loaded = l0k.load_compact(d, ZOO[r["name"]].build())
    r["save_load_rel_err"] = rel_err(outputs(loaded, inputs), out)


def _export(r, small, inputs, out):
    args = tuple(inputs)
    kwargs = {}
    if r["name"] == "t5":  # positional None (attention_mask) is not an export input
        args, kwargs = (inputs[0],), {"decoder_input_ids": inputs[2]}
    ep = torch.export.export(small, args, kwargs)
    with torch.no_grad():
        got = main_output(ep.module()(*args, **kwargs))
    r["export_rel_err"] = rel_err(got, out)


if __name__ == "__main__":
    if sys.argv[1:] == ["install-torchvision-hook"]:
        print("wrote", install_torchvision_hook())
    else:
        sys.exit("usage: python tests/_model_zoo.py install-torchvision-hook")
