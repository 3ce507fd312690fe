"""The whole training step of a transformers Llama with gates on its FFN units and heads, against the same dense model.

CPU (default): ``LlamaForCausalLM`` built from a config (hidden 512, FFN 1536, 8 heads of 64, vocab 4096; 4
layers, and 8 with ``--deep``), 4 x 128 tokens, float32, AdamW, at unit/head density 1.0 / 0.5 / 0.3 / 0.1
(``common.log_alpha_for_density``); the gated step adds ``l0_penalty``. ``--gates structure`` (the default): one
structure gate per FFN unit and per head (``convert(structure=("ffn", "heads"))``), a closed unit or head skipped
in every layer it spans. ``--gates layer``: per-layer gates, one input gate per FFN unit on every ``down_proj`` and
one per head on every ``o_proj`` (``group_size = 64``), so only those layers skip. ``--gates both`` times both;
with ``--gpu``, ``--gates device`` the structure gates' device form (``backend="triton"``: no host reads) and
``--gates all`` the three.
One step = forward, cross-entropy, backward, ``optimizer.step()``. Every configuration runs one step per round
(interleaved; medians). Goal (docs/design.md §11): <= 1.05x the dense step with every gate open and <= 0.6x at
density 0.3.

GPU (``--gpu``): bfloat16, 8192 tokens (2 x 4096), one Llama-7B-shaped block (hidden 4096, FFN 11008, 32 heads with
8 key/value heads, vocab 32000 kept small at 4096 so the block dominates), same densities, CUDA-event timing.

    python bench/llama_step.py [--deep] [--reps 20] [--threads N]
    python bench/llama_step.py --moe [--reps 20]     # a Mixtral: gates on every expert's units and the heads
    python bench/llama_step.py --gpu [--reps 20]

Writes ``bench/results/<device>-llama-step-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import statistics
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import l0kernels as l0k  # noqa: E402

DENSITIES = (1.0, 0.5, 0.3, 0.1)


def build(layers: int, gpu: bool, moe: bool = False):
    import transformers
    if moe:  # Mixtral: 8 experts, 2 per token, each expert's FFN a quarter of the Llama's
        cfg = dict(hidden_size=512, intermediate_size=384, num_attention_heads=8, num_key_value_heads=8,
                   head_dim=64, vocab_size=4096, num_local_experts=8, num_experts_per_tok=2)
        config = transformers.MixtralConfig(num_hidden_layers=layers, max_position_embeddings=4096,
                                            attn_implementation="sdpa", **cfg)
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(config), cfg
    if gpu:
        cfg = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, vocab_size=4096)
    else:
        cfg = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8,
                   head_dim=64, vocab_size=4096)
    config = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096,
                                      attn_implementation="sdpa", **cfg)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config), cfg


def gated_copy(dense, cfg, density: float, seed: int, gates: str, ids):
    model = copy.deepcopy(dense)
    if gates in ("structure", "device"):  # one gate per FFN unit / head, skipped in every layer it spans
        # device: the form with no host reads (Triton kernels for the consumers, producers masked)
        l0k.convert(model, structure=("ffn", "heads"), example_inputs={"input_ids": ids[:, :16], "use_cache": False},
                    backend="triton" if gates == "device" else "auto")
    else:  # per-layer gates the README's way: FFN units on down_proj, heads on o_proj
        l0k.convert(model, gate="in", include="*.down_proj")
        l0k.convert(model, gate="in", include="*.o_proj", group_size=cfg["head_dim"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in l0k.l0_gates(model):
            m.log_alpha.copy_(common.log_alpha_for_density(m.log_alpha.numel(), density, generator=g)
                              .to(m.log_alpha.device))
    return model


def stepper(model, ids, gated: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        if gated:
            loss = loss + 1e-6 * l0k.l0_penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def rows_for(layers: int, gpu: bool, reps: int, meta: dict, modes=("structure",), moe: bool = False) -> List[Dict]:
    dev = torch.device("cuda" if gpu else "cpu")
    dt = torch.bfloat16 if gpu else torch.float32
    dense, cfg = build(layers, gpu, moe)
    dense = dense.to(device=dev, dtype=dt)
    b, t = (2, 4096) if gpu else (4, 128)
    ids = torch.randint(0, cfg["vocab_size"], (b, t + 1), generator=torch.Generator().manual_seed(1)).to(dev)
    fns, names = [stepper(dense, ids, False)], ["dense"]
    for mode in modes:
        for i, d in enumerate(DENSITIES):
            fns.append(stepper(gated_copy(dense, cfg, d, 10 + i, mode, ids), ids, True))
            names.append(f"{mode} {d}")
    times = common.interleaved_times(fns, reps, warmup=2, device=dev)
    med = [statistics.median(x) for x in times]
    out = []
    for name, m, x in zip(names, med, times):
        out.append(dict(meta, model=f"{'Mixtral' if moe else 'Llama'} {layers} layers", hidden=cfg["hidden_size"],
                        ffn=cfg["intermediate_size"], heads=cfg["num_attention_heads"],
                        kv_heads=cfg["num_key_value_heads"], tokens=b * t, dtype=str(dt).replace("torch.", ""),
                        config=name, step_ms=m, min_ms=min(x), max_ms=max(x), ratio=m / med[0], reps=reps))
        print(f"{layers} layers, {name:>14}: {m:8.1f} ms  ({m / med[0]:.2f}x dense)", flush=True)
    return out


def markdown(rows: List[Dict]) -> str:
    r0 = rows[0]
    head = (f"# The whole training step of a Llama, gated, against the dense model\n\n"
            f"{r0['device']}, torch {r0['torch']}, commit {r0['commit']}, {r0['date']}; "
            f"load average {os.getloadavg()[0]:.1f}; {r0['reps']} interleaved rounds, medians. "
            f"`python bench/llama_step.py` (see its docstring).\n\n"
            "| model | tokens | dtype | step | ms (median) | min | max | / dense |\n"
            "|---|---:|---|---|---:|---:|---:|---:|\n")
    body = "".join(f"| {r['model']} (hidden {r['hidden']}, FFN {r['ffn']}, {r['heads']}/{r['kv_heads']} heads) | "
                   f"{r['tokens']} | {r['dtype']} | {r['config']} | {r['step_ms']:.1f} | {r['min_ms']:.1f} | "
                   f"{r['max_ms']:.1f} | {r['ratio']:.2f}x |\n" for r in rows)
    return head + body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--deep", action="store_true", help="CPU: also the 8-layer model")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gates", choices=("structure", "layer", "both", "device", "all"), default="structure",
                    help="structure gates (default), per-layer gates the README's way, both; device: structure gates "
                         "in their device form (backend='triton', GPU only); all: structure, device and layer")
    ap.add_argument("--moe", action="store_true",
                    help="CPU: a Mixtral (8 experts of FFN 384, 2 per token) instead of the Llama; structure gates: "
                         "one gate per unit of every expert and per head")
    ap.add_argument("--out", default=os.path.join(common.HERE, "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu needs a CUDA device")
    now = _dt.datetime.now()
    dev = torch.device("cuda" if args.gpu else "cpu")
    meta = common.make_meta(dev, now)
    modes = {"both": ("structure", "layer"), "all": ("structure", "device", "layer")}.get(args.gates, (args.gates,))
    if "device" in modes and not args.gpu:
        ap.error("--gates device/all: the device form runs Triton kernels, on a GPU (--gpu)")
    if args.moe and (args.gpu or "structure" not in modes or len(modes) > 1):
        ap.error("--moe: the CPU rows with structure gates")
    rows = rows_for(1 if args.gpu else 4, args.gpu, args.reps, meta, modes, args.moe)
    if args.deep and not args.gpu:
        rows += rows_for(8, False, args.reps, meta, modes, args.moe)
    common.write_results(rows, args.out, meta["device"], now, "llama-step", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
