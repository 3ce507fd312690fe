// The one PyTorch-facing file of the CUDA extension l0kernels._C: argument checks, current stream,
// launchers of csrc/*.cu, cuBLAS (at::mm / at::addmm) and cuDNN (at::convolution /
// at::convolution_backward) for the GEMMs and convolutions, and the op registrations
// torch.ops.l0kernels.{uniform, gates, linear_fwd, linear_fwd_fused, sparse_linear, linear_bwd, linear_open_fwd,
// linear_open_bwd, rows_linear_fwd, rows_linear_bwd, conv2d_fwd, conv2d_bwd} (CUDA impls here;
// Python wrappers with their fake impls for torch.compile in l0kernels/backends/cuda/ops.py).
#include <Python.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "l0_kernels.h"

extern "C" {
// `import l0kernels._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

using at::Tensor;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the CUDA storage type of `st`.
template <typename F>
void dispatch_type(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK_TYPE(false, "l0kernels CUDA: ", name, " must be float32, float16 or bfloat16, got ", st);
  }
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "l0kernels CUDA: launching ", what, " failed: ", cudaGetErrorString(err));
}

void check_tensor(const Tensor& t, const char* name, const Tensor& x, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), "l0kernels CUDA: ", name, " is undefined");
  TORCH_CHECK_VALUE(t.is_cuda(), "l0kernels CUDA: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == x.device(), "l0kernels CUDA: ", name, " must be on ", x.device(), " like x, got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "l0kernels CUDA: ", name, " must have dtype ",
                   x.scalar_type(), " like x, got ", t.scalar_type());
  if (dim >= 0) {
    TORCH_CHECK_VALUE(t.dim() == dim, "l0kernels CUDA: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  }
}

l0k::GateConfig make_cfg(at::ArrayRef<double> cfg) {
  TORCH_CHECK_VALUE(cfg.size() == 4, "l0kernels CUDA: cfg must be [beta, gamma, zeta, eps], got ", cfg.size(),
                    " values");
  TORCH_CHECK_VALUE(cfg[0] > 0 && cfg[1] < 0 && cfg[2] > 1 && cfg[3] > 0 && cfg[3] < 0.5,
                    "l0kernels CUDA: cfg needs beta > 0, gamma < 0, zeta > 1, 0 < eps < 0.5, got ", cfg);
  return l0k::GateConfig{static_cast<float>(cfg[0]), static_cast<float>(cfg[1]), static_cast<float>(cfg[2]),
                         static_cast<float>(cfg[3])};
}

// The seed (docs/design.md §10): a 0-d int64 tensor on `ref`'s device whose address the kernels get; they
// read its value on the device (load_seed: low 63 bits), so no host sync, and a CUDA graph replays the
// read. None only in eval (nullptr: no kernel reads it).
const int64_t* seed_ptr(const std::optional<Tensor>& seed, const Tensor& ref, bool training) {
  if (!seed.has_value() || !seed->defined()) {
    TORCH_CHECK_VALUE(!training, "l0kernels CUDA: seed must be a 0-d int64 tensor in training, got None");
    return nullptr;
  }
  const Tensor& s = *seed;
  TORCH_CHECK_TYPE(s.scalar_type() == at::kLong, "l0kernels CUDA: seed must be an int64 tensor, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 0, "l0kernels CUDA: seed must be a 0-d tensor, got shape ", s.sizes());
  TORCH_CHECK_VALUE(s.device() == ref.device(), "l0kernels CUDA: seed must be on ", ref.device(), ", got ", s.device());
  return s.data_ptr<int64_t>();
}

// Flat float32 gates for `rows` repetitions of log_alpha (training) or z_eval (eval, rows ignored).
std::tuple<Tensor, Tensor> flat_gates(const Tensor& log_alpha, int64_t rows, const int64_t* seed, bool training,
                                      const l0k::GateConfig& cfg, bool need_grad) {
  const Tensor la = log_alpha.contiguous();
  const int64_t groups = la.numel();
  const int64_t numel = training ? rows * groups : groups;
  auto fopt = la.options().dtype(at::kFloat);
  Tensor z = at::empty({numel}, fopt);
  Tensor dz = need_grad ? at::empty({numel}, fopt) : Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_type(la.scalar_type(), "log_alpha", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(l0k::launch_gates<T>(ptr<T>(la), numel, groups, seed, training, cfg,
                                      ptr<float>(z), ptr<float>(dz), stream),
                 "gates");
  });
  return {z, dz};
}

// Grouped gates: the flat per-gate values of `rows` noise rows, each gate repeated over its `group`
// consecutive features (the kernels below then see one value per feature).
Tensor per_feature(const Tensor& t, int64_t rows, int64_t group) {
  if (group == 1 || !t.defined() || t.numel() == 0) return t;
  return t.view({rows, -1}).repeat_interleave(group, 1).reshape({-1});
}

// flat_gates with `group` features per gate: z and dz per feature (rows x features in training with
// per-example noise, features otherwise).
std::tuple<Tensor, Tensor> feature_gates(const Tensor& log_alpha, int64_t rows, const int64_t* seed, bool training,
                                         const l0k::GateConfig& cfg, bool need_grad, int64_t group) {
  auto [z, dz] = flat_gates(log_alpha, rows, seed, training, cfg, need_grad);
  const int64_t r = training ? rows : 1;
  return {per_feature(z, r, group), per_feature(dz, r, group)};
}

// Per-feature float32 shares of dlog_alpha summed over each gate's `group` features.
Tensor per_gate(const Tensor& t, int64_t group) { return group == 1 ? t : t.view({-1, group}).sum(1); }

void check_group(int64_t group, int64_t features, const char* what) {
  TORCH_CHECK_VALUE(group >= 1 && features % group == 0, "l0kernels CUDA: group_size must be >= 1 and divide ", what,
                    " (", features, "), got ", group);
}

// Contiguous (R, C) result of a * (b) * z, one rounding to a's dtype.
Tensor scale(const Tensor& a, const Tensor& b, const Tensor& z, int64_t zs_r, int64_t zs_c) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2);
  const int64_t R = a.size(0), C = a.size(1);
  Tensor out = at::empty({R, C}, a.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_type(a.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(l0k::launch_scale<T>(ptr<T>(a), a.stride(0), a.stride(1), ptr<T>(b), b.defined() ? b.stride(0) : 0,
                                      b.defined() ? b.stride(1) : 0, ptr<float>(z), zs_r, zs_c, R, C, ptr<T>(out),
                                      stream),
                 "scale");
  });
  return out;
}

// float32 (C,): sum over rows r of a[r, c] * b[r, c] * dz[(r / rows_per_gate) * dz_sr + c].
Tensor col_sum(const Tensor& a, const Tensor& b, const Tensor& dz, int64_t dz_sr, int64_t rows_per_gate) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2);
  const int64_t R = a.size(0), C = a.size(1);
  int64_t max_splits = R / 64;
  max_splits = max_splits < 1 ? 1 : (max_splits > 512 ? 512 : max_splits);
  Tensor partial = at::empty({max_splits, C}, a.options().dtype(at::kFloat));
  int splits = 0;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_type(a.scalar_type(), "grad", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(l0k::launch_col_reduce<T>(ptr<T>(a), a.stride(0), a.stride(1), ptr<T>(b),
                                           b.defined() ? b.stride(0) : 0, b.defined() ? b.stride(1) : 0,
                                           ptr<float>(dz), dz_sr, rows_per_gate, R, C,
                                           static_cast<int>(max_splits), ptr<float>(partial), &splits, stream),
                 "column reduction");
  });
  if (C == 0) return at::zeros({0}, partial.options());
  return partial.narrow(0, 0, splits).sum(0);
}

