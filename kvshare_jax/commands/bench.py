"""``kvshare bench``: decode throughput, prefill latency and memory of several layouts.

    kvshare bench --config configs/llama_tiny.py --batch-sizes 1,32 --memory-budget 2GiB

Layouts default to ``standard`` plus the nine presets at ``--kv-layers`` (default L/2).
Writes ``<out-dir>/<name>.json``, ``.md`` (tables) and ``.png`` (plot) and prints the
tables. Method: ``kvshare_jax/bench.py``.
"""

from __future__ import annotations

import argparse
import functools
import os

from kvshare_jax.commands import error
from kvshare_jax.commands import parse_with_overrides as parse

PROG = "kvshare bench"


def parser(prog: str = PROG, config: str | None = None) -> argparse.ArgumentParser:
    """The command's flags; ``experiments/throughput.py`` reuses them with a default
    ``config``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        required=config is None,
        default=config,
        help="config file (overrides: --config.a.b=v)",
    )
    p.add_argument("--layouts", help="comma-separated layout specs (default: see above)")
    p.add_argument("--kv-layers", type=int, help="l of the nine default presets (default L/2)")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 16 CPU / 512 acc.)")
    p.add_argument("--gen-len", type=int, help="new tokens (default 128 CPU / 1024 acc.)")
    p.add_argument("--memory-budget", help="find the max batch under this size, e.g. 2GiB")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per program")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    p.add_argument("--out-dir", default="experiments/results", help="where reports go")
    p.add_argument("--name", help="report file name (default throughput_<platform>)")
    p.add_argument(
        "--topology",
        help="compile only, for one device of this TPU slice (e.g. v5e:1x1): the max-batch "
        "column from the TPU compiler's memory account (budget: the chip's HBM)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def spec_from_args(args: argparse.Namespace, overrides: tuple[str, ...]):
    """The :class:`kvshare_jax.bench.BenchSpec` the flags describe."""
    from kvshare_jax import bench
    from kvshare_jax.config import load_config, model_config_from
    from kvshare_jax.layout import preset_specs

    cfg = model_config_from(load_config(args.config, overrides))
    kv_layers = args.kv_layers or max(1, cfg.num_layers // 2)
    layouts = args.layouts.split(",") if args.layouts else preset_specs(kv_layers)
    prompt_len, gen_len = bench.default_lengths("tpu" if args.topology else None)
    return bench.BenchSpec(
        base=cfg,
        layouts=[s.strip() for s in layouts if s.strip()],
        batch_sizes=[int(b) for b in args.batch_sizes.split(",") if b.strip()],
        prompt_len=args.prompt_len or prompt_len,
        gen_len=args.gen_len or gen_len,
        memory_budget=bench.parse_bytes(args.memory_budget) if args.memory_budget else None,
        warmup=args.warmup,
        repeats=args.repeats,
    )


def run(argv: list[str]) -> int:
    import jax

    from kvshare_jax import bench

    try:
        args, overrides = parse(argv, parser())
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise ValueError(f"--out-dir {args.out_dir} is a file")
        spec = spec_from_args(args, overrides)
        if args.topology:
            results = bench.compile_suite(spec, args.topology, progress=not args.quiet)
        else:
            results = bench.run_suite(spec, progress=not args.quiet)
    except (ValueError, OSError) as e:
        return _error(e)
    default_name = (
        f"max_batch_{args.topology.replace(':', '_')}"
        if args.topology
        else (f"throughput_{jax.default_backend()}")
    )
    paths = bench.write_reports(results, args.out_dir, args.name or default_name)
    print(bench.markdown(results))
    print("wrote " + ", ".join(paths.values()))
    return 0
