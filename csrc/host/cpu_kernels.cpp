// l0kernels._cpu: the CPU kernels of the torch backend. No PyTorch or numpy headers: the caller passes
// raw addresses of contiguous buffers. The random stream and the gate formulas come from
// csrc/l0_philox.cuh and csrc/l0_gate.cuh, the one C++ copy of docs/design.md §1 and §2 (shared with the
// CUDA kernels); nothing here re-derives them.
//
// Speed: the loops are written so that GCC vectorizes them. On x86-64 Linux every kernel is compiled
// twice (target_clones: AVX2 and the baseline, picked at load time) and logf/log1pf/expf are declared
// SIMD so the vectorized loops call glibc's libmvec; setup.py adds the flags that allows
// (-fno-math-errno, -ffinite-math-only, ...; never -ffast-math, which would change the process's FP
// state). Elsewhere the same code runs scalar. The results match the float64 formula within the contract's (docs/design.md)
// 1e-6 for gates (tests/test_gates.py).
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include <vector>

#if defined(L0K_LIBMVEC)
extern "C" {
__attribute__((simd("notinbranch"))) float logf(float) noexcept;
__attribute__((simd("notinbranch"))) float log1pf(float) noexcept;
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
}
#define L0K_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define L0K_CLONES
#endif

#include "l0_gate.cuh"
#include "l0_philox.cuh"

