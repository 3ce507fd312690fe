"""The CUDA backend's autograd Functions, :class:`CudaL0LinearFunction` and :class:`CudaL0Conv2dFunction`, and
what they decide per call: the forward of ``l0_linear`` (``fused`` or ``two_pass``), whether a training call
runs over the open set, and the im2col form of a convolution that does.

Forward of ``l0_linear``, two implementations (:mod:`.ops`):

* ``fused`` (``linear_fwd_fused``): one launch that draws the gates inside the GEMM: for 1-16 rows of ``x`` a
  GEMV (``csrc/l0_gemv.cuh``; float32, float16, bfloat16), for more a tensor-core GEMM (``csrc/l0_gemm.cuh``;
  float16 / bfloat16 on compute capability 8.0+);
* ``two_pass`` (``linear_fwd``): gate sampling kernel, gated copy of ``x`` / ``W`` fused with the cast or an
  in-place bias + gate epilogue, and cuBLAS; every dtype.

``GEMM_IMPL`` (``L0K_CUDA_GEMM``, or ``gemm_impl``) chooses: ``fused``, ``two_pass`` or ``auto``, which lets the
autotuner (:mod:`l0kernels._autotune`) time both once per call signature and keep the faster (a fixed rule,
:func:`_static_choice`, where nothing is timed: ``torch.compile``, a CUDA graph capture before the signature
was timed, ``L0K_AUTO_TUNE=0``). Backward regenerates the gates from the seed (no stored mask) and forms the
``log_alpha`` gradients with reduction kernels, using the identities of :mod:`l0kernels.backends.torch.reference`.

Training with one gate vector per call (batch noise, input or output gates, float16 / bfloat16, sm_80+:
:func:`skips_closed`) runs over the open set (``linear_open_fwd`` / ``linear_open_bwd``): the open set is found
on the device (:func:`open_set`: the gate kernel and a stable sort), and every GEMM of forward and backward is
the tensor-core kernel over the gathered open features, reading the open count in device memory; dlog_alpha's
dot products run over the open features only. Closed features get exact zeros and their data is never read;
no host sync, so a CUDA graph captures the step. A layer takes this path once its open fraction, read without
a sync (:func:`l0kernels._active.open_fraction`), is at most ``SKIP_BELOW`` (``L0K_CUDA_SKIP_BELOW``, default
0.5; 1 always): above it cuBLAS on the dense problem is expected to be faster. ``L0K_SKIP_CLOSED=0``
(``_active.ENABLED``) turns it off. ``l0_conv2d`` with ``groups == 1`` takes the same ops on its im2col form
(output gates over the channels, :class:`CudaL0Conv2dFunction`, :func:`conv_skips_closed`), under the same
rule with its own fraction (``CONV_SKIP_BELOW``, ``L0K_CUDA_CONV_SKIP_BELOW``, default 0.25).

The switches ``GEMM_IMPL``, ``SKIP_BELOW``, ``CONV_SKIP_BELOW`` and ``IM2COL_MAX_BYTES`` are the package's
(``l0kernels.backends.cuda.SKIP_BELOW``, ...): this module reads them there on every call, so that a value
set there (by a test, a benchmark, a user) is the one that decides.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ... import _active
from ..._autotune import AUTOTUNER
from ..._checks import conv_out_size
from ..._gates import GateConfig
from ..._philox import seed_on
from ..torch import conv2d_grads_replayed, linear_grads_replayed
from ..torch.structure import rows_grads_replayed
from .. import cuda as _switches  # the package (partly initialised here): read its switches at call time
from . import ops
from .ops import SUPPORTED_DTYPES, cfg_list, cuda_gates

FUSED_MAX_ROWS = 65535 * 128  # grid rows of csrc/l0_gemm.cuh's 128-row tiles
GEMV_MAX_ROWS = 16  # csrc/l0_gemv.cuh: gemv::kMaxRows


def _grads(out, mask):
    return tuple(t if m else None for t, m in zip(out, mask))


_CAPABILITY: Dict[int, tuple] = {}


def _capability(device: torch.device) -> tuple:
    """Compute capability of a CUDA device, cached by index (the eval path asks on every call; a CUDA
    tensor's device always has its index)."""
    if device.index is None:
        return torch.cuda.get_device_capability(device)
    cc = _CAPABILITY.get(device.index)
    if cc is None:
        cc = _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)
    return cc


