"""Bad input (docs/design.md §5): ValueError / TypeError naming the argument, raised before any kernel runs,
leaving modules and PyTorch's RNG untouched."""
import math

import pytest
import torch
from torch import nn

import l0kernels as l0k
from l0kernels import L0Conv2d, L0Linear


def _lin(m=4, n=3, k=5, gate="in", dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen, dtype=dtype)
    w = torch.randn(n, k, generator=gen, dtype=dtype)
    la = torch.randn({"in": (k,), "out": (n,), "weight": (n, k)}[gate], generator=gen, dtype=dtype)
    b = torch.randn(n, generator=gen, dtype=dtype)
    return x, w, la, b


def _conv(bsz=2, cin=4, cout=6, hw=(7, 6), k=3, groups=1):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, cin, *hw, generator=gen)
    w = torch.randn(cout, cin // groups, k, k, generator=gen)
    return x, w, torch.randn(cout, generator=gen), torch.randn(cout, generator=gen)


X, W, LA, B = _lin()
CX, CW, CLA, CB = _conv()


def lin(**kw):
    args = dict(x=X, weight=W, log_alpha=LA, bias=B)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return lambda: l0k.l0_linear(args["x"], args["weight"], args["log_alpha"], args["bias"], **kw)


def conv(**kw):
    args = dict(x=CX, weight=CW, log_alpha=CLA, bias=CB)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return lambda: l0k.l0_conv2d(args["x"], args["weight"], args["log_alpha"], args["bias"], **kw)


# (id, call, exception, regex that names the argument)
CASES = [
    # l0_linear: tensors
    ("lin-x-not-tensor", lin(x=X.tolist()), TypeError, r"^x must be a torch\.Tensor"),
    ("lin-x-int-dtype", lin(x=X.to(torch.int64)), TypeError, r"^x must have a floating dtype"),
    ("lin-weight-1d", lin(weight=W[0]), ValueError, r"^weight must be 2-D"),
    ("lin-x-K-mismatch", lin(x=X[:, :4]), ValueError, r"^x must have shape \(\.\.\., in_features=5\)"),
    ("lin-x-0d", lin(x=torch.tensor(1.0)), ValueError, r"^x must have shape"),
    ("lin-weight-dtype", lin(weight=W.double()), TypeError, r"^weight must have the dtype of x"),
    ("lin-log_alpha-dtype", lin(log_alpha=LA.half()), TypeError, r"^log_alpha must have the dtype of x"),
    ("lin-bias-dtype", lin(bias=B.double()), TypeError, r"^bias must have the dtype of x"),
    ("lin-weight-device", lin(weight=W.to("meta")), ValueError, r"^weight must be on the device of x"),
    ("lin-log_alpha-device", lin(log_alpha=LA.to("meta")), ValueError, r"^log_alpha must be on the device of x"),
    ("lin-bias-device", lin(bias=B.to("meta")), ValueError, r"^bias must be on the device of x"),
    ("lin-log_alpha-shape-in", lin(log_alpha=torch.randn(3)), ValueError, r"^log_alpha must have shape \(5,\)"),
    ("lin-log_alpha-shape-out", lin(gate="out"), ValueError, r"^log_alpha must have shape \(3,\) for gate='out'"),
    ("lin-log_alpha-shape-weight", lin(gate="weight"), ValueError, r"^log_alpha must have shape \(3, 5\)"),
    ("lin-bias-shape", lin(bias=torch.randn(5)), ValueError, r"^bias must have shape \(3,\)"),
    ("lin-bias-not-tensor", lin(bias=[0.0, 0.0, 0.0]), TypeError, r"^bias must be a torch\.Tensor"),
    # l0_linear: options
    ("lin-gate-unknown", lin(gate="column"), ValueError, r"^gate must be one of"),
    ("lin-noise-unknown", lin(noise="example"), ValueError, r"^noise must be one of"),
    ("lin-backend-unknown", lin(backend="gpu"), ValueError, r"^backend must be one of"),
    ("lin-sample-weight", lin(gate="weight", log_alpha=torch.randn(3, 5), noise="sample"), ValueError,
     r"noise='sample' is not defined for gate='weight'"),
    ("lin-training-not-bool", lin(training=1), TypeError, r"^training must be a bool"),
    ("lin-seed-negative", lin(seed=-1), ValueError, r"^seed must be in \[0, 2\*\*63\)"),
    ("lin-seed-too-big", lin(seed=2**63), ValueError, r"^seed must be in \[0, 2\*\*63\)"),
    ("lin-seed-float", lin(seed=3.0), TypeError, r"^seed must be an int"),
    ("lin-seed-bool", lin(seed=True), TypeError, r"^seed must be an int"),
    ("lin-seed-eval-still-checked", lin(seed=-5, training=False), ValueError, r"^seed must be in"),
    ("lin-beta-nan", lin(beta=float("nan")), ValueError, r"^beta must be finite"),
    ("lin-gamma-inf", lin(gamma=-math.inf), ValueError, r"^gamma must be finite"),
    ("lin-zeta-str", lin(zeta="1.1"), TypeError, r"^zeta must be a real number"),
    ("lin-gamma-nonneg", lin(gamma=0.0), ValueError, r"^gamma must be < 0"),
    ("lin-zeta-le-1", lin(zeta=1.0), ValueError, r"^zeta must be > 1"),
    ("lin-beta-le-0", lin(beta=0.0), ValueError, r"^beta must be > 0"),
    ("lin-eps-range", lin(eps=0.7), ValueError, r"^eps must be in"),
    # l0_conv2d
    ("conv-x-3d", conv(x=CX[0]), ValueError, r"^x must be 4-D"),
    ("conv-weight-2d", conv(weight=CW[:, :, 0, 0]), ValueError, r"^weight must be 4-D"),
    ("conv-x-int", conv(x=CX.to(torch.int32)), TypeError, r"^x must have a floating dtype"),
    ("conv-weight-dtype", conv(weight=CW.double()), TypeError, r"^weight must have the dtype of x"),
    ("conv-log_alpha-device", conv(log_alpha=CLA.to("meta")), ValueError, r"^log_alpha must be on the device of x"),
    ("conv-stride-0", conv(stride=0), ValueError, r"^stride must be >= 1"),
    ("conv-stride-triple", conv(stride=(1, 1, 1)), TypeError, r"^stride must be an int or a pair"),
    ("conv-padding-neg", conv(padding=(0, -1)), ValueError, r"^padding must be >= 0"),
    ("conv-padding-float", conv(padding=1.0), TypeError, r"^padding must be an int or a pair"),
    ("conv-dilation-0", conv(dilation=0), ValueError, r"^dilation must be >= 1"),
    ("conv-dilation-bool", conv(dilation=True), TypeError, r"^dilation must be an int or a pair"),
    ("conv-groups-0", conv(groups=0), ValueError, r"^groups must be >= 1"),
    ("conv-groups-float", conv(groups=2.0), TypeError, r"^groups must be an int"),
    ("conv-channels-mismatch", conv(x=CX[:, :3]), ValueError, r"^x must have 4 channels"),
    ("conv-channels-groups-mismatch", conv(groups=2), ValueError, r"^x must have 8 channels"),
    ("conv-out-channels-groups", conv(x=torch.randn(2, 8, 7, 6), weight=torch.randn(6, 2, 3, 3), groups=4),
     ValueError, r"^weight's out_channels \(6\) must be divisible by groups"),
    ("conv-spatial-too-small", conv(x=torch.randn(2, 4, 2, 6)), ValueError, r"^x's spatial size \(2, 6\)"),
    ("conv-spatial-too-small-dilated", conv(dilation=(1, 3)), ValueError, r"^x's spatial size"),
    ("conv-log_alpha-shape", conv(log_alpha=torch.randn(6, 1)), ValueError, r"^log_alpha must have shape \(6,\)"),
    ("conv-bias-shape", conv(bias=torch.randn(4)), ValueError, r"^bias must have shape \(6,\)"),
    ("conv-noise-unknown", conv(noise="channel"), ValueError, r"^noise must be one of"),
    ("conv-backend-unknown", conv(backend="cudnn"), ValueError, r"^backend must be one of"),
    ("conv-seed-huge", conv(seed=2**64), ValueError, r"^seed must be in"),
    ("conv-zeta-nan", conv(zeta=math.nan), ValueError, r"^zeta must be finite"),
    # gates and penalties
    ("sample-log_alpha-list", lambda: l0k.sample_gates([0.0, 1.0], 1), TypeError, r"^log_alpha must be a torch\.Tensor"),
    ("sample-log_alpha-int", lambda: l0k.sample_gates(torch.arange(3), 1), TypeError, r"^log_alpha must have a floating"),
    ("sample-seed-tensor-float", lambda: l0k.sample_gates(LA, torch.tensor(2.0)), TypeError, r"^seed must be an int"),
    ("sample-seed-none", lambda: l0k.sample_gates(LA, None), TypeError, r"^seed must be an int"),
    ("sample-shape-mismatch", lambda: l0k.sample_gates(LA, 1, (4, 3)), ValueError, r"^shape must end with"),
    ("sample-shape-negative", lambda: l0k.sample_gates(LA, 1, (-1, 5)), ValueError, r"^shape must have non-negative"),
    ("sample-shape-str", lambda: l0k.sample_gates(LA, 1, "5"), TypeError, r"^shape must be a sequence of ints"),
    ("sample-shape-float", lambda: l0k.sample_gates(LA, 1, (2.5, 5)), TypeError, r"^shape must be a sequence of ints"),
    ("sample-beta-neg", lambda: l0k.sample_gates(LA, 1, beta=-1.0), ValueError, r"^beta must be > 0"),
    ("det-gamma-pos", lambda: l0k.deterministic_gates(LA, gamma=0.1), ValueError, r"^gamma must be < 0"),
    ("det-log_alpha-numpy", lambda: l0k.deterministic_gates(LA.numpy()), TypeError, r"^log_alpha must be a torch"),
    ("prob-zeta-inf", lambda: l0k.prob_open(LA, zeta=math.inf), ValueError, r"^zeta must be finite"),
    ("prob-log_alpha-bool", lambda: l0k.prob_open(LA > 0), TypeError, r"^log_alpha must have a floating"),
    ("expected_l0-beta-bool", lambda: l0k.expected_l0(LA, beta=True), TypeError, r"^beta must be a real number"),
    ("philox-offsets-float", lambda: l0k.philox_uniform(1, LA), TypeError, r"^offsets must have an integer"),
    ("philox-offsets-negative", lambda: l0k.philox_uniform(1, torch.tensor([-2])), ValueError, r"^offsets must be >= 0"),
    ("philox-seed-float", lambda: l0k.philox_uniform(1.5, 4), TypeError, r"^seed must be an int"),
    ("philox-seed-negative", lambda: l0k.philox_uniform(-1, 4), ValueError, r"^seed must be in"),
    # modules
    ("L0Linear-in_features-neg", lambda: L0Linear(-1, 3), ValueError, r"^in_features must be >= 0"),
    ("L0Linear-out_features-float", lambda: L0Linear(3, 2.0), TypeError, r"^out_features must be an int"),
    ("L0Linear-gate", lambda: L0Linear(3, 2, gate="rows"), ValueError, r"^gate must be one of"),
    ("L0Linear-noise", lambda: L0Linear(3, 2, noise="per-row"), ValueError, r"^noise must be one of"),
    ("L0Linear-backend", lambda: L0Linear(3, 2, backend="fast"), ValueError, r"^backend must be one of"),
    ("L0Linear-sample-weight", lambda: L0Linear(3, 2, gate="weight", noise="sample"), ValueError,
     r"noise='sample' is not defined for gate='weight'"),
    ("L0Linear-droprate-1", lambda: L0Linear(3, 2, droprate_init=1.0), ValueError, r"^droprate_init must be in"),
    ("L0Linear-droprate-0", lambda: L0Linear(3, 2, droprate_init=0.0), ValueError, r"^droprate_init must be in"),
    ("L0Linear-droprate-str", lambda: L0Linear(3, 2, droprate_init="0.5"), TypeError, r"^droprate_init must be a float"),
    ("L0Linear-gamma", lambda: L0Linear(3, 2, gamma=0.5), ValueError, r"^gamma must be < 0"),
    ("L0Conv2d-kernel-0", lambda: L0Conv2d(4, 6, 0), ValueError, r"^kernel_size must be >= 1"),
    ("L0Conv2d-stride-0", lambda: L0Conv2d(4, 6, 3, stride=0), ValueError, r"^stride must be >= 1"),
    ("L0Conv2d-padding-neg", lambda: L0Conv2d(4, 6, 3, padding=-1), ValueError, r"^padding must be >= 0"),
    ("L0Conv2d-dilation-tuple3", lambda: L0Conv2d(4, 6, 3, dilation=(1, 1, 1)), TypeError, r"^dilation must be"),
    ("L0Conv2d-groups-0", lambda: L0Conv2d(4, 6, 3, groups=0), ValueError, r"^groups must be"),
    ("L0Conv2d-groups-divide", lambda: L0Conv2d(4, 6, 3, groups=4), ValueError,
     r"^in_channels \(4\) and out_channels \(6\) must be divisible by groups"),
    ("L0Conv2d-in_channels-str", lambda: L0Conv2d("4", 6, 3), TypeError, r"^in_channels must be an int"),
    ("L0Conv2d-zeta", lambda: L0Conv2d(4, 6, 3, zeta=0.9), ValueError, r"^zeta must be > 1"),
    ("L0Conv2d-droprate", lambda: L0Conv2d(4, 6, 3, droprate_init=-0.1), ValueError, r"^droprate_init must be in"),
    ("reg-model-not-module", lambda: l0k.l0_regularizer([L0Linear(2, 2)]), TypeError, r"^model must be a torch\.nn\.Module"),
    ("reg-model-no-l0", lambda: l0k.l0_regularizer(nn.Linear(2, 2)), ValueError, r"^model has no gates"),
    ("reg-N-0", lambda: l0k.l0_regularizer(L0Linear(2, 2), N=0), ValueError, r"^N \(training-set size\) must be"),
    ("reg-N-float", lambda: l0k.l0_regularizer(L0Linear(2, 2), N=10.0), ValueError, r"^N \(training-set size\)"),
    ("reg-lamba-length", lambda: l0k.l0_regularizer(nn.Sequential(L0Linear(2, 2), L0Linear(2, 2)), [0.1]),
     ValueError, r"^lamba has 1 values"),
    ("penalty-no-l0", lambda: l0k.l0_penalty(nn.Sequential(nn.Linear(2, 2))), ValueError, r"^model has no gates"),
    ("GateConfig-eps", lambda: l0k.GateConfig(eps=0.0), ValueError, r"^eps must be in"),
]


def test_enough_distinct_cases():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) and len(ids) >= 25