namespace {

L0K_CLONES void uniform_at(uint64_t seed, const int64_t* __restrict off, float* __restrict out, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = l0k::philox_uniform(seed, static_cast<uint64_t>(off[i]));
}

L0K_CLONES void uniform_from(uint64_t seed, uint64_t start, float* __restrict out, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = l0k::philox_uniform(seed, start + static_cast<uint64_t>(i));
}

// Noise tensor of `rows` x g elements, row-major offsets, element (r, j) with parameter la[j].
L0K_CLONES void sampled_gates(uint64_t seed, const float* __restrict la, Py_ssize_t g, Py_ssize_t rows,
                              const l0k::GateConfig cfg, float* __restrict z, float* __restrict dz) {
  for (Py_ssize_t r = 0; r < rows; ++r) {
    const uint64_t base = static_cast<uint64_t>(r) * static_cast<uint64_t>(g);
    float* zr = z + base;
    float* dzr = dz ? dz + base : nullptr;
    if (dzr) {
      for (Py_ssize_t j = 0; j < g; ++j)
        l0k::gate_from_uniform(la[j], l0k::philox_uniform(seed, base + j), cfg, zr + j, dzr + j);
    } else {
      for (Py_ssize_t j = 0; j < g; ++j)
        l0k::gate_from_uniform(la[j], l0k::philox_uniform(seed, base + j), cfg, zr + j, nullptr);
    }
  }
}

L0K_CLONES void eval_gates(const float* __restrict la, Py_ssize_t g, const l0k::GateConfig cfg,
                           float* __restrict z, float* __restrict dz) {
  if (dz) {
    for (Py_ssize_t j = 0; j < g; ++j) l0k::gate_eval(la[j], cfg, z + j, dz + j);
  } else {
    for (Py_ssize_t j = 0; j < g; ++j) l0k::gate_eval(la[j], cfg, z + j, nullptr);
  }
}

// For gates on the columns of an (n, k) matrix g (input gates): out[c] = dz[c] * sum_r w[r,c] g[r,c],
// then g[r,c] *= z[c]. One pass over g and w (bandwidth-bound: a column-blocked variant that keeps the
// sums in registers measured the same).
L0K_CLONES void col_scale_dot(float* __restrict gm, const float* __restrict w, const float* __restrict z,
                              const float* __restrict dz, float* __restrict out, Py_ssize_t n, Py_ssize_t k) {
  for (Py_ssize_t c = 0; c < k; ++c) out[c] = 0.0f;
  for (Py_ssize_t r = 0; r < n; ++r) {
    float* gr = gm + r * k;
    const float* wr = w + r * k;
    for (Py_ssize_t c = 0; c < k; ++c) {
      out[c] += wr[c] * gr[c];
      gr[c] *= z[c];
    }
  }
  for (Py_ssize_t c = 0; c < k; ++c) out[c] *= dz[c];
}

// For gates on the rows (output gates): out[r] = dz[r] * (sum_c w[r,c] g[r,c] + extra[r]), then
// g[r,c] *= z[r]. extra may be null.
L0K_CLONES void row_scale_dot(float* __restrict gm, const float* __restrict w, const float* __restrict z,
                              const float* __restrict dz, const float* __restrict extra, float* __restrict out,
                              Py_ssize_t n, Py_ssize_t k) {
  for (Py_ssize_t r = 0; r < n; ++r) {
    float* gr = gm + r * k;
    const float* wr = w + r * k;
    const float zr = z[r];
    // 16 partial sums: a float reduction is only vectorized when its order is fixed in the source.
    float part[16] = {0.0f};
    Py_ssize_t c = 0;
    for (; c + 16 <= k; c += 16) {
      for (int l = 0; l < 16; ++l) {
        part[l] += wr[c + l] * gr[c + l];
        gr[c + l] *= zr;
      }
    }
    float acc = 0.0f;
    for (int l = 0; l < 16; ++l) acc += part[l];
    for (; c < k; ++c) {
      acc += wr[c] * gr[c];
      gr[c] *= zr;
    }
    out[r] = dz[r] * (acc + (extra ? extra[r] : 0.0f));
  }
}

// out[r, c] = x[r, c] * z[c] for an (n, k) x with row stride ldx (unit column stride); out contiguous.
L0K_CLONES void scale_cols(const float* __restrict x, Py_ssize_t ldx, const float* __restrict z, float* __restrict out,
                           Py_ssize_t n, Py_ssize_t k) {
  for (Py_ssize_t r = 0; r < n; ++r) {
    const float* xr = x + r * ldx;
    float* orow = out + r * k;
    for (Py_ssize_t c = 0; c < k; ++c) orow[c] = xr[c] * z[c];
  }
}

// Scatter of the open columns (training that skips closed input gates): out is (n, k), src (n, ko) holds
// the columns idx[0..ko) of out; the other columns of out are set to 0. With wo non-null (the gathered
// weight columns, (n, ko)), also dla[j] = ratio[j] * sum_r wo[r, j] * src[r, j].
L0K_CLONES void scatter_cols(const float* __restrict src, const int64_t* __restrict idx, Py_ssize_t ko,
                             const float* __restrict wo, const float* __restrict ratio, float* __restrict out,
                             float* __restrict dla, Py_ssize_t n, Py_ssize_t k) {
  if (wo)
    for (Py_ssize_t j = 0; j < ko; ++j) dla[j] = 0.0f;
  for (Py_ssize_t r = 0; r < n; ++r) {
    float* o = out + r * k;
    const float* sr = src + r * ko;
    for (Py_ssize_t c = 0; c < k; ++c) o[c] = 0.0f;
    if (wo) {
      const float* wr = wo + r * ko;
      for (Py_ssize_t j = 0; j < ko; ++j) {
        const float v = sr[j];
        o[idx[j]] = v;
        dla[j] += wr[j] * v;
      }
    } else {
      for (Py_ssize_t j = 0; j < ko; ++j) o[idx[j]] = sr[j];
    }
  }
  if (wo)
    for (Py_ssize_t j = 0; j < ko; ++j) dla[j] *= ratio[j];
}

// Squared L2 norms of the columns (axis 1: out has k entries) or rows (axis 0: n entries) of an (n, k)
// matrix in one pass: the group norms of the expected-L2 regularizer (reg_forward).
L0K_CLONES void sq_norms(int axis, const float* __restrict w, Py_ssize_t n, Py_ssize_t k, float* __restrict out) {
  if (axis == 1) {
    for (Py_ssize_t c = 0; c < k; ++c) out[c] = 0.0f;
    for (Py_ssize_t r = 0; r < n; ++r) {
      const float* wr = w + r * k;
      for (Py_ssize_t c = 0; c < k; ++c) out[c] += wr[c] * wr[c];
    }
    return;
  }
  for (Py_ssize_t r = 0; r < n; ++r) {
    const float* wr = w + r * k;
    float part[16] = {0.0f};
    Py_ssize_t c = 0;
    for (; c + 16 <= k; c += 16)
      for (int l = 0; l < 16; ++l) part[l] += wr[c + l] * wr[c + l];
    float acc = 0.0f;
    for (int l = 0; l < 16; ++l) acc += part[l];
    for (; c < k; ++c) acc += wr[c] * wr[c];
    out[r] = acc;
  }
}

template <class T>
T* ptr(unsigned long long addr) {
  return reinterpret_cast<T*>(addr);
}

}  // namespace

