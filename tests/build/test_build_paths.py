"""setup.py's build inputs: no path may depend on the working directory (torch's ninja builder compiles
from a temporary folder; setup.py may be run from anywhere), the CUDA toolkit is resolved through wrappers
and links, and a setuptools older than pyproject.toml needs stops the build with one clear line. CPU only;
two tests compile the small ``_cpu`` extension into a temporary folder."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = os.path.join(ROOT, "setup.py")

_DUMP = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("l0k_setup", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
exts = [dict(name=e.name, sources=e.sources, include_dirs=e.include_dirs) for e in m._cpu_ext_modules()]
k = m._cuda_ext_kwargs()
exts.append(dict(name=k["name"], sources=k["sources"], include_dirs=k["include_dirs"]))
print(json.dumps(exts))
"""


def _load_setup():
    spec = importlib.util.spec_from_file_location("l0k_setup_under_test", SETUP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() itself runs only as __main__
    return mod


def test_extension_paths_do_not_depend_on_the_working_directory(tmp_path):
    """Include paths absolute (the compiler may run anywhere); sources relative to setup.py's folder, which
    setuptools requires (it rejects absolute ones in egg_info) and setup.py changes into."""
    env = {k: v for k, v in os.environ.items() if k not in ("L0K_SKIP_CPU_EXT", "TORCH_CUDA_ARCH_LIST")}
    r = subprocess.run([sys.executable, "-c", _DUMP, SETUP], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    exts = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(e["name"] for e in exts) == ["l0kernels._C", "l0kernels._cpu"]
    for e in exts:
        assert e["sources"] and e["include_dirs"], e
        for p in e["include_dirs"]:
            assert os.path.isabs(p) and os.path.isdir(p), (e["name"], p)
            assert os.path.commonpath([p, ROOT]) == ROOT, (e["name"], p)
        for p in e["sources"]:
            assert not os.path.isabs(p) and "\\" not in p, (e["name"], p)
            assert os.path.isfile(os.path.join(ROOT, p)), (e["name"], p)
        # the headers every source includes are found through the include path alone
        assert any(os.path.isfile(os.path.join(d, "l0_gate.cuh")) for d in e["include_dirs"]), e


def _built(lib):
    return [f for _, _, fs in os.walk(lib) for f in fs if f.startswith("_cpu") and f.endswith(".so")]


def test_setup_py_builds_from_another_working_directory(tmp_path):
    """``python /path/to/setup.py build_ext`` started elsewhere finds its sources (``_cpu`` is optional:
    a missing source would only be a warning, so the test looks for the built file)."""
    env = dict(os.environ, L0K_SKIP_CUDA="1", L0K_CPU_SIMD="0")
    env.pop("L0K_SKIP_CPU_EXT", None)
    r = subprocess.run([sys.executable, SETUP, "-q", "build_ext", "--build-temp", str(tmp_path / "t"), "--build-lib",
                        str(tmp_path / "lib")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _built(tmp_path / "lib"), r.stdout + r.stderr


_NINJA_BUILD = """
import importlib.util, sys
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension
spec = importlib.util.spec_from_file_location("l0k_setup", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
setup(name="l0k_ninja_check", ext_modules=m._cpu_ext_modules(), cmdclass={"build_ext": BuildExtension},
      script_args=["-q", "build_ext", "--build-temp", sys.argv[2], "--build-lib", sys.argv[3]])
"""


def test_cpu_extension_builds_with_torchs_ninja_builder(tmp_path):
    """With the CUDA build on, torch's BuildExtension compiles ``_cpu`` too, with ninja running in the build
    folder: a relative include path (``csrc``) then misses l0_gate.cuh and fails the whole install."""
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():
        pytest.skip("ninja is not installed")
    env = dict(os.environ, L0K_CPU_SIMD="0")
    env.pop("L0K_SKIP_CPU_EXT", None)
    r = subprocess.run([sys.executable, "-c", _NINJA_BUILD, SETUP, str(tmp_path / "t"), str(tmp_path / "lib")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _built(tmp_path / "lib"), r.stdout + r.stderr
    assert os.path.isfile(tmp_path / "t" / "build.ninja")  # it really was the ninja path


@pytest.mark.parametrize("version,ok", [("76.1.0", False), ("61.0", False), ("abc", False), ("77.0.3", True),
                                        ("80.9.0", True), ("100.0.0.dev1", True)])
def test_setuptools_floor(version, ok):
    mod = _load_setup()
    if ok:
        mod._check_setuptools(version)
    else:
        with pytest.raises(SystemExit, match=r"setuptools>=77"):
            mod._check_setuptools(version)


def test_old_setuptools_stops_setup_py_before_anything_else(tmp_path):
    """setup.py run as pip runs it (as __main__) under a setuptools that reports 70.0.0: one line, exit != 0,
    before torch is imported or pyproject.toml is read."""
    code = ("import runpy, sys, setuptools; setuptools.__version__ = '70.0.0'; sys.argv = ['setup.py', '--name']; "
            f"runpy.run_path({SETUP!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "setuptools 70.0.0 is too old: the build needs setuptools>=77" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _fake_toolkit(root):
    """A toolkit folder whose bin/nvcc answers --dryrun like the real one (the _HERE_ line)."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime_api.h").write_text("/* fake */\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={root / "bin"}" >&2\n')
    nvcc.chmod(0o755)
    return nvcc


def _no_cuda_env(monkeypatch, path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}/usr/bin:/bin")


def test_cuda_home_through_a_wrapper_script(tmp_path, monkeypatch):
    real = _fake_toolkit(tmp_path / "cuda-13.0")
    wrap = tmp_path / "local" / "bin"
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    _no_cuda_env(monkeypatch, wrap)
    home, why = _load_setup()._cuda_home()
    assert home == str(tmp_path / "cuda-13.0"), why  # not tmp_path/local, what torch would guess
    assert "wrapper" in why


def test_cuda_home_through_a_symlink(tmp_path, monkeypatch):
    real = _fake_toolkit(tmp_path / "cuda-13.0")
    link = tmp_path / "local" / "bin"
    link.mkdir(parents=True)
    (link / "nvcc").symlink_to(real)
    _no_cuda_env(monkeypatch, link)
    home, why = _load_setup()._cuda_home()
    assert home == str(tmp_path / "cuda-13.0") and "resolves to" in why


def test_cuda_home_explicit_and_wrong(tmp_path, monkeypatch):
    _fake_toolkit(tmp_path / "tk")
    _no_cuda_env(monkeypatch, tmp_path / "nowhere")
    mod = _load_setup()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "tk"))
    assert mod._cuda_home() == (str(tmp_path / "tk"), "CUDA_HOME is set")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no bin/nvcc, no headers: refused, not guessed past
    home, why = mod._cuda_home()
    assert home is None and "cuda_runtime_api.h" in why
