"""A byte-level language model on text no one here wrote: the source files of Python's standard library.

    python examples/stdlib_lm.py                    # dense and gated runs, then the report
    python examples/stdlib_lm.py --steps 200 --quick  # a smoke run

Data: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded), as bytes; a file
goes to validation when the CRC32 of its relative path falls in the last 10% (a split by file, the same on every
machine with the same Python). Model: a transformers ``LlamaForCausalLM`` built from a config (256 byte tokens,
no download). Two runs with the same data order, initial weights and number of AdamW steps:

* dense;
* gated: ``l0k.convert(model, structure=("ffn", "heads"))`` puts one structure gate on each FFN unit (its rows
  of ``gate_proj``/``up_proj`` and its column of ``down_proj``) and on each head (its q rows, its ``o_proj``
  columns, and its key/value rows once every query head sharing them is closed), and a ``SparsityTarget``
  (``metric="gates"``) keeps ``--target`` of the units and heads open (warm-up over the first quarter of the
  run): the decoder blocks' parameters scale with both, so about that share of them stays. After training ``finalize_()`` makes the test-time
  gates meet the target, ``compact()`` removes the closed units and heads from every layer they span (rows of
  ``gate_proj``/``up_proj``/q/k/v, columns of ``down_proj``/``o_proj``), and ``save_compact`` /
  ``load_compact`` round-trip the result.

Reported (``--out``, default ``docs/results/stdlib_lm.{md,json,png}``): validation bits per byte of both runs
over training, training time per step over the run (the gated run's falls as gates close: every layer a unit or
head spans skips it once it is closed), and the compacted model's parameters, CPU latency (1 x 128 bytes) and
throughput (16 x 128) against the dense model. Both runs checkpoint every ``--ckpt-every`` steps into
``--ckpt-dir`` and resume from there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

import l0kernels as l0k

try:
    import transformers
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers (pip install transformers)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- data ------------------------------------------------------------------------------------------------------

def stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return out


def load_split(val_share: float = 0.1, limit_mb: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """(train bytes, validation bytes, info): files joined with a NUL byte between them."""
    root = sysconfig.get_paths()["stdlib"]
    parts: Dict[str, List[bytes]] = {"train": [], "val": []}
    for path in stdlib_files():
        rel = os.path.relpath(path, root)
        side = "val" if (zlib.crc32(rel.encode()) % 1000) >= 1000 * (1 - val_share) else "train"
        with open(path, "rb") as f:
            parts[side].append(f.read())
    data = {k: b"\0".join(v) for k, v in parts.items()}
    if limit_mb:
        data = {k: v[:int(limit_mb * 2 ** 20 * (1 if k == "train" else val_share))] for k, v in data.items()}
    info = {"root": root, "python": sys.version.split()[0], "files_train": len(parts["train"]),
            "files_val": len(parts["val"]), "bytes_train": len(data["train"]), "bytes_val": len(data["val"])}
    as_t = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()
    return as_t(data["train"]), as_t(data["val"]), info


def batch(data: torch.Tensor, b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, data.numel() - t - 1, (b,), generator=gen)
    return torch.stack([data[s:s + t + 1] for s in start.tolist()])


@torch.no_grad()
def bits_per_byte(model, data: torch.Tensor, t: int, n_batches: int, b: int = 16) -> float:
    """Mean next-byte cross-entropy in bits over fixed validation windows (the same for every call)."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    for _ in range(n_batches):
        x = batch(data, b, t, gen)
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    model.train(was)
    return total / count / math.log(2)


# -- model -----------------------------------------------------------------------------------------------------

def build(args) -> "transformers.LlamaForCausalLM":
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.ffn,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                                   max_position_embeddings=args.seq, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(cfg)


def gate(model, args):
    # one structure gate per FFN unit and per head: a closed one is skipped in every layer it spans
    l0k.convert(model, structure=("ffn", "heads"), droprate_init=0.1,
                example_inputs={"input_ids": torch.zeros(1, 16, dtype=torch.long), "use_cache": False})
    return model


# -- training --------------------------------------------------------------------------------------------------