// The gate vector of one call with batch noise (offsets 0..g-1) or the test-time gates.
static void gate_vector(uint64_t seed, bool training, const float* la, Py_ssize_t g, const l0k::GateConfig& cfg,
                        float* z, float* dz) {
  if (training) {
    sampled_gates(seed, la, g, 1, cfg, z, dz);
  } else {
    eval_gates(la, g, cfg, z, dz);
  }
}

// The same with `group` consecutive entries per gate: the g / group gates are drawn (offsets 0..g/group-1)
// and each is repeated over its group, so z and dz have one entry per column/row (g entries).
static void grouped_gate_vector(uint64_t seed, bool training, const float* la, Py_ssize_t g, Py_ssize_t group,
                                const l0k::GateConfig& cfg, float* z, float* dz) {
  gate_vector(seed, training, la, g / group, cfg, z, dz);
  if (group == 1) return;
  for (Py_ssize_t c = g - 1; c >= 0; --c) {  // backwards: entry c / group <= c is not yet overwritten
    z[c] = z[c / group];
    if (dz) dz[c] = dz[c / group];
  }
}

static bool check_group(Py_ssize_t g, Py_ssize_t group) {
  if (group < 1 || g % group != 0) {
    PyErr_SetString(PyExc_ValueError, "group must be >= 1 and divide the number of gated columns/rows");
    return false;
  }
  return true;
}

static bool parse_cfg(PyObject* cfg_tuple, l0k::GateConfig* cfg) {
  return PyArg_ParseTuple(cfg_tuple, "ffff", &cfg->beta, &cfg->gamma, &cfg->zeta, &cfg->eps) != 0;
}

