"""CPU-side checks of the CUDA extension (no GPU needed; run in CI).

- every ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90, and ``csrc/binding.cpp`` passes
  ``g++ -fsyntax-only`` against the installed PyTorch headers (``.ci/compile_cuda.sh``; skipped
  without nvcc);
- the Philox and gate headers, compiled as plain host C++ (``csrc/tests/philox_host.cpp``), give
  ``l0kernels.philox_uniform`` bit for bit and the float64 gate formulas within 1e-6;
- ``setup.py`` with a CPU-only PyTorch skips the extension with one line saying why;
- without the extension, ``backend="cuda"`` says that ``l0kernels._C`` is not built.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import l0kernels as l0k
from l0kernels._gates import GateConfig, eval_gates_and_grad, gates_from_uniform

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")


def _nvcc():
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def test_compile_cuda_sources(tmp_path):
    if _nvcc() is None:
        pytest.skip("nvcc not found")
    env = dict(os.environ, PYTHON=sys.executable, NVCC=_nvcc())
    r = subprocess.run(["bash", os.path.join(ROOT, ".ci", "compile_cuda.sh"), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: nvcc sm_80+sm_90" in r.stdout
    assert "OK: g++ -fsyntax-only csrc/binding.cpp" in r.stdout, r.stdout
    for f in os.listdir(CSRC):
        if f.endswith(".cu"):
            assert (tmp_path / (f[:-3] + ".o")).stat().st_size > 0


def test_cuda_sources_are_free_of_torch_headers():
    for f in sorted(os.listdir(CSRC)):
        if f.endswith((".cu", ".cuh", ".h")):
            text = open(os.path.join(CSRC, f)).read()
            assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f


@pytest.fixture(scope="module")
def philox_host(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path_factory.mktemp("philox") / "philox_host"
    subprocess.run([cxx, "-std=c++17", "-O2", "-I", CSRC, os.path.join(CSRC, "tests", "philox_host.cpp"), "-o",
                    str(exe)], check=True, capture_output=True, text=True)
    return str(exe)


def _run_host(exe, cfg, seeds, offsets, log_alpha):
    lines = "".join(f"{s} {o} {float(la)!r}\n" for s, o, la in zip(seeds, offsets, log_alpha))
    r = subprocess.run([exe, repr(cfg.beta), repr(cfg.gamma), repr(cfg.zeta), repr(cfg.eps)], input=lines,
                       capture_output=True, text=True, check=True)
    rows = [ln.split() for ln in r.stdout.strip().splitlines()]
    assert len(rows) == len(seeds)
    bits = np.array([int(c[0], 16) for c in rows], dtype=np.uint32)
    vals = np.array([[float(v) for v in c[1:]] for c in rows], dtype=np.float64)
    return bits, vals


@pytest.mark.parametrize("cfg", [GateConfig(), GateConfig(beta=0.5, gamma=-0.2, zeta=1.3, eps=1e-5)])
def test_philox_and_gate_headers_match_python(philox_host, cfg):
    g = np.random.default_rng()
    n = 400
    seeds = [int(v) for v in g.integers(0, 2**63, n, dtype=np.uint64)]
    seeds[:4] = [0, 1, 2**32 - 1, 2**63 - 1]
    offsets = [int(v) for v in g.integers(0, 2**63, n, dtype=np.uint64)]
    offsets[4:200] = [int(v) for v in g.integers(0, 2**20, 196)]
    offsets[200:204] = [0, 2**32 - 1, 2**32, 2**32 + 1]
    # log_alpha as float32 values (the host reads floats); spread over the open, closed and ramp regions
    log_alpha = g.uniform(-4.0, 4.0, n).astype(np.float32)
    bits, vals = _run_host(philox_host, cfg, seeds, offsets, log_alpha)

    u_py = torch.stack([l0k.philox_uniform(s, torch.tensor([o], dtype=torch.int64))[0]
                        for s, o in zip(seeds, offsets)])
    assert np.array_equal(bits, u_py.numpy().view(np.uint32)), "Philox stream differs from philox_uniform"
    assert (u_py > 0).any() and (u_py < 1).all()

    la64 = torch.from_numpy(log_alpha.astype(np.float64))
    z, dz = gates_from_uniform(la64, u_py.to(torch.float64), cfg)
    ze, dze = eval_gates_and_grad(la64, cfg)
    got = torch.from_numpy(vals)
    assert torch.equal(got[:, 0].to(torch.float32), u_py)
    for col, ref in ((1, z), (2, dz), (3, ze), (4, dze)):
        err = (got[:, col] - ref).abs().max().item()
        assert err < 1e-6, (col, err)
    # the sample really covers closed, open and ramp gates
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()


def _setup_stderr(env_extra):
    env = dict(os.environ, **env_extra)
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith("l0kernels")
    return [ln for ln in r.stderr.splitlines() if "l0kernels: not building the CUDA extension" in ln]


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only PyTorch")
def test_setup_skips_extension_on_cpu_torch():
    lines = _setup_stderr({})
    assert len(lines) == 1 and "CPU-only" in lines[0], lines


def test_setup_skip_switch():
    lines = _setup_stderr({"L0K_SKIP_CUDA": "1"})
    assert len(lines) == 1 and "L0K_SKIP_CUDA=1" in lines[0], lines


@pytest.mark.skipif(importlib.util.find_spec("l0kernels._C") is not None, reason="the extension is built")
def test_cuda_backend_says_extension_is_missing():
    x, w, la = torch.randn(3, 5), torch.randn(4, 5), torch.randn(5)
    with pytest.raises(ValueError, match=r"l0kernels\._C is not built"):
        l0k.l0_linear(x, w, la, seed=3, backend="cuda")
    # the pure-Python package still works
    assert l0k.l0_linear(x, w, la, seed=3, backend="torch").shape == (3, 4)
