"""Triton backend, ``l0_linear`` (CPU under TRITON_INTERPRET=1; the same tests run natively on a GPU).

Every mode of docs/design.md §3 against the torch backend run in float64 (docs/design.md §6 tolerances),
gates against the float64 formula for the same (seed, offset), odd shapes that are no multiple
of any block, non-contiguous and leading-dim inputs, zero-size M, and what autograd keeps.
"""
import itertools
import os

import pytest
import torch

pytest.importorskip("triton")

import l0kernels as l0k  # noqa: E402
from l0kernels._gates import DEFAULT_CONFIG, eval_gates_and_grad, gates_from_uniform  # noqa: E402

from conftest import TOL, rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
M, K, N = 13, 19, 11
SEED = 2**40 + 12345  # > 2**32: both Philox key words matter


@pytest.fixture(scope="module", autouse=True)
def triton_ready():
    call = l0k._checks.linear_call(torch.randn(2, 3, device=DEV), torch.randn(4, 3, device=DEV),
                                   torch.randn(3, device=DEV), None, seed=1, gate="in", noise="batch", training=True,
                                   backend="triton", beta=2 / 3, gamma=-0.1, zeta=1.1)
    why = l0k.get_backend("triton").why_not(call)
    if why is not None:
        pytest.skip(f"triton backend cannot run here: {why}")


def la_shape(gate, n, k):
    return {"in": (k,), "out": (n,), "weight": (n, k)}[gate]


def run_both(x, w, la, b, dy=None, **kw):
    """Forward + backward on the triton backend and on the float64 torch backend."""
    ps = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, la, b)]
    y = l0k.l0_linear(*ps, backend="triton", **kw)
    if dy is None:
        dy = torch.randn_like(y)
    y.backward(dy)
    qs = [t.detach().double().clone().requires_grad_() if t is not None else None for t in (x, w, la, b)]
    yr = l0k.l0_linear(*qs, backend="torch", **kw)
    yr.backward(dy.double())
    return y, yr, ps, qs


def check(y, yr, ps, qs, tol):
    assert y.dtype == ps[0].dtype and y.shape == yr.shape
    assert rel(y, yr) < tol, ("y", rel(y, yr))
    for name, p, q in zip(("dx", "dW", "dlog_alpha", "db"), ps, qs):
        if p is not None:
            assert p.grad is not None and p.grad.shape == p.shape, name
            assert rel(p.grad, q.grad) < tol, (name, rel(p.grad, q.grad))


@pytest.mark.parametrize("offsets_hi", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2**32 + 3, 2**63 - 1])
def test_gate_helpers_match_float64_formula(seed, offsets_hi):
    from l0kernels.backends.triton._gate_math import triton_gates
    n = 300
    off = torch.randint(2**32, 2**62, (n,)) if offsets_hi else torch.randint(0, 2**31, (n,))
    la = torch.randn(n) * 3
    z, dz = triton_gates(la.to(DEV), seed, off.to(DEV), DEFAULT_CONFIG)
    zr, dzr = gates_from_uniform(la.double(), l0k.philox_uniform(seed, off).double(), DEFAULT_CONFIG)
    assert (z.cpu().double() - zr).abs().max() < 1e-6
    assert (dz.cpu().double() - dzr).abs().max() < 1e-6
    assert 0 < float(z.gt(0).float().mean()) < 1  # draws that both open and close gates


def test_eval_gate_helpers_match_float64_formula():
    from l0kernels.backends.triton._gate_math import triton_gates
    la = torch.cat([torch.randn(200) * 3, torch.tensor([-2.3979, 2.3979, -10.0, 10.0])])
    z, dz = triton_gates(la.to(DEV), 0, torch.zeros(la.shape, dtype=torch.int64, device=DEV), DEFAULT_CONFIG,
                         training=False)
    zr, dzr = eval_gates_and_grad(la.double(), DEFAULT_CONFIG)
    assert (z.cpu().double() - zr).abs().max() < 1e-6
    assert (dz.cpu().double() - dzr).abs().max() < 1e-6


