"""examples/mnist_l0.py flags (weight-decay convention, init, dense baseline, per-epoch history,
resume after a cut-off) and examples/report_lenet5.py, on random stand-in data (no MNIST files needed)."""
import importlib.util
import json
import math
import os

import pytest
import torch

import l0kernels as l0k

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "examples", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ex = _load("mnist_l0")
rep = _load("report_lenet5")


LOADS = []  # the ``normalize`` argument of every load_mnist call the example made


@pytest.fixture
def fake_mnist(monkeypatch):
    g = torch.Generator().manual_seed(0)
    calls = LOADS
    calls.clear()

    def load(folder, normalize=True):
        calls.append(normalize)
        return (torch.randn(120, 1, 28, 28, generator=g), torch.randint(0, 10, (120,), generator=g),
                torch.randn(50, 1, 28, 28, generator=g), torch.randint(0, 10, (50,), generator=g))

    monkeypatch.setattr(ex, "load_mnist", load)
    monkeypatch.setattr(ex, "time_inference", lambda model, x, repeats=20: 1.0)  # speed is not tested here
    n = torch.get_num_threads()
    yield 120
    torch.set_num_threads(n)


def _argv(tmp_path, *extra):
    return ["--epochs", "1", "--batch-size", "40", "--threads", "1", "--quiet", "--no-plot", "--speed-every", "100",
            "--out", str(tmp_path / "ckpt"), "--results", str(tmp_path / "res"), *extra]


def test_defaults_follow_the_authors_per_model():
    a5, a300 = ex.parse_args(["--model", "lenet5"]), ex.parse_args(["--model", "lenet300"])
    assert (a5.ema, ex.wd_scale(a5, 60000)) == (0.0, 1)  # L0LeNet5: wd unscaled, no EMA
    assert (a300.ema, ex.wd_scale(a300, 60000)) == (0.999, 60000)  # L0MLP: N * wd, beta_ema 0.999
    assert a5.init == a300.init == "kaiming"
    for m in ("lenet5", "lenet300"):
        assert ex.wd_scale(ex.parse_args(["--model", m, "--wd-convention", "per-example"]), 7) == 7
        assert ex.wd_scale(ex.parse_args(["--model", m, "--wd-convention", "per-N"]), 7) == 1
    s = ex.parse_args(["--model", "lenet5", "--sep"])
    assert s.lambdas == [10.0, 0.5, 0.1, 10.0] and s.tag == "mnist_lenet5_sep"
    assert ex.parse_args(["--model", "lenet5", "--dense"]).out == os.path.join("runs", "lenet5_dense")
    assert ex.parse_args(["--ema", "0.5"]).ema == 0.5
    with pytest.raises(SystemExit):
        ex.parse_args(["--sep", "--dense"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--wd-convention", "per-parameter"])


@pytest.mark.parametrize("dense", [False, True])
def test_kaiming_init(dense):
    torch.manual_seed(0)
    a = ex.parse_args(["--model", "lenet5", "--device", "cpu"] + (["--dense"] if dense else []))
    model = ex.build_model(a, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, l0k.L0Linear,
                                                            l0k.L0Conv2d))]
    assert len(layers) == 4
    assert all(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in layers) == dense
    for m in layers:
        fan_in = m.weight[0].numel()
        std = float(m.weight.detach().std())
        assert abs(std / math.sqrt(2 / fan_in) - 1) < 0.25, (m, std)
        assert torch.count_nonzero(m.bias) == 0
    # the nn default (kaiming_uniform with a=sqrt(5)) has std sqrt(1/(3 fan_in)): clearly different
    a.init = "torch"
    m = [m for m in ex.build_model(a, torch.device("cpu")).modules() if hasattr(m, "weight")][2]
    assert float(m.weight.detach().std()) < 0.7 * math.sqrt(2 / m.weight[0].numel())
    assert torch.count_nonzero(m.bias) > 0


@pytest.mark.parametrize("model,conv,scale", [("lenet5", "authors", 1), ("lenet300", "authors", 120),
                                              ("lenet5", "per-example", 120), ("lenet300", "per-N", 1)])
def test_regularizer_gets_the_convention_weight_decay(fake_mnist, tmp_path, monkeypatch, model, conv, scale):
    seen = []
    real = l0k.l0_regularizer

    def spy(m, lamba, weight_decay, N):
        seen.append((lamba, weight_decay, N))
        return real(m, lamba, weight_decay, N)

    monkeypatch.setattr(ex.l0k, "l0_regularizer", spy)
    assert ex.main(_argv(tmp_path, "--model", model, "--wd-convention", conv, "--weight-decay", "0.01")) == 0
    assert len(seen) == 3  # 120 images, batch 40
    assert all(s == (0.1, pytest.approx(0.01 * scale), 120) for s in seen)
    r = json.load(open(tmp_path / "res" / f"mnist_{model}.json"))
    assert r["weight_decay_passed"] == pytest.approx(0.01 * scale)
    assert r["settings"]["init"] == "kaiming" and r["settings"]["wd_convention"] == conv


