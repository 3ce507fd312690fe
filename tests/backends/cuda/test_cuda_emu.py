"""The CUDA single-launch gated GEMM (``csrc/l0_gemm.cuh``, tensor cores) and GEMV (``csrc/l0_gemv.cuh``,
1-16 rows) run on the CPU, no GPU needed.

``csrc/tests/gemm_emu.cpp`` compiles the kernel with g++ against ``csrc/tests/cuda_emu.h``, a
thread-level emulator: one OS thread per CUDA thread, ``__syncthreads``/``__syncwarp`` as barriers,
WMMA fragments as whole tiles with the real API's alignment rules checked. That runs the kernel's
own index math, bounds handling, double-buffered pipeline and inline gate draws against the torch
reference for every gate mode, noise layout, dtype, with odd shapes and strided inputs. It does not
show tensor-core numerics or speed (those need a GPU: tests/gpu/test_cuda_gpu.py). A ThreadSanitizer
build checks the shared-memory barriers. Skipped without g++ or CUDA's fp16 headers.
"""
import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

import l0kernels as l0k
from l0kernels._gates import GateConfig

from conftest import log_alpha_at_density

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CSRC = os.path.join(ROOT, "csrc")
SRC = os.path.join(CSRC, "tests", "gemm_emu.cpp")
MODES = {"in": 0, "out": 1, "weight": 2, "none": 3}
DTYPES = {torch.float16: 0, torch.bfloat16: 1}  # the tensor-core kernel's
GEMV_DTYPES = {**DTYPES, torch.float32: 2}
IMPLS = {"auto": 0, "gemm": 1, "gemv": 2}  # auto: as the launcher, the GEMV for M <= 16


def _cuda_include():
    """CUDA's include folder as nvcc finds it (CUDA_HOME first), or None."""
    home = os.environ.get("CUDA_HOME")
    cands = [os.path.join(home, "include")] if home else []
    nvcc = shutil.which("nvcc")
    if nvcc:
        r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
        for line in r.stderr.splitlines():
            if line.startswith("#$ INCLUDES="):
                cands += [t[2:].strip('"') for t in line.split("=", 1)[1].strip('"').split() if t.startswith("-I")]
    cands.append("/usr/local/cuda/include")
    return next((c for c in cands if os.path.exists(os.path.join(c, "cuda_fp16.h"))), None)


def _build(out_dir, *extra):
    inc, gxx = _cuda_include(), shutil.which("g++")
    if inc is None or gxx is None:
        pytest.skip("g++ or CUDA's cuda_fp16.h not found")
    lib = os.path.join(out_dir, "gemm_emu.so")
    cmd = [gxx, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
           f"-I{CSRC}", "-isystem", inc, *extra, SRC, "-o", lib]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return lib


def _bind(lib_path):
    lib = ctypes.CDLL(lib_path)
    fn = lib.l0k_emu_gated_gemm
    i64, vp, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    fn.argtypes = [ctypes.c_int, ctypes.c_int, vp, i64, vp, i64, vp, vp, vp, i64, vp, vp, vp, i64, vp, ctypes.c_int,
                   i64, i64, i64, vp, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, f32, f32, f32,
                   f32, i64]
    fn.restype = ctypes.c_int
    fn.splits = lib.l0k_emu_gemv_splits
    fn.splits.argtypes = [i64, i64, ctypes.c_int]
    fn.splits.restype = ctypes.c_int
    fn.gemm_splits = lib.l0k_emu_gemm_splits
    fn.gemm_splits.argtypes = [i64, i64, i64, ctypes.c_int]
    fn.gemm_splits.restype = ctypes.c_int
    fn.open_gemm = lib.l0k_emu_open_gemm
    fn.open_gemm.argtypes = [ctypes.c_int, vp, i64, vp, i64, vp, vp, vp, i64, vp, vp, vp, vp, vp, vp, ctypes.c_int,
                             ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, vp, ctypes.c_int, ctypes.c_int,
                             f32, f32, f32, f32, i64]
    fn.open_gemm.restype = ctypes.c_int
    fn.gathered_dot = lib.l0k_emu_gathered_dot
    fn.gathered_dot.argtypes = [ctypes.c_int, vp, i64, i64, vp, i64, i64, vp, vp, i64, i64, vp]
    fn.gathered_dot.restype = ctypes.c_int
    return fn


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _bind(_build(str(tmp_path_factory.mktemp("gemm_emu"))))


def run_emu(fn, x, w, la, b, seed, gate, noise, training, allow_vec=True, cfg=GateConfig(), x_cols=None,
            y_cols=None, y=None, impl="auto", idle_cols=None, fill=None, splits=1, group=1):
    """y = the kernel's output for 2-D x (unit column stride), with the path it took (True: 16-byte loads
    of x and w).
    x_cols / y_cols: the gather of x's columns and scatter of y's (eval plans, gate "none"), into ``y``;
    idle_cols: the outputs the kernel fills with ``fill`` (or zeros). impl: "gemm" (tensor cores),
    "gemv" (M <= 16) or "auto" (as the launcher); splits: the GEMV's K splits; group: features per gate."""
    m = x.shape[0]
    n, k = w.shape
    assert x.stride(1) == 1 and w.stride(1) == 1
    if y is None:
        y = torch.full((m, n), float("nan"), dtype=x.dtype)
    ptr = (lambda t: None if t is None else t.data_ptr())
    # the seed as the kernels take it: the address of a 0-d int64 tensor (docs/design.md §10), read in the kernel
    seed_t = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
    vec = fn(GEMV_DTYPES[x.dtype], IMPLS[impl], ptr(x), x.stride(0), ptr(w), w.stride(0), ptr(None if la is None else la.contiguous()),
             ptr(b), ptr(y), y.stride(0), ptr(x_cols), ptr(y_cols), ptr(idle_cols),
             0 if idle_cols is None else idle_cols.numel(), ptr(fill), splits, m, n, k, ptr(seed_t), MODES[gate],
             int(training and noise == "sample"), int(training), int(allow_vec), cfg.beta, cfg.gamma, cfg.zeta, cfg.eps,
             group)
    assert vec in (0, 1, 2, 3), vec  # -3: the split-K workspace was not left zero
    return y, vec == 3