def train(kind: str, args, train_data, val_data) -> Dict:
    ckpt = os.path.join(args.ckpt_dir, f"{kind}.pt")
    model = build(args)
    if kind == "gated":
        gate(model, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ctl = l0k.SparsityTarget(model, args.target, metric="gates", warmup_steps=args.steps // 4) \
        if kind == "gated" else None
    gen = torch.Generator().manual_seed(args.seed + 1)
    hist = {"step": [], "time": [], "val_step": [], "val_bpb": [], "expected": []}
    step = 0
    if os.path.exists(ckpt):
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"])
        if ctl is not None:
            ctl.load_state_dict(st["ctl"])
        gen.set_state(st["gen"]); hist = st["hist"]; step = st["step"]
        print(f"[{kind}] resumed at step {step}", flush=True)
    model.train()
    while step < args.steps:
        x = batch(train_data, args.batch, args.seq, gen)
        t0 = time.perf_counter()
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        if ctl is not None:
            loss = loss + ctl.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ctl is not None:
            ctl.step()
        hist["step"].append(step)
        hist["time"].append(time.perf_counter() - t0)
        hist["expected"].append(ctl.expected() if ctl is not None else 1.0)
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            bpb = bits_per_byte(model, val_data, args.seq, args.val_batches)
            hist["val_step"].append(step)
            hist["val_bpb"].append(bpb)
            recent = sorted(hist["time"][-args.eval_every:])
            print(f"[{kind}] step {step}: val {bpb:.3f} bits/byte, step {1e3 * recent[len(recent) // 2]:.0f} ms"
                  + (f", expected fraction {hist['expected'][-1]:.3f}" if ctl is not None else ""), flush=True)
        if step % args.ckpt_every == 0 or step == args.steps:
            os.makedirs(args.ckpt_dir, exist_ok=True)
            st = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "hist": hist,
                  "step": step, "ctl": ctl.state_dict() if ctl is not None else None}
            torch.save(st, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    return {"model": model, "ctl": ctl, "hist": hist}


def interleaved_step_ms(runs: Dict, args, data: torch.Tensor, rounds: int = 20) -> Dict[str, float]:
    """Median ms of one training step of each final model (copies, fresh AdamW), one step of each per round:
    the two runs above share the machine with whatever else runs, this comparison does not."""
    import copy
    gen = torch.Generator().manual_seed(7)
    steps = {}
    for kind, r in runs.items():
        model = copy.deepcopy(r["model"]).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        ctl = r["ctl"]

        def step(model=model, opt=opt, gated=ctl is not None):
            x = batch(data, args.batch, args.seq, gen)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
            if gated:
                loss = loss + 1e-6 * l0k.l0_penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[kind] = step
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for r in range(rounds + 2):
        for kind in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[kind]()
            if r >= 2:  # two warm-up rounds
                times[kind].append(time.perf_counter() - t0)
    return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}


def latency(model, b: int, t: int, runs: int) -> float:
    model.eval()
    x = torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=x, use_cache=False)
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def block_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "norm" not in n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--target", type=float, default=0.4, help="fraction of the FFN units and heads kept")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--ckpt-dir", default=os.path.join(REPO, "runs", "stdlib_lm"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 MB of training text, small eval")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "results", "stdlib_lm"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.val_batches, args.eval_every, args.ckpt_every = 2, max(args.steps // 2, 1), max(args.steps // 2, 1)
    train_data, val_data, info = load_split(limit_mb=2.0 if args.quick else 0.0)
    print(f"stdlib {info['root']}: {info['files_train']} training files ({info['bytes_train'] / 2**20:.1f} MiB), "
          f"{info['files_val']} validation files ({info['bytes_val'] / 2**20:.1f} MiB)", flush=True)
    runs = {k: train(k, args, train_data, val_data) for k in ("dense", "gated")}
    step_ms = interleaved_step_ms(runs, args, train_data)
    dense, gated, ctl = runs["dense"]["model"].eval(), runs["gated"]["model"].eval(), runs["gated"]["ctl"]
    fin = ctl.finalize_()
    x = torch.randint(0, 256, (2, args.seq), generator=torch.Generator().manual_seed(9))
    small = l0k.compact(gated, {"input_ids": x})
    with torch.no_grad():
        ref = gated(input_ids=x, use_cache=False).logits
        got = small(input_ids=x, use_cache=False).logits
    compact_err = float((got - ref).norm() / ref.norm())
    save_dir = os.path.join(args.ckpt_dir, "compact")
    l0k.save_compact(small, save_dir)
    loaded = l0k.load_compact(save_dir)
    with torch.no_grad():
        load_err = float((loaded(input_ids=x, use_cache=False).logits - got).abs().max())
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python examples/stdlib_lm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "data": info, "args": {k: v for k, v in vars(args).items() if k not in ("ckpt_dir", "out")},
        "finalize": {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in fin.items()},
        "val_bpb": {"dense": runs["dense"]["hist"]["val_bpb"][-1],
                    "gated": runs["gated"]["hist"]["val_bpb"][-1],
                    "compacted": bits_per_byte(small, val_data, args.seq, args.val_batches)},
        "params": {"dense": sum(p.numel() for p in dense.parameters()),
                   "compacted": sum(p.numel() for p in small.parameters()),
                   "dense_blocks": block_params(dense), "compacted_blocks": block_params(small)},
        "step_ms_interleaved": step_ms,
        "compact_rel_err": compact_err, "save_load_max_abs": load_err,
        "latency_1x128_ms": {"dense": 1e3 * latency(dense, 1, args.seq, 30), "compacted": 1e3 * latency(small, 1, args.seq, 30)},
        "latency_16x128_ms": {"dense": 1e3 * latency(dense, 16, args.seq, 10),
                              "compacted": 1e3 * latency(small, 16, args.seq, 10)},
        "history": {k: v["hist"] for k, v in runs.items()},
    }
    write_report(res, args.out)
    return 0


