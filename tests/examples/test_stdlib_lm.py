"""examples/stdlib_lm.py: the stdlib split is by file and stable, and a two-step run of both models trains,
compacts, round-trips through save_compact / load_compact and writes its report."""
import json
import os
import sys
import zlib

import pytest

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "examples"))
import stdlib_lm  # noqa: E402


def test_split_is_by_file_and_stable():
    files = stdlib_lm.stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") and "site-packages" not in f for f in files)
    train, val, info = stdlib_lm.load_split(limit_mb=0.5)
    assert train.max() < 256 and val.numel() > 0
    # a file's side is a function of its path alone: about a tenth of the files validate
    n_val = sum((zlib.crc32(os.path.relpath(f, info["root"]).encode()) % 1000) >= 900 for f in files)
    assert info["files_val"] == n_val and info["files_train"] == len(files) - n_val
    assert 0.05 < n_val / len(files) < 0.15
    assert stdlib_lm.load_split(limit_mb=0.5)[2] == info  # the same split every time


def test_two_step_run_writes_a_report(tmp_path):
    out = tmp_path / "report"
    rc = stdlib_lm.main(["--steps", "2", "--quick", "--hidden", "64", "--ffn", "96", "--layers", "2", "--heads", "4",
                         "--kv-heads", "2", "--seq", "32", "--batch", "2", "--ckpt-dir", str(tmp_path / "ckpt"),
                         "--out", str(out)])
    assert rc == 0
    res = json.load(open(str(out) + ".json"))
    assert res["compact_rel_err"] < 1e-5 and res["save_load_max_abs"] == 0.0
    assert res["params"]["compacted"] <= res["params"]["dense"]
    assert len(res["history"]["gated"]["time"]) == 2
    assert "bits per byte" in open(str(out) + ".md").read()
