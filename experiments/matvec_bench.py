"""The CPU matvec kernel (kvshare_jax/kernels/cpu_matvec.py) against XLA's dot, fp32.

Two measurements in one process, variants interleaved, best of ``--repeats`` after a
warm-up, every timing ended with ``jax.block_until_ready``:

1. **Weight chain**: the products of one llama_tiny decode step (8 layers of q/k/v/o
   512x512, gate/up 512x1376, down 1376x512, then the 512x32000 LM head; 167 MB of
   distinct weights, far beyond the last-level cache), each input depending on the
   previous output, at ``M`` rows: the kernel (``matvec``) vs ``x @ w``; GB/s of
   weights read.
2. **Decode** at each of ``--batches``: ``decode.generate_fn`` on a random
   llama_tiny-shaped model, 16-token prompts + 128 greedy tokens, ``matvec_impl="auto"``
   vs ``"xla"``; tok/s and whether the tokens are identical.

The streaming read bandwidth (`kvshare_jax.probes.read_bandwidth`: an XLA sum, an XLA
row-wise product and the kernel over 1 GiB) is measured in the same run for reference::

    python experiments/matvec_bench.py            # -> experiments/results/matvec_bench_cpu.*

On an AVX-512 host, ``--isa avx2`` caps both sides at AVX2: XLA with
``--xla_cpu_max_isa=AVX2`` and the kernel built with ``KVSHARE_CPU_ISA=avx2`` (set before
JAX starts, so this flag re-executes the script with them).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kvshare_jax import decode, paths
from kvshare_jax.kernels import cpu_matvec
from kvshare_jax.model import ModelConfig, init_params
from kvshare_jax.probes import best_time, cpu_model, read_bandwidth
from kvshare_jax.tables import markdown_table

LAYER = [(512, 512)] * 4 + [(512, 1376)] * 2 + [(1376, 512)]
SHAPE = dict(num_layers=8, vocab_size=32000, d_model=512, num_heads=8, num_kv_heads=8, d_ff=1376)


def chain_weights(seed: int = 0) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    shapes = LAYER * 8 + [(512, 32000)]
    return [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes]


def chain(product):
    """``x [M, 1376]`` through every weight; each input is cut from the last output."""

    def run(x, weights):
        for w in weights:
            y = product(x[:, : w.shape[0]], w)
            x = jnp.tile(y, (1, -(-1376 // y.shape[1])))[:, :1376] * 0.5
        return x

    return jax.jit(run)


def weight_chain(rows: list[int], repeats: int) -> list[dict]:
    weights = chain_weights()
    nbytes = sum(w.nbytes for w in weights)
    programs = {"kernel": chain(cpu_matvec.matvec), "xla": chain(lambda a, b: a @ b)}
    out = []
    for m in rows:
        x = jnp.ones((m, 1376), jnp.float32)
        best = {name: float("inf") for name in programs}
        for _ in range(3):  # interleaved rounds
            for name, f in programs.items():
                t = best_time(lambda f=f, x=x: f(x, weights), warmup=1, repeats=repeats)
                best[name] = min(best[name], t)
        out.append(
            {
                "rows": m,
                "bytes": nbytes,
                "ms": {k: v * 1e3 for k, v in best.items()},
                "gb_s": {k: nbytes / v / 1e9 for k, v in best.items()},
                "speedup": best["xla"] / best["kernel"],
            }
        )
        print(f"M={m}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in best.items()), flush=True)
    return out


def decode_speed(batch: int, repeats: int, prompt_len: int = 16, gen_len: int = 128) -> dict:
    params = init_params(ModelConfig.create("standard", **SHAPE), jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, 32000, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    runs, tokens, best = {}, {}, {}
    for impl in ("auto", "xla"):
        cfg = ModelConfig.create("standard", matvec_impl=impl, **SHAPE)
        fn = decode.generate_fn(cfg, max_new_tokens=gen_len)

        def run(cfg=cfg, fn=fn):
            cache = decode.init_cache(cfg, batch, prompt_len + gen_len - 1)
            return fn(params, cache, prompts, lengths, jax.random.key(0))[0].tokens

        runs[impl], tokens[impl], best[impl] = run, np.asarray(run()), float("inf")
    for _ in range(3):
        for impl, run in runs.items():
            best[impl] = min(best[impl], best_time(run, warmup=0, repeats=repeats))
    tok_s = {k: batch * gen_len / v for k, v in best.items()}
    print(f"batch-{batch} decode tok/s: " + ", ".join(f"{k} {v:.0f}" for k, v in tok_s.items()))
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "tok_s": tok_s,
        "speedup": tok_s["auto"] / tok_s["xla"],
        "same_tokens": bool((tokens["auto"] == tokens["xla"]).all()),
    }


def markdown(res: dict) -> str:
    lines = [
        f"# CPU matvec kernel vs XLA dot (fp32), {res['machine']}, {res['isa']}",
        "",
        "Streaming read of 1 GiB in this run (GB/s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res["read_gb_s"].items())
        + ".",
        "",
        "Weight chain of one llama_tiny decode step "
        f"({res['chain'][0]['bytes'] / 1e6:.0f} MB of distinct weights, dependent):",
        "",
    ]
    header = ("rows M", "XLA dot ms", "kernel ms", "XLA GB/s", "kernel GB/s", "kernel speedup")
    lines += markdown_table(
        header,
        (
            [r["rows"], f"{r['ms']['xla']:.3f}", f"{r['ms']['kernel']:.3f}",
             f"{r['gb_s']['xla']:.1f}", f"{r['gb_s']['kernel']:.1f}", f"{r['speedup']:.2f}x"]
            for r in res["chain"]
        ),
    )  # fmt: skip
    d = res["decode"][0]
    lines += [
        "",
        f"Decode, random llama_tiny shape, {d['prompt_len']}-token prompts + {d['gen_len']} "
        "greedy tokens (prefill included), tok/s:",
        "",
    ]
    lines += markdown_table(
        ("batch", "matvec_impl='auto'", "'xla'", "auto vs xla", "same tokens"),
        (
            [d["batch"], f"{d['tok_s']['auto']:.0f}", f"{d['tok_s']['xla']:.0f}",
             f"{d['speedup']:.2f}x", "yes" if d["same_tokens"] else "NO"]
            for d in res["decode"]
        ),
    )  # fmt: skip
    lines += [
        "",
        f"The model routes products of up to max_rows() = {cpu_matvec.max_rows()} rows to the "
        f"kernel. ISA: {res['isa']}; 1-minute load average {res['load'][0]:.2f} before, "
        f"{res['load'][1]:.2f} after.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--isa", choices=("native", "avx2"), default="native")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out-dir", default="experiments/results")
    p.add_argument("--name", default=f"matvec_bench_{jax.default_backend()}")
    args = p.parse_args(argv)
    if args.isa == "avx2" and os.environ.get("KVSHARE_CPU_ISA") != "avx2":
        env = dict(os.environ, KVSHARE_CPU_ISA="avx2")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip()
        os.execvpe(sys.executable, [sys.executable, __file__, *argv], env)
    if not cpu_matvec.available():
        print("the CPU matvec kernel is not available (see the warning above)", file=sys.stderr)
        return 1
    res = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "isa": "AVX2 (XLA --xla_cpu_max_isa=AVX2, kernel -mno-avx512f)"
        if args.isa == "avx2"
        else "native",
    }
    load = os.getloadavg()[0]
    res["chain"] = weight_chain([int(r) for r in args.rows.split(",")], args.repeats)
    res["decode"] = [
        decode_speed(int(b), max(3, args.repeats // 3)) for b in args.batches.split(",")
    ]
    res["read_gb_s"] = {k: v / 1e9 for k, v in read_bandwidth().items()}
    res["load"] = [load, os.getloadavg()[0]]
    base = paths.join(args.out_dir, args.name)
    paths.write_json(f"{base}.json", res)
    paths.write_text(f"{base}.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