# -- the forward of l0_linear: fused or two_pass -------------------------------------------------------------

def fused_why_not(x: torch.Tensor) -> Optional[str]:
    """Why the single-launch forward cannot take ``x`` (2-D view ``(M, K)``), or None."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows <= GEMV_MAX_ROWS:  # the GEMV: every supported dtype, any architecture the build targets
        return None if x.dtype in SUPPORTED_DTYPES else f"the fused forward does not run {x.dtype}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return (f"the fused forward runs float16 and bfloat16 for more than {GEMV_MAX_ROWS} rows of x "
                f"(float32 up to {GEMV_MAX_ROWS}), got {x.dtype} with {rows} rows")
    if _capability(x.device)[0] < 8:
        return f"the fused forward needs compute capability 8.0+ for more than {GEMV_MAX_ROWS} rows of x"
    if rows > FUSED_MAX_ROWS:
        return f"the fused forward takes at most {FUSED_MAX_ROWS} rows, got {rows}"
    return None


def _static_choice(x, weight, gate, sample) -> str:
    """Before anything is measured (tracing, graph capture): the fused kernels where the problem is
    small enough (M <= 256; M <= 16 is the GEMV) that one launch instead of two and no gated copy
    should matter more than the GEMM's own speed against cuBLAS, except per-example input gates with
    N > 256, which both fused kernels redraw once per block column."""
    m, n = x.numel() // max(1, x.shape[-1]), weight.shape[0]
    if m > 256 or (gate == "in" and sample and n > 256):
        return "two_pass"
    return "fused"


def forward_reasons(x: torch.Tensor) -> Dict[str, List[str]]:
    """Why each forward implementation does not run ``x`` (training and eval): ``{"fused": [...], "two_pass":
    [...]}``, empty where it may (both with ``GEMM_IMPL == "auto"``: the autotuner picks). ``two_pass`` runs
    every call the fused forward cannot."""
    impl = _switches.GEMM_IMPL
    why = fused_why_not(x)
    fused = ["GEMM_IMPL is 'two_pass' (L0K_CUDA_GEMM or gemm_impl)"] if impl == "two_pass" else []
    two_pass = ["GEMM_IMPL is 'fused' (L0K_CUDA_GEMM or gemm_impl)"] if impl == "fused" and why is None else []
    return {"fused": fused + ([why] if why is not None else []), "two_pass": two_pass}


def forward_impls(x: torch.Tensor) -> Tuple[str, ...]:
    """The forward implementations that may run ``x`` (:func:`forward_reasons` gives them none), in the order
    ``auto`` prefers untimed: ``("fused",)``, ``("two_pass",)`` or, with ``GEMM_IMPL == "auto"``, both."""
    return tuple(name for name, reasons in forward_reasons(x).items() if not reasons)


def _forward_op(x, weight, log_alpha, bias, seed, gate, sample, training, cfg, group_size=1):
    """The forward op to run: ``ops.linear_fwd_fused`` or ``ops.linear_fwd``."""
    impl_ops = {"fused": ops.linear_fwd_fused, "two_pass": ops.linear_fwd}
    impls = forward_impls(x)
    if len(impls) == 1:
        return impl_ops[impls[0]]
    key = ("cuda.linear_fwd", tuple(x.shape), x.dtype, x.device, tuple(weight.shape), gate, sample, training,
           bias is not None, group_size)
    pick = AUTOTUNER.pick(key, {name: (lambda op=impl_ops[name]: op(x, weight, log_alpha, bias, seed, gate, sample,
                                                                    training, cfg, group_size)) for name in impls},
                          x.device, fallback=_static_choice(x, weight, gate, sample))
    return impl_ops[pick]


# -- the open-set policy ---------------------------------------------------------------------------------------
# The open-set kernels replace cuBLAS, which is faster on large dense GEMMs than the tensor-core kernel of
# csrc/l0_gemm.cuh: a layer takes them once the open fraction of its gates is at most SKIP_BELOW (1.0: always).
# The fraction is read without a host sync (l0kernels._active.open_fraction). 0.5 is a guess until measured on
# a GPU (bench/train_step.py --gpu runs the "cuda" rows with SKIP_BELOW = 1.0 beside "cuda-noskip").
# A convolution's open-set path also writes and reads its im2col matrix (kh*kw times the input, forward and
# again in backward) where cuDNN's implicit GEMM reads the input itself: expected to pay only once few channels
# stay open, so its own, lower guess CONV_SKIP_BELOW (bench/train_step.py --gpu's conv rows measure it).

def _gemm_reasons(x: torch.Tensor, rows: int) -> List[str]:
    """Why the tensor-core GEMM with its open-set fields cannot take ``x`` with ``rows`` rows (empty: it can)."""
    out = []
    if x.dtype not in (torch.float16, torch.bfloat16):
        out.append(f"x is {str(x.dtype).replace('torch.', '')}: the open-set GEMM runs float16 and bfloat16")
    elif _capability(x.device)[0] < 8:
        out.append("the open-set GEMM needs compute capability 8.0+")
    if rows > FUSED_MAX_ROWS:
        out.append(f"{rows} rows: the open-set GEMM takes at most {FUSED_MAX_ROWS}")
    return out


def open_set_reasons(x: torch.Tensor, gate: str, noise: str, training: bool) -> List[str]:
    """Why a call may not run over the open set only (``linear_open_fwd`` / ``linear_open_bwd``); empty where it
    may: a training call with one gate vector (batch noise), input or output gates, float16 / bfloat16 on
    compute capability 8.0+ (the tensor-core GEMM of ``csrc/l0_gemm.cuh`` with its open-set fields), at most
    ``FUSED_MAX_ROWS`` rows, ``L0K_SKIP_CLOSED`` on. It does where the layer's open fraction is at most
    ``SKIP_BELOW`` (:func:`_taken_open_set`)."""
    out = _active.call_reasons(training, noise != "batch")
    if gate not in ("in", "out"):
        out.append("gate='weight': every weight has its own gate, no group to skip")
    return out + _gemm_reasons(x, x.numel() // max(1, x.shape[-1]))


def skips_closed(x: torch.Tensor, gate: str, noise: str, training: bool) -> bool:
    """Whether a training call may run over the open set only (:func:`open_set_reasons` gives none)."""
    return not open_set_reasons(x, gate, noise, training)


def _taken_open_set(log_alpha: torch.Tensor, seed, cfg: GateConfig, group_size: int, below: float):
    """For a call that :func:`skips_closed` (or :func:`conv_skips_closed`) allows: this call's device open set
    where the layer's last known open fraction is at most ``below`` (``SKIP_BELOW`` or ``CONV_SKIP_BELOW``;
    :func:`l0kernels._active.taken_open_set`, always at 1.0), else None (the dense kernels). The set is drawn
    once and shared by the fraction read and the kernels."""
    return _active.taken_open_set(lambda: open_set(log_alpha, seed, cfg, group_size), log_alpha,
                                  log_alpha.shape[0] * group_size, below)


def open_set(log_alpha: torch.Tensor, seed: torch.Tensor, cfg: GateConfig, group_size: int) -> _active.OpenSet:
    """The open set of a training call's gates (per feature), on the device: the gate kernel and a stable
    sort, no host sync (the kernels read the count in device memory). Backward draws it again from the seed."""
    z, _ = cuda_gates(log_alpha, seed, -1, True, cfg)
    return _active.open_set(z.repeat_interleave(group_size) if group_size != 1 else z)


def conv_open_set_reasons(x: torch.Tensor, weight: torch.Tensor, conv, noise: str, training: bool) -> List[str]:
    """Why a training call of ``l0_conv2d`` may not run over the open output channels (:func:`open_set_reasons`'s
    rule for the GEMM of its im2col form, see :class:`CudaL0Conv2dFunction`); empty where it may: one gate
    vector per call, ``groups == 1``, float16 / bfloat16 on compute capability 8.0+, 1 to ``FUSED_MAX_ROWS``
    output pixels and an im2col matrix of at most ``IM2COL_MAX_BYTES`` (``L0K_CUDA_IM2COL_MAX_BYTES``, 2 GiB;
    above it the call keeps cuDNN's dense path)."""
    stride, padding, dilation, groups = conv
    out = _active.call_reasons(training, noise != "batch")
    if groups != 1:
        return out + [f"groups={groups}: the im2col path needs groups == 1"]
    oh, ow = _conv_hw(x, weight, stride, padding, dilation)
    rows = x.shape[0] * oh * ow
    out += _gemm_reasons(x, rows)
    if rows == 0:
        out.append("no output pixels")
    elif rows * math.prod(weight.shape[1:]) * x.element_size() > _switches.IM2COL_MAX_BYTES:
        out.append(f"its im2col matrix would take {rows * math.prod(weight.shape[1:]) * x.element_size()} bytes, "
                   f"more than IM2COL_MAX_BYTES={_switches.IM2COL_MAX_BYTES} (L0K_CUDA_IM2COL_MAX_BYTES)")
    return out


def conv_skips_closed(x: torch.Tensor, weight: torch.Tensor, conv, noise: str, training: bool) -> bool:
    """Whether a training call of ``l0_conv2d`` may run over the open output channels
    (:func:`conv_open_set_reasons` gives none)."""
    return not conv_open_set_reasons(x, weight, conv, noise, training)


# -- the im2col form of a convolution ---------------------------------------------------------------------------

def _conv_hw(x, weight, stride, padding, dilation):
    return tuple(conv_out_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in (0, 1))


def _im2col(x, weight, stride, padding, dilation) -> torch.Tensor:
    """``x`` as the ``(B * OH * OW, C * kh * kw)`` row-major matrix whose product with ``weight.reshape(C_out,
    -1).T`` is the convolution, rows ordered (b, oh, ow): channels-last order of the output."""
    cols = F.unfold(x, tuple(weight.shape[2:]), dilation=tuple(dilation), padding=tuple(padding),
                    stride=tuple(stride))  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


# -- the autograd Functions -------------------------------------------------------------------------------------

class CudaL0LinearFunction(torch.autograd.Function):
    """``l0_linear`` on the CUDA extension; same arguments as ``L0LinearFunction.apply``:
    ``apply(x, weight, log_alpha, bias, seed, gate, noise, training, cfg[, group_size])``. Training calls
    of :func:`skips_closed` run over the open set (the GEMMs skip closed features, forward and backward)."""

    @staticmethod
    def forward(ctx, x, weight, log_alpha, bias, seed, gate, noise, training, cfg, group_size=1):
        seed = seed_on(seed, x.device) if training else None  # the ops read the seed tensor on the device
        ctx.save_for_backward(x, weight, log_alpha, bias, seed)
        sample = noise == "sample"
        ctx.conf = (gate, sample, training, cfg_list(cfg))
        ctx.group_size = group_size
        ctx.cfg = cfg
        os_ = _taken_open_set(log_alpha, seed, cfg, group_size, _switches.SKIP_BELOW) \
            if skips_closed(x, gate, noise, training) else None
        ctx.open = os_ is not None
        if training and noise == "batch" and gate != "weight":
            _active.count_path("linear-" + gate, "fwd", "skip" if ctx.open else "dense")
        if ctx.open:
            return ops.linear_open_fwd(x, weight, log_alpha, bias, seed, os_.index, os_.count, gate, cfg_list(cfg),
                                       group_size)
        op = _forward_op(x, weight, log_alpha, bias, seed, gate, sample, training, cfg_list(cfg), group_size)
        return op(x, weight, log_alpha, bias, seed, gate, sample, training, cfg_list(cfg), group_size)

    @staticmethod
    def backward(ctx, dy):
        x, weight, log_alpha, bias, seed = ctx.saved_tensors
        gate, sample, training, cfg = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: the reference formula through autograd
            return linear_grads_replayed(dy, x, weight, log_alpha, bias, seed, gate, "sample" if sample else "batch",
                                         training, ctx.cfg, ctx.group_size, ctx.needs_input_grad) + (None,) * 6
        mask = [bool(m) for m in ctx.needs_input_grad[:4]]
        mask[3] = mask[3] and bias is not None
        if ctx.open:
            _active.count_path("linear-" + gate, "bwd", "skip")
            os_ = open_set(log_alpha, seed, ctx.cfg, ctx.group_size)
            out = ops.linear_open_bwd(dy, x, weight, log_alpha, bias, seed, os_.index, os_.count, gate, cfg, mask,
                                      ctx.group_size)
        else:
            out = ops.linear_bwd(dy, x, weight, log_alpha, bias, seed, gate, sample, training, cfg, mask,
                                 ctx.group_size)
        return _grads(out, mask) + (None,) * 6


def rows_reasons(x: torch.Tensor) -> List[str]:
    """Why :class:`CudaRowsLinearFunction` (the tensor-core GEMM over a producer's open rows) cannot take ``x``;
    empty where it can."""
    if not x.is_cuda:
        return [f"the CUDA backend needs CUDA tensors, got device {x.device}"]
    return _gemm_reasons(x, x.numel() // max(1, x.shape[-1]))


class CudaRowsLinearFunction(torch.autograd.Function):
    """A structure gate's producer over its open rows (docs/design.md §11): ``apply(x, weight, bias, index,
    count)``, ``(index, count)`` the device open set of rows. ``ops.rows_linear_fwd`` / ``rows_linear_bwd``: every
    GEMM over the open rows, closed rows exact zeros, nothing read on the host."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, count):
        ctx.save_for_backward(x, weight, bias, index, count)
        return ops.rows_linear_fwd(x, weight, bias, index, count)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, index, count = ctx.saved_tensors
        needs = tuple(bool(m) for m in ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # create_graph=True: the definition through autograd
            return rows_grads_replayed(dy, x, weight, bias, index, count, needs) + (None, None)
        mask = [needs[0], needs[1], needs[2] and bias is not None]
        return _grads(ops.rows_linear_bwd(dy, x, weight, bias, index, count, mask), mask) + (None, None)


class CudaL0Conv2dFunction(torch.autograd.Function):
    """``l0_conv2d`` on the CUDA extension; same arguments as ``L0Conv2dFunction.apply``:
    ``apply(x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, noise, training, cfg[,
    group_size])``.

    Dense: cuDNN plus the extension's gate kernels (``conv2d_fwd`` / ``conv2d_bwd``). Training calls of
    :func:`conv_skips_closed` whose layer's open fraction is at most ``CONV_SKIP_BELOW`` run over the open
    output channels instead: the convolution as the GEMM of its im2col form (``F.unfold``: ``X``, ``(B*OH*OW,
    C*kh*kw)``), ``Y = X W[o]^T`` with output gates, on the open-set ops of the linear layer
    (``linear_open_fwd`` / ``linear_open_bwd``: the open count read in device memory, no sync); ``dx`` is
    ``F.fold`` of ``dX = dY[:, o] W[o]``, ``dW[o] = dY[:, o]^T X``, and ``dlog_alpha`` and ``db`` as for a
    linear layer's output gates. Closed channels get exact zeros and their weights are never read. The
    im2col matrix costs ``kh*kw`` times the input's memory (recomputed in backward, not stored); cuDNN has no
    form that takes the open count from device memory."""

    @staticmethod
    def forward(ctx, x, weight, log_alpha, bias, stride, padding, dilation, groups, seed, noise, training, cfg,
                group_size=1):
        seed = seed_on(seed, x.device) if training else None
        conv = (list(stride), list(padding), list(dilation), int(groups))
        ctx.save_for_backward(x, weight, log_alpha, bias, seed)
        ctx.conf = (conv, (noise == "sample", training, cfg_list(cfg)))
        ctx.group_size = group_size
        ctx.cfg = cfg
        os_ = _taken_open_set(log_alpha, seed, cfg, group_size, _switches.CONV_SKIP_BELOW) \
            if conv_skips_closed(x, weight, conv, noise, training) else None
        ctx.open = os_ is not None
        if training and noise == "batch":
            _active.count_path("conv2d", "fwd", "skip" if ctx.open else "dense")
        if ctx.open:
            c_out = weight.shape[0]
            oh, ow = _conv_hw(x, weight, *conv[:3])
            y2 = ops.linear_open_fwd(_im2col(x, weight, *conv[:3]), weight.reshape(c_out, -1), log_alpha, bias,
                                     seed, os_.index, os_.count, "out", cfg_list(cfg), group_size)
            y = y2.view(x.shape[0], oh, ow, c_out).permute(0, 3, 1, 2)  # channels-last strides
            return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()
        return ops.conv2d_fwd(x, weight, log_alpha, bias, *conv, seed, noise == "sample", training, cfg_list(cfg),
                              group_size)

    @staticmethod
    def backward(ctx, dy):
        x, weight, log_alpha, bias, seed = ctx.saved_tensors
        conv, rest = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: the reference formula through autograd
            return conv2d_grads_replayed(dy, x, weight, log_alpha, bias, tuple(conv), seed,
                                         "sample" if rest[0] else "batch", rest[1], ctx.cfg, ctx.group_size,
                                         ctx.needs_input_grad) + (None,) * 9
        mask = [bool(m) for m in ctx.needs_input_grad[:4]]
        mask[3] = mask[3] and bias is not None
        if ctx.open:
            _active.count_path("conv2d", "bwd", "skip")
            os_ = open_set(log_alpha, seed, ctx.cfg, ctx.group_size)
            stride, padding, dilation = conv[:3]
            c_out = weight.shape[0]
            dy2 = dy.permute(0, 2, 3, 1).reshape(-1, c_out)  # free for a channels-last dY
            dx2, dw2, dla, db = ops.linear_open_bwd(dy2, _im2col(x, weight, stride, padding, dilation),
                                                    weight.reshape(c_out, -1), log_alpha, bias, seed, os_.index,
                                                    os_.count, "out", rest[2], mask, ctx.group_size)
            dx = None
            if mask[0]:
                dx = F.fold(dx2.view(x.shape[0], -1, dx2.shape[1]).transpose(1, 2), tuple(x.shape[2:]),
                            tuple(weight.shape[2:]), dilation=tuple(dilation), padding=tuple(padding),
                            stride=tuple(stride))
                if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                    dx = dx.contiguous(memory_format=torch.channels_last)  # x's layout, as cuDNN's dgrad
            out = (dx, dw2.view(weight.shape) if mask[1] else None, dla, db)
        else:
            out = ops.conv2d_bwd(dy, x, weight, log_alpha, bias, *conv, seed, *rest, mask, ctx.group_size)
        return _grads(out, mask) + (None,) * 9