// Row dot products of two (R, C) matrices (made contiguous), float32 (R,).
Tensor row_dot(const Tensor& a_in, const Tensor& b_in) {
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t R = a.size(0), C = a.numel() / (R > 0 ? R : 1);
  Tensor out = at::empty({R}, a.options().dtype(at::kFloat));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_type(a.scalar_type(), "weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(l0k::launch_row_dot<T>(ptr<T>(a), ptr<T>(b), R, C, ptr<float>(out), stream), "row dot");
  });
  return out;
}

// In place (in == out) or out of place: out = (in + bias[c]) * z[b * z_sb + c] on (B, C, HW) data.
void channel_epilogue(const Tensor& in, const Tensor& out, const Tensor& bias, const Tensor& z, int64_t z_sb,
                      int64_t B, int64_t C, int64_t HW, bool channels_last) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_type(in.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(l0k::launch_channel_epilogue<T>(ptr<T>(in), ptr<T>(out), ptr<T>(bias), ptr<float>(z), z_sb, B, C,
                                                 HW, channels_last, stream),
                 "channel epilogue");
  });
}

int gate_mode(const std::string& gate) {
  if (gate == "in") return 0;
  if (gate == "out") return 1;
  if (gate == "weight") return 2;
  TORCH_CHECK_VALUE(false, "l0kernels CUDA: gate must be 'in', 'out' or 'weight', got '", gate, "'");
  return -1;
}

void check_linear(const Tensor& x, const Tensor& weight, const Tensor& log_alpha, const std::optional<Tensor>& bias,
                  int mode, bool sample, int64_t group) {
  TORCH_CHECK_VALUE(x.is_cuda(), "l0kernels CUDA: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, "l0kernels CUDA: x must have at least 1 dimension");
  check_tensor(weight, "weight", x, 2);
  check_tensor(log_alpha, "log_alpha", x, -1);
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == k, "l0kernels CUDA: x must have shape (..., ", k, ") to match weight ",
                    weight.sizes(), ", got ", x.sizes());
  TORCH_CHECK_VALUE(mode != 2 || group == 1, "l0kernels CUDA: group_size must be 1 for gate='weight', got ", group);
  check_group(group, mode == 0 ? k : n, mode == 0 ? "in_features" : "out_features");
  const std::vector<int64_t> want = mode == 0 ? std::vector<int64_t>{k / group}
                                    : mode == 1 ? std::vector<int64_t>{n / group}
                                                : std::vector<int64_t>{n, k};
  TORCH_CHECK_VALUE(log_alpha.sizes() == at::IntArrayRef(want), "l0kernels CUDA: log_alpha must have shape ",
                    at::IntArrayRef(want), ", got ", log_alpha.sizes());
  TORCH_CHECK_VALUE(!(mode == 2 && sample), "l0kernels CUDA: noise='sample' is not defined for gate='weight'");
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", x, 1);
    TORCH_CHECK_VALUE(bias->size(0) == n, "l0kernels CUDA: bias must have shape (", n, "), got ", bias->sizes());
  }
}

