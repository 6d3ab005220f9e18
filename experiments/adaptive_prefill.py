"""Adaptive prefill of cyclic blocks: latency, passes run and accuracy.

For each upward preset at l = L/2 (those with a cyclic block) and each prompt length,
times the prefill (batch 1, best of ``--repeats`` after a warm-up, compiled ahead) with
today's fixed ``m + b = 9`` passes, ``"exact"`` (until the upward KVs stop changing, at
most t passes) and ``"auto"`` at each ``--tols``, against ``standard``'s prefill; reports
the passes each ran and the max abs difference of all prompt logits from the exact
result (t fixed passes, which are exact by docs/design.md §4)::

    python experiments/adaptive_prefill.py                      # llama_tiny shape
    python experiments/adaptive_prefill.py --lengths 16,128 --shape d_model=256,d_ff=688

Writes ``<out-dir>/<name>.{json,md}`` (default ``experiments/results/adaptive_prefill_cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvshare_jax.decode import init_cache, prefill
from kvshare_jax.model import ModelConfig, init_params
from kvshare_jax.tables import markdown_table

PRESETS = ("pizza-top", "pizza-middle", "sandwich-top", "sandwich-middle", "lasagna-top")
SHAPE = dict(num_layers=8, d_model=512, num_heads=8, num_kv_heads=8, d_ff=1376, vocab_size=32000)


def timed_prefill(cfg, params, tokens, passes, tol: float, repeats: int):
    """(best seconds, logits [b,t,v], passes run) of one prefill setting."""
    b, t = tokens.shape
    lengths = jnp.full((b,), t, jnp.int32)
    fn = jax.jit(
        lambda p, c, x, n: prefill(
            cfg, p, c, x, n, passes=passes, tol=tol, all_logits=True, return_passes=True
        ),
        donate_argnums=1,
    )
    cache_shape = jax.eval_shape(lambda: init_cache(cfg, b, t))
    fn = fn.lower(params, cache_shape, tokens, lengths).compile()
    best, out = float("inf"), None
    for i in range(repeats + 1):
        cache = init_cache(cfg, b, t)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        out = jax.block_until_ready(fn(params, cache, tokens, lengths))
        if i:
            best = min(best, time.perf_counter() - start)
    logits, _, ran = out
    return best, np.asarray(logits), int(ran)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="16,128,512")
    p.add_argument("--tols", default="1e-3,1e-5", help="tolerances of auto")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--shape", default="", help="k=v overrides of the llama_tiny shape")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out-dir", default="experiments/results")
    p.add_argument("--name", default="adaptive_prefill_cpu")
    args = p.parse_args(argv)
    shape = dict(SHAPE)
    for item in filter(None, args.shape.split(",")):
        key, value = item.split("=")
        shape[key] = int(value)
    layers = shape.pop("num_layers")
    tols = [float(x) for x in args.tols.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths)
    rows = []
    for t in lengths:
        tokens = jax.random.randint(jax.random.key(1), (1, t), 0, shape["vocab_size"])
        std_cfg = ModelConfig.create("standard", layers, max_len=max_len, **shape)
        std_params = init_params(std_cfg, jax.random.key(0))
        std_s, _, _ = timed_prefill(std_cfg, std_params, tokens, (7, 2), 0.0, args.repeats)
        for preset in args.presets.split(","):
            spec = f"{preset}:{layers // 2}"
            cfg = ModelConfig.create(spec, layers, max_len=max_len, **shape)
            params = init_params(cfg, jax.random.key(0))
            _, reference, _ = timed_prefill(cfg, params, tokens, (t - 1, 1), 0.0, 0)
            settings = [("fixed 7+2", (7, 2), 0.0), ("exact", "exact", 0.0)]
            settings += [(f"auto {tol:g}", "auto", tol) for tol in tols]
            for label, passes, tol in settings:
                secs, logits, ran = timed_prefill(cfg, params, tokens, passes, tol, args.repeats)
                row = {
                    "layout": spec,
                    "prompt_len": t,
                    "setting": label,
                    "prefill_ms": secs * 1e3,
                    "standard_ms": std_s * 1e3,
                    "vs_standard": secs / std_s,
                    "passes_run": ran,
                    "max_logit_diff": float(np.abs(logits - reference).max()),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {
        "shape": {"num_layers": layers, **shape},
        "batch": 1,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "jax": jax.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    results = {"meta": meta, "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, args.name)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    meta = results["meta"]
    s = meta["shape"]
    lines = [
        f"Prefill of one prompt (batch 1), L={s['num_layers']}, d={s['d_model']}, "
        f"{s['num_heads']}/{s['num_kv_heads']} heads, d_ff {s['d_ff']}, vocab {s['vocab_size']}, "
        f"random init, fp32, CPU ({meta['cpu_count']} cores, load average "
        f"{meta['load_average']:.1f} at the end); best of {meta['repeats']}. `max logit diff`: "
        "max abs difference of all prompt logits from the exact result (t passes).",
        "",
    ]
    header = ("layout", "t", "setting", "prefill ms", "standard ms", "x standard", "passes",
              "max logit diff")  # fmt: skip
    rows = [
        [r["layout"], r["prompt_len"], r["setting"], f"{r['prefill_ms']:.1f}",
         f"{r['standard_ms']:.1f}", f"{r['vs_standard']:.2f}", r["passes_run"],
         f"{r['max_logit_diff']:.2e}"]
        for r in results["rows"]
    ]  # fmt: skip
    return "\n".join([*lines, *markdown_table(header, rows)]) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
