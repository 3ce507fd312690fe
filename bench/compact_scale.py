"""compact() at scale: a Llama-shaped transformers model of about 1B parameters, bfloat16, on the CPU.

    python bench/compact_scale.py                      # hidden 2048, 16 layers, 32 heads / 8 kv heads
    python bench/compact_scale.py --layers 2 --hidden 256 --intermediate 1024 --vocab 1024   # a smoke run

The model is built from a config with its weights left uninitialised (``torch.device("meta")`` then
``to_empty``) and filled with a cheap random pattern, converted the README's way (head groups as input gates
of ``o_proj``, FFN units as input gates of ``down_proj``), a random share of the gates closed, then
compacted once. It prints and writes (``--out``, JSON) the wall time of ``compact()``, the process's peak
resident memory above what it held after importing torch and transformers, over the model's own size
(``peak_over_model``: 2.0 means the model and one copy; ``compact_over_model``: what the process grew by
during ``compact()``, over the model's size), and the parameters before and after.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import l0kernels as l0k  # noqa: E402


def _rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(a):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                      max_position_embeddings=256, tie_word_embeddings=False, torch_dtype=torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # a cheap pattern instead of the library's init (minutes at this size)
            p.copy_((torch.rand(p.shape[-1], generator=g) - 0.5).to(p.dtype).expand(p.shape) * 0.05)
        for name, b in model.named_buffers():
            if "inv_freq" in name:
                b.copy_(1.0 / (10000 ** (torch.arange(0, b.numel() * 2, 2, dtype=torch.float32) / (b.numel() * 2))))
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--closed", type=float, default=0.4, help="share of the gates closed at random")
    p.add_argument("--out", default=None, help="JSON file for the result")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (its import is part of the baseline, not of compact's memory)
    rss_start = _rss_mib()
    t0 = time.perf_counter()
    model = build(a)
    head_dim = a.hidden // a.heads
    l0k.convert(model, gate="in", include="*.o_proj", group_size=head_dim)
    l0k.convert(model, gate="in", include="*.down_proj")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in l0k.l0_layers(model):
            closed = torch.rand(m.log_alpha.shape, generator=g) < a.closed
            m.log_alpha.copy_(torch.where(closed, -10.0, 10.0).to(m.log_alpha.dtype))
    params = sum(t.numel() for t in model.parameters())
    model_mib = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20
    built_s, rss_before = time.perf_counter() - t0, _rss_mib()
    t1 = time.perf_counter()
    small = l0k.compact(model)
    compact_s = time.perf_counter() - t1
    rss_peak = _rss_mib()
    kept = sum(t.numel() for t in small.parameters())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
    except OSError:
        commit = ""
    r = {"params": params, "params_after": kept, "model_mib": round(model_mib, 1), "build_s": round(built_s, 1),
         "compact_s": round(compact_s, 2), "peak_rss_mib": round(rss_peak, 1),
         "rss_start_mib": round(rss_start, 1), "rss_before_compact_mib": round(rss_before, 1),
         "peak_over_model": round((rss_peak - rss_start) / model_mib, 2),
         "compact_over_model": round((rss_peak - rss_before) / model_mib, 2),
         "config": vars(a), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
         "torch": torch.__version__, "commit": commit, "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")}
    print(json.dumps(r, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