def test_dense_l2_is_the_l0_term_with_open_gates():
    torch.manual_seed(0)
    m = l0k.L0Linear(7, 5, droprate_init=1e-6)  # p_open ~ 1
    d = torch.nn.Linear(7, 5)
    with torch.no_grad():
        d.weight.copy_(m.weight)
        d.bias.copy_(m.bias)
    want = 0.5 * 0.3 / 11 * float(m.weight.detach().pow(2).sum() + m.bias.detach().pow(2).sum())
    assert float(ex.dense_l2(d, 0.3, 11).detach()) == pytest.approx(want, rel=1e-6)
    assert float(m.regularizer(0.0, 0.3, 11).detach()) == pytest.approx(want, rel=1e-4)


def test_cut_off_run_keeps_its_history_and_resumes(fake_mnist, tmp_path, monkeypatch):
    calls = [0]
    real = ex.test_error

    def dies_in_epoch_2(*args, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt("cut off")
        return real(*args, **kw)

    monkeypatch.setattr(ex, "test_error", dies_in_epoch_2)
    argv = _argv(tmp_path, "--model", "lenet5", "--dense")
    argv[1] = "3"  # --epochs 3
    with pytest.raises(KeyboardInterrupt):
        ex.main(argv)
    path = tmp_path / "res" / "mnist_lenet5_dense.json"
    r = json.load(open(path))
    assert r["epochs_done"] == 1 and r["epochs_planned"] == 3 and r["method"] == "dense"
    h = r["history"][0]
    assert set(h) >= {"epoch", "train_ce", "train_loss", "test_error", "arch", "train_seconds", "seconds"}
    assert h["arch"] == [20, 50, 800, 500] and h["train_loss"] > h["train_ce"] > 0
    assert (tmp_path / "res" / "mnist_lenet5_dense.md").exists()
    monkeypatch.setattr(ex, "test_error", real)
    assert ex.main(argv + ["--resume"]) == 0
    r = json.load(open(path))
    assert [e["epoch"] for e in r["history"]] == [1, 2, 3]
    assert r["train_seconds_total"] == pytest.approx(sum(e["train_seconds"] for e in r["history"]))


def test_report_fills_table_from_partial_histories(fake_mnist, tmp_path):
    res = tmp_path / "res"
    assert ex.main(_argv(tmp_path, "--model", "lenet5", "--sep", "--epochs", "2")) == 0
    assert ex.main(_argv(tmp_path, "--model", "lenet5", "--dense", "--out", str(tmp_path / "d"))) == 0
    doc = tmp_path / "results.md"
    doc.write_text("intro\n\n" + rep.TABLE_HEADER + "\n|---|---|---|---|\n| old | row | x | y |\n\nafter\n")
    assert rep.main(["--results", str(res), "--doc", str(doc), "--no-plot"]) == 0
    text = doc.read_text()
    assert "| old | row |" not in text and text.startswith("intro\n") and text.endswith("\nafter\n")
    assert "20-25-45-462" in text and "9-18-65-25" in text
    sep = [l for l in text.split("\n") if "this repo, L0-sep" in l]
    assert len(sep) == 1 and "2 epochs" in sep[0] and "extrapolated from 1 epochs" in sep[0]
    assert "([report](res/mnist_lenet5_sep.md);" in sep[0]  # linked relative to the doc
    assert "CPU " in sep[0] and "× 2 = " in sep[0]
    assert "init kaiming" in sep[0] and "EMA off" in sep[0]
    assert "this repo, L0-sep" in (res / "mnist_lenet5_table.md").read_text()


def test_report_default_doc_is_docs_results_md(monkeypatch, tmp_path):
    """Without ``--doc`` the report rewrites the table in docs/results.md (which has it), linking ``results/``."""
    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "results.md")
    with open(doc) as f:
        assert any(l.startswith(rep.TABLE_HEADER) for l in f)
    seen = []
    monkeypatch.setattr(rep, "update_doc", lambda path, lines: seen.append((path, lines)) or True)
    monkeypatch.setattr(rep, "table_lines", lambda results, link_dir="docs/results": [link_dir])
    monkeypatch.setattr(rep, "write_md", lambda results, lines, png: str(tmp_path / "table.md"))  # writes nothing
    assert rep.main(["--results", os.path.join(os.path.dirname(doc), "results"), "--no-plot"]) == 0
    assert [(os.path.abspath(p), l) for p, l in seen] == [(doc, ["results"])]


@pytest.mark.parametrize("flag,normalize", [((), False), (("--inputs", "standardized"), True),
                                            (("--inputs", "unit"), False)])
def test_inputs_follow_the_authors_loader_by_default(fake_mnist, tmp_path, flag, normalize):
    """The authors feed ToTensor() pixels in [0, 1]; --inputs standardized shifts and scales them."""
    assert ex.main(_argv(tmp_path, "--model", "lenet300", *flag)) == 0
    assert LOADS == [normalize]
    r = ex.parse_args(["--model", "lenet300", *flag])
    assert r.inputs == ("standardized" if normalize else "unit")