Tensor opt(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// The checked arguments of linear_fwd, linear_fwd_fused and linear_bwd.
struct LinearArgs {
  int mode;            // 0 in, 1 out, 2 weight
  l0k::GateConfig cfg;
  Tensor bias;         // undefined without one
  Tensor x2;           // x as (M, K)
  int64_t m, n, k;
  bool per_row;        // per-example noise: training with sample
  int64_t group;       // features per gate ("in" / "out")
};

LinearArgs linear_args(const Tensor& x, const Tensor& weight, const Tensor& log_alpha,
                       const std::optional<Tensor>& bias, const std::string& gate, bool sample,
                       bool training, at::ArrayRef<double> cfg_v, int64_t group) {
  const int mode = gate_mode(gate);
  check_linear(x, weight, log_alpha, bias, mode, sample, group);
  const c10::cuda::CUDAGuard guard(x.device());  // a reshape that copies runs on x's device
  const int64_t n = weight.size(0), k = weight.size(1);
  Tensor x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  return LinearArgs{mode, make_cfg(cfg_v), opt(bias), std::move(x2), m, n, k, training && sample, group};
}

std::vector<int64_t> linear_out_shape(const Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

Tensor linear_fwd(const Tensor& x, const Tensor& weight, const Tensor& log_alpha, const std::optional<Tensor>& bias_in,
                  const std::optional<Tensor>& seed_t, std::string gate, bool sample, bool training,
                  at::ArrayRef<double> cfg_v, int64_t group_size) {
  const auto [mode, cfg, bias, x2, m, n, k, per_row, group] =
      linear_args(x, weight, log_alpha, bias_in, gate, sample, training, cfg_v, group_size);
  const int64_t* seed = seed_ptr(seed_t, x, training);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t zs_r = per_row ? log_alpha.numel() * group : 0;
  Tensor z = std::get<0>(feature_gates(log_alpha, per_row ? m : 1, seed, training, cfg, false, group));
  Tensor y;
  if (mode == 0) {  // y = (x * z) @ W^T + b: gated copy of x written once, then cuBLAS
    const Tensor xz = scale(x2, Tensor(), z, zs_r, 1);
    y = bias.defined() ? at::addmm(bias, xz, weight.t()) : at::mm(xz, weight.t());
  } else if (mode == 1) {  // y = (x @ W^T + b) * z: cuBLAS, then bias + gate in place
    y = at::mm(x2, weight.t());
    if (!y.is_contiguous()) y = y.contiguous();
    channel_epilogue(y, y, bias, z, zs_r, m, n, 1, false);
  } else {  // y = x @ (W * Z)^T + b
    const Tensor wz = scale(weight, Tensor(), z, k, 1);
    y = bias.defined() ? at::addmm(bias, x2, wz.t()) : at::mm(x2, wz.t());
  }
  return y.reshape(linear_out_shape(x, n));
}

// Attribute `Attr` of `device`, read once per device index (0 for an index out of range).
template <cudaDeviceAttr Attr>
int device_attribute(const at::Device& device) {
  static std::array<std::atomic<int>, 64> cache{};  // atomic: host threads may fill it concurrently
  const int idx = device.index();
  if (idx < 0 || idx >= static_cast<int>(cache.size())) return 0;
  int value = cache[idx].load(std::memory_order_relaxed);
  if (value == 0) {
    check_launch(cudaDeviceGetAttribute(&value, Attr, idx), "cudaDeviceGetAttribute");
    cache[idx].store(value, std::memory_order_relaxed);
  }
  return value;
}

int cc_major(const at::Device& device) { return device_attribute<cudaDevAttrComputeCapabilityMajor>(device); }

int sm_count(const at::Device& device) {
  return std::max(1, device_attribute<cudaDevAttrMultiProcessorCount>(device));
}

// The split-K workspace on (device, stream): `sums` floats and `counters` ints, zero. Kept per
// stream (kernels on one stream run in order, and each leaves it zero again) and grown on demand;
// never used while a CUDA graph is captured (a graph would keep a pointer the next growth frees).
// Returns the tensors, not their pointers: the caller holds them until its kernel is queued, so a
// growth by another host thread on the same stream cannot free them before (the caching allocator
// then frees them in stream order, after that kernel).
std::pair<Tensor, Tensor> split_workspace(const Tensor& like, int64_t sums, int64_t counters, cudaStream_t stream) {
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, std::pair<Tensor, Tensor>>();  // never freed:
  // the tensors must not outlive the CUDA context at exit
  const std::lock_guard<std::mutex> lock(mu);
  auto& [ws, count] = (*cache)[{like.device().index(), stream}];
  if (!ws.defined() || ws.numel() < sums) {
    ws = at::zeros({std::max<int64_t>(sums, ws.defined() ? 2 * ws.numel() : 0)}, like.options().dtype(at::kFloat));
  }
  if (!count.defined() || count.numel() < counters) {
    count = at::zeros({std::max<int64_t>(counters, count.defined() ? 2 * count.numel() : 0)},
                      like.options().dtype(at::kInt));
  }
  return {ws, count};
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_launch(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

// Optional pieces of a single-launch GEMM call: eval gather / scatter / idle outputs.
struct GemmExtras {
  Tensor x_cols, y_cols, idle_cols, fill;
};

// x2 (M, K') with unit column stride (or gathered through x_cols), w (N', K') likewise, y (M, N).
// 1-16 rows: the GEMV, else the tensor-core GEMM; either split over K when the outputs alone give too
// few blocks (gemv::choose_splits, gemm::choose_splits).
template <typename T>
void run_gated_gemm(const Tensor& x2, const Tensor& w, const Tensor& la, const Tensor& bias, const Tensor& y,
                    const GemmExtras& e, const int64_t* seed, int mode, bool per_row, bool training,
                    const l0k::GateConfig& cfg, int64_t group = 1) {
  l0k::GatedGemmParams<T> p{ptr<T>(x2), x2.stride(0), ptr<T>(w), w.stride(0), ptr<T>(la), ptr<T>(bias),
                            ptr<T>(y), y.stride(0), ptr<const int64_t>(e.x_cols), ptr<const int64_t>(e.y_cols),
                            x2.size(0), w.size(0), w.size(1),
                            seed, mode, per_row, training,
                            l0k::gemm::vec_loads_ok(x2.data_ptr(), x2.stride(0)), cfg};
  p.vec_w = l0k::gemm::vec_loads_ok(w.data_ptr(), w.stride(0));
  p.group = group;
  p.idle_cols = ptr<const int64_t>(e.idle_cols);
  p.n_idle = e.idle_cols.defined() ? e.idle_cols.numel() : 0;
  p.fill = ptr<T>(e.fill);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::pair<Tensor, Tensor> ws;  // held until the kernel is queued
  if (p.M > 0 && p.N > 0) {
    const bool gemv = p.M <= l0k::gemv::kMaxRows;
    const int sms = sm_count(x2.device());
    const int splits = gemv ? l0k::gemv::choose_splits(p.N, p.K, sms) : l0k::gemm::choose_splits(p.M, p.N, p.K, sms);
    if (splits > 1 && !capturing(stream)) {
      const int64_t tiles = gemv ? l0k::gemv::grid_cols(p.N) : l0k::gemm::grid_cols(p.N) * l0k::gemm::grid_rows(p.M);
      ws = split_workspace(x2, p.M * p.N, tiles, stream);
      p.ws = ws.first.data_ptr<float>();
      p.ws_count = ws.second.data_ptr<int>();
      p.splits = splits;
    }
  }
  check_launch(l0k::launch_gated_gemm<T>(p, stream), "gated GEMM");
}

// The conditions of the single-launch kernels: 1-16 rows take the GEMV (csrc/l0_gemv.cuh; float32,
// float16, bfloat16); more rows the tensor-core GEMM (csrc/l0_gemm.cuh; float16 / bfloat16, sm_80+,
// at most 65535 * 128 rows).
void check_gemm_kernel(const Tensor& x, int64_t m, const char* op, const char* other) {
  const at::ScalarType st = x.scalar_type();
  if (m <= l0k::gemv::kMaxRows) {
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "l0kernels CUDA: ", op,
                     " runs float32, float16 and bfloat16, got ", st);
    return;
  }
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16, "l0kernels CUDA: ", op,
                   " runs float16 and bfloat16 for more than ", l0k::gemv::kMaxRows, " rows of x, got ", st, " (",
                   other, " runs it)");
  TORCH_CHECK_VALUE(cc_major(x.device()) >= 8, "l0kernels CUDA: ", op, " needs compute capability 8.0+ for more than ",
                    l0k::gemv::kMaxRows, " rows of x (", other, " runs everywhere)");
  TORCH_CHECK_VALUE(l0k::gemm::grid_rows(m) <= 65535, "l0kernels CUDA: ", op, " takes at most ",
                    65535 * static_cast<int64_t>(l0k::gemm::kBM), " rows of x, got ", m, " (", other, " takes any)");
}

// The same result as linear_fwd in one launch: the GEMV (csrc/l0_gemv.cuh) for 1-16 rows of x, else
// the tensor-core GEMM (csrc/l0_gemm.cuh); conditions in check_gemm_kernel.
Tensor linear_fwd_fused(const Tensor& x, const Tensor& weight, const Tensor& log_alpha,
                        const std::optional<Tensor>& bias_in, const std::optional<Tensor>& seed_t, std::string gate,
                        bool sample, bool training, at::ArrayRef<double> cfg_v, int64_t group_size) {
  const LinearArgs a = linear_args(x, weight, log_alpha, bias_in, gate, sample, training, cfg_v, group_size);
  const int64_t* seed = seed_ptr(seed_t, x, training);
  const c10::cuda::CUDAGuard guard(x.device());
  check_gemm_kernel(x, a.m, "linear_fwd_fused", "linear_fwd");
  const Tensor x2 = a.x2.stride(1) == 1 ? a.x2 : a.x2.contiguous();
  const Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const Tensor la = log_alpha.contiguous();
  const Tensor bias = a.bias.defined() ? a.bias.contiguous() : Tensor();
  Tensor y = at::empty({a.m, a.n}, x.options());
  dispatch_type(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    run_gated_gemm<T>(x2, w, la, bias, y, GemmExtras{}, seed, a.mode, a.per_row, training, a.cfg, a.group);
  });
  return y.view(linear_out_shape(x, a.n));
}

// Eval plan of an L0Linear (l0kernels/backends/_plans.py LinearPlan) in one launch (the GEMV for 1-16 rows,
// else the tensor-core GEMM; conditions in check_gemm_kernel):
// y[:, out_idx] = x[:, in_idx] @ weight.T + bias, the other columns fill (zeros when undefined).
// x (M, K) any row stride; weight (N', K') compact; in_idx (K',) / out_idx (N',) int64 or undefined;
// idle_idx: the outputs not in out_idx (out_features - N' of them), written by the same launch; without
// it (and with out_idx) y is filled first (one more launch).
Tensor sparse_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias_in,
                     const std::optional<Tensor>& in_idx_in, const std::optional<Tensor>& out_idx_in,
                     const std::optional<Tensor>& idle_idx_in, const std::optional<Tensor>& fill_in,
                     int64_t out_features) {
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 2, "l0kernels CUDA: x must be a 2-D CUDA tensor, got ", x.sizes(),
                    " on ", x.device());
  check_tensor(weight, "weight", x, 2);
  const Tensor bias = opt(bias_in), in_idx = opt(in_idx_in), out_idx = opt(out_idx_in), idle_idx = opt(idle_idx_in);
  const Tensor fill = opt(fill_in);
  const int64_t m = x.size(0), np = weight.size(0), kp = weight.size(1);
  if (bias.defined()) {
    check_tensor(bias, "bias", x, 1);
    TORCH_CHECK_VALUE(bias.size(0) == np, "l0kernels CUDA: bias must have ", np, " elements, got ", bias.sizes());
  }
  TORCH_CHECK_VALUE(!idle_idx.defined() || out_idx.defined(), "l0kernels CUDA: idle_idx needs out_idx");
  for (const auto& [t, name, len] :
       {std::tuple<const Tensor&, const char*, int64_t>{in_idx, "in_idx", kp},
        std::tuple<const Tensor&, const char*, int64_t>{out_idx, "out_idx", np},
        std::tuple<const Tensor&, const char*, int64_t>{idle_idx, "idle_idx", out_features - np}}) {
    if (!t.defined()) continue;
    TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                          t.size(0) == len,
                      "l0kernels CUDA: ", name, " must be an int64 (", len, ",) tensor on ", x.device(), ", got ",
                      t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
  TORCH_CHECK_VALUE(in_idx.defined() || x.size(1) == kp, "l0kernels CUDA: x must have ", kp,
                    " columns (no in_idx), got ", x.sizes());
  TORCH_CHECK_VALUE(out_idx.defined() ? out_features >= np : out_features == np,
                    "l0kernels CUDA: out_features ", out_features, " does not fit weight ", weight.sizes());
  if (fill.defined()) {
    check_tensor(fill, "fill", x, 1);
    TORCH_CHECK_VALUE(fill.size(0) == out_features, "l0kernels CUDA: fill must have ", out_features,
                      " elements, got ", fill.sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  check_gemm_kernel(x, m, "sparse_linear", "the PyTorch plan path");
  // unit column stride also for the gather: the kernels read x[m, in_idx[k]] at m * ldx + in_idx[k]
  const Tensor x2 = x.stride(1) == 1 || x.size(1) <= 1 ? x : x.contiguous();
  const Tensor w = weight.is_contiguous() ? weight : weight.contiguous();
  Tensor y;
  if (!out_idx.defined() || idle_idx.defined()) {
    y = at::empty({m, out_features}, x.options());  // every column written by the launch
  } else if (fill.defined()) {
    y = fill.expand({m, out_features}).contiguous();
  } else {
    y = at::zeros({m, out_features}, x.options());
  }
  const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
  const GemmExtras extras{in_idx, out_idx, idle_idx, idle_idx.defined() && fill.defined() ? fill.contiguous() : Tensor()};
  const l0k::GateConfig none{1.0f, -0.1f, 1.1f, 1e-6f};  // unused without gates
  dispatch_type(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    run_gated_gemm<T>(x2, w, Tensor(), b, y, extras, nullptr, l0k::kGateNone, false, false, none);
  });
  return y;
}

Tensor empty_result(const Tensor& x) { return at::empty({0}, x.options()); }

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_bwd(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                      const Tensor& log_alpha, const std::optional<Tensor>& bias_in,
                                                      const std::optional<Tensor>& seed_t, std::string gate,
                                                      bool sample, bool training,
                                                      at::ArrayRef<double> cfg_v, std::array<bool, 4> mask,
                                                      int64_t group_size) {
  const auto [mode, cfg, bias, x2, m, n, k, per_row, group] =
      linear_args(x, weight, log_alpha, bias_in, gate, sample, training, cfg_v, group_size);
  const int64_t* seed = seed_ptr(seed_t, x, training);
  check_tensor(grad, "grad", x, -1);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(grad.numel() == m * n, "l0kernels CUDA: grad must have ", m * n, " elements (x rows x ", n,
                    "), got shape ", grad.sizes());
  const Tensor dy = grad.reshape({m, n});
  const bool need_x = mask[0], need_w = mask[1], need_la = mask[2], need_b = mask[3] && bias.defined();
  const int64_t zs_r = per_row ? log_alpha.numel() * group : 0;
  Tensor z, dz;
  std::tie(z, dz) = feature_gates(log_alpha, per_row ? m : 1, seed, training, cfg, need_la, group);
  Tensor dx, dw, dla, db;  // dla: per feature until per_gate below
  if (mode == 0) {
    const Tensor g = (need_x || need_la) ? at::mm(dy, weight) : Tensor();  // (M, K) = dY @ W
    if (need_x) dx = scale(g, Tensor(), z, zs_r, 1);
    if (need_w) dw = at::mm(dy.t(), scale(x2, Tensor(), z, zs_r, 1));
    if (need_la) dla = col_sum(g, x2, dz, zs_r, 1);
    if (need_b) db = col_sum(dy, Tensor(), Tensor(), 0, 1).to(bias.scalar_type());
  } else if (mode == 1 && per_row) {  // per-example output gates: h recomputed for dlog_alpha
    const Tensor dyz = (need_x || need_w || need_b) ? scale(dy, Tensor(), z, n, 1) : Tensor();
    if (need_x) dx = at::mm(dyz, weight);
    if (need_w) dw = at::mm(dyz.t(), x2);
    if (need_b) db = col_sum(dyz, Tensor(), Tensor(), 0, 1).to(bias.scalar_type());
    if (need_la) {
      const Tensor h = bias.defined() ? at::addmm(bias, x2, weight.t()) : at::mm(x2, weight.t());
      dla = col_sum(dy, h, dz, n, 1);
    }
  } else if (mode == 1) {  // batch / eval output gates: dla = dz * (rowsum(W * P) + b * colsum(dY)), P = dY^T x
    if (need_x) dx = at::mm(scale(dy, Tensor(), z, 0, 1), weight);
    const Tensor p = (need_w || need_la) ? at::mm(dy.t(), x2) : Tensor();
    if (need_w) dw = scale(p, Tensor(), z, 1, 0);
    const Tensor colsum = (need_b || need_la) ? col_sum(dy, Tensor(), Tensor(), 0, 1) : Tensor();
    if (need_b) db = (colsum * z).to(bias.scalar_type());
    if (need_la) {
      Tensor hdy = row_dot(weight, p);
      if (bias.defined()) hdy = hdy + bias.to(at::kFloat) * colsum;
      dla = hdy * dz;
    }
  } else {  // weight gates
    if (need_x) dx = at::mm(dy, scale(weight, Tensor(), z, k, 1));
    const Tensor p = (need_w || need_la) ? at::mm(dy.t(), x2) : Tensor();
    if (need_w) dw = scale(p, Tensor(), z, k, 1);
    if (need_la) dla = scale(p, weight, dz, k, 1);
    if (need_b) db = col_sum(dy, Tensor(), Tensor(), 0, 1).to(bias.scalar_type());
  }
  if (dla.defined()) dla = per_gate(dla, group).to(log_alpha.scalar_type());
  if (dx.defined()) dx = dx.reshape(x.sizes());
  auto fill = [&](const Tensor& t) { return t.defined() ? t : empty_result(x); };
  return {fill(dx), fill(dw), fill(dla), fill(db)};
}

// -- Training over the open set (issue 13) ------------------------------------------------------------------
// Batch-noise input / output gates: the GEMMs of forward and backward run over the open features only,
// gathered through the open set of l0kernels/_active.py (`index`: (F,) int64, the open features first;
// `count`: a 0-d int64 tensor), which the kernels read on the device: no host sync, fixed shapes, so a
// CUDA graph captures the step. Closed features get exact zeros and their data is never read.

// One launch of the tensor-core GEMM with csrc/l0_gemm.cuh's open-set fields.
struct OpenGemm {
  const Tensor& x;  // the A operand's storage: (M, K) K-major, or (K, M) with x_mn
  const Tensor& w;  // the B operand's storage: (N, K) K-major, or (K, N) with w_mn
  int64_t M, N, K;
  bool x_mn = false, w_mn = false, y_trans = false;
  Tensor x_cols = Tensor(), y_cols = Tensor(), w_rows = Tensor(), w_cols = Tensor(), k_count = Tensor(),
         n_count = Tensor();
  // The GEMM's columns are the open features: B's rows gathered, y's columns scattered, zeros past the count.
  OpenGemm& open_columns(const Tensor& index, const Tensor& count) {
    w_rows = index;
    y_cols = index;
    n_count = count;
    return *this;
  }
  // The reduction runs over the open features: A's and B's k gathered, to the count.
  OpenGemm& open_reduction(const Tensor& index, const Tensor& count) {
    x_cols = index;
    w_cols = index;
    k_count = count;
    return *this;
  }
};

template <typename T>
void run_open_gemm(const OpenGemm& g, const Tensor& la, const Tensor& bias, const Tensor& y, const int64_t* seed,
                   int mode, const l0k::GateConfig& cfg, int64_t group) {
  l0k::GatedGemmParams<T> p{ptr<T>(g.x), g.x.stride(0), ptr<T>(g.w), g.w.stride(0), ptr<T>(la), ptr<T>(bias),
                            ptr<T>(y), y.stride(0), ptr<const int64_t>(g.x_cols), ptr<const int64_t>(g.y_cols),
                            g.M, g.N, g.K, seed, mode, false, seed != nullptr,
                            l0k::gemm::vec_loads_ok(g.x.data_ptr(), g.x.stride(0)), cfg};
  p.vec_w = l0k::gemm::vec_loads_ok(g.w.data_ptr(), g.w.stride(0));
  p.group = group;
  p.w_rows = ptr<const int64_t>(g.w_rows);
  p.w_cols = ptr<const int64_t>(g.w_cols);
  p.k_count = ptr<const int64_t>(g.k_count);
  p.n_count = ptr<const int64_t>(g.n_count);
  p.x_mn = g.x_mn;
  p.w_mn = g.w_mn;
  p.y_trans = g.y_trans;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::pair<Tensor, Tensor> ws;  // held until the kernel is queued
  if (p.M > 0 && p.N > 0) {
    // split on the full sizes (the open count stays on the device; splits past it find no k-tiles)
    const int splits = l0k::gemm::choose_splits(p.M, p.N, p.K, sm_count(g.x.device()));
    if (splits > 1 && !capturing(stream)) {
      ws = split_workspace(g.x, p.M * p.N, l0k::gemm::grid_cols(p.N) * l0k::gemm::grid_rows(p.M), stream);
      p.ws = ws.first.data_ptr<float>();
      p.ws_count = ws.second.data_ptr<int>();
      p.splits = splits;
    }
  }
  check_launch(l0k::launch_gated_gemm<T>(p, stream), "open-set GEMM");
}

// float32 (F,): sum over i < L of a[idx[j] * so + i * si] * b[idx[j] * so + i * si] for j < count, else 0
// (a and b contiguous with the same layout).
Tensor gathered_dot(const Tensor& a, const Tensor& b, int64_t so, int64_t si, int64_t L, const Tensor& idx,
                    const Tensor& count) {
  const int64_t F = idx.numel();
  Tensor out = at::empty({F}, a.options().dtype(at::kFloat));
  dispatch_type(a.scalar_type(), "weight", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(l0k::launch_gathered_dot<T>(ptr<T>(a), so, si, ptr<T>(b), so, si, idx.data_ptr<int64_t>(),
                                             count.data_ptr<int64_t>(), F, L, ptr<float>(out),
                                             c10::cuda::getCurrentCUDAStream()),
                 "gathered dot");
  });
  return out;
}

