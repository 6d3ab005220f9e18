"""Benchmark the Pallas flash-attention kernel against jax.nn.dot_product_attention and
the XLA reference (causal, GQA), forward and forward+backward.

    python experiments/attention_bench.py                 # GPU/TPU: seq 2k/8k, h 64/128
    JAX_PLATFORMS=cpu python experiments/attention_bench.py --small   # interpret-mode smoke

Reports the median time, TFLOP/s and each baseline's time divided by the kernel's
(> 1: the kernel is faster). FLOPs: forward ``4 * b * n * t * s * h`` (two matmuls),
halved for the causal mask; forward+backward counts 3.5x the forward (the backward
recomputes the scores: 5 matmuls). Writes
``experiments/results/attention_bench_<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from kvshare_jax.attention import xla_attention
from kvshare_jax.kernels import pallas_attention
from kvshare_jax.masks import Mask
from kvshare_jax.tables import markdown_table

IMPLS = ("pallas", "jax_nn", "xla_ref")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--small",
        action="store_true",
        help="quick smoke run: seq 128, 4/2 heads, head dim 32, 2 iterations",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.small:
        args.seqs, args.head_dims, args.heads, args.kv_heads = [128], [32], 4, 2
        args.warmup, args.iters = 1, 2
    return args


def attention_fn(impl: str, args: argparse.Namespace) -> Callable:
    """``f(q, k, v) -> out`` with a causal mask for ``impl``."""
    if impl == "jax_nn":
        return functools.partial(jax.nn.dot_product_attention, is_causal=True)

    def with_positions(q, k, v):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        mask = Mask(pos, pos)
        if impl == "xla_ref":
            return xla_attention(q, k, v, mask)
        return pallas_attention(q, k, v, mask, block_q=args.block_q, block_k=args.block_k)

    return with_positions


def timed(f: Callable, inputs: tuple, warmup: int, iters: int) -> tuple[float, float, object]:
    """(compile+first-run seconds, median milliseconds, last output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*inputs))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(f(*inputs))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(f(*inputs))
        times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times), out


def bench_config(args: argparse.Namespace, seq: int, h: int) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    b, n, kh = args.batch, args.heads, args.kv_heads
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, seq, n, h), dtype)
    k = jax.random.normal(ks[1], (b, seq, kh, h), dtype)
    v = jax.random.normal(ks[2], (b, seq, kh, h), dtype)
    ct = jax.random.normal(ks[3], (b, seq, n, h), dtype)
    fwd_flops = 4 * b * n * seq * seq * h / 2  # causal: half the score matrix
    rows, outputs = [], {}
    for impl in args.impls:
        fn = attention_fn(impl, args)
        programs = {
            "fwd": (jax.jit(fn), (q, k, v), fwd_flops),
            "fwd_bwd": (
                jax.jit(lambda q, k, v, ct, fn=fn: jax.vjp(fn, q, k, v)[1](ct)),
                (q, k, v, ct),
                3.5 * fwd_flops,
            ),
        }
        for mode, (f, inputs, flops) in programs.items():
            row = dict(impl=impl, mode=mode, seq=seq, head_dim=h)
            try:
                first, ms, out = timed(f, inputs, args.warmup, args.iters)
            except Exception as e:  # e.g. out of memory for the reference at 8k
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            else:
                row.update(ms=ms, tflops=flops / ms / 1e9, first_call_s=first)
                if mode == "fwd":
                    outputs[impl] = np.asarray(out, np.float32)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if "pallas" in outputs:
        for row in rows:
            if row["mode"] == "fwd" and row["impl"] in outputs:
                diff = np.abs(outputs[row["impl"]] - outputs["pallas"]).max()
                row["max_abs_diff_vs_pallas"] = float(diff)
    ms = {(r["impl"], r["mode"]): r.get("ms") for r in rows}
    for row in rows:
        kernel_ms = ms.get(("pallas", row["mode"]))
        if kernel_ms and row.get("ms"):
            row["ratio_vs_pallas"] = row["ms"] / kernel_ms
    return rows


def environment(args: argparse.Namespace) -> dict:
    dev = jax.devices()[0]
    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        backend=jax.default_backend(),
        device=dev.device_kind,
        device_count=jax.device_count(),
        pallas_interpret=jax.default_backend() == "cpu",
        dtype=args.dtype,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        block_q=args.block_q,
        block_k=args.block_k,
        warmup=args.warmup,
        iters=args.iters,
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        numpy=np.__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
    )


def to_markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# Attention benchmark ({env['backend']}: {env['device']})",
        "",
        ", ".join(f"{k}={v}" for k, v in env.items()),
        "",
        "Causal, GQA; TFLOP/s counts half the score matrix; ratio = time / Pallas time.",
        "",
    ]
    header = ("seq", "head dim", "mode", "impl", "ms", "TFLOP/s", "ratio vs pallas", "max diff")
    table = []
    for r in rows:
        if "error" in r:
            cells = [r["error"], "", "", ""]
        else:
            cells = [
                f"{r['ms']:.3f}",
                f"{r['tflops']:.4g}",
                f"{r.get('ratio_vs_pallas', float('nan')):.2f}",
                f"{r['max_abs_diff_vs_pallas']:.2e}" if "max_abs_diff_vs_pallas" in r else "",
            ]
        table.append([r["seq"], r["head_dim"], r["mode"], r["impl"], *cells])
    return "\n".join([*lines, *markdown_table(header, table)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(args)
    print(json.dumps(env), flush=True)
    rows = [row for seq in args.seqs for h in args.head_dims for row in bench_config(args, seq, h)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"attention_bench_{env['backend']}"
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, results=rows), indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(env, rows))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
