"""Eval-mode structured-sparse paths (l0kernels.backends._plans) and the Triton eval kernels (interpreter on CPU).

Every output is compared with the float64 torch reference ``l0_linear/l0_conv2d(..., training=False)``.
"""
import os

import pytest
import torch

import l0kernels as l0k
from l0kernels.backends import _plans
from l0kernels.backends._plans import build_linear_plan, clear_eval_cache

from conftest import TOL

CLOSED = -6.0  # far below log(-gamma/zeta) ~ -2.398: z_eval == 0


def randomize_gates(layer, p_closed, gen=None):
    """log_alpha ~ U(-2, 4) (open: partly and fully), a random subset forced closed."""
    with torch.no_grad():
        la = layer.log_alpha
        la.copy_((torch.rand(la.shape, generator=gen, dtype=torch.float64) * 6 - 2).to(la.dtype))
        closed = torch.rand(la.shape, generator=gen) < p_closed
        la[closed] = CLOSED
    return closed


def ref_linear(m, x):
    b = m.bias.double() if m.bias is not None else None
    return l0k.l0_linear(x.double(), m.weight.double(), m.log_alpha.double(), b, gate=m.gate, training=False,
                         backend="torch")


def ref_conv(m, x):
    b = m.bias.double() if m.bias is not None else None
    return l0k.l0_conv2d(x.double(), m.weight.double(), m.log_alpha.double(), b, m.stride, m.padding, m.dilation,
                         m.groups, training=False, backend="torch")


@pytest.mark.parametrize("gate", ["in", "out", "weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p_closed", [0.0, 0.6, 1.0])
def test_linear_eval_matches_reference(gate, dtype, p_closed, rel_err):
    torch.manual_seed(hash((gate, str(dtype), p_closed)) % 2**31)
    for bias in (True, False):
        m = l0k.L0Linear(37, 19, bias=bias, gate=gate, dtype=dtype).eval()
        randomize_gates(m, p_closed)
        for shape in [(1, 37), (5, 37), (2, 3, 37)]:
            x = torch.randn(shape, dtype=dtype)
            with torch.no_grad():
                y = m(x)
            ref = ref_linear(m, x)
            assert y.shape == ref.shape and y.dtype == dtype
            assert rel_err(y, ref) < TOL[dtype]
            if p_closed == 1.0 and gate != "in":  # every output row closed: zeros (out) or the bias (weight)
                want = torch.zeros_like(y) if gate == "out" or not bias else m.bias.expand_as(y)
                assert torch.equal(y, want)


def test_linear_eval_plan_is_compact():
    torch.manual_seed(1)
    m = l0k.L0Linear(30, 20, gate="in").eval()
    closed = randomize_gates(m, 0.5)
    plan = build_linear_plan(m)
    assert plan.weight.shape == (20, int((~closed).sum()))
    assert torch.equal(plan.in_idx, (~closed).nonzero().flatten())
    m = l0k.L0Linear(30, 20, gate="out").eval()
    closed = randomize_gates(m, 0.5)
    plan = build_linear_plan(m)
    assert plan.weight.shape == (int((~closed).sum()), 30) and plan.bias.shape == (int((~closed).sum()),)
    m = l0k.L0Linear(6, 5, gate="weight").eval()
    with torch.no_grad():
        m.log_alpha.uniform_(-2, 4)
        m.log_alpha[:, 2] = CLOSED  # a closed column
        m.log_alpha[3, :] = CLOSED  # a closed row: outputs its bias
    plan = build_linear_plan(m)
    assert plan.weight.shape == (4, 5) and plan.in_idx.tolist() == [0, 1, 3, 4, 5]
    assert plan.out_idx.tolist() == [0, 1, 2, 4]


def test_linear_eval_noncontiguous_input(rel_err):
    torch.manual_seed(2)
    m = l0k.L0Linear(23, 11, gate="in").eval()
    randomize_gates(m, 0.5)
    x = torch.randn(23, 9).t()  # (9, 23), non-contiguous
    with torch.no_grad():
        y = m(x)
    assert rel_err(y, ref_linear(m, x)) < TOL[torch.float32]


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(groups=2)])
def test_conv_eval_matches_reference(kw, rel_err):
    torch.manual_seed(3)
    for p_closed in (0.0, 0.5, 1.0):
        m = l0k.L0Conv2d(4, 6, 3, **kw).eval()
        randomize_gates(m, p_closed)
        for cl in (False, True):
            x = torch.randn(2, 4, 9, 7)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                y = m(x)
            ref = ref_conv(m, x)
            assert y.shape == ref.shape
            assert rel_err(y, ref) < TOL[torch.float32]
            if p_closed == 1.0:
                assert torch.count_nonzero(y) == 0


