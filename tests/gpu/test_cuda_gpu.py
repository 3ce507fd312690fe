"""GPU tests of the CUDA backend (``l0kernels._C``), against the torch backend run in float64.

Marked ``gpu``: skipped without a CUDA device (tests/conftest.py), and skipped when the extension is
not built (``pip install --no-build-isolation -e .`` with a CUDA PyTorch and nvcc).

Memory and race checks (on a GPU machine; both must report 0 errors): ``python3 scripts/gpu_check.py
--call 2`` runs compute-sanitizer memcheck (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) and racecheck over a
list of these tests by exact id (``-k "float16"`` selects nothing: the dtype cases are ``dtype0``..).
"""
import itertools

import pytest
import torch

import l0kernels as l0k
from l0kernels._gates import GateConfig, eval_gates_and_grad, gates_from_uniform, noise_uniform
from l0kernels.backends.torch import L0Conv2dFunction, L0LinearFunction

from conftest import TOL, log_alpha_at_density

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    pytest.importorskip("l0kernels._C", reason="the CUDA extension l0kernels._C is not built")
    from l0kernels.backends.cuda import CudaL0Conv2dFunction, CudaL0LinearFunction, cuda_gates, gemm_impl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CFG = GateConfig()


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _seed():
    return int(torch.randint(0, 2**62, ()).item()) * 2 + 1  # above 2**32


def test_uniform_stream_bit_exact():
    seed = _seed()
    off = torch.cat([torch.arange(1000), torch.randint(0, 2**62, (1000,))]).cuda()
    u = torch.ops.l0kernels.uniform(seed, off)
    ref = l0k.philox_uniform(seed, off.cpu())
    assert torch.equal(u.cpu().view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["batch", "sample", "weight", "eval"])
def test_gates_match_float64_formula(dtype, layout):
    seed = _seed()
    la = (torch.randn(13, 7) * 3 if layout == "weight" else torch.randn(37) * 3).to(dtype).cuda()
    rows = 5 if layout == "sample" else -1
    training = layout != "eval"
    z, dz = cuda_gates(la, seed, rows, training, CFG, need_grad=True)
    la64 = la.double().cpu()
    if training:
        shape = ((rows,) if rows >= 0 else ()) + tuple(la.shape)
        zr, dzr = gates_from_uniform(la64, noise_uniform(seed, shape, "cpu").double(), CFG)
    else:
        zr, dzr = eval_gates_and_grad(la64, CFG)
    assert z.shape == zr.shape and z.dtype == torch.float32
    assert (z.double().cpu() - zr).abs().max() < 1e-6
    assert (dz.double().cpu() - dzr).abs().max() < 1e-6
    assert ((zr > 0) & (zr < 1)).any()


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).cuda()


def _check_grads(out, ref, tensors, refs, tol, rel_err):
    assert rel_err(out, ref) < tol
    g = torch.randn_like(ref)
    gs = torch.autograd.grad(out, tensors, g.to(out.dtype))
    gr = torch.autograd.grad(ref, refs, g)
    for name, a, b in zip("x weight log_alpha bias".split(), gs, gr):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


