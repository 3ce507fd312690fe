"""convert() and compact() on real model definitions: the zoo of tests/_model_zoo.py (tiny transformers models from
configs, torchvision classification models at a small input; random init, eval mode), each converted with the
defaults, a random 40% of every gate vector closed, compacted, checked, saved/loaded and exported, as
tests/compact/test_models_coverage.py does. Writes docs/results/models_coverage.md and .json.

Usage: python bench/models_coverage.py [--runs 10] [--threads 1] [--model NAME ...] [--out docs/results/models_coverage]
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import _model_zoo as zoo  # noqa: E402  (the builders, shared with the test)

zoo.define_torchvision_op_schemas()  # before anything imports transformers or torchvision

import torch  # noqa: E402


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "l0kernels"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"l0kernels at {head}" + (" with local changes under l0kernels/" if dirty else "")


def _version(pkg: str) -> str:
    try:
        return __import__(pkg).__version__
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        return f"not available ({type(e).__name__})"


def _row(r):
    err = r["errors"]
    failed = list(err.items())
    ok_compact = "compact" not in err and "build" not in err and "convert" not in err
    saved = ("yes" if "save_load_rel_err" in r and r["save_load_rel_err"] == 0.0
             else f"differs ({r['save_load_rel_err']:.1e})" if "save_load_rel_err" in r
             else "no" if "save_load" in err else "")
    return {
        "model": r["name"], "family": r["family"],
        "convert_ok": "build" not in err and "convert" not in err,
        "gated_layers": r.get("gated_layers"),
        "compact_ok": ok_compact and "exact" not in err,
        "compact_exact": r.get("rel_err") is not None and r["rel_err"] <= 1e-5,
        "rel_err": r.get("rel_err"),
        "result": r.get("result_class"), "same_class": r.get("same_class"),
        "params_dense": r.get("params_dense"), "params_compact": r.get("params_compact"),
        "kept": r.get("kept"),
        "removed_pct": None if r.get("kept") is None else 100.0 * (1.0 - r["kept"]),
        "compact_s": r.get("compact_s"),
        "latency_ms": {k: v * 1e3 for k, v in r.get("latency_s", {}).items()},
        "saved_loaded": saved,
        "save_load_rel_err": r.get("save_load_rel_err"),
        "export_ok": "export_rel_err" in r and r["export_rel_err"] <= 1e-5,
        "export_rel_err": r.get("export_rel_err"),
        "failure": "; ".join(f"{k}: {zoo.failure(e)}" for k, e in failed) or None,
    }


def _fmt(v, spec, none="—"):
    return none if v is None else format(v, spec)


def _markdown(rows, meta):
    lat = lambda row, k: _fmt(row["latency_ms"].get(k), ".2f")  # noqa: E731
    out = [f"# convert() and compact() on real model definitions", "",
           f"`{meta['command']}` on {meta['date']}: {meta['machine']}; {meta['versions']}; "
           f"{meta['threads']} CPU thread(s), latencies the median of {meta['runs']} interleaved runs "
           f"(dense / gated / compacted) after two warm-up calls, on a machine shared with other jobs. "
           f"Wall time {meta['wall_s']:.0f} s. torchvision is PyPI's CUDA build installed with `--no-deps` as in "
           f".ci/run (step 2b): its C++ ops do not load with the CPU torch; the models here use none.", "",
           "Each model (tests/_model_zoo.py: random init, BatchNorm statistics and affine parameters randomised, eval "
           "mode) is converted with `l0k.convert(model)` (defaults: input gates on linear layers, output-channel gates "
           "on convolutions, unit gates on routed MoE experts; tied weights, and layers never called while their weights are read (Swin's attention), are not gated), a random 40% of every gate vector is closed "
           "(`log_alpha` -10, the rest +10), and `l0k.compact(model, example_inputs)` is checked against the gated "
           "eval model (exact: ||a - b|| <= 1e-5 ||b||, float32). Kept params: the compacted model's parameters "
           "over the dense model's. Inputs: token ids 2 x 12 (vocab 128), images 1 x 3 x 64 x 64 (ViTs: 32 x 32, "
           "MaxViT: 224 x 224). tests/compact/test_models_coverage.py asserts the same per model (xfail, strict, where a "
           "step fails today).", ""]
    n = len(rows)
    ok = [r for r in rows if r["compact_ok"] and r["compact_exact"]]
    removed = [r for r in ok if r["removed_pct"] and r["removed_pct"] > 0]
    out += [f"**{len(ok)} of {n}** models compact and match the gated model exactly; "
            f"{len(removed)} of them lose parameters (median kept "
            f"{sorted(r['kept'] for r in removed)[len(removed) // 2]:.1%} among those); "
            f"{sum(r['export_ok'] for r in rows)} export with `torch.export.export`; "
            f"{sum(r['saved_loaded'] == 'yes' for r in rows)} round-trip through `save_compact`/`load_compact` "
            f"into a freshly built model of the class; "
            f"{sum(bool(r.get('same_class')) for r in rows)} come back as their own class; "
            f"{n - len(ok)} fail in compact.", ""]
    out += ["| model | convert ok (gated layers) | compact exact (rel err) | result | kept params | removed | "
            "compact s | latency ms dense | gated | compacted | saved/loaded | export | failure |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        kept = (f"{r['params_compact']:,} / {r['params_dense']:,} ({r['kept']:.1%})" if r["kept"] is not None
                else "—")
        out.append(
            f"| {r['model']} | {'yes' if r['convert_ok'] else 'no'} ({_fmt(r['gated_layers'], 'd')}) "
            f"| {('yes' if r['compact_exact'] else 'NO') + ' (' + format(r['rel_err'], '.1e') + ')' if r['rel_err'] is not None else '—'} "
            f"| {r['result'] or '—'} | {kept} | {_fmt(r['removed_pct'], '.1f')}{'%' if r['removed_pct'] is not None else ''} "
            f"| {_fmt(r['compact_s'], '.2f')} | {lat(r, 'dense')} | {lat(r, 'gated')} | {lat(r, 'compact')} "
            f"| {r['saved_loaded'] or '—'} | {'yes' if r['export_ok'] else '—' if r['export_rel_err'] is None else 'NO'} "
            f"| {(r['failure'] or '').replace('|', '/')} |")
    out += ["", "Notes:", "",
            "* The MoE models' experts (3-D parameters, unit gates) keep, per layer, the most units any expert keeps, "
            "rounded up to 8 (compact packs each expert's open units first); 40% closed per-feature gates close no "
            "whole attention head, so the transformers models lose FFN units and the inputs of layers only.",
            "* RegNet keeps 99.9%: its 3x3 convolutions are grouped (16 channels a group) and a group goes only "
            "whole, which 40% random closed channels almost never make; its other channels sit on residual adds.",
            "* Latencies are of tiny models at tiny inputs on a shared machine: they show that the compacted models "
            "run, not speed-ups to expect from trained sparsity."]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="timed forwards per model and variant (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", action="append", choices=list(zoo.ZOO))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "models_coverage"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    rows = []
    for name in a.model or list(zoo.ZOO):
        why = zoo.available(name)
        if why:
            print(f"{name:20s} skipped: {why}", flush=True)
            continue
        t = time.perf_counter()
        row = _row(zoo.run(name, latency_runs=a.runs))
        rows.append(row)
        print(f"{name:20s} {time.perf_counter() - t:6.1f} s  kept {_fmt(row['kept'], '.3f')}  "
              f"rel err {_fmt(row['rel_err'], '.1e')}  {row['failure'] or ''}", flush=True)
    meta = {
        "command": "python bench/models_coverage.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                         if (argv if argv is not None else sys.argv[1:]) else ""),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{_cpu()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
                   f"Python {platform.python_version()}",
        "versions": f"{_commit()}, torch {torch.__version__}, transformers {_version('transformers')}, "
                    f"torchvision {_version('torchvision')}",
        "threads": torch.get_num_threads(), "runs": a.runs, "wall_s": time.perf_counter() - start,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "models": rows}, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(_markdown(rows, meta))
    print(f"wrote {a.out}.md and .json")


if __name__ == "__main__":
    main()