def reference(x, w, la, b, seed, gate, noise, training, group=1):
    """The same math in float32 from the torch backend's gates: each gated operand rounded once to
    x's dtype (as the kernel and the two-pass path do), fp32 products and sums. ``group``: features per
    gate (the gates, drawn over the noise tensor of gates, repeated over their features)."""
    m, k = x.shape
    if not training:
        z = l0k.deterministic_gates(la.float())
    elif noise == "sample":
        z = l0k.sample_gates(la.float(), seed, (m,) + tuple(la.shape))
    else:
        z = l0k.sample_gates(la.float(), seed)
    z = z.repeat_interleave(group, dim=-1)
    xf, wf = x.float(), w.float()
    bf = 0.0 if b is None else b.float()
    if gate == "in":
        return (xf * z).to(x.dtype).float() @ wf.T + bf
    if gate == "weight":
        return xf @ (wf * z).to(x.dtype).float().T + bf
    return (xf @ wf.T + bf) * z


def make(m, n, k, gate, dtype, bias=True, x_cols=None, seed=0, group=1):
    g = torch.Generator().manual_seed(seed)
    xfull = torch.randn(m, x_cols or k, generator=g).to(dtype)
    x = xfull[:, :k]
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    shape = {"in": (k // group,), "out": (n // group,), "weight": (n, k)}[gate]
    la = (torch.randn(shape, generator=g) * 2).to(dtype)  # about a quarter of the gates closed in eval
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, la, b


def check(y, ref, dtype):
    # fp32 sums in a different order, then one rounding of y to the storage dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5}[dtype]
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * scale)


CASES = [("in", "batch", True), ("in", "sample", True), ("in", "batch", False), ("out", "batch", True),
         ("out", "sample", True), ("out", "batch", False), ("weight", "batch", True), ("weight", "batch", False)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("gate,noise,training", CASES)
def test_modes_odd_shape(emu, dtype, gate, noise, training):
    # 3 k-tiles with a ragged last one, ragged M and N inside one block; scalar loads (K % 8 != 0)
    x, w, la, b = make(37, 45, 70, gate, dtype)
    y, vec = run_emu(emu, x, w, la, b, 1234, gate, noise, training)
    assert not vec
    check(y, reference(x, w, la, b, 1234, gate, noise, training), dtype)


@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("in", "sample"), ("out", "sample"), ("weight", "batch")])
def test_several_blocks_vector_loads(emu, gate, noise):
    # 2 x 2 blocks (M, N > 128), K % 8 == 0 and a strided x (row stride 104): the 16-byte load path,
    # with ragged tiles on every side; 2**40 + 3 exercises the seed's high word
    dtype = torch.bfloat16
    x, w, la, b = make(131, 133, 72, gate, dtype, x_cols=104, seed=1)
    seed = 2 ** 40 + 3
    y, vec = run_emu(emu, x, w, la, b, seed, gate, noise, True)
    assert vec
    check(y, reference(x, w, la, b, seed, gate, noise, True), dtype)


GROUPED = [("in", "batch", True), ("in", "sample", True), ("in", "batch", False), ("out", "batch", True),
           ("out", "sample", True), ("out", "batch", False)]


@pytest.mark.parametrize("impl,m", [("gemm", 37), ("gemv", 5)])
@pytest.mark.parametrize("gate,noise,training", GROUPED)
def test_grouped_gates(emu, impl, m, gate, noise, training):
    # group_size 5 on K = 70 (a group straddles k-tiles and chunks) and 9 on N = 45 (block columns)
    group = 5 if gate == "in" else 9
    x, w, la, b = make(m, 45, 70, gate, torch.float16, seed=11, group=group)
    y, _ = run_emu(emu, x, w, la, b, 2 ** 33 + 5, gate, noise, training, impl=impl, group=group)
    check(y, reference(x, w, la, b, 2 ** 33 + 5, gate, noise, training, group), torch.float16)
    if training:  # the draws are over the gates: expanding log_alpha to the features draws other gates
        y1, _ = run_emu(emu, x, w, la.repeat_interleave(group), b, 2 ** 33 + 5, gate, noise, training, impl=impl)
        assert not torch.equal(y, y1)


@pytest.mark.parametrize("impl", ["gemm", "gemv"])
def test_one_gate_for_all_features(emu, impl):
    x, w, la, b = make(3 if impl == "gemv" else 20, 16, 24, "in", torch.bfloat16, seed=12, group=24)
    y, _ = run_emu(emu, x, w, la, b, 8, "in", "sample", True, impl=impl, group=24)
    check(y, reference(x, w, la, b, 8, "in", "sample", True, 24), torch.bfloat16)


def test_vector_and_scalar_paths_agree(emu):
    x, w, la, b = make(20, 24, 64, "in", torch.float16, seed=2)
    y_vec, vec = run_emu(emu, x, w, la, b, 5, "in", "sample", True)
    y_sc, sc = run_emu(emu, x, w, la, b, 5, "in", "sample", True, allow_vec=False)
    assert vec and not sc
    assert torch.equal(y_vec, y_sc)