LINEAR_CASES = [(g, n, t) for g, n, t in itertools.product(["in", "out", "weight"], ["batch", "sample"], [True, False])
                if not (g == "weight" and n == "sample")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate,noise,training", LINEAR_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64_reference(dtype, gate, noise, training, bias, rel_err):
    m0, m1, k, n = 3, 29, 37, 19
    x = _rand(k, m1, m0, dtype=dtype).permute(2, 1, 0)  # (3, 29, 37), non-contiguous
    w = _rand(n, k, dtype=dtype, scale=0.2)
    la = _rand(*{"in": (k,), "out": (n,), "weight": (n, k)}[gate], dtype=dtype, scale=1.5)
    b = _rand(n, dtype=dtype) if bias else None
    seed = _seed() if training else None
    leaves = [t.detach().requires_grad_() for t in (x, w, la) + ((b,) if bias else ())]
    refs = [t.detach().double().cpu().requires_grad_() for t in leaves]
    out = CudaL0LinearFunction.apply(*leaves[:3], leaves[3] if bias else None, seed, gate, noise, training, CFG)
    ref = L0LinearFunction.apply(*refs[:3], refs[3] if bias else None, seed, gate, noise, training, CFG)
    assert out.dtype == dtype and out.shape == (m0, m1, n)
    _check_grads(out, ref.cuda(), leaves, refs, TOL[dtype], rel_err)


# (m0, m1, k, n): tensor-core GEMM (> 16 rows) and GEMV (<= 16 rows: 1, 5, 7, 16) shapes
FUSED_SHAPES = [(3, 29, 37, 19), (1, 131, 72, 133), (2, 64, 256, 260), (1, 5, 0, 7), (1, 1, 300, 77),
                (7, 1, 264, 1030), (2, 8, 520, 45), (1, 3, 2000, 45),  # the last: GEMV split over K
                (1, 40, 2000, 300)]  # tensor-core GEMM split over K (3 output tiles)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate,noise,training", LINEAR_CASES)
@pytest.mark.parametrize("shape", FUSED_SHAPES)
def test_linear_fused_forward_matches_two_pass_and_reference(dtype, gate, noise, training, shape, rel_err):
    """The single-launch forward (csrc/l0_gemm.cuh for > 16 rows, csrc/l0_gemv.cuh for 1-16) against
    the two-pass one and float64: odd shapes, several blocks, K = 0, strided x (scalar loads) and
    contiguous x (16-byte loads)."""
    m0, m1, k, n = shape
    if m0 * m1 > 16 and (dtype == torch.float32 or torch.cuda.get_device_capability()[0] < 8):
        pytest.skip("the tensor-core forward runs float16 / bfloat16 on sm_80+")
    for x in (_rand(m0, m1, k, dtype=dtype), _rand(m0, m1, k + 3, dtype=dtype)[..., :k]):
        w = _rand(n, k, dtype=dtype, scale=0.2)
        la = _rand(*{"in": (k,), "out": (n,), "weight": (n, k)}[gate], dtype=dtype, scale=1.5)
        b = _rand(n, dtype=dtype)
        seed = _seed() if training else None
        with gemm_impl("fused"):
            y = CudaL0LinearFunction.apply(x, w, la, b, seed, gate, noise, training, CFG)
        with gemm_impl("two_pass"):
            y2 = CudaL0LinearFunction.apply(x, w, la, b, seed, gate, noise, training, CFG)
        ref = L0LinearFunction.apply(x.double().cpu(), w.double().cpu(), la.double().cpu(), b.double().cpu(), seed,
                                     gate, noise, training, CFG)
        assert y.shape == y2.shape == ref.shape and y.dtype == dtype
        assert rel_err(y, ref.cuda()) < TOL[dtype]
        assert rel_err(y, y2) < TOL[dtype]


def test_linear_fused_forward_auto_choice_and_backward(rel_err):
    """auto times both forwards once per signature and remembers the pick; backward is the same."""
    from l0kernels.backends import cuda as cb
    x = _rand(100, 300, dtype=torch.float16).requires_grad_()
    w = _rand(200, 300, dtype=torch.float16, scale=0.1).requires_grad_()
    la = _rand(300, dtype=torch.float16).requires_grad_()
    from l0kernels._autotune import AUTOTUNER
    AUTOTUNER.clear()
    with gemm_impl("auto"):
        y = CudaL0LinearFunction.apply(x, w, la, None, 11, "in", "batch", True, CFG)
    assert list(AUTOTUNER.best.values()) in (["fused"], ["two_pass"])
    gs = torch.autograd.grad(y.float().sum(), (x, w, la))
    with gemm_impl("two_pass"):
        y2 = CudaL0LinearFunction.apply(x, w, la, None, 11, "in", "batch", True, CFG)
    gs2 = torch.autograd.grad(y2.float().sum(), (x, w, la))
    assert rel_err(y, y2) < TOL[torch.float16]
    for a, b in zip(gs, gs2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate", ["in", "out", "weight"])
@pytest.mark.parametrize("rows", [1, 13, 300])
def test_eval_sparse_linear_kernel(dtype, gate, rows, rel_err):
    """backend="cuda" eval: the extension's sparse_linear on the layer's compact plan (the GEMV for
    1 and 13 rows, the tensor-core GEMM for 300), against the reference eval forward."""
    from l0kernels.backends._plans import cached_plan
    from l0kernels.backends import cuda as cb
    tensor_cores = rows > 16
    if tensor_cores and (dtype == torch.float32 or torch.cuda.get_device_capability()[0] < 8):
        pytest.skip("the tensor-core eval kernel runs float16 / bfloat16 on sm_80+")
    layer = l0k.L0Linear(300, 260, gate=gate, backend="cuda").to(device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        layer.log_alpha.copy_(torch.randn_like(layer.log_alpha) * 3)
    x = _rand(rows, 300, dtype=dtype)
    assert cb.forward_impls(x) == ("fused", "two_pass")  # auto: the faster of the two
    with gemm_impl("fused"), torch.no_grad():
        assert cb.forward_impls(x) == ("fused",)
        y = layer(x)
    assert cached_plan(layer) is not None
    ref = l0k.l0_linear(x.double().cpu(), layer.weight.double().cpu(), layer.log_alpha.double().cpu(),
                        layer.bias.double().cpu(), gate=gate, training=False, backend="torch")
    assert rel_err(y, ref.cuda()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_split_k_workspace_left_zero(dtype, rel_err):
    """Few outputs and a long K: the GEMV splits K over blocks and sums through a workspace that each
    launch leaves zero; calls in a row (and on a second stream) agree with the two-pass path."""
    x, w, la = _rand(3, 5000, dtype=dtype), _rand(40, 5000, dtype=dtype, scale=0.05), _rand(40, dtype=dtype)
    with gemm_impl("two_pass"):
        ref = CudaL0LinearFunction.apply(x, w, la, None, 5, "out", "sample", True, CFG)
    outs = []
    with gemm_impl("fused"):
        for _ in range(3):
            outs.append(CudaL0LinearFunction.apply(x, w, la, None, 5, "out", "sample", True, CFG))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outs.append(CudaL0LinearFunction.apply(x, w, la, None, 5, "out", "sample", True, CFG))
        torch.cuda.current_stream().wait_stream(side)
    for y in outs:
        assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("gate", ["in", "weight"])
def test_eval_gather_from_a_column_strided_x(gate, rows, rel_err):
    """An eval plan that gathers inputs, called with a transposed x (column stride != 1): the kernels
    gather at m * ldx + in_idx[k], so the op must make the columns unit-stride first."""
    layer = l0k.L0Linear(90, 70, gate=gate, backend="cuda").to("cuda", torch.float16).eval()
    with torch.no_grad():
        layer.log_alpha.copy_(torch.randn_like(layer.log_alpha) * 3)
        if gate == "weight":
            layer.log_alpha[:, :9] = -10.0  # whole input columns closed: the plan gathers
    x = _rand(90, rows, dtype=torch.float16).t()  # strides (1, rows)
    assert x.stride(1) != 1
    with gemm_impl("fused"), torch.no_grad():
        y = layer(x)
    from l0kernels.backends._plans import cached_plan
    assert cached_plan(layer).in_idx is not None
    ref = l0k.l0_linear(x.double().cpu(), layer.weight.double().cpu(), layer.log_alpha.double().cpu(),
                        layer.bias.double().cpu(), gate=gate, training=False, backend="torch")
    assert rel_err(y, ref.cuda()) < TOL[torch.float16]


def test_eval_idle_outputs_in_one_launch(rel_err):
    """An output-gated layer at batch 1 in eval: the plan's idle outputs are written by the kernel's own
    blocks (no pre-fill), a wide K takes the split GEMV."""
    layer = l0k.L0Linear(3000, 90, gate="out", backend="cuda").to("cuda").eval()
    with torch.no_grad():
        layer.log_alpha.copy_(torch.randn_like(layer.log_alpha) * 3)
        layer.log_alpha[:10] = -10.0
    x = _rand(1, 3000, dtype=torch.float32)
    with gemm_impl("fused"), torch.no_grad():
        y = layer(x)
    ref = l0k.l0_linear(x.double().cpu(), layer.weight.double().cpu(), layer.log_alpha.double().cpu(),
                        layer.bias.double().cpu(), gate="out", training=False, backend="torch")
    assert rel_err(y, ref.cuda()) < TOL[torch.float32]
    assert torch.equal(y[:, :10], torch.zeros_like(y[:, :10]))


@pytest.mark.parametrize("backend", ["cuda", "auto", "torch"])
@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_eval_calls_after_the_first_never_synchronise(backend, gate):
    """the contract: the eval path builds (and times) its plan once; later calls make no host-device
    synchronisation. torch.cuda's sync debug mode raises on any synchronising call."""
    layer = l0k.L0Linear(300, 200, gate=gate, backend=backend).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        layer.log_alpha.copy_(torch.randn_like(layer.log_alpha) * 3)
        layer.log_alpha[:5] = -10.0
        xs = [_rand(rows, 300, dtype=torch.bfloat16) for rows in (1, 16, 300)]
        for x in xs:
            layer(x)  # first calls: plan built, paths timed
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                for x in xs:
                    layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_linear_public_api_and_zero_rows(rel_err):
    x, w, la, b = _rand(0, 11, dtype=torch.float32), _rand(5, 11, dtype=torch.float32), _rand(11, dtype=torch.float32), _rand(5, dtype=torch.float32)
    y = l0k.l0_linear(x, w, la, b, seed=5, backend="cuda")
    assert y.shape == (0, 5)
    x = _rand(4, 11, dtype=torch.float32)
    y = l0k.l0_linear(x, w, la, b, seed=5, backend="cuda")
    r = l0k.l0_linear(x.double(), w.double(), la.double(), b.double(), seed=5, backend="torch")
    assert rel_err(y, r) < TOL[torch.float32]
    with pytest.raises(ValueError, match="float64"):
        l0k.l0_linear(x.double(), w.double(), la.double(), seed=5, backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        l0k.l0_linear(x.cpu(), w.cpu(), la.cpu(), seed=5, backend="cuda")


def test_ops_reject_bad_arguments():
    x, w, la = _rand(4, 11, dtype=torch.float32), _rand(5, 11, dtype=torch.float32), _rand(11, dtype=torch.float32)
    cfg = [CFG.beta, CFG.gamma, CFG.zeta, CFG.eps]
    with pytest.raises(ValueError, match="log_alpha"):
        torch.ops.l0kernels.linear_fwd(x, w, la[:5], None, 1, "in", False, True, cfg)
    with pytest.raises(TypeError, match="weight"):
        torch.ops.l0kernels.linear_fwd(x, w.half(), la, None, 1, "in", False, True, cfg)
    with pytest.raises(ValueError, match="gate"):
        torch.ops.l0kernels.linear_fwd(x, w, la, None, 1, "rows", False, True, cfg)
    with pytest.raises(TypeError, match="float16 and bfloat16"):  # float32: the GEMV only (<= 16 rows)
        torch.ops.l0kernels.linear_fwd_fused(_rand(17, 11, dtype=torch.float32), w, la, None, 1, "in", False, True, cfg)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        torch.ops.l0kernels.linear_fwd_fused(x.double(), w.double(), la.double(), None, 1, "in", False, True, cfg)
    with pytest.raises(ValueError, match="log_alpha"):
        torch.ops.l0kernels.linear_fwd_fused(x.half(), w.half(), la[:5].half(), None, 1, "in", False, True, cfg)


CONV_CASES = list(itertools.product(["batch", "sample"], [True, False], [False, True]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise,training,channels_last", CONV_CASES)
def test_conv2d_matches_float64_reference(dtype, noise, training, channels_last, rel_err):
    b_, cin, cout, groups = 3, 6, 10, 2
    x = _rand(b_, cin, 13, 11, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = _rand(cout, cin // groups, 3, 3, dtype=dtype, scale=0.3)
    la = _rand(cout, dtype=dtype, scale=1.5)
    b = _rand(cout, dtype=dtype)
    conv = ((2, 1), (1, 2), (1, 2), groups)
    seed = _seed() if training else None
    leaves = [t.detach().requires_grad_() for t in (x, w, la, b)]
    refs = [t.detach().double().cpu().requires_grad_() for t in leaves]
    out = CudaL0Conv2dFunction.apply(*leaves, *conv, seed, noise, training, CFG)
    ref = L0Conv2dFunction.apply(*refs, *conv, seed, noise, training, CFG)
    assert out.dtype == dtype and out.shape == ref.shape
    _check_grads(out, ref.cuda(), leaves, refs, TOL[dtype], rel_err)


def test_opcheck_fake_impls():
    x, w, la, b = _rand(4, 11, dtype=torch.float32), _rand(5, 11, dtype=torch.float32), _rand(11, dtype=torch.float32), _rand(5, dtype=torch.float32)
    cfg = [CFG.beta, CFG.gamma, CFG.zeta, CFG.eps]
    torch.library.opcheck(torch.ops.l0kernels.linear_fwd.default, (x, w, la, b, 7, "in", True, True, cfg),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.l0kernels.linear_fwd_fused.default, (x, w, la, b, 7, "weight", False, True, cfg),
                          test_utils=("test_schema", "test_faketensor"))  # 4 rows: the GEMV, float32
    if torch.cuda.get_device_capability()[0] >= 8:
        torch.library.opcheck(torch.ops.l0kernels.linear_fwd_fused.default,
                              (x.half(), w.half(), la.half(), b.half(), 7, "out", True, True, cfg),
                              test_utils=("test_schema", "test_faketensor"))
    g = _rand(4, 5, dtype=torch.float32)
    torch.library.opcheck(torch.ops.l0kernels.linear_bwd.default,
                          (g, x, w, la, b, 7, "in", True, True, cfg, [True, True, True, True]),
                          test_utils=("test_schema", "test_faketensor"))
    xc, wc, lac = _rand(2, 4, 9, 9, dtype=torch.float32), _rand(6, 4, 3, 3, dtype=torch.float32), _rand(6, dtype=torch.float32)
    torch.library.opcheck(torch.ops.l0kernels.conv2d_fwd.default,
                          (xc, wc, lac, None, [1, 1], [1, 1], [1, 1], 1, 7, False, True, cfg),
                          test_utils=("test_schema", "test_faketensor"))
    # sparse_linear: 4 rows (the GEMV), 3 of 5 outputs computed, the other 2 idle (filled in the launch)
    out_idx = torch.tensor([0, 2, 3], device="cuda")
    idle_idx = torch.tensor([1, 4], device="cuda")
    in_idx = torch.tensor([0, 1, 2, 5, 7, 8, 10], device="cuda")
    torch.library.opcheck(torch.ops.l0kernels.sparse_linear.default,
                          (x, _rand(3, 7, dtype=torch.float32), b[:3], in_idx, out_idx, idle_idx, b, 5),
                          test_utils=("test_schema", "test_faketensor"))


def _assert_same_as_dense(apply, tensors, g, out, grads, rel_err):
    """``apply(*tensors)`` with ``L0K_SKIP_CLOSED`` off (the dense kernels) gives ``out`` and, for the upstream
    gradient ``g`` (float64, CPU), ``grads``, within the dtype's tolerance."""
    from l0kernels import _active
    dtype = out.dtype
    old = _active.ENABLED
    _active.ENABLED = False
    try:
        dense = [t.detach().requires_grad_() for t in tensors]
        out_d = apply(*dense)
        gd = torch.autograd.grad(out_d, dense, g.to(dtype).cuda())
    finally:
        _active.ENABLED = old
    assert rel_err(out.cpu(), out_d.cpu().double()) < TOL[dtype]
    for a, d in zip(grads, gd):
        assert rel_err(a.cpu(), d.cpu().double()) < TOL[dtype] * 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.0, "one"])
@pytest.mark.parametrize("gate,group", [("in", 1), ("out", 1), ("in", 3), ("out", 3)])
def test_training_over_the_open_set(dtype, density, gate, group, rel_err, monkeypatch):
    """Batch-noise training of half types runs over the open set (linear_open_fwd / linear_open_bwd): equal
    to the float64 reference at every density, closed features' gradients exactly zero, inf in their weights
    never read, the open path counted, and L0K_SKIP_CLOSED off (the dense kernels) giving the same."""
    from l0kernels import _active
    from l0kernels.backends import cuda as cb
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the open-set GEMM needs sm_80+")
    monkeypatch.setattr(cb, "SKIP_BELOW", 1.0)  # the open-set path at every density
    m, k, n = 70, 141, 99
    feats = k if gate == "in" else n
    gen = torch.Generator().manual_seed(7 * group + (gate == "in"))
    la = log_alpha_at_density(feats // group, density, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda()
    la = la.to(dtype).cuda()
    seed = torch.tensor(_seed(), device="cuda")
    z = l0k.sample_gates(la.float().cpu(), seed.cpu()).repeat_interleave(group)
    closed = torch.nonzero(z == 0).reshape(-1).cuda()
    wp = w.clone()
    wp.index_fill_(1 if gate == "in" else 0, closed, float("inf"))  # closed weights: never read
    leaves = [t.detach().requires_grad_() for t in (x, wp, la, b)]
    refs = [t.detach().double().cpu().requires_grad_() for t in (x, w, la, b)]
    _active.PATHS.clear()
    out = CudaL0LinearFunction.apply(*leaves, seed, gate, "batch", True, CFG, group)
    ref = L0LinearFunction.apply(*refs, seed.cpu(), gate, "batch", True, CFG, group)
    g = torch.randn(m, n, dtype=torch.float64)
    gs = torch.autograd.grad(out, leaves, g.to(dtype).cuda())
    gr = torch.autograd.grad(ref, refs, g)
    assert _active.PATHS["linear-" + gate, "fwd", "skip"] == 1 and _active.PATHS["linear-" + gate, "bwd", "skip"] == 1
    assert torch.isfinite(out).all() and rel_err(out.cpu(), ref) < TOL[dtype]
    for name, a, r in zip(("x", "weight", "log_alpha", "bias"), gs, gr):
        assert torch.isfinite(a).all(), name
        assert rel_err(a.cpu(), r) < TOL[dtype] * 10, name
    dw = gs[1].cpu()
    zc = closed.cpu()
    assert (dw.index_select(1 if gate == "in" else 0, zc) == 0).all()
    if gate == "out":
        assert (out.cpu()[:, zc] == 0).all() and (gs[3].cpu()[zc] == 0).all()
    else:
        assert (gs[0].cpu()[:, zc] == 0).all()
    assert (gs[2].cpu().repeat_interleave(group)[zc] == 0).all()
    _assert_same_as_dense(lambda *ts: CudaL0LinearFunction.apply(*ts, seed, gate, "batch", True, CFG, group),
                          (x, w, la, b), g, out, gs, rel_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
def test_producer_over_its_open_rows(dtype, density, rel_err, monkeypatch):
    """A structure gate's producer on the CUDA backend (``structure_linear(host=False, backend="cuda")``:
    rows_linear_fwd / _bwd): the float64 definition (``F.linear * open``), forward and every gradient; closed
    rows exact zeros in ``y``, ``dW`` and ``db``; inf in their weights never read."""
    from l0kernels import _active
    from l0kernels.backends import cuda as cb
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the open-set GEMM needs sm_80+")
    monkeypatch.setattr(cb, "SKIP_BELOW", 1.0)
    m, k, n = 300, 141, 99
    gen = torch.Generator().manual_seed(11)
    keep = torch.rand(n, generator=gen) < density
    x = torch.randn(3, m // 3, k, generator=gen).to(dtype).cuda()
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda()
    wp, bp = w.clone(), b.clone()
    wp[~keep.cuda()] = float("inf")
    bp[~keep.cuda()] = float("inf")
    leaves = [t.detach().requires_grad_() for t in (x, wp, bp)]
    refs = [t.detach().double().cpu().requires_grad_() for t in (x, w, b)]
    _active.PATHS.clear()
    out = l0k.structure_linear(*leaves, rows=keep.cuda(), host=False, backend="cuda")
    ref = torch.nn.functional.linear(*refs) * keep
    assert _active.PATHS["structure-rows", "fwd", "skip"] == 1
    g = torch.randn(ref.shape, dtype=torch.float64)
    gs = torch.autograd.grad(out, leaves, g.to(dtype).cuda())
    gr = torch.autograd.grad(ref, refs, g)
    assert torch.isfinite(out).all() and rel_err(out.cpu(), ref) < TOL[dtype]
    assert (out.cpu()[..., ~keep] == 0).all()
    for name, a, r in zip(("x", "weight", "bias"), gs, gr):
        assert torch.isfinite(a).all(), name
        assert rel_err(a.cpu(), r) < TOL[dtype] * 10 or (r == 0).all() and (a == 0).all(), name
    assert (gs[1].cpu()[~keep] == 0).all() and (gs[2].cpu()[~keep] == 0).all()
    idx, cnt = torch.zeros(n, dtype=torch.int64, device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.l0kernels.rows_linear_fwd.default, (x, w, b, idx, cnt),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.0, "one"])
@pytest.mark.parametrize("group,channels_last", [(1, False), (2, True)])
def test_conv2d_training_over_the_open_set(dtype, density, group, channels_last, rel_err, monkeypatch):
    """Batch-noise training of a half-type convolution runs over the open output channels (im2col and the
    open-set GEMMs): equal to the float64 reference, closed channels' outputs and gradients exactly zero, inf
    in their weights never read, the path counted, and the same as cuDNN with L0K_SKIP_CLOSED off."""
    from l0kernels import _active
    from l0kernels.backends import cuda as cb
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the open-set GEMM needs sm_80+")
    monkeypatch.setattr(cb, "SKIP_BELOW", 1.0)
    c_out = 12
    gen = torch.Generator().manual_seed(11 * group)
    la = log_alpha_at_density(c_out // group, density, gen).to(dtype).cuda()
    x = torch.randn(3, 5, 13, 11, generator=gen).to(dtype).cuda()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(c_out, 5, 3, 3, generator=gen) * 0.2).to(dtype).cuda()
    b = torch.randn(c_out, generator=gen).to(dtype).cuda()
    conv = ((2, 1), (1, 2), (1, 2), 1)
    seed = torch.tensor(_seed(), device="cuda")
    z = l0k.sample_gates(la.float().cpu(), seed.cpu()).repeat_interleave(group)
    closed = torch.nonzero(z == 0).reshape(-1).cuda()
    wp = w.clone()
    wp[closed] = float("inf")
    leaves = [t.detach().requires_grad_() for t in (x, wp, la, b)]
    refs = [t.detach().double().cpu().requires_grad_() for t in (x, w, la, b)]
    _active.PATHS.clear()
    out = CudaL0Conv2dFunction.apply(*leaves, *conv, seed, "batch", True, CFG, group)
    ref = L0Conv2dFunction.apply(*refs, *conv, seed.cpu(), "batch", True, CFG, group)
    g = torch.randn(ref.shape, dtype=torch.float64)
    gs = torch.autograd.grad(out, leaves, g.to(dtype).cuda())
    gr = torch.autograd.grad(ref, refs, g)
    assert _active.PATHS["conv2d", "fwd", "skip"] == 1 and _active.PATHS["conv2d", "bwd", "skip"] == 1
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.isfinite(out).all() and rel_err(out.cpu(), ref) < TOL[dtype]
    for name, a, r in zip(("x", "weight", "log_alpha", "bias"), gs, gr):
        assert torch.isfinite(a).all(), name
        assert rel_err(a.cpu(), r) < TOL[dtype] * 10, name
    zc = closed.cpu()
    assert (out.cpu()[:, zc] == 0).all() and (gs[1].cpu()[zc] == 0).all() and (gs[3].cpu()[zc] == 0).all()
    assert (gs[2].cpu().repeat_interleave(group)[zc] == 0).all()
    _assert_same_as_dense(lambda *ts: CudaL0Conv2dFunction.apply(*ts, *conv, seed, "batch", True, CFG, group),
                          (x, w, la, b), g, out, gs, rel_err)


def test_training_over_the_open_set_never_synchronises():
    """The open-set step reads its counts on the device: a whole forward+backward runs with synchronising
    CUDA calls turned into errors."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the open-set GEMM needs sm_80+")
    from l0kernels import _active
    lin = l0k.L0Linear(64, 48, backend="cuda", droprate_init=0.9).cuda().half()
    x = torch.randn(40, 64, device="cuda", dtype=torch.half)
    lin(x).float().sum().backward()  # warm-up: allocations, the autotuner, the first open-fraction read
    torch.cuda.synchronize()
    _active.PATHS.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):  # the open fraction read again behind an event: still no sync
            lin(x).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert _active.PATHS["linear-in", "fwd", "skip"] == 20  # about 35% open (droprate 0.9): the open-set path
