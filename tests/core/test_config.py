"""One module for every environment switch: l0kernels/config.py declares and reads them all, and
docs/design.md's table lists them."""
import os
import re
import subprocess
import sys

import pytest

from l0kernels import config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sources():
    for folder, _, files in os.walk(os.path.join(ROOT, "l0kernels")):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(folder, f)
    yield os.path.join(ROOT, "setup.py")


def test_only_config_reads_the_switches():
    reads = re.compile(r"(os\.environ(\.get)?|os\.getenv)\s*[\(\[]\s*[\"'](L0K_[A-Z0-9_]+)")
    offenders = []
    for path in _sources():
        if path.endswith(os.path.join("l0kernels", "config.py")):
            continue
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if reads.search(line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_every_switch_named_in_the_package_is_declared():
    named = set()
    for path in _sources():
        with open(path) as f:
            named |= set(re.findall(r"\bL0K_[A-Z0-9_]+\b", f.read()))
    macros = {"L0K_LIBMVEC"}  # a preprocessor macro setup.py passes to the C++ build, not an environment switch
    assert named - macros - set(config.SWITCHES) == set()


def test_design_doc_lists_every_switch():
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        doc = f.read()
    table = doc[doc.index("## Environment switches"):]
    missing = [name for name in config.SWITCHES if f"`{name}`" not in table]
    assert not missing, missing


def test_values_parse_and_bad_values_name_the_switch(monkeypatch):
    sw = config.SWITCHES["L0K_CUDA_SKIP_BELOW"]
    monkeypatch.setenv("L0K_CUDA_SKIP_BELOW", "0.3")
    assert sw.value() == 0.3
    monkeypatch.setenv("L0K_CUDA_SKIP_BELOW", "half")
    with pytest.raises(ValueError, match="L0K_CUDA_SKIP_BELOW"):
        sw.value()
    monkeypatch.setenv("L0K_AUTO_TUNE", "0")
    assert config.auto_tune() is False
    monkeypatch.delenv("L0K_AUTO_TUNE")
    assert config.auto_tune() is True
    with pytest.raises(KeyError):
        config.build_flag("L0K_SKIP_CLOSED")


def test_an_invalid_choice_stops_the_import():
    env = dict(os.environ, L0K_CUDA_GEMM="cublas")
    r = subprocess.run([sys.executable, "-c", "import l0kernels"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode != 0 and "L0K_CUDA_GEMM" in r.stderr


def test_switches_reach_the_modules():
    env = dict(os.environ, L0K_SKIP_CLOSED="0", L0K_SKIP_DENSE_ABOVE="0.25", L0K_SKIP_MIN_MACS="7")
    code = ("import l0kernels._active as a; print(a.ENABLED, a.DENSE_ABOVE, a.MIN_SKIPPED_MACS)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.stdout.split() == ["False", "0.25", "7"], r.stderr


def test_table_names_every_switch():
    t = config.table()
    assert all(f"`{name}`" in t for name in config.SWITCHES)
