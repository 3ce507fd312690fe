// l0kernels._philox_cpu: the CPU fast path of philox_uniform. No PyTorch headers, no numpy headers:
// the caller passes raw addresses of contiguous int64 offsets and a float32 output. The stream
// itself comes from csrc/l0_philox.cuh (the one C++ copy of SPEC section 2, shared with CUDA).
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "l0_philox.cuh"

// uniform(seed, offsets_addr, out_addr, n): out[i] = u_raw(seed, offsets[i])
static PyObject* uniform(PyObject*, PyObject* args) {
  unsigned long long seed, off_addr, out_addr;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "KKKn", &seed, &off_addr, &out_addr, &n)) return nullptr;
  const int64_t* off = reinterpret_cast<const int64_t*>(off_addr);
  float* out = reinterpret_cast<float*>(out_addr);
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = l0k::philox_uniform(seed, static_cast<uint64_t>(off[i]));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// uniform_range(seed, start, out_addr, n): out[i] = u_raw(seed, start + i) (no offsets array needed)
static PyObject* uniform_range(PyObject*, PyObject* args) {
  unsigned long long seed, start, out_addr;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "KKKn", &seed, &start, &out_addr, &n)) return nullptr;
  float* out = reinterpret_cast<float*>(out_addr);
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = l0k::philox_uniform(seed, start + static_cast<uint64_t>(i));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef kMethods[] = {
    {"uniform", uniform, METH_VARARGS, "uniform(seed, offsets_addr, out_addr, n)"},
    {"uniform_range", uniform_range, METH_VARARGS, "uniform_range(seed, start, out_addr, n)"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_philox_cpu",
                                     "CPU Philox4x32-10 (tl.rand's stream) from csrc/l0_philox.cuh", -1, kMethods};

PyMODINIT_FUNC PyInit__philox_cpu(void) { return PyModule_Create(&kModule); }