// The checked open set (index, count) of `feats` features, the dtype and device the open-set GEMM runs.
void check_open_set(const Tensor& x, int64_t feats, const Tensor& index, const Tensor& count, const char* op) {
  TORCH_CHECK_VALUE(index.is_cuda() && index.device() == x.device() && index.scalar_type() == at::kLong &&
                        index.dim() == 1 && index.size(0) == feats && index.is_contiguous(),
                    "l0kernels CUDA: ", op, ": index must be a contiguous int64 (", feats, ",) tensor on ", x.device(),
                    ", got ", index.scalar_type(), " ", index.sizes(), " on ", index.device());
  TORCH_CHECK_VALUE(count.is_cuda() && count.device() == x.device() && count.scalar_type() == at::kLong &&
                        count.dim() == 0,
                    "l0kernels CUDA: ", op, ": count must be a 0-d int64 tensor on ", x.device());
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16, "l0kernels CUDA: ", op,
                   " runs float16 and bfloat16 (the tensor-core GEMM), got ", st);
  TORCH_CHECK_VALUE(cc_major(x.device()) >= 8, "l0kernels CUDA: ", op, " needs compute capability 8.0+");
  TORCH_CHECK_VALUE(l0k::gemm::grid_rows(x.numel() / std::max<int64_t>(x.size(-1), 1)) <= 65535, "l0kernels CUDA: ",
                    op, " takes at most ", 65535 * static_cast<int64_t>(l0k::gemm::kBM), " rows of x");
}

