"""Training throughput of ``standard`` vs the nine KV-sharing presets at one model size.

    JAX_PLATFORMS=cpu python experiments/train_throughput.py          # 8 layers, l=4, d=256
    python experiments/train_throughput.py --steps 20 --batch 16      # on an accelerator

Times full train steps (forward, backward, AdamW update; random tokens, so the input
pipeline is excluded): ``--warmup`` untimed steps per layout, then ``--steps`` rounds
that time one step of every layout in turn (each ending in ``block_until_ready``; the
median is reported), so load from other processes affects all layouts alike. Reports
tokens/s and the time relative to ``standard`` next to the analytical FLOP model:

* a layer costs its matmuls (Q, O, MLP, and K/V only for KV layers) plus attention
  (scores and weighted sum over all ``T`` keys, as the XLA path computes them);
  forward = F, forward + backward = 3F;
* a layer inside an iterated (cyclic) block runs ``m`` forward-only passes and ``b``
  passes with gradient: ``(m + 3b) F`` instead of ``3F``, i.e. ``(m + 3b) / 3`` times;
* the embedding (a gather, no FLOPs) and the LM head run once.

A second model also drops what XLA eliminates as dead code: passes that only produce
the KVs of the block's upward targets need no layer above the highest such target.

Writes ``experiments/results/train_throughput_<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import flax
import jax
import jaxlib
import ml_collections
import numpy as np
import optax

from kvshare_jax import sharding, train
from kvshare_jax.config import default_config, model_config_from
from kvshare_jax.layout import preset_specs
from kvshare_jax.model import ModelConfig
from kvshare_jax.tables import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="L")
    p.add_argument("--kv-layers", type=int, default=4, help="l of the nine presets")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--forward-passes", type=int, default=7, help="m")
    p.add_argument("--backward-passes", type=int, default=2, help="b")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p.parse_args(argv)


def layouts(kv_layers: int) -> list[str]:
    return preset_specs(kv_layers)


def run_config(args: argparse.Namespace, layout: str) -> ml_collections.ConfigDict:
    config = default_config()
    m, t = config.model, config.train
    m.num_layers, m.layout, m.d_model = args.layers, layout, args.d_model
    m.num_heads = m.num_kv_heads = args.heads
    m.d_ff, m.max_len = args.d_ff, args.seq
    m.forward_passes, m.backward_passes = args.forward_passes, args.backward_passes
    t.seq_len, t.batch_size = args.seq, args.batch
    return config


def layer_flops(cfg: ModelConfig, i: int, seq: int) -> float:
    """Forward FLOPs per token of layer ``i`` (matmuls + attention over ``seq`` keys)."""
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.hd
    matmuls = 2 * d * n * h * 2 + 2 * d * cfg.d_ff * 3  # q, o; gate, up, down
    if cfg.layout.is_kv_layer(i):
        matmuls += 2 * d * k * h * 2  # k, v
    return matmuls + 2 * seq * n * h * 2  # scores and weighted sum


def train_flops_per_token(cfg: ModelConfig, seq: int, dead_code: bool = False) -> float:
    """Forward + backward FLOPs per token: the LM head plus every layer, a layer of a
    cyclic block costing ``(m + 3b) F`` instead of ``3F``.

    With ``dead_code``, passes whose only use is the KVs of the block's upward targets
    (the ``m`` no-grad passes and the first ``b - 1`` grad passes) skip what XLA
    eliminates: the layers above the highest upward target ``u`` and all of ``u`` but
    its K/V projection.
    """
    m, b = cfg.forward_passes, cfg.backward_passes
    d, k, h = cfg.d_model, cfg.num_kv_heads, cfg.hd
    total = 3 * 2 * d * cfg.vocab_size  # LM head
    iterated = set()
    for block in cfg.layout.cyclic_blocks:
        full = sum(layer_flops(cfg, i, seq) for i in block.layers)
        u = max(cfg.layout.targets[i] for i in block.layers if cfg.layout.is_upward(i))
        kv_only = sum(layer_flops(cfg, i, seq) for i in range(block.start, u))
        kv_only += 2 * d * k * h * 2
        total += (m + 3 * (b - 1)) * kv_only + 3 * full if dead_code else (m + 3 * b) * full
        iterated.update(block.layers)
    return total + sum(
        3 * layer_flops(cfg, i, seq) for i in range(cfg.num_layers) if i not in iterated
    )


def prepare(args: argparse.Namespace, layout: str) -> dict[str, object]:
    """Compiles ``layout``'s train step and runs the warm-up steps."""
    config = run_config(args, layout)
    cfg = model_config_from(config, vocab_size=args.vocab)
    tx = train.make_optimizer(config.train)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    _, shardings = train.state_shardings(cfg, tx, mesh, rules)
    state = train.init_state(cfg, tx, shardings, seed=0)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1))
    batch = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": np.ones((args.batch, args.seq), np.float32),
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    step = train.compile_train_step(cfg, tx, 1, mesh, rules, shardings)
    start = time.perf_counter()
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    blocks = ", ".join(f"[{b.start}..{b.end}]" for b in cfg.layout.cyclic_blocks) or "-"
    return {
        "layout": layout,
        "mapping": str(cfg.layout),
        "cyclic_blocks": blocks,
        "flops_per_token": train_flops_per_token(cfg, args.seq),
        "flops_per_token_dead_code": train_flops_per_token(cfg, args.seq, dead_code=True),
        "warmup_s": time.perf_counter() - start,  # includes compilation
        "step": step,
        "state": state,
        "batch": batch,
        "times": [],
    }