MODES = [(g, n, t) for g, n, t in itertools.product(("in", "out", "weight"), ("batch", "sample"), (True, False))
         if not (g == "weight" and n == "sample")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate,noise,training", MODES)
def test_linear_matches_torch_float64(gate, noise, training, dtype):
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    w = torch.randn(N, K, device=DEV, dtype=dtype) / K ** 0.5
    b = torch.randn(N, device=DEV, dtype=dtype)
    la = (torch.randn(la_shape(gate, N, K), device=DEV) * 2).to(dtype)
    check(*run_both(x, w, la, b, seed=SEED, gate=gate, noise=noise, training=training), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate,noise,training", [("in", "sample", True), ("out", "sample", True),
                                                 ("weight", "batch", True), ("weight", "batch", False)])
def test_pregated_operands_match_torch_float64(monkeypatch, gate, noise, training, dtype):
    """The path that gates an operand once into a temporary (large other dimension) instead of on load."""
    from l0kernels.backends.triton import linear as tlin
    monkeypatch.setattr(tlin, "PREGATE_MIN_TILES", 0)
    assert tlin._pregate_pays(1)
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    w = torch.randn(N, K, device=DEV, dtype=dtype) / K ** 0.5
    b = torch.randn(N, device=DEV, dtype=dtype)
    la = (torch.randn(la_shape(gate, N, K), device=DEV) * 2).to(dtype)
    check(*run_both(x, w, la, b, seed=SEED, gate=gate, noise=noise, training=training), TOL[dtype])


@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("out", "batch"), ("out", "sample"), ("weight", "batch")])
def test_linear_without_bias(gate, noise):
    x = torch.randn(7, K, device=DEV)
    w = torch.randn(N, K, device=DEV)
    la = torch.randn(la_shape(gate, N, K), device=DEV) * 2
    check(*run_both(x, w, la, None, seed=3, gate=gate, noise=noise), TOL[torch.float32])


@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"),
                                        ("weight", "batch")])
def test_same_seed_same_gates_as_torch(gate, noise):
    """The gates themselves, read back through the op: in-gates with W = I give y = x * z; out-gates give
    y = h * z; weight gates with x = I give y = (W * Z)^T."""
    seed = int(torch.randint(0, 2**62, ()).item())
    k = n = 17
    if gate == "weight":
        x = torch.eye(k, device=DEV)
        w = torch.randn(n, k, device=DEV)
        la = torch.randn(n, k, device=DEV) * 2
        y = l0k.l0_linear(x, w, la, seed=seed, gate=gate, noise=noise, backend="triton")
        z = l0k.sample_gates(la, seed)
        torch.testing.assert_close(y, (w * z).t(), atol=1e-6, rtol=1e-6)
        return
    m = 9
    x = torch.randn(m, k, device=DEV)
    w = torch.eye(k, device=DEV) if gate == "in" else torch.randn(n, k, device=DEV)
    la = torch.randn(k, device=DEV) * 2
    y = l0k.l0_linear(x, w, la, seed=seed, gate=gate, noise=noise, backend="triton")
    z = l0k.sample_gates(la, seed, (m, k) if noise == "sample" else None)
    ref = x * z if gate == "in" else (x @ w.t()) * z
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert 0 < float((z == 0).float().mean()) < 1 or float(z.min()) < 1  # not all gates trivially open


@pytest.mark.parametrize("gate,noise", [("in", "sample"), ("out", "batch"), ("weight", "batch")])
def test_non_contiguous_inputs(gate, noise):
    xb = torch.randn(K, 2 * M + 1, device=DEV)
    x = xb[:, 1::2].t()  # (M, K), strides (2, 2M+1)
    wb = torch.randn(K, N + 4, device=DEV)
    w = wb[:, 2:N + 2].t()  # (N, K), transposed slice
    assert not x.is_contiguous() and not w.is_contiguous()
    la = torch.randn(la_shape(gate, N, K), device=DEV) * 2
    if gate == "weight":
        la = (torch.randn(K, N, device=DEV) * 2).t()
    b = torch.randn(2 * N, device=DEV)[::2]
    y, yr, ps, qs = run_both(x, w, la, b, seed=SEED, gate=gate, noise=noise)
    check(y, yr, ps, qs, TOL[torch.float32])
    # a non-contiguous upstream gradient (expanded / transposed)
    dy = torch.randn(N, M, device=DEV).t()
    check(*run_both(x, w, la, b, dy=dy, seed=SEED, gate=gate, noise=noise), TOL[torch.float32])


