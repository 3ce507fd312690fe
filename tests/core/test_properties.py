"""Property-based tests of ``l0_linear`` and ``l0_conv2d`` against the contract written out here in float64.

The expectation is computed in this file from SPEC sections 1-3 and 8, not with the package's own
reference: the uniforms come from ``l0k.philox_uniform`` (tested bit-exact in test_philox.py), and
everything after them (clamp, hard-concrete gate, group expansion, the ops) is float64 PyTorch here.
The gate is built with ``hardtanh`` so that autograd on the float64 formula gives the contract's
``dz/dlog_alpha`` (0 on the clamped region, boundaries included); expected gradients of ``x``,
``weight``, ``bias`` and ``log_alpha`` are autograd on that formula.

Hypothesis draws the shapes, options, gate constants and the seeds of the torch generators that make
the data (so every example has fresh random values), training and eval, every gate mode and noise kind,
group sizes, odd and zero-size shapes, non-contiguous / strided / offset / broadcast / channels_last
inputs, float32 and float64, on the ``torch`` backend; a smaller budget runs the ``triton`` backend
under TRITON_INTERPRET=1 (float32 only: the Triton backend does not take float64).
"""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import l0kernels as l0k  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DEFAULT_CONST = (2.0 / 3.0, -0.1, 1.1)  # beta, gamma, zeta
EPS = 1e-6

# Budgets (examples per property): the torch cases take a few milliseconds each; an interpreted Triton case
# 0.1-0.5 s on a small CPU (about 20 s for the whole file on two shared cores).
TORCH_LINEAR_EXAMPLES = 400
TORCH_CONV_EXAMPLES = 300
TRITON_LINEAR_EXAMPLES = 30
TRITON_CONV_EXAMPLES = 20

COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- the contract, float64 ---------------------------------------------------------------------------------

def hard(s, gamma, zeta, magnitude=False):
    """``clamp(s * (zeta - gamma) + gamma, 0, 1)`` with hardtanh's derivative (0 on the clamped region).

    ``magnitude=True`` gives the rounding scale of that gate instead: ``s * (zeta - gamma) - gamma`` (the sum
    of the terms' magnitudes) where the gate is open, the same 0 or 1 where it is clamped; its derivative in
    ``log_alpha`` is the gate's own.
    """
    s_bar = s * (zeta - gamma) + gamma
    z = F.hardtanh(s_bar, 0.0, 1.0)
    if magnitude:
        z = torch.where((s_bar > 0) & (s_bar < 1), s * (zeta - gamma) - gamma, z)
    return z


def train_gates(log_alpha, seed, shape, beta, gamma, zeta, eps, magnitude=False):
    """SPEC section 1 training gates for the noise tensor ``shape`` (offset = row-major index, section 2)."""
    n = math.prod(shape)
    offsets = torch.arange(n, dtype=torch.int64).reshape(shape)
    u_raw = l0k.philox_uniform(int(seed), offsets)
    assert u_raw.dtype == torch.float32
    u = u_raw.double().clamp(eps, 1 - eps)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
    return hard(s, gamma, zeta, magnitude)


def eval_gates(log_alpha, gamma, zeta, magnitude=False):
    return hard(torch.sigmoid(log_alpha), gamma, zeta, magnitude)


def gates(la, training, noise_shape, seed, beta, gamma, zeta, eps, magnitude):
    if training:
        return train_gates(la, seed, noise_shape, beta, gamma, zeta, eps, magnitude)
    return eval_gates(la, gamma, zeta, magnitude)


def expect_linear(x, w, la, b, *, gate, noise, training, seed, beta, gamma, zeta, eps, group_size, magnitude=False):
    k, n = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, k)
    shape = (x2.shape[0], la.shape[0]) if noise == "sample" else tuple(la.shape)
    z = gates(la, training, shape, seed, beta, gamma, zeta, eps, magnitude)
    if gate != "weight":
        z = z.repeat_interleave(group_size, dim=-1)  # gate j -> features j*g .. j*g+g-1
    if gate == "in":
        y = (x2 * z) @ w.T
        y = y + b if b is not None else y
    elif gate == "out":
        y = x2 @ w.T
        y = (y + b if b is not None else y) * z
    else:
        y = x2 @ (w * z).T
        y = y + b if b is not None else y
    return y.reshape(*x.shape[:-1], n)


