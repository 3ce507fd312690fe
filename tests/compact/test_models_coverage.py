"""convert() and compact() on real model definitions (tests/_model_zoo.py): tiny transformers models built from
configs (Llama, Qwen2 and Mistral with grouped-query attention, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT, Mixtral,
Qwen3-MoE, BERT, RoBERTa, DistilBERT, ViT, T5) and torchvision classification models at a small input, randomly
initialised with trained-looking BatchNorm statistics, in eval mode.

Each model is converted with the defaults, a random 40% of every gate vector is closed, and the model is compacted
(with ``example_inputs``). Checked per model, one test each:

* ``test_compact_is_exact``: the compacted model computes what the gated eval model computes
  (||a - b|| <= 1e-5 ||b||, float32), has no more parameters than the dense model, and a transformers model keeps
  its class;
* ``test_compact_removes_parameters``: parameters are removed where the closed gates must allow it: every model
  listed has a two-layer MLP/FFN (or a conv -> BatchNorm -> activation -> conv chain) whose second layer has 40% of
  its input gates closed (or whose first conv has 40% of its output channels closed), so those hidden units are
  unread (or constant) and can go. Not asserted for the MoE models: transformers keeps their experts as 3-D
  parameters (not nn.Linear), so only the attention projections and the output layer are gated; 40% closed
  per-feature gates close no whole head, and closed inputs of q/k/v and the output layer sit on the residual
  stream (normalised over all its features), so nothing can go;
* ``test_save_load``: ``save_compact`` / ``load_compact`` round trip (bit-identical outputs), into a freshly built
  model of the same class (transformers models: built from the saved config);
* ``test_export``: ``torch.export.export`` of the compacted model, same outputs.

Models that fail a check today are ``xfail(strict=True)`` with the failure as it is (type and first line, checked:
a different failure fails the test), so that a fix flips them and the suite says so. Each model is run once (the
record is cached); the numbers are in docs/results/models_coverage.md (bench/models_coverage.py).
"""
import functools

import pytest

import _model_zoo as zoo

TOL = 1e-5  # docs/design.md §6, float32

# compact fails on these graphs: (exception type, failure as recorded by zoo.failure)
COMPACT_FAILS: dict = {}

# compact keeps every parameter although the closed gates make units removable
NO_REMOVAL: dict = {}
NOT_ASSERTED = {"mixtral", "qwen3-moe"}  # see the module docstring


def _params(test):
    out = []
    for name in zoo.ZOO:
        if test == "removes" and name in NOT_ASSERTED:
            continue
        marks = []
        if name in COMPACT_FAILS:
            marks.append(pytest.mark.xfail(strict=True, raises=ValueError, reason=COMPACT_FAILS[name]))
        elif test == "removes" and name in NO_REMOVAL:
            marks.append(pytest.mark.xfail(strict=True, raises=AssertionError,
                                           reason=f"AssertionError: compact removed no parameter: {NO_REMOVAL[name]}"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@functools.lru_cache(maxsize=None)
def _record(name):
    why = zoo.available(name)
    if why:
        pytest.skip(why)
    return zoo.run(name)


def _reraise(name, r, steps):
    """Raise the recorded exception of the first failed step in ``steps``; an expected failure must be the one
    recorded in COMPACT_FAILS (else the test fails with an AssertionError naming both)."""
    for step in steps:
        e = r["errors"].get(step)
        if e is None:
            continue
        expected = COMPACT_FAILS.get(name)
        if expected is not None and zoo.failure(e) != expected:
            raise AssertionError(f"{name}: {step} failed with {zoo.failure(e)!r}, expected {expected!r}") from e
        raise e


@pytest.mark.parametrize("name", _params("exact"))
def test_compact_is_exact(name, record_property):
    r = _record(name)
    _reraise(name, r, ("build", "convert", "compact", "exact"))
    for k in ("gated_layers", "params_dense", "params_compact", "kept", "rel_err", "compact_s", "result_class"):
        record_property(k, r[k])
    assert r["gated_layers"] > 0
    assert r["rel_err"] <= TOL, f"compacted vs gated eval model: rel err {r['rel_err']:.3g}"
    assert r["params_compact"] <= r["params_dense"]
    assert r["same_class"], f"compact returned a {r['result_class']}"


@pytest.mark.parametrize("name", _params("removes"))
def test_compact_removes_parameters(name):
    r = _record(name)
    _reraise(name, r, ("build", "convert", "compact"))
    if r["params_compact"] >= r["params_dense"]:
        raise AssertionError(f"compact removed no parameter ({r['params_compact']} of {r['params_dense']} kept)")


@pytest.mark.parametrize("name", _params("save"))
def test_save_load(name):
    r = _record(name)
    _reraise(name, r, ("build", "convert", "compact", "exact"))
    _reraise(name, r, ("save_load",))
    assert r["save_load_rel_err"] == 0.0, f"loaded vs compacted: rel err {r['save_load_rel_err']:.3g}"


@pytest.mark.parametrize("name", _params("export"))
def test_export(name):
    r = _record(name)
    _reraise(name, r, ("build", "convert", "compact", "exact", "export"))
    assert r["export_rel_err"] <= TOL, f"exported vs compacted: rel err {r['export_rel_err']:.3g}"