@pytest.mark.parametrize("gate,noise", [("in", "sample"), ("out", "sample"), ("weight", "batch")])
def test_leading_dims(gate, noise):
    x = torch.randn(2, 3, K, device=DEV)
    w = torch.randn(N, K, device=DEV)
    b = torch.randn(N, device=DEV)
    la = torch.randn(la_shape(gate, N, K), device=DEV) * 2
    y, yr, ps, qs = run_both(x, w, la, b, seed=SEED, gate=gate, noise=noise)
    assert y.shape == (2, 3, N)
    check(y, yr, ps, qs, TOL[torch.float32])


@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("out", "sample"), ("weight", "batch")])
def test_zero_size_rows(gate, noise):
    x = torch.randn(0, K, device=DEV, requires_grad=True)
    w = torch.randn(N, K, device=DEV, requires_grad=True)
    b = torch.randn(N, device=DEV, requires_grad=True)
    la = (torch.randn(la_shape(gate, N, K), device=DEV) * 2).requires_grad_()
    y = l0k.l0_linear(x, w, la, b, seed=1, gate=gate, noise=noise, backend="triton")
    assert y.shape == (0, N)
    y.sum().backward()
    assert x.grad.shape == (0, K)
    for t in (w, b, la):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_zero_in_features_keeps_gated_bias():
    x = torch.randn(5, 0, device=DEV)
    w = torch.randn(N, 0, device=DEV)
    b = torch.randn(N, device=DEV, requires_grad=True)
    la = (torch.randn(N, device=DEV) * 2).requires_grad_()
    y = l0k.l0_linear(x, w, la, b, seed=4, gate="out", noise="sample", backend="triton")
    z = l0k.sample_gates(la.detach(), 4, (5, N))
    torch.testing.assert_close(y, b.detach() * z, atol=1e-6, rtol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(b.grad, (dy * z).sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("in", "sample"), ("out", "batch"), ("out", "sample"),
                                        ("weight", "batch")])
def test_autograd_saves_only_inputs(gate, noise):
    x = torch.randn(M, K, device=DEV, requires_grad=True)
    w = torch.randn(N, K, device=DEV, requires_grad=True)
    b = torch.randn(N, device=DEV, requires_grad=True)
    la = (torch.randn(la_shape(gate, N, K), device=DEV) * 2).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = l0k.l0_linear(x, w, la, b, seed=SEED, gate=gate, noise=noise, backend="triton")
    y.sum().backward()
    assert saved, "nothing was saved (hooks not exercised)"
    ins = {t.data_ptr() for t in (x, w, la, b)}
    for t in saved:
        assert t.data_ptr() in ins or t.numel() <= max(N, K), f"extra saved tensor {tuple(t.shape)}"


def test_backend_reasons(monkeypatch):
    import l0kernels.backends.triton as tb
    backend = l0k.get_backend("triton")
    assert backend.name == "triton" and backend.priority == 10
    args = dict(seed=1, gate="in", noise="batch", training=True, backend="triton", beta=2 / 3, gamma=-0.1, zeta=1.1)
    call64 = l0k._checks.linear_call(torch.randn(2, 3, dtype=torch.float64, device=DEV),
                                     torch.randn(4, 3, dtype=torch.float64, device=DEV),
                                     torch.randn(3, dtype=torch.float64, device=DEV), None, **args)
    why = backend.why_not(call64)
    assert "float16/bfloat16/float32" in why and "backend='torch'" in why
    with pytest.raises(ValueError, match="float64"):
        l0k.l0_linear(call64.x, call64.weight, call64.log_alpha, seed=1, backend="triton")
    cpu = l0k._checks.linear_call(torch.randn(2, 3), torch.randn(4, 3), torch.randn(3), None, **args)
    monkeypatch.setattr(tb, "INTERPRET", False)
    assert "CUDA" in backend.why_not(cpu) and "TRITON_INTERPRET" in backend.why_not(cpu)
    monkeypatch.undo()
    assert not backend.auto_eligible(cpu)  # the interpreter is for tests only
    if DEV == "cpu":
        assert l0k.select_backend(cpu, "auto").name != "triton"