def test_cache_reused_and_invalidated(monkeypatch, rel_err):
    torch.manual_seed(4)
    builds = []
    real = _plans.build_linear_plan
    monkeypatch.setattr(_plans, "build_linear_plan", lambda mod: builds.append(1) or real(mod))
    m = l0k.L0Linear(13, 7, gate="out").eval()
    randomize_gates(m, 0.4)
    x = torch.randn(4, 13)
    with torch.no_grad():
        m(x)
        m(x)
        assert len(builds) == 1  # second call: cached plan
        m.weight.mul_(-1.5)  # in-place update bumps the version counter
        assert rel_err(m(x), ref_linear(m, x)) < TOL[torch.float32]
        assert len(builds) == 2
        m.log_alpha.copy_(torch.where(m.log_alpha > 0, torch.full_like(m.log_alpha, CLOSED), m.log_alpha.abs() + 1))
        assert rel_err(m(x), ref_linear(m, x)) < TOL[torch.float32]
        m.bias.add_(1.0)
        assert rel_err(m(x), ref_linear(m, x)) < TOL[torch.float32]
        assert len(builds) == 4
        m.weight = torch.nn.Parameter(torch.randn(7, 13))  # a new parameter object
        assert rel_err(m(x), ref_linear(m, x)) < TOL[torch.float32]
        assert len(builds) == 5
        m.load_state_dict({k: v * 0.5 for k, v in m.state_dict().items()})
        assert rel_err(m(x), ref_linear(m, x)) < TOL[torch.float32]
        assert len(builds) == 6
        m.weight.data.mul_(2.0)  # .data edits are invisible to version counters ...
        clear_eval_cache(m)  # ... and need an explicit clear
        assert rel_err(m(x), ref_linear(m, x)) < TOL[torch.float32]
        assert len(builds) == 7


def test_conv_cache_invalidated(rel_err):
    torch.manual_seed(5)
    m = l0k.L0Conv2d(3, 5, 3, padding=1).eval()
    randomize_gates(m, 0.5)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        m(x)
        m.log_alpha.neg_()
        assert rel_err(m(x), ref_conv(m, x)) < TOL[torch.float32]
        m.weight.add_(torch.randn_like(m.weight))
        assert rel_err(m(x), ref_conv(m, x)) < TOL[torch.float32]


