"""How fast XLA multiplies the decode step's matrices on this machine (fp32).

A decode step of the llama_tiny shape at batch ``M`` is a chain of ``[M, 512] x [512, N]``
products (N = 512 for q/k/v/o, 1376 for gate/up, 32000 for the LM head; 1376 -> 512 for
down). This probe times each shape inside one jitted ``lax.scan`` (no Python dispatch
between products), best of ``--repeats`` after a warm-up, and prints GFLOP/s and the
weight-read bandwidth, so a decode-throughput target can be checked against what the
matmuls alone allow::

    python experiments/gemm_probe.py --batch-sizes 1,8,32,128
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from kvshare_jax.probes import best_time

SHAPES = {"q/k/v/o": (512, 512), "gate/up": (512, 1376), "down": (1376, 512), "head": (512, 32000)}


def time_product(m: int, k: int, n: int, reps: int, repeats: int) -> float:
    """Seconds per ``[m,k] x [k,n]`` product, ``reps`` chained products per call."""
    x = jnp.ones((m, k), jnp.float32)
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.01

    @jax.jit
    def chain(x, w):
        def body(acc, _):
            y = acc @ w  # [m, n]; all of it is used, so no part of the product is dropped
            return acc + y.sum() * 1e-9, None  # a dependency between products

        return jax.lax.scan(body, x, None, length=reps)[0]

    return best_time(lambda: chain(x, w), warmup=1, repeats=repeats) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--reps", type=int, default=20, help="products per timed call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="experiments/results/gemm_probe_cpu.json")
    args = p.parse_args()
    rows = []
    for m in (int(b) for b in args.batch_sizes.split(",")):
        for name, (k, n) in SHAPES.items():
            s = time_product(m, k, n, args.reps, args.repeats)
            row = {"batch": m, "shape": name, "k": k, "n": n, "us": s * 1e6}
            row["gflop_s"] = 2 * m * k * n / s / 1e9
            row["weight_gb_s"] = 4 * k * n / s / 1e9
            rows.append(row)
            print(
                f"M={m:4d} {name:8s} [{k}x{n}]: {row['us']:8.1f} us  {row['gflop_s']:6.1f} "
                f"GFLOP/s  {row['weight_gb_s']:5.1f} GB/s of weights",
                flush=True,
            )
    meta = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()}
    meta["jax"] = jax.__version__
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
