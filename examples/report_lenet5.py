"""Table 1 from the MNIST histories: ``docs/results/mnist_lenet5_table.md`` / ``.png`` and the table in ``docs/results.md``.

    python examples/report_lenet5.py                 # reads docs/results/mnist_*.json, rewrites the tables

It reads the json files ``examples/mnist_l0.py`` rewrites after every epoch, so it works on runs that
are still going or were cut off (each row says how many epochs it is for). Rows: LeNet-5-Caffe L0,
L0-sep and the dense baseline (``mnist_lenet5.json``, ``mnist_lenet5_sep.json``, ``mnist_lenet5_dense.json``),
the same two with the authors' inputs (``mnist_lenet5_unit.json``, ``mnist_lenet5_sep_unit.json``), and every
``mnist_lenet300*.json`` (beside ``mnist_lenet300_dense.json``). Training time is the sum of the per-epoch training seconds
(evaluation and reporting excluded); the dense row of a model is its time for the same epochs, or,
when the dense run has fewer epochs, its mean epoch time times that many epochs, marked as an
extrapolation.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from l0kernels.models import PAPER_TABLE1, arch_str  # noqa: E402

TABLE_HEADER = "| model | run | architecture | test error |"
PAPER_LAMBDA = {"L0 (lambda=0.1/N)": "L0, λ = 0.1/N", "L0-sep": "L0-sep, λ = [10, 0.5, 0.1, 10]/N"}


def load(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def train_seconds(r: Dict, epochs: Optional[int] = None) -> float:
    h = r["history"][:epochs] if epochs else r["history"]
    return sum(e.get("train_seconds", e["seconds"]) for e in h)


def settings(r: Dict) -> str:
    """Init, L2 convention and EMA of a run (runs from before these flags: torch init, per-N, EMA 0.999)."""
    s = r.get("settings", {})
    init = s.get("init", "torch")
    wd, passed, n = s.get("weight_decay"), r.get("weight_decay_passed", s.get("weight_decay")), r["N"]
    l2 = f"per-example, {wd:g}·N passed" if passed != wd and abs(passed - wd * n) <= 1e-9 * passed else \
        f"per-N, {passed:g} passed" + ("" if "wd_convention" in s else " (old default)")
    inputs = "inputs in [0, 1]" if s.get("inputs") == "unit" else "inputs standardised"  # older runs: standardised
    return f"{inputs}, init {init}, L2 {l2}, EMA {s.get('ema') or 'off'}"


def minutes(sec: float) -> str:
    return f"{sec / 60:.0f} min" if sec >= 600 else f"{sec / 60:.1f} min"


def cpu_per_epoch(r: Dict) -> Optional[float]:
    """Mean CPU seconds of the training process per epoch, over the epochs that recorded it."""
    c = [e["train_cpu_seconds"] for e in r["history"] if "train_cpu_seconds" in e]
    return sum(c) / len(c) if c else None


def cpu_str(r: Dict, epochs: int) -> str:
    c = cpu_per_epoch(r)
    if c is None:
        return ""
    k = sum("train_cpu_seconds" in e for e in r["history"])
    return f"CPU {c:.1f} s/epoch (mean of {k}) × {epochs} = {minutes(c * epochs)}"


def dense_time(dense: Optional[Dict], epochs: int, planned: int) -> str:
    if not dense:
        return "dense: no epoch finished yet"
    done = dense["epochs_done"]
    if done >= epochs:
        wall = f"wall {minutes(train_seconds(dense, epochs))} for the same {epochs} epochs"
    else:
        per = train_seconds(dense) / done
        wall = f"wall ≈{minutes(per * epochs)} for {epochs} epochs (extrapolated from {done} epochs)"
    c = cpu_str(dense, planned)
    return "dense: " + wall + (f"; {c}" + (" (extrapolated)" if done < planned else "") if c else "")


def rows(results: str) -> List[Dict]:
    out: List[Dict] = []
    dense5 = load(os.path.join(results, "mnist_lenet5_dense.json"))
    dense300 = load(os.path.join(results, "mnist_lenet300_dense.json"))
    for path in sorted(glob.glob(os.path.join(results, "mnist_lenet300*.json"))):
        r = load(path)
        if r and "model" in r and "history" in r and r.get("method") != "dense":  # (not the SparsityTarget report)
            out.append(dict(r=r, file=os.path.basename(path), dense=dense300))
    for tag in ("mnist_lenet5", "mnist_lenet5_sep", "mnist_lenet5_unit", "mnist_lenet5_sep_unit"):
        r = load(os.path.join(results, tag + ".json"))
        if r:
            out.append(dict(r=r, file=tag + ".json", dense=dense5))
    return out


def table_lines(results: str, link_dir: str = "docs/results") -> List[str]:
    """The table's rows; each run's report is linked as ``link_dir/<report>.md``."""
    lines = [TABLE_HEADER + " training time (this machine) |", "|---|---|---|---|---|"]
    found = rows(results)
    for model, key in (("LeNet-300-100", "lenet300"), ("LeNet-5-Caffe", "lenet5")):
        for meth, (arch, err) in PAPER_TABLE1[key].items():
            lines.append(f"| {model} | paper, {PAPER_LAMBDA.get(meth, meth)}, 200 epochs | {arch} | {err:.1f}% | |")
        for row in found:
            r = row["r"]
            if r["model"] != model:
                continue
            done, planned = r["epochs_done"], r["epochs_planned"]
            ep = f"{done} epoch{'s' * (done != 1)}" + ("" if done >= planned else f" of {planned}, run cut off or still going")
            lam = ", ".join(f"{v:g}" for v in r["lambdas_times_N"])
            rep = row["file"].replace(".json", ".md")
            t = f"wall {minutes(train_seconds(r))}"
            c = cpu_str(r, planned)
            if c:
                t += f"; {c}" + (" (extrapolated)" if done < planned else "")
            if row["dense"] is not None or model == "LeNet-5-Caffe":
                t += f"; {dense_time(row['dense'], done, planned)}"
            lines.append(f"| {model} | **this repo, {r['method']}, λ = [{lam}]/N, {ep}** "
                         f"([report]({link_dir}/{rep}); {settings(r)}) | **{arch_str(r['architecture'])}** | "
                         f"**{100 * r['test_error']:.2f}%** | {t} |")
    return lines


def update_doc(doc: str, lines: List[str]) -> bool:
    """Replace the table that starts with ``TABLE_HEADER`` in ``doc``; False when it has none."""
    with open(doc) as f:
        text = f.read().split("\n")
    start = next((i for i, l in enumerate(text) if l.startswith(TABLE_HEADER)), None)
    if start is None:
        return False
    end = start
    while end < len(text) and text[end].startswith("|"):
        end += 1
    text[start:end] = lines
    with open(doc, "w") as f:
        f.write("\n".join(text))
    return True


def plot(results: str, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = {name: load(os.path.join(results, f"mnist_lenet5{suffix}.json"))
            for name, suffix in (("L0", ""), ("L0-sep", "_sep"), ("dense", "_dense"))}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        h = r["history"]
        ep = [e["epoch"] for e in h]
        ax1.plot(ep, [100 * e["test_error"] for e in h], label=name)
        if name != "dense":
            dense = r["dense_architecture"]
            ax2.plot(ep, [sum(e["arch"]) / sum(dense) for e in h], label=f"{name}: {arch_str(r['architecture'])}")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test error (%)")
    ax1.set_yscale("log")
    ax1.axhline(0.9, color="gray", ls=":", label="paper L0 0.9%")
    ax1.axhline(1.0, color="gray", ls="--", label="paper L0-sep 1.0%")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax1.set_title("LeNet-5-Caffe on MNIST")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("open gates / gates (all layers)")
    ax2.set_ylim(0, 1.05)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_md(results: str, lines: List[str], png: Optional[str]) -> str:
    path = os.path.join(results, "mnist_lenet5_table.md")
    out = ["# Table 1 of Louizos et al. (2018): the paper beside this repo's runs", "",
           "Generated by `examples/report_lenet5.py` from the json histories in this folder; every row says how "
           "many epochs it is for. Architecture = open test-time gates per L0 layer; test error with the "
           "deterministic gates. Training time: wall = the per-epoch training seconds summed (no evaluation); "
           "CPU = the training process's CPU seconds per epoch (one thread), times the planned epochs where a run "
           "is not done (marked extrapolated); the dense network (no gates, same optimizer, init and L2 term) "
           "on the same machine beside it. The machine is a shared 2-core CPU with other sessions' jobs and "
           "these runs at different `nice` levels, so wall times are not comparable between runs; CPU times are.",
           ""]
    out += lines
    out += ["", "Known differences from the authors' LeNet-5 setup (`train_lenet5.py`, `models.py`, `l0_layers.py` of "
            "AMLab-Amsterdam/L0_regularization), besides the epochs a row is for:",
            "- inputs: the authors feed `ToTensor()` values in [0, 1], as `examples/mnist_l0.py --inputs unit` (its "
            "default) does; rows marked \"inputs standardised\" shifted and scaled the pixels by MNIST's mean and std "
            "(`--inputs standardized`);",
            "- the λ cost of a gated conv channel: here `λ · (in·k·k + 1)` (weights and bias); the authors' "
            "`L0Conv2d._reg_w` charges `λ` per weight but subtracts it for the bias (`λ · (in·k·k − 1)`);",
            "- the gate noise and the random streams differ (Philox seeds here, `torch` RNG there), so single runs "
            "differ by run-to-run noise; the paper reports one number per row.",
            "Same as the authors: Adam 1e-3, batch 100, droprate_init 0.5, log_alpha clamp, Kaiming-normal init "
            "with zero biases, L2 term `(1/N)·0.5·wd·p_g·‖θ_g‖²` with wd = 5e-4 (their `L0LeNet5` does not scale "
            "wd by N, unlike their `L0MLP`), no EMA (their `L0LeNet5` default; `train_lenet5.py` does not pass "
            "`--beta_ema`), one gate draw per minibatch."]
    if png:
        out += ["", f"![LeNet-5-Caffe: test error and open gates over epochs]({os.path.basename(png)})"]
    out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(REPO, "docs", "results"))
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "results.md"),
                   help="the markdown file whose Table 1 is rewritten ('' to leave it alone)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    lines = table_lines(a.results, ".")  # the table file sits beside the reports
    png = None if a.no_plot else plot(a.results, os.path.join(a.results, "mnist_lenet5_table.png"))
    md = write_md(a.results, lines, png)
    print("\n".join(lines))
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    if a.doc:
        link_dir = os.path.relpath(a.results, os.path.dirname(os.path.abspath(a.doc))).replace(os.sep, "/")
        doc_lines = table_lines(a.results, link_dir)
        print(f"table updated in {a.doc}" if update_doc(a.doc, doc_lines) else f"no table in {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