def test_custom_op_opcheck_and_compile():
    from l0kernels.backends.triton._ops import linear_op
    x = torch.randn(5, K, device=DEV, requires_grad=True)
    w = torch.randn(N, K, device=DEV, requires_grad=True)
    la = torch.randn(N, device=DEV, requires_grad=True)
    b = torch.randn(N, device=DEV, requires_grad=True)
    torch.library.opcheck(linear_op, (x, w, la, b, torch.tensor(123, device=DEV), "out", True, True, 2 / 3, -0.1, 1.1, 1e-6))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    def f(x, w, la, b):
        return l0k.l0_linear(x, w, la, b, seed=5, gate="in", noise="sample", backend="triton")

    la_in = torch.randn(K, device=DEV, requires_grad=True)
    l0k.available_backends()  # load the lazy backends outside the compiled region
    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend=record)(x, w, la_in, b)
    assert any("l0kernels_triton.linear" in g for g in graphs)
    ref = f(x, w, la_in, b)
    torch.testing.assert_close(y, ref)


# The interpreter accepts code the GPU compiler rejects: compile representative variants ahead of time
# for sm_90 in a fresh process without TRITON_INTERPRET (no GPU needed; Triton ships ptxas).
AOT_HELPER = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def aot(kern, ptr_types, consts, default_ptr):
    while not isinstance(kern, triton.runtime.jit.JITFunction):
        kern = kern.fn  # unwrap triton.autotune
    sig = {}
    for p in kern.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = ptr_types.get(p.name, default_ptr)
        elif p.name in ("beta", "gamma", "zeta", "eps"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "*i64" if p.name == "seed" else "i32"  # the seed: a pointer to a 0-d int64 tensor
    k = triton.compile(ASTSource(kern, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert k.asm["cubin"]
'''

AOT_LINEAR = AOT_HELPER + r'''
from l0kernels.backends.triton import linear as L
blocks = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
f32 = {"dla_ptr": "*fp32", "idx_ptr": "*i64", "cnt_ptr": "*i64"}
for dt, dotf32, prec in (("*bf16", False, "ieee"), ("*fp32", True, "tf32")):
    for gate, sample, gsize, open_ in ((1, True, 1, False), (2, True, 1, False), (2, False, 1, False),
                                       (3, False, 1, False), (1, True, 4, False), (2, False, 8, False),
                                       (1, False, 1, True), (2, False, 1, True), (1, False, 4, True),
                                       (2, False, 8, True)):
        c = dict(GATE=gate, SAMPLE=sample, TRAINING=True, GSIZE=gsize, DOT_F32=dotf32, PRECISION=prec, OPEN=open_,
                 **blocks)
        aot(L._fwd_kernel, f32, dict(c, HAS_BIAS=True, EPILOGUE=int(gate == 2 and sample)), dt)
        if dt == "*bf16":
            aot(L._dx_kernel, f32, dict(c, STORE_DX=True, NEED_DLA=True), dt)
            aot(L._dw_kernel, f32, dict(c, HAS_BIAS=True, STORE_DW=True, STORE_DB=True, NEED_DLA=True), dt)
    aot(L._fwd_kernel, f32, dict(GATE=0, SAMPLE=False, TRAINING=True, GSIZE=1, DOT_F32=dotf32, PRECISION=prec,
                                 HAS_BIAS=False, EPILOGUE=0, OPEN=False, **blocks), dt)
    aot(L._pregate_kernel, {}, dict(PER_ELEMENT=True, TRAINING=True, GSIZE=1, BLOCK_R=32, BLOCK_C=128), dt)
    aot(L._pregate_kernel, {}, dict(PER_ELEMENT=False, TRAINING=True, GSIZE=3, BLOCK_R=32, BLOCK_C=128), dt)
from l0kernels.backends.triton import _gate_math as G
aot(G._closed_kernel, {"la_ptr": "*fp32", "out_ptr": "*u8"}, dict(GSIZE=4, BLOCK=128), "*fp32")
print("compiled")
'''


@pytest.mark.interpret
def test_kernels_compile_for_gpu():
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT_LINEAR], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
