"""A tiny Hugging Face Llama built from a config (no download), gated, trained on a synthetic task, compacted.

    python examples/llama_synthetic.py --steps 600

The task is next-token prediction on sequences from a fixed random Markov chain over ``--vocab`` tokens
(each token has 3 likely successors), so the best model needs little attention. The output projection of
every attention block (``o_proj``, one gate per input feature: whole heads close when all their features
do) and the down projection of every MLP (``down_proj``, one gate per FFN unit) get L0 input gates; the
loss is cross-entropy plus ``--lam`` times the mean P(gate open). ``l0k.compact`` then removes the closed
FFN units (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``) and the closed heads (rows of
q/k/v, columns of o; with grouped-query attention a key/value head only with all its query heads). The
report (``docs/results/llama_synthetic.{md,json}``) gives parameters, FLOPs per token, CPU latency and
next-token accuracy of the compacted model against the dense original (same weights, every gate open).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import l0kernels as l0k
from l0kernels.models import time_inference

try:
    import transformers
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers (pip install transformers)")


def add_gates(model, names):
    """Replace the nn.Linear children called one of ``names`` by L0Linear(gate="in"), gates open."""
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name in names:
                layer = l0k.L0Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     gate="in", droprate_init=0.2)
                with torch.no_grad():
                    layer.weight.copy_(child.weight)
                    if child.bias is not None:
                        layer.bias.copy_(child.bias)
                setattr(parent, child_name, layer)
    return model


def markov_batches(vocab, batch, seq, gen):
    succ = torch.randint(0, vocab, (vocab, 3), generator=gen)
    probs = torch.tensor([0.6, 0.3, 0.1])

    def sample():
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, seq):
            pick = torch.multinomial(probs, batch, replacement=True, generator=gen)
            x[:, t] = succ[x[:, t - 1], pick]
        return x
    return sample


def accuracy(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float((logits.argmax(-1) == ids[:, 1:]).float().mean())


def linear_flops_per_token(model):
    return sum(2 * m.in_features * m.out_features + (m.bias is not None) * m.out_features
               for m in model.modules() if isinstance(m, nn.Linear))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gate-lr", type=float, default=0.03)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="docs/results")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                   max_position_embeddings=a.seq, attn_implementation="sdpa")
    model = add_gates(transformers.LlamaForCausalLM(cfg), {"o_proj", "down_proj"})
    gates = [m for m in model.modules() if isinstance(m, l0k.L0Linear)]
    n_gates = sum(m.num_gates() for m in gates)
    la = [q for n, q in model.named_parameters() if n.endswith("log_alpha")]
    rest = [q for n, q in model.named_parameters() if not n.endswith("log_alpha")]
    opt = torch.optim.Adam([{"params": rest}, {"params": la, "lr": a.gate_lr}], lr=a.lr)
    sample = markov_batches(a.vocab, a.batch, a.seq, gen)
    t0 = time.perf_counter()
    model.train()
    for step in range(a.steps):
        ids = sample()
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        loss = loss + a.lam * l0k.l0_penalty(model) / n_gates
        opt.zero_grad()
        loss.backward()
        opt.step()
        l0k.constrain_(model)
        if step % 100 == 0:
            print(f"step {step:5d} loss {loss.item():.4f} open gates "
                  f"{sum(m.num_active() for m in gates)}/{n_gates}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    test = torch.cat([sample() for _ in range(8)])
    small = l0k.compact(model)
    dense_model = copy.deepcopy(model)
    with torch.no_grad():
        for m in dense_model.modules():
            if isinstance(m, l0k.L0Linear):
                m.log_alpha.fill_(10.0)  # every gate open: the dense original with the trained weights
    dense = l0k.compact(dense_model)
    diff = l0k.compare(model, small, (test[:16],))
    acc = {"acc_gated": accuracy(model, test), "acc_compact": accuracy(small, test),
           "acc_dense_original": accuracy(dense, test)}
    params = lambda m: sum(t.numel() for n, t in m.named_parameters())
    heads = [(blk.self_attn.q_proj.out_features // 8, blk.self_attn.k_proj.out_features // 8)
             for blk in small.model.layers]
    ffn = [blk.mlp.down_proj.in_features for blk in small.model.layers]
    speed = {}
    for b in (1, 32):
        xb = test[:b]

        class Call(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m(input_ids=x).logits
        speed[b] = {"dense_ms": time_inference(Call(dense).eval(), xb),
                    "l0_eval_ms": time_inference(Call(model).eval(), xb),
                    "compact_ms": time_inference(Call(small).eval(), xb)}
    r = {"steps": a.steps, "batch": a.batch, "seq": a.seq, "vocab": a.vocab, "lam": a.lam, "lr": a.lr,
         "gate_lr": a.gate_lr, "seed": a.seed, "train_s": train_s, **acc,
         "heads_q_kv_per_layer": heads, "ffn_units_per_layer": ffn, "dense_params": params(dense),
         "compact_params": params(small), "dense_linear_flops_per_token": linear_flops_per_token(dense),
         "compact_linear_flops_per_token": linear_flops_per_token(small), "compare": diff,
         "speed": {str(k): v for k, v in speed.items()}, "torch": torch.__version__,
         "transformers": transformers.__version__, "threads": torch.get_num_threads(),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "llama_synthetic.json"), "w") as f:
        json.dump(r, f, indent=1)
    lines = [
        "# Tiny Hugging Face Llama (GQA) on a synthetic Markov-chain task: gated, compacted",
        "",
        f"`python examples/llama_synthetic.py --steps {a.steps} --lam {a.lam}` (a short run: {a.steps} steps of "
        f"{a.batch} sequences of {a.seq} tokens, {train_s:.0f} s on {r['threads']} CPU thread(s)). Config: "
        "hidden 64, 2 layers, 8 query heads, 4 key/value heads, head_dim 8, FFN 256.",
        "",
        "| | dense original | compacted |",
        "|---|---:|---:|",
        f"| parameters | {r['dense_params']:,d} | {r['compact_params']:,d} |",
        f"| linear-layer FLOPs per token | {r['dense_linear_flops_per_token']:,d} | "
        f"{r['compact_linear_flops_per_token']:,d} |",
    ]
    for b, s in speed.items():
        lines.append(f"| CPU latency, batch {b} x {a.seq} tokens (median ms) | {s['dense_ms']:.3f} | "
                     f"{s['compact_ms']:.3f} ({s['dense_ms'] / s['compact_ms']:.2f}x) |")
    lines += [
        f"| next-token accuracy | {r['acc_dense_original']:.2%} (gates all open) | {r['acc_compact']:.2%} "
        f"(gated eval model: {r['acc_gated']:.2%}) |",
        "",
        "Kept (query, key/value) heads per layer: " + ", ".join(f"{q}/{kv}" for q, kv in heads)
        + f" of 8/4; FFN units per layer: {', '.join(map(str, ffn))} of 256.",
        f"Compacted vs gated eval model: max |diff| of the logits {diff['max_abs']:.1e}, relative (norm) "
        f"{diff['norm_rel']:.1e}.",
        "",
    ]
    with open(os.path.join(a.results, "llama_synthetic.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