def test_eval_with_grad_falls_back_to_differentiable_path():
    torch.manual_seed(6)
    for gate in ("in", "out"):
        m = l0k.L0Linear(9, 5, gate=gate, dtype=torch.float64).eval()
        randomize_gates(m, 0.3)
        x = torch.randn(4, 9, dtype=torch.float64)
        y = m(x)
        assert y.requires_grad
        y.square().sum().backward()
        la = m.log_alpha.detach().clone().requires_grad_()
        w = m.weight.detach().clone().requires_grad_()
        ref = l0k.l0_linear(x, w, la, m.bias.detach(), gate=gate, training=False, backend="torch")
        ref.square().sum().backward()
        assert torch.allclose(m.log_alpha.grad, la.grad) and torch.allclose(m.weight.grad, w.grad)
    c = l0k.L0Conv2d(2, 3, 3, dtype=torch.float64).eval()
    y = c(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    y.sum().backward()
    assert c.log_alpha.grad is not None


def test_eval_bad_input():
    m = l0k.L0Linear(8, 4).eval()
    with pytest.raises(ValueError, match="x must have shape"):
        with torch.no_grad():
            m(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x"):
        with torch.no_grad():
            m(torch.randn(3, 8, dtype=torch.float64))
    c = l0k.L0Conv2d(3, 4, 3).eval()
    with pytest.raises(ValueError, match="channels"):
        with torch.no_grad():
            c(torch.randn(1, 2, 5, 5))


def test_triton_backend_rejects_float64():
    pytest.importorskip("triton")
    m = l0k.L0Linear(8, 4, backend="triton", dtype=torch.float64).eval()
    with pytest.raises(ValueError, match="triton"):
        with torch.no_grad():
            m(torch.randn(2, 8, dtype=torch.float64))


# -- Triton eval kernels (interpreter on CPU) -------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("gate", ["in", "out", "weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_eval_kernels(gate, dtype, rel_err):
    pytest.importorskip("triton")
    sparse_eval = pytest.importorskip("l0kernels.backends.triton.sparse_eval")
    if not (torch.cuda.is_available() or sparse_eval.INTERPRET):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(7)
    m = l0k.L0Linear(21, 18, gate=gate, backend="triton", dtype=dtype, device=dev).eval()
    randomize_gates(m, 0.5)
    if gate == "weight":
        with torch.no_grad():
            m.log_alpha[:, 3] = CLOSED
            m.log_alpha[5, :] = CLOSED
    plan = build_linear_plan(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for rows in (1, 3, 19):
        x = torch.randn(rows + 2, 21, dtype=dtype, device=dev)[1:-1]
        ref = ref_linear(m, x)
        for force in (("gemv", "gemm") if rows <= 16 else ("gemm",)):
            y = sparse_eval.sparse_linear(x, plan, force=force)
            assert rel_err(y, ref) < TOL[dtype], force
        with torch.no_grad():
            y = m(x)  # module path picks the kernel
        assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]
    for k, v in m.state_dict().items():  # the kernels never write into the layer's parameters
        assert torch.equal(v, before[k]), k


@pytest.mark.interpret
def test_triton_eval_all_closed_and_noncontiguous(rel_err):
    sparse_eval = pytest.importorskip("l0kernels.backends.triton.sparse_eval")
    if not (torch.cuda.is_available() or sparse_eval.INTERPRET):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(8)
    for gate in ("in", "out"):
        m = l0k.L0Linear(10, 6, gate=gate, backend="triton", device=dev).eval()
        with torch.no_grad():
            m.log_alpha.fill_(CLOSED)
            x = torch.randn(10, 20, device=dev).t()  # (20, 10) with strides (1, 20)
            y = m(x)
        want = m.bias.detach().expand(20, 6) if gate == "in" else torch.zeros(20, 6, device=dev)
        assert torch.allclose(y, want)
    m = l0k.L0Linear(10, 6, gate="in", backend="triton", device=dev).eval()
    randomize_gates(m, 0.5)
    x = torch.randn(10, 20, device=dev).t()
    with torch.no_grad():
        assert rel_err(m(x), ref_linear(m, x)) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_cuda_auto_eval_uses_sparse_path(gate, rel_err):
    torch.manual_seed(9)
    m = l0k.L0Linear(300, 100, gate=gate, device="cuda").eval()
    randomize_gates(m, 0.7)
    for rows in (1, 16, 1000):
        x = torch.randn(rows, 300, device="cuda")
        with torch.no_grad():
            y = m(x)
        assert rel_err(y, ref_linear(m, x)) < TOL[torch.float32]


def test_cache_not_shared_by_copies(rel_err):
    import copy
    torch.manual_seed(10)
    m = l0k.L0Linear(9, 6, gate="in").eval()
    randomize_gates(m, 0.5)
    x = torch.randn(3, 9)
    with torch.no_grad():
        m(x)
        assert _plans.cached_plan(m) is not None
        m2 = copy.deepcopy(m)
        assert _plans.cached_plan(m2) is None
        m2.weight.mul_(3.0)
        assert rel_err(m2(x), ref_linear(m2, x)) < TOL[torch.float32]
        assert rel_err(m(x), ref_linear(m, x)) < TOL[torch.float32]


_AOT_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("L0K_TRITON_AUTOTUNE", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from l0kernels.backends.triton import sparse_eval as S
assert S.AUTOTUNE
args = ["x_ptr", "w_ptr", "b_ptr", "y_ptr", "in_idx_ptr", "out_idx_ptr", "idle_ptr", "fill_ptr", "M", "N", "K",
        "N_IDLE", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ym", "stride_yn"]
jobs = []  # every autotune config the launcher can pick: GEMM configs, and GEMV configs kept for 1 and 16 rows
for cfg in S.GEMM_CONFIGS:
    for dt, ieee in (("bf16", False), ("fp32", True)):
        jobs.append((dt, S._sparse_gemm_kernel.fn, dict(UPCAST=False, IEEE=ieee, **cfg.kwargs), cfg))
for bm in (1, 16):
    for cfg in S._prune_gemv(S.GEMV_CONFIGS, {}, BLOCK_M=bm):
        jobs.append(("fp16", S._sparse_gemv_kernel.fn, dict(BLOCK_M=bm, **cfg.kwargs), cfg))
assert len(jobs) > 10
for dt, fn, consts, cfg in jobs:
    consts.update(HAS_BIAS=True, GATHER_IN=True, SCATTER_OUT=True, HAS_IDLE=True, HAS_FILL=True)
    sig = {a: ("*i64" if "idx" in a or "idle" in a else f"*{dt}") if a.endswith("_ptr") else "i32" for a in args}
    sig.update({k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert k.asm["cubin"]
print("compiled", len(jobs))
"""


@pytest.mark.interpret
def test_triton_eval_kernels_compile_for_gpu():
    """The interpreter accepts code the GPU compiler rejects: compile the kernels ahead of time for sm_90
    (no GPU needed; Triton ships ptxas) in a fresh process without TRITON_INTERPRET."""
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {e}")
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