// in_gate_forward(seed, training, la_addr, k, x_addr, ldx, m, out_addr, cfg[, group]): the input of the GEMM
// for input gates with batch noise (or eval gates): out = x * z[None, :], z drawn here (not returned);
// `group` (default 1) consecutive columns share gate c / group.
static PyObject* in_gate_forward(PyObject*, PyObject* args) {
  unsigned long long seed, la_addr, x_addr, out_addr;
  int training;
  Py_ssize_t k, ldx, m, group = 1;
  PyObject* cfg_tuple;
  l0k::GateConfig cfg;
  if (!PyArg_ParseTuple(args, "KpKnKnnKO|n", &seed, &training, &la_addr, &k, &x_addr, &ldx, &m, &out_addr,
                        &cfg_tuple, &group) ||
      !parse_cfg(cfg_tuple, &cfg))
    return nullptr;
  if (k <= 0 || m < 0) {
    PyErr_SetString(PyExc_ValueError, "in_gate_forward: k must be > 0 and m >= 0");
    return nullptr;
  }
  if (!check_group(k, group)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  std::vector<float> z(static_cast<size_t>(k));
  grouped_gate_vector(seed, training != 0, ptr<const float>(la_addr), k, group, cfg, z.data(), nullptr);
  scale_cols(ptr<const float>(x_addr), ldx, z.data(), ptr<float>(out_addr), m, k);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// gate_backward(axis, seed, training, la_addr, p_addr, w_addr, extra_addr, out_addr, z_addr, n, k, cfg[, group]):
// for batch-noise (or eval) gates on axis 1 (columns: input gates, g = k) or 0 (rows: output gates,
// g = n) of an (n, k) weight: draws z (written to z_addr, g floats, for the caller's dx and db) and
// dz/dlog_alpha, then scale_dot: out = dlog_alpha, p *= z in place. With `group` (default 1) columns/rows
// per gate, z is repeated over each group and out[c] is column/row c's share (dz of its gate times its
// own sum): the caller sums out over each group.
static PyObject* gate_backward(PyObject*, PyObject* args) {
  int axis, training;
  unsigned long long seed, la_addr, p_addr, w_addr, extra_addr, out_addr, z_addr;
  Py_ssize_t n, k, group = 1;
  PyObject* cfg_tuple;
  l0k::GateConfig cfg;
  if (!PyArg_ParseTuple(args, "iKpKKKKKKnnO|n", &axis, &seed, &training, &la_addr, &p_addr, &w_addr, &extra_addr,
                        &out_addr, &z_addr, &n, &k, &cfg_tuple, &group) ||
      !parse_cfg(cfg_tuple, &cfg))
    return nullptr;
  if (n < 0 || k < 0 || (axis != 0 && axis != 1) || (axis == 1 && extra_addr != 0)) {
    PyErr_SetString(PyExc_ValueError, "gate_backward: bad axis or sizes");
    return nullptr;
  }
  const Py_ssize_t g = axis == 1 ? k : n;
  if (g == 0) Py_RETURN_NONE;
  if (!check_group(g, group)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  std::vector<float> dz_buf(static_cast<size_t>(g));
  float* z = ptr<float>(z_addr);
  float* dz = dz_buf.data();
  grouped_gate_vector(seed, training != 0, ptr<const float>(la_addr), g, group, cfg, z, dz);
  if (axis == 1) {
    col_scale_dot(ptr<float>(p_addr), ptr<const float>(w_addr), z, dz, ptr<float>(out_addr), n, k);
  } else {
    row_scale_dot(ptr<float>(p_addr), ptr<const float>(w_addr), z, dz, ptr<const float>(extra_addr),
                  ptr<float>(out_addr), n, k);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// scatter_cols(src_addr, idx_addr, ko, wo_addr, ratio_addr, out_addr, dla_addr, n, k): see scatter_cols above;
// wo_addr == 0 skips dla. Every address is a contiguous float32 (idx: int64) buffer; idx values in [0, k).
static PyObject* scatter_cols_py(PyObject*, PyObject* args) {
  unsigned long long src_addr, idx_addr, w_addr, ratio_addr, out_addr, dla_addr;
  Py_ssize_t ko, n, k;
  if (!PyArg_ParseTuple(args, "KKnKKKKnn", &src_addr, &idx_addr, &ko, &w_addr, &ratio_addr, &out_addr, &dla_addr,
                        &n, &k))
    return nullptr;
  if (n < 0 || k < 0 || ko < 0 || ko > k) {
    PyErr_SetString(PyExc_ValueError, "scatter_cols: sizes must satisfy 0 <= ko <= k, n >= 0");
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  scatter_cols(ptr<const float>(src_addr), ptr<const int64_t>(idx_addr), ko, ptr<const float>(w_addr),
               ptr<const float>(ratio_addr), ptr<float>(out_addr), ptr<float>(dla_addr), n, k);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// The per-layer regularizer (l0kernels/_regularizer.py) on a float32 weight viewed as (n, k): gated features
// are its columns (axis 1) or rows (axis 0, where a gated bias joins its row); g gates over the features,
// gate j covering features j*F/g ... (j+1)*F/g - 1.
//
// reg_forward(axis, w_addr, n, k, b_addr, bias_gated, la_addr, g, lamba_size, wd, shift, p_addr, sq_addr) -> float:
// p[j] = sigmoid(la[j] - shift), sq[j] = ||theta_j||^2 (0 when wd == 0), and returns
// sum_j p[j] (lamba_size + 0.5 wd sq[j]) + 0.5 wd ||b||^2 (the last term for an ungated bias only). b_addr may be 0.
static PyObject* reg_forward(PyObject*, PyObject* args) {
  int axis, bias_gated;
  unsigned long long w_addr, b_addr, la_addr, p_addr, sq_addr;
  Py_ssize_t n, k, g;
  double lamba_size, wd, shift;
  if (!PyArg_ParseTuple(args, "iKnnKpKndddKK", &axis, &w_addr, &n, &k, &b_addr, &bias_gated, &la_addr, &g, &lamba_size,
                        &wd, &shift, &p_addr, &sq_addr))
    return nullptr;
  const Py_ssize_t feats = axis == 1 ? k : n;
  if (n < 0 || k < 0 || (axis != 0 && axis != 1) || g <= 0 || feats % g != 0 || (bias_gated && axis != 0)) {
    PyErr_SetString(PyExc_ValueError, "reg_forward: axis must be 0 or 1, g > 0 must divide the features");
    return nullptr;
  }
  double term = 0.0;
  Py_BEGIN_ALLOW_THREADS
  const float* la = ptr<const float>(la_addr);
  const float* b = ptr<const float>(b_addr);
  float* p = ptr<float>(p_addr);
  float* sq = ptr<float>(sq_addr);
  const Py_ssize_t fpg = feats / g;
  if (wd != 0.0) {
    std::vector<float> fs(static_cast<size_t>(feats));
    sq_norms(axis, ptr<const float>(w_addr), n, k, fs.data());
    if (b && bias_gated)
      for (Py_ssize_t r = 0; r < n; ++r) fs[r] += b[r] * b[r];
    for (Py_ssize_t j = 0; j < g; ++j) {
      float acc = 0.0f;
      for (Py_ssize_t f = j * fpg; f < (j + 1) * fpg; ++f) acc += fs[f];
      sq[j] = acc;
    }
    if (b && !bias_gated) {
      double bb = 0.0;
      for (Py_ssize_t r = 0; r < n; ++r) bb += static_cast<double>(b[r]) * b[r];
      term += 0.5 * wd * bb;
    }
  } else {
    for (Py_ssize_t j = 0; j < g; ++j) sq[j] = 0.0f;
  }
  for (Py_ssize_t j = 0; j < g; ++j) {
    p[j] = 1.0f / (1.0f + expf(static_cast<float>(shift) - la[j]));
    term += static_cast<double>(p[j]) * (lamba_size + 0.5 * wd * sq[j]);
  }
  Py_END_ALLOW_THREADS
  return PyFloat_FromDouble(term);
}

// reg_backward(axis, w_addr, n, k, b_addr, bias_gated, g, p_addr, sq_addr, c, lamba_size, wd, dla_addr, dw_addr, db_addr):
// dla[j] = c p (1 - p) (lamba_size + 0.5 wd sq[j]); dw = c wd p[gate] * w; db = c wd (p[gate] if gated, else 1) * b.
// Each output address may be 0 (not wanted).
static PyObject* reg_backward(PyObject*, PyObject* args) {
  int axis, bias_gated;
  unsigned long long w_addr, b_addr, p_addr, sq_addr, dla_addr, dw_addr, db_addr;
  Py_ssize_t n, k, g;
  double c, lamba_size, wd;
  if (!PyArg_ParseTuple(args, "iKnnKpnKKdddKKK", &axis, &w_addr, &n, &k, &b_addr, &bias_gated, &g, &p_addr, &sq_addr,
                        &c, &lamba_size, &wd, &dla_addr, &dw_addr, &db_addr))
    return nullptr;
  const Py_ssize_t feats = axis == 1 ? k : n;
  if (n < 0 || k < 0 || (axis != 0 && axis != 1) || g <= 0 || feats % g != 0 || (bias_gated && axis != 0)) {
    PyErr_SetString(PyExc_ValueError, "reg_backward: axis must be 0 or 1, g > 0 must divide the features");
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  const float* p = ptr<const float>(p_addr);
  const float* sq = ptr<const float>(sq_addr);
  const Py_ssize_t fpg = feats / g;
  if (dla_addr) {
    float* dla = ptr<float>(dla_addr);
    for (Py_ssize_t j = 0; j < g; ++j)
      dla[j] = static_cast<float>(c * p[j] * (1.0 - p[j]) * (lamba_size + 0.5 * wd * sq[j]));
  }
  const float cw = static_cast<float>(c * wd);
  std::vector<float> s(static_cast<size_t>(feats));
  for (Py_ssize_t f = 0; f < feats; ++f) s[f] = cw * p[f / fpg];
  if (dw_addr) {
    const float* w = ptr<const float>(w_addr);
    float* dw = ptr<float>(dw_addr);
    for (Py_ssize_t r = 0; r < n; ++r) {
      const float* wr = w + r * k;
      float* dr = dw + r * k;
      if (axis == 1) {
        const float* sv = s.data();
        for (Py_ssize_t col = 0; col < k; ++col) dr[col] = wr[col] * sv[col];
      } else {
        const float sr = s[r];
        for (Py_ssize_t col = 0; col < k; ++col) dr[col] = wr[col] * sr;
      }
    }
  }
  if (db_addr && b_addr) {
    const float* b = ptr<const float>(b_addr);
    float* db = ptr<float>(db_addr);
    for (Py_ssize_t r = 0; r < n; ++r) db[r] = b[r] * (bias_gated ? s[r] : cw);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// uniform(seed, offsets_addr, out_addr, n): out[i] = u_raw(seed, offsets[i])
static PyObject* uniform(PyObject*, PyObject* args) {
  unsigned long long seed, off_addr, out_addr;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "KKKn", &seed, &off_addr, &out_addr, &n)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  uniform_at(seed, ptr<const int64_t>(off_addr), ptr<float>(out_addr), n);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// uniform_range(seed, start, out_addr, n): out[i] = u_raw(seed, start + i) (no offsets array needed)
static PyObject* uniform_range(PyObject*, PyObject* args) {
  unsigned long long seed, start, out_addr;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "KKKn", &seed, &start, &out_addr, &n)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  uniform_from(seed, start, ptr<float>(out_addr), n);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// gates(seed, training, la_addr, g, n, z_addr, dz_addr, beta, gamma, zeta, eps): gates of a noise
// tensor of n elements (row-major offsets 0..n-1, docs/design.md §2) whose element i has parameter
// log_alpha[i % g]: z[i] and, when dz_addr != 0, dz/dlog_alpha[i]; float32. Training: the sampled
// gate; else the test-time gate (n must then be g).
static PyObject* gates(PyObject*, PyObject* args) {
  unsigned long long seed, la_addr, z_addr, dz_addr;
  int training;
  Py_ssize_t g, n;
  float beta, gamma, zeta, eps;
  if (!PyArg_ParseTuple(args, "KpKnnKKffff", &seed, &training, &la_addr, &g, &n, &z_addr, &dz_addr, &beta, &gamma,
                        &zeta, &eps))
    return nullptr;
  if (g <= 0 || n < 0 || n % g != 0 || (!training && n != g)) {
    PyErr_SetString(PyExc_ValueError, "gates: n must be a multiple of g > 0 (equal to g for eval gates)");
    return nullptr;
  }
  const l0k::GateConfig cfg{beta, gamma, zeta, eps};
  Py_BEGIN_ALLOW_THREADS
  if (training) {
    sampled_gates(seed, ptr<const float>(la_addr), g, n / g, cfg, ptr<float>(z_addr), ptr<float>(dz_addr));
  } else {
    eval_gates(ptr<const float>(la_addr), g, cfg, ptr<float>(z_addr), ptr<float>(dz_addr));
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef kMethods[] = {
    {"uniform", uniform, METH_VARARGS, "uniform(seed, offsets_addr, out_addr, n)"},
    {"uniform_range", uniform_range, METH_VARARGS, "uniform_range(seed, start, out_addr, n)"},
    {"gates", gates, METH_VARARGS, "gates(seed, training, la_addr, g, n, z_addr, dz_addr, beta, gamma, zeta, eps)"},
    {"in_gate_forward", in_gate_forward, METH_VARARGS,
     "in_gate_forward(seed, training, la_addr, k, x_addr, ldx, m, out_addr, (beta, gamma, zeta, eps)[, group])"},
    {"gate_backward", gate_backward, METH_VARARGS,
     "gate_backward(axis, seed, training, la_addr, p_addr, w_addr, extra_addr, out_addr, z_addr, n, k, "
     "(beta, gamma, zeta, eps)[, group])"},
    {"scatter_cols", scatter_cols_py, METH_VARARGS,
     "scatter_cols(src_addr, idx_addr, ko, wo_addr, ratio_addr, out_addr, dla_addr, n, k)"},
    {"reg_forward", reg_forward, METH_VARARGS,
     "reg_forward(axis, w_addr, n, k, b_addr, bias_gated, la_addr, g, lamba_size, wd, shift, p_addr, sq_addr) -> float"},
    {"reg_backward", reg_backward, METH_VARARGS,
     "reg_backward(axis, w_addr, n, k, b_addr, bias_gated, g, p_addr, sq_addr, c, lamba_size, wd, dla_addr, dw_addr, "
     "db_addr)"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu",
                                     "CPU kernels of the torch backend: Philox4x32-10 and hard-concrete gates from "
                                     "csrc/l0_philox.cuh and csrc/l0_gate.cuh",
                                     -1, kMethods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&kModule); }