def expect_conv2d(x, w, la, b, stride, padding, dilation, groups, *, noise, training, seed, beta, gamma, zeta, eps,
                  group_size, magnitude=False):
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    shape = (x.shape[0], la.shape[0]) if noise == "sample" else tuple(la.shape)
    z = gates(la, training, shape, seed, beta, gamma, zeta, eps, magnitude)
    z = z.repeat_interleave(group_size, dim=-1)
    return y * z[..., :, None, None]


# -- data --------------------------------------------------------------------------------------------------

def laid_out(t, kind):
    """``t``'s values in another memory layout (a leaf once ``requires_grad_`` is set on it)."""
    if kind == "contiguous":
        return t.clone()
    if kind == "strided":  # every other element of the last dim, storage offset 1
        base = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), float("nan"), dtype=t.dtype)
        view = base[..., 1::2]
        view.copy_(t)
        return view
    if kind == "transposed":  # last two dims swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "broadcast":  # stride 0 along dim 0: every row the same (values change, fresh anyway)
        return t[:1].expand(t.shape)
    raise AssertionError(kind)


def layouts_for(t, is_x, plain_4d=False):
    kinds = ["contiguous", "strided"]
    if t.dim() >= 2 and not (t.dim() == 4 and plain_4d):
        kinds.append("transposed")
    if t.dim() >= 2 and is_x and t.shape[0] > 1:
        kinds.append("broadcast")
    if t.dim() == 4 and not plain_4d:
        kinds.append("channels_last")
    return kinds


@st.composite
def gate_consts(draw):
    if draw(st.booleans()):
        return DEFAULT_CONST
    beta = draw(st.floats(0.25, 2.0))
    gamma = draw(st.floats(-0.5, -0.01))
    zeta = draw(st.floats(1.01, 1.5))
    return beta, gamma, zeta


@st.composite
def log_alpha_params(draw):
    """Mean and spread of ``log_alpha``: from all gates open or closed to a mix of clamped and open gates."""
    return draw(st.floats(-4.0, 4.0)), draw(st.sampled_from([0.1, 1.0, 3.0, 6.0]))


@st.composite
def linear_cases(draw, dtypes=(torch.float32, torch.float64), max_gates=6, max_group=4, max_rows=5,
                 contiguous_bias=False):
    gate = draw(st.sampled_from(["in", "out", "weight"]))
    training = draw(st.booleans())
    noise = "batch" if gate == "weight" else draw(st.sampled_from(["batch", "sample"]))
    g = 1 if gate == "weight" else draw(st.integers(1, max_group))
    ngates = draw(st.integers(1, max_gates))
    other = draw(st.integers(1, 13))
    k, n = (ngates * g, other) if gate == "in" else (other, ngates * g)
    if gate == "weight":
        k, n = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    lead = tuple(draw(st.lists(st.integers(1, max_rows), max_size=2)))
    if draw(st.integers(0, 19)) == 0:  # now and then a zero-size batch
        lead = (0,) + lead[1:] if lead else (0,)
    la_shape = {"in": (k // g,), "out": (n // g,), "weight": (n, k)}[gate]
    seed_kind = draw(st.sampled_from(["int", "tensor"])) if training else draw(st.sampled_from(["int", "none"]))
    return dict(
        gate=gate, noise=noise, training=training, group_size=g, x_shape=lead + (k,), w_shape=(n, k),
        la_shape=la_shape, bias=draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)),
        consts=draw(gate_consts()), la_params=draw(log_alpha_params()),
        seed=draw(st.integers(0, 2**63 - 1)), seed_kind=seed_kind, data_seed=draw(st.integers(0, 2**32 - 1)),
        layout_draws=draw(st.lists(st.integers(0, 100), min_size=4, max_size=4)), contiguous_bias=contiguous_bias,
    )


