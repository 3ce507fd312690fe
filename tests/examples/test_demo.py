"""The demo: the L0 gates find the teacher's inputs; the MNIST reader; the fallback compactor."""
import gzip
import struct

import numpy as np
import pytest
import torch

import l0kernels as l0k
from l0kernels import demo
from l0kernels.data import read_idx, teacher_task
from l0kernels.models import LeNet300100, LeNet5Caffe, count_params


@pytest.fixture
def one_thread():
    """Small matmuls: one thread is as fast and does not stall when the CI's two cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_teacher_gates_recover_true_inputs(one_thread):
    r = demo.run_teacher(seed=3, steps=500, quiet=True)
    # the first layer keeps (nearly) exactly the 50 inputs the teacher reads, out of 500
    assert r["recall"] >= 0.95 and r["precision"] >= 0.95, (r["tp"], r["fp"], r["missed"])
    assert r["test_mse"] < 0.2  # target variance is about 1; label noise variance 0.01


def test_teacher_run_is_deterministic_under_seed(one_thread):
    a = demo.run_teacher(seed=5, steps=30, n_features=40, n_true=5, n_train=256, hidden=8, quiet=True)
    b = demo.run_teacher(seed=5, steps=30, n_features=40, n_true=5, n_train=256, hidden=8, quiet=True)
    c = demo.run_teacher(seed=6, steps=30, n_features=40, n_true=5, n_train=256, hidden=8, quiet=True)
    for pa, pb in zip(a["model"].parameters(), b["model"].parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a["model"][0].log_alpha, c["model"][0].log_alpha)


def test_demo_main_prints_report(capsys, one_thread):
    assert demo.main(["--steps", "400", "--seed", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "true positives" in out and "per-layer sparsity" in out and "compacted" in out
    line = next(s for s in out.splitlines() if "true positives" in s)
    tp = int(line.split(":")[1].split("true positives")[0])
    assert tp >= 48, line


def test_teacher_task_support_drives_target():
    t = teacher_task(n_features=60, n_true=6, n_train=512, n_test=8, noise_std=0.0, nonlinear=False, seed=2)
    assert t.support.numel() == 6 and bool((t.support.diff() > 0).all())
    # a linear noiseless teacher: least squares puts weight on the support only, |w| in [0.5, 1.5] / sqrt(6)
    w = torch.linalg.lstsq(t.x_train.double(), t.y_train.double()).solution.flatten()
    off = torch.ones(60, dtype=torch.bool)
    off[t.support] = False
    assert w[off].abs().max() < 1e-6
    assert w[t.support].abs().min() > 0.5 / 6 ** 0.5 - 1e-6
    t2 = teacher_task(n_features=60, n_true=6, n_train=512, n_test=8, noise_std=0.0, nonlinear=False, seed=2)
    assert torch.equal(t2.y_train, t.y_train) and torch.equal(t2.support, t.support)
    with pytest.raises(ValueError, match="n_true"):
        teacher_task(n_features=10, n_true=11)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    arr = np.random.randint(0, 256, size=(7, 5, 3), dtype=np.uint8)
    raw = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">III", *arr.shape) + arr.tobytes()
    path = tmp_path / ("a.idx" + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(raw) if compress else raw)
    assert np.array_equal(read_idx(str(path)), arr)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(str(bad))
    short = tmp_path / "short.idx"
    short.write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(short))


@pytest.mark.parametrize("model_cls,shape", [(LeNet300100, (784,)), (LeNet5Caffe, (1, 28, 28))])
def test_compact_of_paper_models_matches_eval_model(model_cls, shape):
    torch.manual_seed(0)
    m = model_cls()
    with torch.no_grad():
        for _, layer in l0k.l0_layers(m):
            layer.log_alpha.normal_(0.0, 3.0)  # a mix of closed, partial and fully open gates
    m.eval()
    c = l0k.compact(m)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        ref, out = m(x), c(x)
    assert (out - ref).norm() / ref.norm() < 1e-5
    assert count_params(c) < sum(p.numel() for n, p in m.named_parameters() if "log_alpha" not in n)