@pytest.mark.parametrize("impl", ["gemm", "gemv"])
@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_no_bias_and_custom_constants(emu, gate, impl):
    cfg = GateConfig(beta=0.5, gamma=-0.2, zeta=1.2, eps=1e-5)
    x, w, la, _ = make(9, 17, 33, gate, torch.float16, bias=False, seed=3)
    y, _ = run_emu(emu, x, w, la, None, 77, gate, "batch", True, cfg=cfg, impl=impl)
    extra = dict(beta=cfg.beta, gamma=cfg.gamma, zeta=cfg.zeta, eps=cfg.eps)
    ref = l0k.l0_linear(x.float(), w.float(), la.float(), None, seed=77, gate=gate, noise="batch", backend="torch",
                        **extra)
    check(y, ref, torch.float16)  # within float16 rounding of the torch backend itself


@pytest.mark.parametrize("impl", ["gemm", "gemv"])
def test_zero_k_gives_gated_bias(emu, impl):
    x, w, la, b = make(5, 7, 0, "out", torch.float16, seed=4)
    y, _ = run_emu(emu, x, w, la, b, 3, "out", "sample", True, impl=impl)
    check(y, reference(x, w, la, b, 3, "out", "sample", True), torch.float16)


@pytest.mark.parametrize("impl", ["gemm", "gemv"])
def test_same_seed_same_output_different_seed_differs(emu, impl):
    x, w, la, b = make(12, 10, 40, "in", torch.float16, seed=5)
    y1, _ = run_emu(emu, x, w, la, b, 9, "in", "sample", True, impl=impl)
    y2, _ = run_emu(emu, x, w, la, b, 9, "in", "sample", True, impl=impl)
    y3, _ = run_emu(emu, x, w, la, b, 10, "in", "sample", True, impl=impl)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