@st.composite
def conv_cases(draw, dtypes=(torch.float32, torch.float64), max_gates=4, max_group=3, max_batch=3, max_hw=7,
               contiguous_bias=False):
    training = draw(st.booleans())
    noise = draw(st.sampled_from(["batch", "sample"]))
    g = draw(st.integers(1, max_group))
    ngates = draw(st.integers(1, max_gates))
    c_out = ngates * g
    groups = draw(st.sampled_from([d for d in (1, 2, 3, 4) if c_out % d == 0]))
    c_in = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # spatial size at least the dilated kernel minus the padding
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), max_hw))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), max_hw))
    batch = draw(st.integers(1, max_batch))
    scalar = draw(st.booleans())  # stride/padding/dilation as ints where both dims agree
    as_arg = (lambda p: p[0] if scalar and p[0] == p[1] else p)
    seed_kind = draw(st.sampled_from(["int", "tensor"])) if training else draw(st.sampled_from(["int", "none"]))
    return dict(
        noise=noise, training=training, group_size=g, groups=groups, stride=as_arg(stride),
        padding=as_arg(padding), dilation=as_arg(dilation), x_shape=(batch, c_in, h, w),
        w_shape=(c_out, c_in // groups, kh, kw), la_shape=(ngates,), bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)), consts=draw(gate_consts()), la_params=draw(log_alpha_params()),
        seed=draw(st.integers(0, 2**63 - 1)), seed_kind=seed_kind, data_seed=draw(st.integers(0, 2**32 - 1)),
        layout_draws=draw(st.lists(st.integers(0, 100), min_size=4, max_size=4)), contiguous_bias=contiguous_bias,
    )


def make_inputs(case):
    """Fresh random ``x, weight, log_alpha, bias`` from the drawn data seed (float64 values, then the case's
    dtype and layouts, leaves that require grad), and the generator, which then draws the cotangent ``dy``."""
    gen = torch.Generator().manual_seed(case["data_seed"])
    mu, sd = case["la_params"]
    vals = [torch.randn(case["x_shape"], generator=gen, dtype=torch.float64),
            torch.randn(case["w_shape"], generator=gen, dtype=torch.float64) / 2,
            mu + sd * torch.randn(case["la_shape"], generator=gen, dtype=torch.float64),
            torch.randn(case["w_shape"][0], generator=gen, dtype=torch.float64) if case["bias"] else None]
    out = []
    for i, v in enumerate(vals):
        if v is None:
            out.append(None)
            continue
        v = v.to(case["dtype"])
        # PyTorch's CPU conv2d (oneDNN) segfaults when x or the weight is channels_last and x has a spatial
        # size of 1, e.g. on torch 2.13.0+cpu: F.conv2d(torch.randn(2, 2, 2, 1).contiguous(memory_format=
        # torch.channels_last), torch.randn(1, 2, 1, 1), torch.randn(1), (1, 2), (0, 1), (1, 2)). Such x keep
        # plain layouts (x and weight) so that the crash of the process does not hide the other examples.
        plain_4d = len(case["x_shape"]) == 4 and 1 in case["x_shape"][2:]
        kinds = layouts_for(v, is_x=(i == 0), plain_4d=plain_4d) if v.numel() else ["contiguous"]
        if i == 3 and case["contiguous_bias"]:
            kinds = ["contiguous"]
        out.append(laid_out(v, kinds[case["layout_draws"][i] % len(kinds)]).requires_grad_())
    return out, gen


def seed_arg(case):
    if case["seed_kind"] == "none":
        return None
    if case["seed_kind"] == "tensor":
        return torch.tensor(case["seed"], dtype=torch.int64)
    return case["seed"]


def assert_close(out, ref, scale, tol, what):
    """``||out - ref|| <= tol * ||ref|| + 4 * eps(dtype) * ||scale|| + tiny``.

    The relative error of SPEC section 6, plus the rounding floor of the dtype: ``scale`` is the same
    quantity computed with the magnitudes of every term (``|x|``, ``|W|``, ``|b|``, ``|dy|`` and the gates'
    magnitudes), so a sum that cancels (a ``dlog_alpha`` summed over many rows, an output near zero, every
    gate closed) is held to what its dtype can give, and no more. With O(1) random data this floor is far
    below ``tol * ||ref||`` except where the result cancels to a small fraction of its terms.
    """
    assert out is not None, f"{what}: no gradient"
    assert out.shape == ref.shape, (what, tuple(out.shape), tuple(ref.shape))
    dtype = out.dtype
    out, ref, scale = out.detach().double(), ref.detach().double(), scale.detach().double()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = float((out - ref).norm())
    bound = tol * float(ref.norm()) + 4 * torch.finfo(dtype).eps * float(scale.norm()) + 1e-30
    rel = err / max(float(ref.norm()), 1e-300)
    assert err <= bound, (f"{what}: ||out-ref|| = {err:.3e}, ||ref|| = {float(ref.norm()):.3e} (rel {rel:.3e}), "
                          f"||magnitudes|| = {float(scale.norm()):.3e}")


def check_op(case, op, expect, op_args, mode_kw, backend):
    params, gen = make_inputs(case)
    dtype = case["dtype"]
    beta, gamma, zeta = case["consts"]
    y = op(*params, *op_args, seed=seed_arg(case), training=case["training"], backend=backend, beta=beta,
           gamma=gamma, zeta=zeta, eps=EPS, group_size=case["group_size"], **mode_kw)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    y.backward(dy)

    kw = dict(training=case["training"], seed=case["seed"], beta=beta, gamma=gamma, zeta=zeta, eps=EPS,
              group_size=case["group_size"], **mode_kw)
    refs, scales = [], []
    for magnitude, out in ((False, refs), (True, scales)):
        ps = [p.detach().double() if p is not None else None for p in params]
        if magnitude:  # log_alpha keeps its sign: the gates carry their own magnitude
            ps = [p.abs() if p is not None and i != 2 else p for i, p in enumerate(ps)]
        ps = [p.requires_grad_() if p is not None else None for p in ps]
        yr = expect(*ps, *op_args, magnitude=magnitude, **kw)
        yr.backward(dy.double().abs() if magnitude else dy.double())
        out.extend([yr] + [p.grad if p is not None else None for p in ps])

    tol = TOL[dtype]
    for name, got, ref, scale in zip(("y", "dx", "dweight", "dlog_alpha", "dbias"),
                                     [y] + [p.grad if p is not None else None for p in params], refs, scales):
        if ref is not None:
            assert_close(got, ref, scale, tol, name)


def run_linear(case, backend):
    check_op(case, l0k.l0_linear, expect_linear, (), dict(gate=case["gate"], noise=case["noise"]), backend)


def run_conv(case, backend):
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    check_op(case, l0k.l0_conv2d, expect_conv2d, args, dict(noise=case["noise"]), backend)


# -- torch backend ------------------------------------------------------------------------------------------

@settings(max_examples=TORCH_LINEAR_EXAMPLES, **COMMON)
@given(case=linear_cases())
def test_linear_matches_contract_torch(case):
    run_linear(case, "torch")


@settings(max_examples=TORCH_CONV_EXAMPLES, **COMMON)
@given(case=conv_cases())
def test_conv2d_matches_contract_torch(case):
    run_conv(case, "torch")


# -- triton backend (interpreter on the CPU; natively on a GPU) ------------------------------------------------

@pytest.fixture(scope="module")
def triton_ready():
    pytest.importorskip("triton")
    call = l0k._checks.linear_call(torch.randn(2, 3), torch.randn(4, 3), torch.randn(3), None, seed=1, gate="in",
                                   noise="batch", training=True, backend="triton", beta=2 / 3, gamma=-0.1, zeta=1.1)
    why = l0k.get_backend("triton").why_not(call)
    if why is not None:
        pytest.skip(f"triton backend cannot run here: {why}")


@pytest.mark.interpret
@settings(max_examples=TRITON_LINEAR_EXAMPLES, **COMMON)
@given(case=linear_cases(dtypes=(torch.float32,)))
def test_linear_matches_contract_triton(triton_ready, case):
    run_linear(case, "triton")


@pytest.mark.interpret
@settings(max_examples=TRITON_CONV_EXAMPLES, **COMMON)
@given(case=conv_cases(dtypes=(torch.float32,)))
def test_conv2d_matches_contract_triton(triton_ready, case):
    run_conv(case, "triton")


@pytest.mark.interpret
@pytest.mark.parametrize("op", ["linear-in", "linear-out", "linear-weight", "conv2d"])
def test_triton_noncontiguous_bias(triton_ready, op):
    """A (2,) bias that is every other element of a buffer (stride 2, storage offset 1), the other inputs
    contiguous, batch noise, training: the kernels once read it as contiguous (wrong y, and a wrong dlog_alpha
    for gated biases)."""
    common = dict(noise="batch", training=True, group_size=1, bias=True, dtype=torch.float32, consts=DEFAULT_CONST,
                  la_params=(0.0, 1.0), seed=11, seed_kind="int", data_seed=7, layout_draws=[0, 0, 0, 1],
                  contiguous_bias=False)
    if op == "conv2d":
        run_conv(dict(common, groups=1, stride=1, padding=0, dilation=1, x_shape=(1, 1, 3, 3), w_shape=(2, 1, 2, 2),
                      la_shape=(2,)), "triton")
    else:
        gate = op.split("-")[1]
        run_linear(dict(common, gate=gate, x_shape=(3, 2), w_shape=(2, 2),
                        la_shape={"in": (2,), "out": (2,), "weight": (2, 2)}[gate]), "triton")