def time_one_step(run: dict[str, object]) -> None:
    start = time.perf_counter()
    run["state"], metrics = run["step"](run["state"], run["batch"])
    jax.block_until_ready((run["state"], metrics))
    run["times"].append(time.perf_counter() - start)


def environment() -> dict[str, object]:
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def markdown(env: dict, args: argparse.Namespace, rows: list[dict]) -> str:
    lines = [
        f"# Train-step throughput ({env['backend']}: {env['device']})",
        "",
        ", ".join(f"{k}={v}" for k, v in env.items()),
        "",
        f"L={args.layers}, l={args.kv_layers}, d={args.d_model}, heads={args.heads}, "
        f"d_ff={args.d_ff}, vocab={args.vocab}, seq={args.seq}, batch={args.batch}, "
        f"m={args.forward_passes}, b={args.backward_passes}, fp32, warmup={args.warmup}, "
        f"median of {args.steps} timed steps per layout, interleaved across layouts.",
        "",
        "time ratio = step time / standard's. FLOP ratio = the cost model's (a layer of a "
        "cyclic block costs (m + 3b)/3 layers); DCE = the same model without what XLA "
        "eliminates from passes that only feed KVs (see `train_flops_per_token`). "
        "excess = time ratio / FLOP ratio - 1.",
        "",
    ]
    header = ("layout", "mapping", "cyclic blocks", "step ms", "tokens/s", "time ratio",
              "FLOP ratio", "excess", "FLOP ratio (DCE)", "excess (DCE)")  # fmt: skip
    table = [
        [r["layout"], r["mapping"], r["cyclic_blocks"], f"{r['step_ms']:.0f}",
         f"{r['tokens_per_s']:.0f}", f"{r['time_ratio']:.2f}", f"{r['flop_ratio']:.2f}",
         f"{100 * r['excess']:+.0f}%", f"{r['flop_ratio_dead_code']:.2f}",
         f"{100 * r['excess_dead_code']:+.0f}%"]
        for r in rows
    ]  # fmt: skip
    return "\n".join([*lines, *markdown_table(header, table)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment()
    runs = [prepare(args, layout) for layout in layouts(args.kv_layers)]
    for _ in range(args.steps):  # interleaved, so load changes hit every layout alike
        for run in runs:
            time_one_step(run)
    rows = []
    for run in runs:
        seconds = statistics.median(run.pop("times"))
        for key in ("step", "state", "batch"):
            del run[key]
        rows.append(
            {**run, "step_ms": 1000 * seconds, "tokens_per_s": args.batch * args.seq / seconds}
        )
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["step_ms"] / base["step_ms"]
        r["flop_ratio"] = r["flops_per_token"] / base["flops_per_token"]
        r["flop_ratio_dead_code"] = r["flops_per_token_dead_code"] / base["flops_per_token"]
        r["excess"] = r["time_ratio"] / r["flop_ratio"] - 1
        r["excess_dead_code"] = r["time_ratio"] / r["flop_ratio_dead_code"] - 1
    env["load_average_at_end"] = os.getloadavg()[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"train_throughput_{env['backend']}"
    payload = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out_dir / f"{name}.json").write_text(json.dumps({**payload, "rows": rows}, indent=2))
    (args.out_dir / f"{name}.md").write_text(markdown(env, args, rows))
    print(markdown(env, args, rows))


if __name__ == "__main__":
    main()