@pytest.mark.parametrize("rows", [21, 5])
@pytest.mark.parametrize("gate", ["in", "out", "weight"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_eval_plan_gather_scatter(emu, gate, dtype, rows):
    """The eval kernel (binding op sparse_linear): the layer's compact plan with the gather of x's
    active columns and the scatter of the active outputs, against the PyTorch plan path; 21 rows run
    the tensor-core kernel, 5 the GEMV."""
    from l0kernels.backends._plans import build_linear_plan, linear_plan_torch
    torch.manual_seed(6)
    k, n = 75, 140
    layer = l0k.L0Linear(k, n, gate=gate, backend="torch").to(dtype)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.randn_like(layer.log_alpha.float()) * 3)  # about 40 % closed
        if gate == "weight":
            layer.log_alpha[:7] = -10.0  # whole rows closed: their output is the bias (fill)
            layer.log_alpha[:, :5] = -10.0  # and whole columns
    plan = build_linear_plan(layer)
    assert plan.in_idx is not None or plan.out_idx is not None
    x = torch.randn(rows, k + 2).to(dtype)[:, 1:-1]  # strided rows
    if plan.out_idx is None:
        y, _ = run_emu(emu, x, plan.weight, None, plan.bias, 0, "none", "batch", False, x_cols=plan.in_idx)
    else:  # as the op: the output starts as the fill (or zeros) and the kernel writes the active columns
        y = torch.zeros(rows, n, dtype=dtype) if plan.fill is None else plan.fill.expand(rows, n).contiguous()
        run_emu(emu, x, plan.weight, None, plan.bias, 0, "none", "batch", False, x_cols=plan.in_idx,
                y_cols=plan.out_idx, y=y)
    ref = linear_plan_torch(x.float(), _float_plan(plan))
    check(y, ref, dtype)
    if plan.out_idx is not None:
        idle = torch.ones(n, dtype=torch.bool)
        idle[plan.out_idx] = False
        assert torch.equal(y[:, idle].float(), ref[:, idle])  # untouched: exactly the fill / zeros


def _float_plan(plan):
    import dataclasses
    f = (lambda t: None if t is None or not t.is_floating_point() else t.float())
    return dataclasses.replace(plan, weight=plan.weight.float(), bias=f(plan.bias), fill=f(plan.fill))


@pytest.mark.skipif(os.environ.get("L0K_SKIP_TSAN") == "1", reason="L0K_SKIP_TSAN=1")
def test_thread_sanitizer_finds_no_race(tmp_path):
    """Built with -fsanitize=thread: every shared-memory write is ordered with its reads by a barrier
    (the tensor-core kernel's pipeline, the GEMV's staging of x, both kernels' split-K arrival counters).
    (Lanes other than 0 do not touch fragments in the emulator, so races inside a warp's WMMA calls
    are out of reach; the block-level pipeline is what this checks.)"""
    libtsan = subprocess.run([shutil.which("g++") or "g++", "-print-file-name=libtsan.so"], capture_output=True,
                             text=True).stdout.strip()
    if not os.path.isabs(libtsan) or not os.path.exists(libtsan):
        pytest.skip("libtsan not found")
    lib = _build(str(tmp_path), "-fsanitize=thread", "-g", "-O1")
    code = ("import sys, torch; sys.path[:0] = %r; import test_cuda_emu as t; fn = t._bind(%r); "
            "x, w, la, b = t.make(37, 20, 72, 'in', torch.float16); "
            "print(t.run_emu(fn, x, w, la, b, 1, 'in', 'batch', True)[1]); "
            "x, w, la, b = t.make(3, 20, 300, 'weight', torch.float16); "
            "print(t.run_emu(fn, x, w, la, b, 1, 'weight', 'batch', True, impl='gemv')[1]); "
            "x, w, la, b = t.make(3, 20, 1296, 'in', torch.float32); "
            "print(t.run_emu(fn, x, w, la, b, 1, 'in', 'sample', True, impl='gemv', splits=3)[1]); "
            "x, w, la, b = t.make(20, 30, 200, 'out', torch.float16); "
            "print(t.run_emu(fn, x, w, la, b, 1, 'out', 'batch', True, impl='gemm', splits=3)[1]); "
            # the open-set path: MN-major operands stored transposed into shared memory, the device counts
            "x, w, b, dy, la, z, idx, cnt = t._open_case(40, 45, 66, 'in', torch.float16, 0.5, 1); "
            "y = torch.empty(45, 66, dtype=torch.float16); "
            "t.run_open(fn, dy, x, y, M=45, N=66, K=40, mode='out', la=la, seed=77, w_rows=idx, y_cols=idx, "
            "n_count=cnt, x_mn=True, w_mn=True, splits=2); print(True)") % (
        [os.path.dirname(__file__), os.path.join(ROOT, "tests")], lib)  # (conftest.py is in tests/)
    # the library is dlopen'ed by an uninstrumented python: the runtime must be preloaded
    env = dict(os.environ, LD_PRELOAD=libtsan, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "WARNING: ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0 and r.stdout.split() == ["True", "False", "True", "True", "True"], r.stderr[-4000:]  # load paths as expected


# -- the GEMV (csrc/l0_gemv.cuh): 1-16 rows, every dtype ------------------------------------------------------


@pytest.mark.parametrize("dtype", list(GEMV_DTYPES))
@pytest.mark.parametrize("gate,noise,training", CASES)
def test_gemv_modes(emu, dtype, gate, noise, training):
    # 3 rows (the 4-row kernel), K = 300: two chunks, the second ragged; N = 37: three blocks, the last
    # ragged; K % 8 != 0: scalar W loads
    x, w, la, b = make(3, 37, 300, gate, dtype, seed=7)
    y, vec = run_emu(emu, x, w, la, b, 4321, gate, noise, training, impl="gemv")
    assert not vec
    check(y, reference(x, w, la, b, 4321, gate, noise, training), dtype)


@pytest.mark.parametrize("m", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("gate,noise", [("in", "sample"), ("out", "sample"), ("weight", "batch")])
def test_gemv_row_counts_vector_loads(emu, m, gate, noise):
    # every compiled row count (1, 2, 4, 8, 16; 5 runs the 8-row kernel with 3 idle rows), 16-byte W
    # loads (K % 8 == 0), a strided x, a seed above 2**32
    dtype = torch.float16
    x, w, la, b = make(m, 19, 264, gate, dtype, x_cols=280, seed=m)
    seed = 2 ** 33 + 11
    y, vec = run_emu(emu, x, w, la, b, seed, gate, noise, True, impl="gemv")
    assert vec
    check(y, reference(x, w, la, b, seed, gate, noise, True), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_vector_and_scalar_paths_agree(emu, dtype):
    x, w, la, b = make(4, 33, 512, "weight", dtype, seed=8)
    y_vec, vec = run_emu(emu, x, w, la, b, 6, "weight", "batch", True, impl="gemv")
    y_sc, sc = run_emu(emu, x, w, la, b, 6, "weight", "batch", True, allow_vec=False, impl="gemv")
    assert vec and not sc
    assert torch.equal(y_vec, y_sc)


def test_gemv_and_tensor_core_kernel_agree(emu):
    # the same call through both kernels: equal up to fp32 summation order and one rounding
    x, w, la, b = make(11, 70, 200, "in", torch.bfloat16, seed=9)
    y_gemv, _ = run_emu(emu, x, w, la, b, 12, "in", "batch", True, impl="gemv")
    y_gemm, _ = run_emu(emu, x, w, la, b, 12, "in", "batch", True, impl="gemm")
    check(y_gemv, y_gemm.float(), torch.bfloat16)


def test_launcher_choice(emu):
    # auto takes the GEMV up to 16 rows; float32 has no tensor-core kernel; the GEMV refuses 17 rows
    x, w, la, b = make(16, 9, 24, "out", torch.float32, seed=10)
    y, _ = run_emu(emu, x, w, la, b, 1, "out", "batch", True)
    check(y, reference(x, w, la, b, 1, "out", "batch", True), torch.float32)
    x17 = torch.randn(17, 24)
    out = torch.empty(17, 9)
    cfg = (2 / 3, -0.1, 1.1, 1e-6)
    assert emu(2, IMPLS["auto"], x17.data_ptr(), 24, w.data_ptr(), 24, la.data_ptr(), b.data_ptr(), out.data_ptr(), 9,
               None, None, None, 0, None, 1, 17, 9, 24, 1, MODES["out"], 0, 1, 1, *cfg, 1) == -2
    xh, wh = x17.half(), w.half()
    assert emu(0, IMPLS["gemv"], xh.data_ptr(), 24, wh.data_ptr(), 24, la.half().data_ptr(), None,
               out.half().data_ptr(), 9, None, None, None, 0, None, 1, 17, 9, 24, 1, MODES["out"], 0, 1, 1, *cfg, 1) == -2
    # at most 16 splits of the tensor-core kernel, 32 of the GEMV
    assert emu(0, IMPLS["gemm"], xh.data_ptr(), 24, wh.data_ptr(), 24, la.half().data_ptr(), None,
               out.half().data_ptr(), 9, None, None, None, 0, None, 17, 17, 9, 24, 1, MODES["out"], 0, 1, 1, *cfg, 1) == -2
    assert emu(0, IMPLS["gemv"], xh.data_ptr(), 24, wh.data_ptr(), 24, la.half().data_ptr(), None,
               out.half().data_ptr(), 9, None, None, None, 0, None, 33, 3, 9, 24, 1, MODES["out"], 0, 1, 1, *cfg, 1) == -2


@pytest.mark.parametrize("gate", ["in", "out", "weight"])
def test_gemv_eval_plan_float32(emu, gate):
    """sparse_linear's float32 path (the GEMV) on a compact plan: gather, scatter, fill."""
    from l0kernels.backends._plans import build_linear_plan, linear_plan_torch
    torch.manual_seed(11)
    k, n = 90, 50
    layer = l0k.L0Linear(k, n, gate=gate, backend="torch")
    with torch.no_grad():
        layer.log_alpha.copy_(torch.randn_like(layer.log_alpha) * 3)
        if gate == "weight":
            layer.log_alpha[:4] = -10.0
    plan = build_linear_plan(layer)
    assert plan.in_idx is not None or plan.out_idx is not None
    x = torch.randn(7, k)
    y = None  # no scatter: the kernel writes every column
    if plan.out_idx is not None:  # as the op: the output starts as the fill (or zeros)
        y = torch.zeros(7, n) if plan.fill is None else plan.fill.expand(7, n).contiguous()
    y, _ = run_emu(emu, x, plan.weight, None, plan.bias, 0, "none", "batch", False, x_cols=plan.in_idx,
                   y_cols=plan.out_idx, y=y)
    check(y, linear_plan_torch(x, plan), torch.float32)


# -- split-K (GEMV) and idle outputs written in the same launch (both kernels) ----------------------------------


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("gate,noise,training", CASES)
def test_gemv_split_k(emu, gate, noise, training, splits):
    # K = 1300: 6 chunks (the last ragged) over 2, 3 or 5 splits (5: spans of 2 chunks, the last split
    # idle); 16 rows; N = 37 (3 block columns, the last ragged). The workspace must come back zero.
    dtype = torch.float32
    x, w, la, b = make(16, 37, 1300, gate, dtype, seed=12)
    y, _ = run_emu(emu, x, w, la, b, 77, gate, noise, training, impl="gemv", splits=splits)
    ref = reference(x, w, la, b, 77, gate, noise, training)
    check(y, ref, dtype)
    y1, _ = run_emu(emu, x, w, la, b, 77, gate, noise, training, impl="gemv")
    check(y, y1, dtype)  # the same sums in another order


def test_gemv_split_rule(emu):
    # about two blocks per multiprocessor, at least 2 chunks of 256 per split, at most 32 splits
    assert emu.splits(4096, 4096, 132) == 2   # 256 block columns: ceil(264 / 256)
    assert emu.splits(410, 4096, 132) == 8    # 26 columns: 11 wanted, K allows 8
    assert emu.splits(64, 65536, 132) == 32   # 4 columns: capped
    assert emu.splits(16, 300, 132) == 1      # 2 chunks: no split
    assert emu.splits(0, 4096, 132) == 1 and emu.splits(100, 0, 132) == 1
    for n, k, sms in [(5000, 4096, 132), (1, 1, 1), (999, 10000, 108), (100, 9 * 256, 132), (16, 23 * 256, 80)]:
        s = emu.splits(n, k, sms)
        chunks = -(-k // 256)
        assert 1 <= s <= 32 and (s == 1 or chunks >= 2 * s)
        assert (s - 1) * -(-chunks // s) < chunks  # the last split has chunks


@pytest.mark.parametrize("impl,rows", [("gemm", 21), ("gemv", 5), ("gemv", 1)])
@pytest.mark.parametrize("with_fill", [False, True])
def test_idle_outputs_written_in_the_launch(emu, impl, rows, with_fill):
    """Eval plans with output scatter: the outputs that are not computed get the fill (or zeros) from
    extra blocks of the same launch; y starts as NaN, so every column must be written."""
    dtype = torch.bfloat16 if impl == "gemm" else torch.float32
    g = torch.Generator().manual_seed(13)
    n, k, n_act = 300, 40, 70
    perm = torch.randperm(n, generator=g)
    out_idx, idle = perm[:n_act].sort().values, perm[n_act:].sort().values
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n_act, k, generator=g).to(dtype)
    b = torch.randn(n_act, generator=g).to(dtype)
    fill = torch.randn(n, generator=g).to(dtype) if with_fill else None
    y = torch.full((rows, n), float("nan"), dtype=dtype)
    run_emu(emu, x, w, None, b, 0, "none", "batch", False, y_cols=out_idx, idle_cols=idle, fill=fill, y=y, impl=impl)
    ref = torch.zeros(rows, n) if fill is None else fill.float().expand(rows, n).clone()
    ref[:, out_idx] = x.float() @ w.float().T + b.float()
    check(y, ref, dtype)
    assert torch.equal(y[:, idle].float(), ref[:, idle])


@pytest.mark.parametrize("impl,rows", [("gemm", 20), ("gemv", 3)])
def test_every_output_idle(emu, impl, rows):
    # a plan with no active output: the launch only writes the fill
    dtype = torch.float16
    x, w = torch.randn(rows, 8).to(dtype), torch.zeros(0, 8, dtype=dtype)
    fill = torch.randn(45).to(dtype)
    y = torch.full((rows, 45), float("nan"), dtype=dtype)
    run_emu(emu, x, w, None, None, 0, "none", "batch", False, y_cols=torch.zeros(0, dtype=torch.long),
            idle_cols=torch.arange(45), fill=fill, y=y, impl=impl)
    assert torch.equal(y, fill.expand(rows, 45))


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("gate,noise,training", CASES)
def test_gemm_split_k(emu, gate, noise, training, splits):
    # the tensor-core kernel with K = 300 (10 k-tiles, the last ragged) over 2 or 3 splits (4, 4, 2);
    # ragged M and N in one output tile; the workspace must come back zero
    dtype = torch.bfloat16
    x, w, la, b = make(37, 45, 300, gate, dtype, seed=14)
    y, _ = run_emu(emu, x, w, la, b, 91, gate, noise, training, impl="gemm", splits=splits)
    check(y, reference(x, w, la, b, 91, gate, noise, training), dtype)


@pytest.mark.parametrize("gate,noise", [("in", "batch"), ("in", "sample"), ("out", "batch"), ("weight", "batch")])
def test_gemm_split_k_tiles_vector_loads_empty_splits(emu, gate, noise):
    # 2 x 2 output tiles (each with its own arrival counter), 16-byte loads, and 5 splits of K = 72
    # (3 k-tiles: splits 3 and 4 have no tiles and add zeros, but still count as arrivals)
    dtype = torch.float16
    x, w, la, b = make(131, 133, 72, gate, dtype, x_cols=80, seed=15)
    y, vec = run_emu(emu, x, w, la, b, 2 ** 35 + 1, gate, noise, True, impl="gemm", splits=5)
    assert vec
    check(y, reference(x, w, la, b, 2 ** 35 + 1, gate, noise, True), dtype)


def test_gemm_split_rule(emu):
    # as many splits as fit one wave of one block per multiprocessor, at least 4 k-tiles of 32 per split,
    # at most 16 splits, none without tiles
    assert emu.gemm_splits(8192, 4096, 4096, 132) == 1    # 2048 tiles
    assert emu.gemm_splits(256, 4096, 4096, 132) == 2     # 64 tiles: 132 // 64 (3 would need a second wave)
    assert emu.gemm_splits(64, 4096, 4096, 132) == 4      # 32 tiles
    assert emu.gemm_splits(32, 128, 4096, 132) == 16      # 1 tile: capped
    assert emu.gemm_splits(32, 128, 200, 132) == 1        # 7 k-tiles: no split
    assert emu.gemm_splits(32, 128, 65 * 32, 132) == 13   # 65 k-tiles: 16 splits of 5 would leave 3 empty
    assert emu.gemm_splits(0, 128, 4096, 132) == 1 and emu.gemm_splits(64, 128, 0, 132) == 1


def test_gemm_split_k_eval_plan_with_idle_outputs(emu):
    # eval plan through the split tensor-core kernel: gather, scatter and idle fill in one launch
    g = torch.Generator().manual_seed(16)
    n, k, n_act, rows = 90, 200, 30, 40
    perm = torch.randperm(n, generator=g)
    out_idx, idle = perm[:n_act].sort().values, perm[n_act:].sort().values
    in_idx = torch.randperm(k + 20, generator=g)[:k].sort().values
    x = torch.randn(rows, k + 20, generator=g).half()
    w = torch.randn(n_act, k, generator=g).half()
    b = torch.randn(n_act, generator=g).half()
    fill = torch.randn(n, generator=g).half()
    y = torch.full((rows, n), float("nan"), dtype=torch.float16)
    run_emu(emu, x, w, None, b, 0, "none", "batch", False, x_cols=in_idx, y_cols=out_idx, idle_cols=idle, fill=fill,
            y=y, impl="gemm", splits=3)
    ref = fill.float().expand(rows, n).clone()
    ref[:, out_idx] = x.float()[:, in_idx] @ w.float().T + b.float()
    check(y, ref, torch.float16)


@pytest.mark.parametrize("impl,rows", [("gemv", 5), ("gemm", 40)])
def test_w_keeps_vector_loads_when_x_cannot(emu, impl, rows):
    # x's row stride 301 is not a multiple of 8: x takes scalar loads, W (K = 264) keeps 16-byte ones;
    # the result equals the all-scalar run bit for bit
    dtype = torch.float16
    x, w, la, b = make(rows, 50, 264, "weight", dtype, x_cols=301, seed=17)
    ptr = lambda t: t.data_ptr()  # noqa: E731
    out = torch.empty(rows, 50, dtype=dtype)
    seed = torch.tensor(5, dtype=torch.int64)  # the kernels take the seed's address
    code = emu(GEMV_DTYPES[dtype], IMPLS[impl], ptr(x), x.stride(0), ptr(w), w.stride(0), ptr(la.contiguous()), ptr(b),
               ptr(out), 50, None, None, None, 0, None, 1, rows, 50, 264, ptr(seed), MODES["weight"], 0, 1, 1, 2 / 3,
               -0.1, 1.1, 1e-6, 1)
    assert code == 2  # bit 1: W's 16-byte loads only
    y_sc, _ = run_emu(emu, x, w, la, b, 5, "weight", "batch", True, allow_vec=False, impl=impl)
    assert torch.equal(out, y_sc)
    check(out, reference(x, w, la, b, 5, "weight", "batch", True), dtype)


@pytest.mark.parametrize("impl", ["gemm", "gemv"])
@pytest.mark.parametrize("gate,noise,training", [("in", "batch", True), ("out", "sample", True),
                                                 ("weight", "batch", False), ("in", "batch", False)])
def test_nonfinite_log_alpha_like_reference(emu, impl, gate, noise, training):
    """NaN and +-inf in log_alpha (docs/design.md §6): the fused kernels' gates are NaN, 1 and 0 like the float64
    reference (csrc/l0_gate.cuh keeps a NaN through the clamp), so the outputs are NaN exactly where the
    reference is; the seed comes as a pointer to a 0-d int64 tensor."""
    m = 20 if impl == "gemm" else 3
    dtype = torch.float16  # the tensor-core kernel takes half types only
    x, w, la, b = make(m, 12, 40, gate, dtype, seed=21)
    la = la.clone()
    flat = la.view(-1)
    flat[1], flat[3], flat[5] = float("nan"), float("inf"), float("-inf")
    seed = torch.tensor(2 ** 35 + 9, dtype=torch.int64)
    y, _ = run_emu(emu, x, w, la, b, seed, gate, noise, training, impl=impl)
    ref = reference(x, w, la, b, int(seed), gate, noise, training)
    assert ref.isnan().any() and torch.equal(y.isnan(), ref.isnan())
    fin = ~ref.isnan()  # none for input gates: a NaN input gate reaches every output
    if fin.any():
        check(y[fin], ref[fin], dtype)


# -- training over the open set (issue 13): the GEMMs of the skipping forward and backward ----------------------
# The kernel reads the open count from device memory and gathers the open features through the open set's
# permutation (l0kernels/_active.py: open indices first); closed features are never read and get zeros.

def run_open(fn, x, w, y, *, M, N, K, mode, la=None, bias=None, seed=None, x_cols=None, y_cols=None, w_rows=None,
             w_cols=None, k_count=None, n_count=None, x_mn=False, w_mn=False, y_trans=False, splits=1, group=1,
             allow_vec=True, cfg=GateConfig()):
    ptr = (lambda t: None if t is None else t.data_ptr())
    seed_t = None if seed is None else torch.tensor(seed, dtype=torch.int64)
    r = fn.open_gemm(DTYPES[x.dtype], ptr(x), x.stride(0), ptr(w), w.stride(0), ptr(la), ptr(bias), ptr(y), y.stride(0),
                     ptr(x_cols), ptr(y_cols), ptr(w_rows), ptr(w_cols), ptr(k_count), ptr(n_count), int(x_mn),
                     int(w_mn), int(y_trans), splits, M, N, K, ptr(seed_t), MODES[mode], int(allow_vec), cfg.beta,
                     cfg.gamma, cfg.zeta, cfg.eps, group)
    assert r in (0, 1, 2, 3), r
    return y


def _open_case(m, n, k, gate, dtype, density, group, seed=21):
    """Inputs, the per-feature training gates z, and the open set (index, count) of the gated features."""
    from l0kernels import _active
    g = torch.Generator().manual_seed(seed)
    feats = k if gate == "in" else n
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    la = log_alpha_at_density(feats // group, density, g, jitter=0.3).to(dtype)
    z = l0k.sample_gates(la.float(), 77).repeat_interleave(group)
    os_ = _active.open_set(z)
    return x, w, b, dy, la, z, os_.index.contiguous(), os_.count.reshape(())


def _poison(t, dim, closed):
    """``t`` with inf in the closed features along ``dim`` (they must never be read)."""
    t = t.clone()
    t.index_fill_(dim, closed, float("inf"))
    return t


OPEN_DENSITIES = [1.0, 0.5, 0.0, "one"]


@pytest.mark.parametrize("density", OPEN_DENSITIES)
@pytest.mark.parametrize("gate,group", [("in", 1), ("out", 1), ("in", 3), ("out", 3)])
def test_open_forward(emu, gate, group, density):
    """y over the open features: input gates gather x's and W's open columns, the reduction running to the
    count read on the device; output gates gather W's open rows and scatter y's, closed columns exactly 0."""
    dtype = torch.bfloat16
    m, n, k = 37, 45, 69
    x, w, b, _, la, z, idx, cnt = _open_case(m, n, k, gate, dtype, density, group)
    closed = idx[int(cnt):]
    y = torch.full((m, n), float("nan"), dtype=dtype)
    if gate == "in":
        xp, wp = _poison(x, 1, closed), _poison(w, 1, closed)
        run_open(emu, xp, wp, y, M=m, N=n, K=k, mode="in", la=la, bias=b, seed=77, x_cols=idx, w_cols=idx,
                 k_count=cnt, group=group)
    else:
        wp, bp = _poison(w, 0, closed), _poison(b, 0, closed)
        run_open(emu, x, wp, y, M=m, N=n, K=k, mode="out", la=la, bias=bp, seed=77, w_rows=idx, y_cols=idx,
                 n_count=cnt, group=group)
        assert (y[:, closed] == 0).all()
    check(y, reference(x, w, la, b, 77, gate, "batch", True, group), dtype)


@pytest.mark.parametrize("density", OPEN_DENSITIES)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("what", ["in-dx", "in-dw", "out-dx", "out-dw"])
def test_open_backward(emu, what, group, density):
    """The four GEMMs of the skipping backward against float32 torch: input gates dX[:, o] = (dY W[:, o]) z[o]
    (B = W^T MN-major, gathered rows), dW[:, o] = dY^T (x[:, o] z[o]) (A = dY^T and B = x^T MN-major);
    output gates dX = (dY[:, o] z[o]) W[o] (reduction over the open count), dW[o] = (dY[:, o] z[o])^T x
    (written transposed). Closed features: zeros, and inf in their data changes nothing."""
    dtype = torch.float16
    m, n, k = 40, 45, 66
    gate = what.split("-")[0]
    x, w, b, dy, la, z, idx, cnt = _open_case(m, n, k, gate, dtype, density, group, seed=5)
    closed = idx[int(cnt):]
    xf, wf, dyf = x.float(), w.float(), dy.float()
    if what == "in-dx":
        out = torch.full((m, k), float("nan"), dtype=dtype)
        run_open(emu, dy, _poison(w, 1, closed), out, M=m, N=k, K=n, mode="out", la=la, seed=77, w_rows=idx,
                 y_cols=idx, n_count=cnt, w_mn=True, group=group)
        ref = (dyf @ wf) * z
        zero = out[:, closed]
    elif what == "in-dw":
        out = torch.full((n, k), float("nan"), dtype=dtype)
        run_open(emu, dy, _poison(x, 1, closed), out, M=n, N=k, K=m, mode="out", la=la, seed=77, w_rows=idx,
                 y_cols=idx, n_count=cnt, x_mn=True, w_mn=True, group=group)
        ref = dyf.t() @ (xf * z).to(dtype).float()
        zero = out[:, closed]
    elif what == "out-dx":
        out = torch.full((m, k), float("nan"), dtype=dtype)
        run_open(emu, _poison(dy, 1, closed), _poison(w, 0, closed), out, M=m, N=k, K=n, mode="in", la=la, seed=77,
                 x_cols=idx, w_cols=idx, k_count=cnt, w_mn=True, group=group)
        ref = (dyf * z).to(dtype).float() @ wf
        zero = None
    else:
        out = torch.full((n, k), float("nan"), dtype=dtype)
        run_open(emu, x, _poison(dy, 1, closed), out, M=k, N=n, K=m, mode="out", la=la, seed=77, w_rows=idx,
                 y_cols=idx, n_count=cnt, x_mn=True, w_mn=True, y_trans=True, group=group)
        ref = (dyf.t() @ xf) * z[:, None]
        zero = out[closed]
    if zero is not None:
        assert (zero == 0).all()
    check(out, ref, dtype)


@pytest.mark.parametrize("density", OPEN_DENSITIES)
@pytest.mark.parametrize("what", ["fwd", "dx", "dw"])
def test_producer_rows(emu, what, density):
    """The GEMMs of a structure gate's producer over its open rows (``rows_linear_fwd`` / ``_bwd`` in
    csrc/binding.cpp): the open-set fields without gates (mode none, no seed). Forward y[:, o] = x W[o]^T + b[o],
    dX = dY[:, o] W[o], dW[o]^T = x^T dY[:, o] (written transposed); closed rows zeros, their data (inf) never
    read."""
    dtype = torch.bfloat16
    m, n, k = 37, 45, 69
    x, w, b, dy, _, z, idx, cnt = _open_case(m, n, k, "out", dtype, density, 1, seed=13)
    closed = idx[int(cnt):]
    keep = (z != 0).float()
    xf, wf, dyf = x.float(), w.float(), dy.float()
    if what == "fwd":
        out = torch.full((m, n), float("nan"), dtype=dtype)
        run_open(emu, x, _poison(w, 0, closed), out, M=m, N=n, K=k, mode="none", bias=_poison(b, 0, closed),
                 w_rows=idx, y_cols=idx, n_count=cnt)
        ref, zero = (xf @ wf.t() + b.float()) * keep, out[:, closed]
    elif what == "dx":
        out = torch.full((m, k), float("nan"), dtype=dtype)
        run_open(emu, _poison(dy, 1, closed), _poison(w, 0, closed), out, M=m, N=k, K=n, mode="none", x_cols=idx,
                 w_cols=idx, k_count=cnt, w_mn=True)
        ref, zero = (dyf * keep) @ wf, None
    else:
        out = torch.full((n, k), float("nan"), dtype=dtype)
        run_open(emu, x, _poison(dy, 1, closed), out, M=k, N=n, K=m, mode="none", w_rows=idx, y_cols=idx,
                 n_count=cnt, x_mn=True, w_mn=True, y_trans=True)
        ref, zero = (dyf.t() @ xf) * keep[:, None], out[closed]
    if zero is not None:
        assert (zero == 0).all()
    check(out, ref, dtype)


@pytest.mark.parametrize("what", ["in-fwd", "out-dx", "in-dw"])
def test_open_split_k_and_vector_loads(emu, what):
    """Split-K over the open count (the workspace left zero), and the 16-byte loads of MN-major operands
    (aligned, row stride a multiple of 8) agree with the scalar path."""
    dtype = torch.bfloat16
    m, n, k = 24, 40, 200
    gate = "out" if what == "out-dx" else "in"
    x, w, b, dy, la, z, idx, cnt = _open_case(m, n, k, gate, dtype, 0.6, 1, seed=8)
    outs = []
    for splits, vec in ((1, True), (3, True), (1, False)):
        if what == "in-fwd":
            y = torch.empty((m, n), dtype=dtype)
            run_open(emu, x, w, y, M=m, N=n, K=k, mode="in", la=la, bias=b, seed=77, x_cols=idx, w_cols=idx,
                     k_count=cnt, splits=splits, allow_vec=vec)
        elif what == "out-dx":
            y = torch.empty((m, k), dtype=dtype)
            run_open(emu, dy, w, y, M=m, N=k, K=n, mode="in", la=la, seed=77, x_cols=idx, w_cols=idx, k_count=cnt,
                     w_mn=True, splits=splits, allow_vec=vec)
        else:
            y = torch.empty((n, k), dtype=dtype)
            run_open(emu, dy, x, y, M=n, N=k, K=m, mode="out", la=la, seed=77, w_rows=idx, y_cols=idx, n_count=cnt,
                     x_mn=True, w_mn=True, splits=splits, allow_vec=vec)
        outs.append(y)
    tol = dict(rtol=1e-2, atol=1e-2 * max(1.0, outs[0].float().abs().max().item()))
    torch.testing.assert_close(outs[1].float(), outs[0].float(), **tol)  # split sums in another order
    assert torch.equal(outs[2], outs[0])


@pytest.mark.parametrize("density", OPEN_DENSITIES)
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("dtype", list(GEMV_DTYPES))
def test_gathered_dot(emu, dtype, axis, density):
    """dlog_alpha's dot products over the open set: columns (axis 1: input gates) or rows (axis 0: output
    gates) of W and dW, to the count read on the device; 0 for closed features, whose data (inf here) is
    never read."""
    n, k = 37, 45
    x, w, _, dy, la, z, idx, cnt = _open_case(5, n, k, "in" if axis == 1 else "out", dtype, density, 1, seed=9)
    w2 = torch.randn(n, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    closed = idx[int(cnt):]
    wa, wb = _poison(w, axis, closed), _poison(w2, axis, closed)
    feats = k if axis == 1 else n
    so, si, length = (1, k, n) if axis == 1 else (k, 1, k)
    out = torch.full((feats,), float("nan"))
    assert emu.gathered_dot(GEMV_DTYPES[dtype], wa.data_ptr(), so, si, wb.data_ptr(), so, si, idx.data_ptr(),
                            cnt.data_ptr(), feats, length, out.data_ptr()) == 0
    full = (w.float() * w2.float()).sum(0 if axis == 1 else 1)
    ref = torch.zeros(feats)
    ref[: int(cnt)] = full[idx[: int(cnt)]]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