// The checked arguments of the open-set ops, beyond linear_args.
void check_open(const Tensor& x, const LinearArgs& a, const Tensor& index, const Tensor& count, const char* op) {
  TORCH_CHECK_VALUE(a.mode == 0 || a.mode == 1, "l0kernels CUDA: ", op, " takes gate 'in' or 'out'");
  check_open_set(x, a.mode == 0 ? a.k : a.n, index, count, op);
}

Tensor unit_cols(const Tensor& t) { return t.stride(-1) == 1 && t.size(-1) > 0 ? t : t.contiguous(); }

// Forward: input gates y = (x[:, o] * z[o]) @ W[:, o]^T + b (the reduction over the open count); output
// gates y[:, o] = (x @ W[o]^T + b[o]) * z[o], y[:, closed] = 0.
Tensor linear_open_fwd(const Tensor& x, const Tensor& weight, const Tensor& log_alpha,
                       const std::optional<Tensor>& bias_in, const Tensor& seed_t, const Tensor& index,
                       const Tensor& count, std::string gate, at::ArrayRef<double> cfg_v, int64_t group_size) {
  const LinearArgs a = linear_args(x, weight, log_alpha, bias_in, gate, false, true, cfg_v, group_size);
  const int64_t* seed = seed_ptr(seed_t, x, true);
  const c10::cuda::CUDAGuard guard(x.device());
  check_open(x, a, index, count, "linear_open_fwd");
  const Tensor x2 = unit_cols(a.x2), w = unit_cols(weight), la = log_alpha.contiguous();
  const Tensor bias = a.bias.defined() ? a.bias.contiguous() : Tensor();
  Tensor y = at::empty({a.m, a.n}, x.options());
  OpenGemm g{x2, w, a.m, a.n, a.k};
  if (a.mode == 0) {
    g.open_reduction(index, count);
  } else {
    g.open_columns(index, count);
  }
  dispatch_type(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    run_open_gemm<T>(g, la, bias, y, seed, a.mode, a.cfg, a.group);
  });
  return y.view(linear_out_shape(x, a.n));
}

