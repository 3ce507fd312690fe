"""Triton backend, ``l0_conv2d`` (CPU under TRITON_INTERPRET=1; the same tests run natively on a GPU).

Output-channel gates, batch and per-example noise, training and eval, stride/padding/dilation/groups,
NCHW and channels_last, against the torch backend run in float64 (docs/design.md §6 tolerances).
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")

import l0kernels as l0k  # noqa: E402
from l0kernels import _active  # noqa: E402

from conftest import TOL, rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 2**35 + 99


@pytest.fixture(scope="module", autouse=True)
def triton_ready():
    call = l0k._checks.conv2d_call(torch.randn(1, 2, 4, 4, device=DEV), torch.randn(3, 2, 3, 3, device=DEV),
                                   torch.randn(3, device=DEV), None, 1, 0, 1, 1, seed=1, noise="batch", training=True,
                                   backend="triton", beta=2 / 3, gamma=-0.1, zeta=1.1)
    why = l0k.get_backend("triton").why_not(call)
    if why is not None:
        pytest.skip(f"triton backend cannot run here: {why}")


def run_both(x, w, la, b, **kw):
    ps = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, la, b)]
    if x.is_contiguous(memory_format=torch.channels_last):
        ps[0] = x.detach().clone(memory_format=torch.channels_last).requires_grad_()
    y = l0k.l0_conv2d(*ps, backend="triton", **kw)
    dy = torch.randn_like(y)
    y.backward(dy)
    qs = [t.detach().double().clone().requires_grad_() if t is not None else None for t in (x, w, la, b)]
    yr = l0k.l0_conv2d(*qs, backend="torch", **kw)
    yr.backward(dy.double())
    return y, yr, ps, qs


def check(y, yr, ps, qs, tol):
    assert y.shape == yr.shape and y.dtype == ps[0].dtype
    assert rel(y, yr) < tol, ("y", rel(y, yr))
    for name, p, q in zip(("dx", "dW", "dlog_alpha", "db"), ps, qs):
        if p is not None:
            assert p.grad is not None and p.grad.shape == p.shape, name
            assert rel(p.grad, q.grad) < tol, (name, rel(p.grad, q.grad))


GEOMS = {
    "plain": dict(B=2, C_in=3, C_out=5, H=7, W=6, k=(3, 2), stride=1, padding=1, dilation=1, groups=1),
    "strided": dict(B=3, C_in=4, C_out=6, H=9, W=8, k=(3, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                    groups=2),
    "depthwise": dict(B=2, C_in=3, C_out=3, H=6, W=5, k=(3, 3), stride=2, padding=0, dilation=1, groups=3),
}


def make(geom, dtype, channels_last, bias=True):
    g = GEOMS[geom]
    x = torch.randn(g["B"], g["C_in"], g["H"], g["W"], device=DEV, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(g["C_out"], g["C_in"] // g["groups"], *g["k"], device=DEV, dtype=dtype)
    la = (torch.randn(g["C_out"], device=DEV) * 2).to(dtype)
    b = torch.randn(g["C_out"], device=DEV, dtype=dtype) if bias else None
    kw = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"])
    return x, w, la, b, kw


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("noise,training", [("batch", True), ("sample", True), ("batch", False)])
@pytest.mark.parametrize("geom", list(GEOMS))
def test_conv2d_matches_torch_float64(geom, noise, training, channels_last):
    x, w, la, b, kw = make(geom, torch.float32, channels_last)
    y, yr, ps, qs = run_both(x, w, la, b, seed=SEED, noise=noise, training=training, **kw)
    check(y, yr, ps, qs, TOL[torch.float32])
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype,noise", [(torch.bfloat16, "batch"), (torch.float16, "sample")])
def test_conv2d_half_precision(dtype, noise):
    x, w, la, b, kw = make("strided", dtype, True)
    check(*run_both(x, w, la, b, seed=SEED, noise=noise, **kw), TOL[dtype])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv2d_half_precision_skipping_backward(dtype, channels_last):
    """Batch-noise training with groups == 1 runs forward and backward over the open channels only (the
    implicit-GEMM dgrad/wgrad kernels); in half precision against float64, closed channels exactly zero."""
    x, w, la, b, kw = make("plain", dtype, channels_last)
    la[0], la[1] = 10.0, -30.0  # one channel open, one closed in every draw
    _active.PATHS.clear()
    y, yr, ps, qs = run_both(x, w, la, b, seed=SEED, noise="batch", **kw)
    assert _active.PATHS["conv2d", "bwd", "skip"] == 1
    check(y, yr, ps, qs, TOL[dtype])
    assert y[:, 1].eq(0).all() and ps[1].grad[1].eq(0).all() and ps[2].grad[1] == 0 and ps[3].grad[1] == 0


@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_conv2d_without_bias_non_contiguous(noise):
    x, w, la, _, kw = make("plain", torch.float32, False, bias=False)
    xb = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], device=DEV)
    x = xb[..., ::2]  # non-contiguous in W
    check(*run_both(x, w, la, None, seed=SEED, noise=noise, **kw), TOL[torch.float32])


@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_same_seed_same_channel_gates_as_torch(noise):
    x, w, la, b, kw = make("plain", torch.float32, True)
    seed = int(torch.randint(0, 2**62, ()).item())
    y = l0k.l0_conv2d(x, w, la, b, seed=seed, noise=noise, backend="triton", **kw)
    h = torch.nn.functional.conv2d(x, w, b, **kw)
    z = l0k.sample_gates(la, seed, (x.shape[0], w.shape[0]) if noise == "sample" else None)
    ref = h * (z[:, :, None, None] if z.dim() == 2 else z[:, None, None])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_zero_batch():
    x, w, la, b, kw = make("plain", torch.float32, False)
    x = x[:0].requires_grad_()
    w.requires_grad_()
    la.requires_grad_()
    b.requires_grad_()
    y = l0k.l0_conv2d(x, w, la, b, seed=1, backend="triton", **kw)
    assert y.shape[0] == 0
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (w, la, b):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("noise", ["batch", "sample"])
def test_autograd_saves_only_inputs(noise):
    x, w, la, b, kw = make("strided", torch.float32, True)
    for t in (x, w, la, b):
        t.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = l0k.l0_conv2d(x, w, la, b, seed=SEED, noise=noise, backend="triton", **kw)
    y.sum().backward()
    assert saved
    ins = {t.data_ptr() for t in (x, w, la, b)}
    for t in saved:
        assert t.data_ptr() in ins or t.numel() <= w.shape[0], f"extra saved tensor {tuple(t.shape)}"


def test_conv2d_custom_op_opcheck():
    from l0kernels.backends.triton._ops import conv2d_op
    x = torch.randn(2, 3, 6, 5, device=DEV).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 3, 3, 3, device=DEV, requires_grad=True)
    la = torch.randn(4, device=DEV, requires_grad=True)
    b = torch.randn(4, device=DEV, requires_grad=True)
    for sample, training in itertools.product((False, True), (True, False)):
        if sample and not training:
            continue
        torch.library.opcheck(conv2d_op, (x, w, la, b, [2, 1], [1, 1], [1, 1], 1, torch.tensor(7, device=DEV), sample, training, 2 / 3, -0.1,
                                          1.1, 1e-6))


@pytest.mark.interpret
def test_conv_kernels_compile_for_gpu():
    """Compile the conv kernels ahead of time for sm_90 without TRITON_INTERPRET (see test_triton_linear)."""
    import os
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {e}")
    from test_triton_linear import AOT_HELPER
    script = AOT_HELPER + r'''
from l0kernels.backends.triton import conv2d as C
blocks = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
f32 = {"dla_ptr": "*fp32", "colsum_ptr": "*fp32", "zsum_ptr": "*fp32", "idx_ptr": "*i64", "cnt_ptr": "*i64"}
for sample, epi, gs, open_ in ((True, 1, 1, False), (False, 0, 1, False), (True, 0, 4, False), (False, 0, 1, True),
                               (False, 0, 4, True)):
    aot(C._conv_fwd_kernel, f32, dict(GATE=2, SAMPLE=sample, TRAINING=True, GSIZE=gs, HAS_BIAS=True, EPILOGUE=epi,
                                      DOT_F32=False, PRECISION="ieee", OPEN=open_, **blocks), "*bf16")
for gs in (1, 4):
    aot(C._gate_dy_kernel, f32, dict(SAMPLE=True, TRAINING=True, GSIZE=gs, STORE=True, OPEN=False, BLOCK_M=64,
                                     BLOCK_C=32), "*bf16")
    aot(C._wgrad_epilogue_kernel, f32, dict(TRAINING=False, GSIZE=gs, HAS_BIAS=True, STORE_DW=True, NEED_DLA=True,
                                            OPEN=False, BLOCK_C=32, BLOCK_K=128), "*bf16")
    # the skipping backward (device open set): its gate kernels, on cuDNN-free float32 P
    aot(C._gate_dy_kernel, f32, dict(SAMPLE=False, TRAINING=True, GSIZE=gs, STORE=True, OPEN=True, BLOCK_M=64,
                                     BLOCK_C=32), "*bf16")
    aot(C._wgrad_epilogue_kernel, dict(f32, p_ptr="*fp32"), dict(TRAINING=True, GSIZE=gs, HAS_BIAS=True,
                                                                 STORE_DW=True, NEED_DLA=True, OPEN=True, BLOCK_C=32,
                                                                 BLOCK_K=128), "*bf16")
for dt, dotf32, prec in (("*bf16", False, "ieee"), ("*fp16", False, "ieee"), ("*fp32", True, "tf32"),
                         ("*fp32", True, "ieee")):
    flags = dict(DOT_F32=dotf32, PRECISION=prec, **blocks)
    aot(C._conv_dgrad_kernel, f32, flags, dt)
    aot(C._conv_wgrad_kernel, dict(f32, p_ptr="*fp32"), flags, dt)
print("compiled")
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
