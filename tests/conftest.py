"""Test configuration.

Without a CUDA device the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must
be set before any ``@triton.jit`` function is defined, so it is set here, before l0kernels'
Triton backend can be imported. GPU tests are marked ``gpu`` and skip without CUDA. Tests run with one
intra-op thread (``L0K_TEST_THREADS``).
"""
import os

import pytest
import torch

from _model_zoo import define_torchvision_op_schemas  # noqa: E402  (tests/; imports only torch)

# torchvision's PyPI wheel is a CUDA build: its C++ ops do not load with the CPU torch, and its import (which
# transformers does too, once pillow is installed) then stops on torchvision::nms / qnms. Define those two schemas
# before anything imports transformers or torchvision; nothing is done without torchvision or where its ops load.
define_torchvision_op_schemas()

HAS_CUDA = torch.cuda.is_available()

# One intra-op thread (L0K_TEST_THREADS to change it): on a small shared machine (CI: 2 cores) PyTorch's
# thread pool spins against the other load, and single tests ran 10-25x slower with 2 threads (the
# SparsityTarget convergence tests: 61-79 s against 6.7 s with one thread). No test depends on threads;
# the package's C++ CPU kernels are single-threaded.
torch.set_num_threads(int(os.environ.get("L0K_TEST_THREADS", "1")))
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The device backends take their open-set kernels only once a layer's open fraction is at most
# L0K_TRITON_SKIP_BELOW / L0K_CUDA_SKIP_BELOW (0.5 by default): the tests run them at every density (1.0: always),
# and test_sparse_train.py::test_triton_open_fraction_rule tests the rule itself.
os.environ.setdefault("L0K_TRITON_SKIP_BELOW", "1")

MNIST_DIR = os.environ.get(
    "L0K_MNIST_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker (a folder named gpu is a keyword too)
            item.add_marker(skip)


def rel(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute norm where ref is 0); a NaN in out fails."""
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    assert not torch.isnan(out).any(), "NaN in output"
    den = ref.norm()
    return float((out - ref).norm() / den) if den > 0 else float((out - ref).norm())


def zoo_model(name):
    """``(model, inputs)`` of tests/_model_zoo.py's ``name``, in eval mode; the test is skipped where that model
    cannot be built here."""
    import _model_zoo as zoo
    why = zoo.available(name)
    if why:
        pytest.skip(why)
    model, inputs = zoo.build(name)
    return model.eval(), inputs


@pytest.fixture
def rel_err():
    return rel


@pytest.fixture
def registry(monkeypatch):
    """Register backends for one test only (the registry is restored afterwards)."""
    from l0kernels._dispatch import _REGISTRY
    import l0kernels as l0k
    l0k.available_backends()

    def add(b):
        monkeypatch.setitem(_REGISTRY, b.name, b)
        return b
    return add


# docs/design.md §6 tolerances against the float64 torch reference
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
TOL_TF32 = 1e-3



from l0kernels._dispatch import Backend, get_backend  # noqa: E402  (after TRITON_INTERPRET is set above)


class RecordingBackend(Backend):
    """The tests' stand-in backend: runs the torch backend's ops and records the calls it gets in
    ``self.calls``; subclasses set ``name``, ``priority`` and ``auto`` (whether ``auto`` may pick it)."""

    auto = True

    def __init__(self):
        self.calls = []

    def auto_eligible(self, call):
        return self.auto

    def unsupported_linear(self, call):
        return None

    def unsupported_conv2d(self, call):
        return None

    def linear(self, call):
        self.calls.append(call)
        return get_backend("torch").linear(call)

    def conv2d(self, call):
        self.calls.append(call)
        return get_backend("torch").conv2d(call)


def log_alpha_at_density(ngates: int, density, generator: torch.Generator, jitter: float = 0.0) -> torch.Tensor:
    """float32 ``log_alpha`` whose training gates are open at about ``density`` (open ones near 4, closed
    ones near -9: open with probability 0.999 / 1e-4), or with exactly one gate open (``density="one"``);
    ``jitter`` adds that much normal noise."""
    if density == "one":
        la = torch.full((ngates,), -9.0)
        la[ngates // 2] = 9.0
        return la
    la = torch.where(torch.rand(ngates, generator=generator) < density, torch.tensor(4.0), torch.tensor(-9.0))
    return la + jitter * torch.randn(ngates, generator=generator) if jitter else la


def randomize_bn(bn):
    """Trained-looking BatchNorm statistics and affine parameters (random, in place)."""
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