// Backward over the open set (gates drawn again from the seed). Input gates: dX[:, o] = (dY W[:, o]) z[o],
// dW[:, o] = dY^T (x[:, o] z[o]), dla[o] = (dz / z)[o] sum_n W[n, o] dW[n, o], db = colsum(dY); output gates:
// dX = (dY[:, o] z[o]) W[o], dW[o] = z[o] (dY[:, o])^T x (computed as dW^T), db = colsum(dY) z,
// dla[o] = dz[o] (sum_k W[o, k] dW[o, k] / z[o] + b[o] colsum[o]). Closed features: zeros.
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_open_bwd(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                           const Tensor& log_alpha,
                                                           const std::optional<Tensor>& bias_in, const Tensor& seed_t,
                                                           const Tensor& index, const Tensor& count, std::string gate,
                                                           at::ArrayRef<double> cfg_v, std::array<bool, 4> mask,
                                                           int64_t group_size) {
  const LinearArgs a = linear_args(x, weight, log_alpha, bias_in, gate, false, true, cfg_v, group_size);
  const int64_t* seed = seed_ptr(seed_t, x, true);
  check_tensor(grad, "grad", x, -1);
  const c10::cuda::CUDAGuard guard(x.device());
  check_open(x, a, index, count, "linear_open_bwd");
  const int64_t m = a.m, n = a.n, k = a.k;
  TORCH_CHECK_VALUE(grad.numel() == m * n, "l0kernels CUDA: grad must have ", m * n, " elements (x rows x ", n,
                    "), got shape ", grad.sizes());
  const Tensor dy = grad.reshape({m, n}).contiguous(), x2 = a.x2.contiguous(), w = weight.contiguous();
  const Tensor la = log_alpha.contiguous();
  const bool need_x = mask[0], need_w = mask[1], need_la = mask[2], need_b = mask[3] && a.bias.defined();
  Tensor z, dz;
  if (need_la || (a.mode == 1 && need_b)) std::tie(z, dz) = feature_gates(log_alpha, 1, seed, true, a.cfg, need_la, a.group);
  Tensor dx, dw, dla, db;
  auto gemm = [&](const OpenGemm& g, const Tensor& y, int mode) {
    dispatch_type(x.scalar_type(), "x", [&](auto tag) {
      using T = typename decltype(tag)::type;
      run_open_gemm<T>(g, la, Tensor(), y, seed, mode, a.cfg, a.group);
    });
  };
  // the open features' dot products of W and dW (columns for input gates, rows for output gates), and
  // dlog_alpha scattered from the open positions j < count (closed: 0)
  auto open_dla = [&](const Tensor& dot_over_z_plus) {
    const Tensor j = at::arange(index.numel(), index.options());
    const Tensor dzo = dz.index_select(0, index);
    const Tensor vals = at::where(j < count, dzo * dot_over_z_plus, at::zeros({}, dzo.options()));
    return at::zeros_like(dz).scatter_(0, index, vals);
  };
  if (a.mode == 0) {
    if (need_x) {
      dx = at::empty({m, k}, x.options());
      OpenGemm g{dy, w, m, k, n};  // dX[:, o] = dY W[:, o]: B = W^T, MN-major
      g.w_mn = true;
      gemm(g.open_columns(index, count), dx, l0k::kGateOut);
    }
    if (need_w || need_la) {
      dw = at::empty({n, k}, x.options());
      OpenGemm g{dy, x2, n, k, m};  // dW[:, o] = dY^T x[:, o]: A = dY^T, B = x^T, both MN-major
      g.x_mn = g.w_mn = true;
      gemm(g.open_columns(index, count), dw, l0k::kGateOut);
    }
    if (need_la) {
      const Tensor dot = gathered_dot(w, dw, 1, k, n, index, count);
      const Tensor zo = z.index_select(0, index);
      dla = open_dla(dot / at::where(zo > 0, zo, at::ones({}, zo.options())));
    }
    if (need_b) db = col_sum(dy, Tensor(), Tensor(), 0, 1).to(a.bias.scalar_type());
  } else {
    if (need_x) {
      dx = at::empty({m, k}, x.options());
      OpenGemm g{dy, w, m, k, n};  // dX = dY[:, o] W[o]: B = W^T, MN-major, the reduction over o
      g.w_mn = true;
      gemm(g.open_reduction(index, count), dx, l0k::kGateIn);
    }
    if (need_w || need_la) {
      dw = at::empty({n, k}, x.options());
      OpenGemm g{x2, dy, k, n, m};  // dW[o]^T = x^T dY[:, o]: A = x^T, B = dY^T, written transposed
      g.x_mn = g.w_mn = g.y_trans = true;
      gemm(g.open_columns(index, count), dw, l0k::kGateOut);
    }
    const Tensor colsum = (need_b || need_la) ? col_sum(dy, Tensor(), Tensor(), 0, 1) : Tensor();
    if (need_b) db = (colsum * z).to(a.bias.scalar_type());
    if (need_la) {
      const Tensor dot = gathered_dot(w, dw, k, 1, k, index, count);
      const Tensor zo = z.index_select(0, index);
      Tensor hdy = dot / at::where(zo > 0, zo, at::ones({}, zo.options()));
      if (a.bias.defined()) hdy = hdy + (a.bias.to(at::kFloat) * colsum).index_select(0, index);
      dla = open_dla(hdy);
    }
  }
  if (dla.defined()) dla = per_gate(dla, a.group).to(log_alpha.scalar_type());
  if (dx.defined()) dx = dx.reshape(x.sizes());
  if (!need_w) dw = Tensor();
  auto fill = [&](const Tensor& t) { return t.defined() ? t : empty_result(x); };
  return {fill(dx), fill(dw), fill(dla), fill(db)};
}

// -- A structure gate's producer over its open rows (docs/design.md §11) ------------------------------------------
// y[:, o] = x @ W[o]^T + b[o] for the open rows o of (index, count), exact zeros for the others; no gates (the
// block's consumer applies z). The open-set GEMMs of linear_open_fwd / _bwd with output gates, without the gate.

// The checked (x2, n, k, bias) of the rows ops.
std::tuple<Tensor, int64_t, int64_t, Tensor> rows_args(const Tensor& x, const Tensor& weight,
                                                       const std::optional<Tensor>& bias_in, const Tensor& index,
                                                       const Tensor& count, const char* op) {
  TORCH_CHECK_VALUE(x.is_cuda(), "l0kernels CUDA: x must be a CUDA tensor, got device ", x.device());
  check_tensor(weight, "weight", x, 2);
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "l0kernels CUDA: x must have ", k,
                    " features in its last dim (weight's in_features), got shape ", x.sizes());
  const Tensor bias = opt(bias_in);
  if (bias.defined()) {
    check_tensor(bias, "bias", x, 1);
    TORCH_CHECK_VALUE(bias.size(0) == n, "l0kernels CUDA: bias must have shape (", n, "), got ", bias.sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  check_open_set(x, n, index, count, op);
  return {x.reshape({-1, k}), n, k, bias.defined() ? bias.contiguous() : Tensor()};
}

Tensor rows_linear_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias_in,
                       const Tensor& index, const Tensor& count) {
  const auto [x2_in, n, k, bias] = rows_args(x, weight, bias_in, index, count, "rows_linear_fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor x2 = unit_cols(x2_in), w = unit_cols(weight);
  const int64_t m = x2.size(0);
  Tensor y = at::empty({m, n}, x.options());
  OpenGemm g{x2, w, m, n, k};
  g.open_columns(index, count);
  const l0k::GateConfig cfg{};
  dispatch_type(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    run_open_gemm<T>(g, Tensor(), bias, y, nullptr, l0k::kGateNone, cfg, 1);
  });
  return y.view(linear_out_shape(x, n));
}