def _median_windows(times: List[float], w: int) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for i in range(0, len(times), w):
        chunk = sorted(times[i:i + w])
        if chunk:
            xs.append(i + len(chunk) // 2)
            ys.append(1e3 * chunk[len(chunk) // 2])
    return xs, ys


def write_report(res: Dict, out: str) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    h = res["history"]
    w = max(len(h["dense"]["time"]) // 30, 1)
    dx, dy = _median_windows(h["dense"]["time"], w)
    gx, gy = _median_windows(h["gated"]["time"], w)
    plot = ""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].plot(dx, dy, label="dense")
        ax[0].plot(gx, gy, label="gated (unit and head gates)")
        ax[0].set_xlabel("step"); ax[0].set_ylabel(f"ms per step (median of {w})"); ax[0].legend()
        ax[1].plot(h["dense"]["val_step"], h["dense"]["val_bpb"], label="dense")
        ax[1].plot(h["gated"]["val_step"], h["gated"]["val_bpb"], label="gated")
        ax[1].set_xlabel("step"); ax[1].set_ylabel("validation bits per byte"); ax[1].legend()
        fig.tight_layout()
        fig.savefig(out + ".png", dpi=110)
        plot = f"![time per step and validation bits per byte]({os.path.basename(out)}.png)\n\n"
    except ImportError:
        plot = "(matplotlib not installed: no plot)\n\n"
    p, lat1, lat16 = res["params"], res["latency_1x128_ms"], res["latency_16x128_ms"]
    d = res["data"]
    lines = [
        "# A byte-level Llama on Python's standard library: dense against unit and head gates", "",
        f"`{res['command']}` on {res['date']}, torch {res['torch']}, transformers {res['transformers']}, "
        f"{res['threads']} CPU thread(s), this machine (2 cores, shared). Data: the `.py` files of Python "
        f"{d['python']}'s standard library, split by file: {d['files_train']} files ({d['bytes_train'] / 2**20:.1f} "
        f"MiB) for training, {d['files_val']} ({d['bytes_val'] / 2**20:.1f} MiB) for validation. Model and runs: "
        f"see `examples/stdlib_lm.py`.", "",
        plot,
        "| | dense | gated, then compacted |", "|---|---:|---:|",
        f"| validation bits per byte (end of training) | {res['val_bpb']['dense']:.3f} | "
        f"{res['val_bpb']['gated']:.3f} (compacted: {res['val_bpb']['compacted']:.3f}) |",
        f"| parameters | {p['dense']:,} | {p['compacted']:,} |",
        f"| parameters of the decoder blocks | {p['dense_blocks']:,} | {p['compacted_blocks']:,} "
        f"({p['compacted_blocks'] / p['dense_blocks']:.1%}) |",
        f"| training ms per step, median of the first {w} steps of the run | {dy[0]:.0f} | {gy[0]:.0f} |",
        f"| training ms per step, median of the last {w} steps of the run | {dy[-1]:.0f} | {gy[-1]:.0f} |",
        f"| training ms per step of the final models, interleaved (20 rounds) | "
        f"{res['step_ms_interleaved']['dense']:.0f} | {res['step_ms_interleaved']['gated']:.0f} "
        f"({res['step_ms_interleaved']['gated'] / res['step_ms_interleaved']['dense']:.2f}x) |",
        f"| CPU latency, 1 x 128 bytes (ms) | {lat1['dense']:.2f} | {lat1['compacted']:.2f} |",
        f"| CPU throughput, 16 x 128 bytes (kbyte/s) | {16 * 128 / lat16['dense']:.0f} | "
        f"{16 * 128 / lat16['compacted']:.0f} |",
        "",
        f"`finalize_()`: {res['finalize']}. Compacted against the gated model: relative error "
        f"{res['compact_rel_err']:.1e}; `save_compact` / `load_compact`: largest difference "
        f"{res['save_load_max_abs']:.1e}.", "",
        "The two runs ran one after the other on a machine shared with other jobs, so their per-step times "
        "(the plot, the first and last rows above) carry that load; the interleaved row compares the final "
        "models under the same load.", "",
        "The gates are structure gates (docs/design.md §11): a closed FFN unit is skipped in `gate_proj`, "
        "`up_proj` and `down_proj`, a closed head in q and `o_proj` (and k/v once its key/value group is "
        "closed) and in the attention itself, forward and backward, from the step it closes.", "",
    ]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}.md, .json" + (", .png" if plot.startswith("!") else ""))


if __name__ == "__main__":
    raise SystemExit(main())