@pytest.fixture
def no_kernels(monkeypatch):
    """Every backend fails the test if one of its ops is called: errors must come before any kernel."""
    from l0kernels._dispatch import _REGISTRY, available_backends
    available_backends()  # load the lazy backends so they are patched too
    for b in list(_REGISTRY.values()):
        for op in ("linear", "conv2d"):
            def boom(call, _op=op, _b=b.name):
                raise AssertionError(f"backend {_b}.{_op} ran on a malformed call")
            monkeypatch.setattr(b, op, boom)


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_malformed_call_raises_naming_argument(name, call, exc, match, no_kernels):
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=match):
        call()
    if name.startswith(("lin-", "conv-")):  # a rejected op did not draw its seed from PyTorch's generator
        assert torch.equal(rng, torch.get_rng_state())


def test_valid_calls_do_reach_the_backend(no_kernels):
    # the fixture really intercepts kernels (so the test above is not vacuous)
    with pytest.raises(AssertionError, match="ran on a malformed call"):
        l0k.l0_linear(X, W, LA, B, seed=1, backend="torch")
    with pytest.raises(AssertionError, match="ran on a malformed call"):
        l0k.l0_conv2d(CX, CW, CLA, CB, seed=1, backend="torch")


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, {k: getattr(m, k) for k in vars(m)
                                                                if not k.startswith("_")}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_failed_forward_leaves_module_untouched(kind, training, no_kernels):
    torch.manual_seed(0)
    if kind == "linear":
        m = L0Linear(5, 3, gate="out")
        good = torch.randn(4, 5)
        bad = [torch.randn(4, 6), torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5).to(torch.int32),
               torch.randn(4, 5, device="meta"), [[0.0] * 5]]
    else:
        m = L0Conv2d(4, 6, 3, padding=1)
        good = torch.randn(2, 4, 8, 7)
        bad = [torch.randn(2, 5, 11, 11), torch.randn(2, 4, 9, 9, dtype=torch.float64), torch.randn(4, 9, 9),
               torch.randn(2, 4, 9, 9, device="meta"), torch.randn(1, 4, 9, 9).to(torch.int64)]
    m.train(training)
    if not training:  # build the eval cache with a good call first (the patched backends are not used in eval)
        with torch.no_grad():
            m(good)
    elif kind == "conv":
        m.input_hw = (8, 7)  # as after a good call
    state, attrs = _snapshot(m)
    rng = torch.get_rng_state()
    for x in bad:
        with pytest.raises((ValueError, TypeError), match=r"\bx\b"):
            m(x)
    after_state, after_attrs = _snapshot(m)
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    assert attrs == after_attrs
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("kw, exc, match", [
    (dict(lamba=-0.1), ValueError, "lamba"),
    (dict(lamba=float("nan")), ValueError, "lamba"),
    (dict(lamba="0.1"), TypeError, "lamba"),
    (dict(lamba=[0.1, True]), TypeError, "lamba"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay"),
    (dict(weight_decay=None), TypeError, "weight_decay"),
])
def test_regularizer_coefficients_are_checked(kw, exc, match):
    model = torch.nn.Sequential(l0k.L0Linear(4, 3), torch.nn.ReLU(), l0k.L0Linear(3, 2))
    with pytest.raises(exc, match=match):
        l0k.l0_regularizer(model, **kw)
    if not isinstance(kw.get("lamba"), list):
        with pytest.raises(exc, match=match):
            model[0].regularizer(**{"lamba": 0.1, **kw})