// Backward: dX = dY[:, o] W[o] (the reduction over the open rows), dW[o]^T = x^T dY[:, o] (closed rows of dW
// zero), db = colsum(dY) on the open rows (closed: zero). mask: which of (dx, dweight, dbias).
std::tuple<Tensor, Tensor, Tensor> rows_linear_bwd(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias_in, const Tensor& index,
                                                   const Tensor& count, std::array<bool, 3> mask) {
  const auto [x2_in, n, k, bias] = rows_args(x, weight, bias_in, index, count, "rows_linear_bwd");
  check_tensor(grad, "grad", x, -1);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x2_in.size(0);
  TORCH_CHECK_VALUE(grad.numel() == m * n, "l0kernels CUDA: grad must have ", m * n, " elements (x rows x ", n,
                    "), got shape ", grad.sizes());
  const Tensor dy = grad.reshape({m, n}).contiguous(), x2 = x2_in.contiguous(), w = weight.contiguous();
  const bool need_x = mask[0], need_w = mask[1], need_b = mask[2] && bias.defined();
  const l0k::GateConfig cfg{};
  Tensor dx, dw, db;
  auto gemm = [&](const OpenGemm& g, const Tensor& y) {
    dispatch_type(x.scalar_type(), "x", [&](auto tag) {
      using T = typename decltype(tag)::type;
      run_open_gemm<T>(g, Tensor(), Tensor(), y, nullptr, l0k::kGateNone, cfg, 1);
    });
  };
  if (need_x) {
    dx = at::empty({m, k}, x.options());
    OpenGemm g{dy, w, m, k, n};  // B = W^T, MN-major; the reduction over the open rows
    g.w_mn = true;
    gemm(g.open_reduction(index, count), dx);
    dx = dx.reshape(x.sizes());
  }
  if (need_w) {
    dw = at::empty({n, k}, x.options());
    OpenGemm g{x2, dy, k, n, m};  // dW[o]^T = x^T dY[:, o]: A = x^T, B = dY^T, written transposed
    g.x_mn = g.w_mn = g.y_trans = true;
    gemm(g.open_columns(index, count), dw);
  }
  if (need_b) {
    const Tensor pos = at::arange(n, index.options());
    const Tensor open = at::zeros({n}, dy.options().dtype(at::kFloat)).scatter_(0, index, (pos < count).to(at::kFloat));
    db = (col_sum(dy, Tensor(), Tensor(), 0, 1) * open).to(bias.scalar_type());
  }
  auto fill = [&](const Tensor& t) { return t.defined() ? t : empty_result(x); };
  return {fill(dx), fill(dw), fill(db)};
}

// Layout of a 4-D tensor for the channel kernels; copies it to x's suggested format if it is neither
// NCHW- nor NHWC-contiguous.
Tensor channel_layout(const Tensor& t, const Tensor& x, bool* channels_last) {
  if (t.is_contiguous()) {
    *channels_last = false;
    return t;
  }
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    *channels_last = true;
    return t;
  }
  const Tensor c = t.contiguous(x.suggest_memory_format());
  *channels_last = !c.is_contiguous();
  return c;
}

// float32 (C,): sum over b, hw of a * b_ * dz[b * dz_sb + c] for (B, C, H, W) tensors in one layout.
Tensor channel_sum(const Tensor& a, const Tensor& b, bool channels_last, const Tensor& dz, int64_t dz_sb) {
  const int64_t B = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3);
  if (channels_last) {  // (B*HW, C) row-major
    const Tensor a2 = a.permute({0, 2, 3, 1}).reshape({B * HW, C});
    const Tensor b2 = b.defined() ? b.permute({0, 2, 3, 1}).reshape({B * HW, C}) : Tensor();
    return col_sum(a2, b2, dz, dz_sb, HW > 0 ? HW : 1);
  }
  Tensor out = at::empty({C}, a.options().dtype(at::kFloat));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_type(a.scalar_type(), "grad", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(l0k::launch_plane_reduce<T>(ptr<T>(a), ptr<T>(b), ptr<float>(dz), dz_sb, B, C, HW, ptr<float>(out),
                                             stream),
                 "plane reduction");
  });
  return out;
}

void check_conv(const Tensor& x, const Tensor& weight, const Tensor& log_alpha, const std::optional<Tensor>& bias,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                int64_t group) {
  TORCH_CHECK_VALUE(x.is_cuda(), "l0kernels CUDA: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, "l0kernels CUDA: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  check_tensor(weight, "weight", x, 4);
  check_tensor(log_alpha, "log_alpha", x, 1);
  check_group(group, weight.size(0), "out_channels");
  TORCH_CHECK_VALUE(log_alpha.size(0) * group == weight.size(0), "l0kernels CUDA: log_alpha must have shape (",
                    weight.size(0) / group, ") (out_channels / group_size), got ", log_alpha.sizes());
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", x, 1);
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), "l0kernels CUDA: bias must have shape (", weight.size(0),
                      "), got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "l0kernels CUDA: stride, padding and dilation must be pairs");
  TORCH_CHECK_VALUE(groups >= 1, "l0kernels CUDA: groups must be >= 1, got ", groups);
}

Tensor conv2d_fwd(const Tensor& x, const Tensor& weight, const Tensor& log_alpha, const std::optional<Tensor>& bias_in,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                  const std::optional<Tensor>& seed_t, bool sample, bool training, at::ArrayRef<double> cfg_v,
                  int64_t group_size) {
  check_conv(x, weight, log_alpha, bias_in, stride, padding, dilation, groups, group_size);
  const int64_t* seed = seed_ptr(seed_t, x, training);
  const l0k::GateConfig cfg = make_cfg(cfg_v);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor bias = opt(bias_in);
  Tensor h = at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
  bool cl = false;
  h = channel_layout(h, x, &cl);
  const int64_t B = h.size(0), C = h.size(1), HW = h.size(2) * h.size(3);
  const bool per_row = training && sample;
  const Tensor z = std::get<0>(feature_gates(log_alpha, per_row ? B : 1, seed, training, cfg, false, group_size));
  channel_epilogue(h, h, bias, z, per_row ? C : 0, B, C, HW, cl);
  return h;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv2d_bwd(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                      const Tensor& log_alpha, const std::optional<Tensor>& bias_in,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, int64_t groups,
                                                      const std::optional<Tensor>& seed_t,
                                                      bool sample, bool training, at::ArrayRef<double> cfg_v,
                                                      std::array<bool, 4> mask, int64_t group_size) {
  check_conv(x, weight, log_alpha, bias_in, stride, padding, dilation, groups, group_size);
  check_tensor(grad, "grad", x, 4);
  const int64_t* seed = seed_ptr(seed_t, x, training);
  const l0k::GateConfig cfg = make_cfg(cfg_v);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor bias = opt(bias_in);
  bool cl = false;
  const Tensor dy = channel_layout(grad, x, &cl);
  const int64_t B = dy.size(0), C = dy.size(1), HW = dy.size(2) * dy.size(3);
  TORCH_CHECK_VALUE(C == weight.size(0) && B == x.size(0), "l0kernels CUDA: grad must have shape (", x.size(0), ", ",
                    weight.size(0), ", H_out, W_out), got ", grad.sizes());
  const bool need_x = mask[0], need_w = mask[1], need_la = mask[2], need_b = mask[3] && bias.defined();
  const bool per_row = training && sample;
  const int64_t z_sb = per_row ? C : 0;
  Tensor z, dz;
  std::tie(z, dz) = feature_gates(log_alpha, per_row ? B : 1, seed, training, cfg, need_la, group_size);
  auto conv_bw = [&](const Tensor& g, bool want_x, bool want_w) {
    return at::convolution_backward(g, x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                    {want_x, want_w, false});
  };
  auto gated = [&](const Tensor& t) {
    Tensor out = at::empty_like(t);  // preserves the (dense) layout of t
    channel_epilogue(t, out, Tensor(), z, z_sb, B, C, HW, cl);
    return out;
  };
  Tensor dx, dw, dla, db;
  if (per_row) {  // per-example channel gates: h recomputed for dlog_alpha
    const Tensor dyz = (need_x || need_w || need_b) ? gated(dy) : Tensor();
    if (need_x || need_w) std::tie(dx, dw, std::ignore) = conv_bw(dyz, need_x, need_w);
    if (need_b) db = channel_sum(dyz, Tensor(), cl, Tensor(), 0).to(bias.scalar_type());
    if (need_la) {
      Tensor h = at::convolution(x, weight, bias.defined() ? std::optional<Tensor>(bias) : std::nullopt, stride,
                                 padding, dilation, false, {0, 0}, groups);
      h = h.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
      dla = per_gate(channel_sum(dy, h, cl, dz, C), group_size).to(log_alpha.scalar_type());
    }
  } else {  // batch / eval gates: dla = dz * (rowsum(W * P) + b * colsum(dY)), P = dW of the un-gated grad
    if (need_x) dx = std::get<0>(conv_bw(gated(dy), true, false));
    Tensor p = (need_w || need_la) ? std::get<1>(conv_bw(dy, false, true)).contiguous() : Tensor();
    if (need_w) dw = scale(p.view({C, -1}), Tensor(), z, 1, 0).view(weight.sizes());
    const Tensor colsum = (need_b || need_la) ? channel_sum(dy, Tensor(), cl, Tensor(), 0) : Tensor();
    if (need_b) db = (colsum * z).to(bias.scalar_type());
    if (need_la) {
      Tensor hdy = row_dot(weight.contiguous().view({C, -1}), p.view({C, -1}));
      if (bias.defined()) hdy = hdy + bias.to(at::kFloat) * colsum;
      dla = per_gate(hdy * dz, group_size).to(log_alpha.scalar_type());
    }
  }
  auto fill = [&](const Tensor& t) { return t.defined() ? t : empty_result(x); };
  return {fill(dx), fill(dw), fill(dla), fill(db)};
}

// Gates of a noise tensor: training: shape (rows, *log_alpha.shape) for rows >= 0, log_alpha's shape for
// rows == -1; eval: z_eval in log_alpha's shape. dz has z's shape when need_grad, else shape (0,).
std::tuple<Tensor, Tensor> gates_op(const Tensor& log_alpha, int64_t rows, const std::optional<Tensor>& seed_t,
                                    bool training,
                                    at::ArrayRef<double> cfg_v, bool need_grad) {
  TORCH_CHECK_VALUE(log_alpha.is_cuda(), "l0kernels CUDA: log_alpha must be a CUDA tensor, got device ",
                    log_alpha.device());
  TORCH_CHECK_VALUE(rows >= -1, "l0kernels CUDA: rows must be >= -1, got ", rows);
  const int64_t* seed = seed_ptr(seed_t, log_alpha, training);
  const l0k::GateConfig cfg = make_cfg(cfg_v);
  const c10::cuda::CUDAGuard guard(log_alpha.device());
  std::vector<int64_t> shape(log_alpha.sizes().begin(), log_alpha.sizes().end());
  if (training && rows >= 0) shape.insert(shape.begin(), rows);
  Tensor z, dz;
  std::tie(z, dz) = flat_gates(log_alpha, training && rows >= 0 ? rows : 1, seed, training, cfg, need_grad);
  return {z.view(shape), need_grad ? dz.view(shape) : at::empty({0}, z.options())};
}

// u_raw(seed, offsets) as float32 in the offsets' shape (the stream itself, for tests).
Tensor uniform_op(const Tensor& seed_t, const Tensor& offsets) {
  TORCH_CHECK_VALUE(offsets.is_cuda(), "l0kernels CUDA: offsets must be a CUDA tensor, got device ", offsets.device());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "l0kernels CUDA: offsets must be int64, got ",
                   offsets.scalar_type());
  const int64_t* seed = seed_ptr(seed_t, offsets, true);
  const c10::cuda::CUDAGuard guard(offsets.device());
  const Tensor off = offsets.contiguous();
  Tensor out = at::empty(off.sizes(), off.options().dtype(at::kFloat));
  check_launch(l0k::launch_uniform(off.data_ptr<int64_t>(), off.numel(), seed,
                                   out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "uniform");
  return out;
}

}  // namespace

TORCH_LIBRARY(l0kernels, m) {
  m.def("uniform(Tensor seed, Tensor offsets) -> Tensor");
  m.def("gates(Tensor log_alpha, int rows, Tensor? seed, bool training, float[] cfg, bool need_grad) -> (Tensor, Tensor)");
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor log_alpha, Tensor? bias, Tensor? seed, str gate, bool sample, "
        "bool training, float[] cfg, int group_size=1) -> Tensor");
  m.def("linear_fwd_fused(Tensor x, Tensor weight, Tensor log_alpha, Tensor? bias, Tensor? seed, str gate, bool sample, "
        "bool training, float[] cfg, int group_size=1) -> Tensor");
  m.def("sparse_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? in_idx, Tensor? out_idx, Tensor? idle_idx, "
        "Tensor? fill, int out_features) -> Tensor");
  m.def("linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor log_alpha, Tensor? bias, Tensor? seed, str gate, "
        "bool sample, bool training, float[] cfg, bool[4] mask, int group_size=1) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_open_fwd(Tensor x, Tensor weight, Tensor log_alpha, Tensor? bias, Tensor seed, Tensor index, "
        "Tensor count, str gate, float[] cfg, int group_size=1) -> Tensor");
  m.def("linear_open_bwd(Tensor grad, Tensor x, Tensor weight, Tensor log_alpha, Tensor? bias, Tensor seed, "
        "Tensor index, Tensor count, str gate, float[] cfg, bool[4] mask, int group_size=1) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("rows_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor count) -> Tensor");
  m.def("rows_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor count, "
        "bool[3] mask) -> (Tensor, Tensor, Tensor)");
  m.def("conv2d_fwd(Tensor x, Tensor weight, Tensor log_alpha, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int groups, Tensor? seed, bool sample, bool training, float[] cfg, int group_size=1) -> Tensor");
  m.def("conv2d_bwd(Tensor grad, Tensor x, Tensor weight, Tensor log_alpha, Tensor? bias, int[] stride, "
        "int[] padding, int[] dilation, int groups, Tensor? seed, bool sample, bool training, float[] cfg, "
        "bool[4] mask, int group_size=1) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(l0kernels, CUDA, m) {
  m.impl("uniform", &uniform_op);
  m.impl("gates", &gates_op);
  m.impl("linear_fwd", &linear_fwd);
  m.impl("linear_fwd_fused", &linear_fwd_fused);
  m.impl("sparse_linear", &sparse_linear);
  m.impl("linear_bwd", &linear_bwd);
  m.impl("linear_open_fwd", &linear_open_fwd);
  m.impl("linear_open_bwd", &linear_open_bwd);
  m.impl("rows_linear_fwd", &rows_linear_fwd);
  m.impl("rows_linear_bwd", &rows_linear_bwd);
  m.impl("conv2d_fwd", &conv2d_fwd);
  m.impl("conv2d_bwd", &conv2d_bwd);
}
