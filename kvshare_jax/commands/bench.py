"""``kvshare bench``: decode throughput, prefill latency and memory of several layouts.

    kvshare bench --config configs/llama_tiny.py --batch-sizes 1,32 --memory-budget 2GiB

Layouts default to ``standard`` plus the nine presets at ``--kv-layers`` (default L/2).
Writes ``<out-dir>/<name>.json``, ``.md`` (tables) and ``.png`` (plot) and prints the
tables. Method: ``kvshare_jax/bench.py``.
"""

from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING

from kvshare_jax.commands import (
    ArgParser,
    add_prefill_flags,
    error,
    parse_with_overrides,
    prefill_from_flags,
)
from kvshare_jax.config import check_output_dir

if TYPE_CHECKING:
    from kvshare_jax.bench import BenchSpec

PROG = "kvshare bench"


def arg_parser(prog: str = PROG, config: str | None = None) -> ArgParser:
    """The flags of ``kvshare bench`` (``experiments/throughput.py`` reuses them with a
    default ``config``)."""
    p = ArgParser(prog=prog, description="generation benchmark per layout")
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
    add_prefill_flags(p)
    p.add_argument("--out-dir", default="experiments/results", help="where reports go")
    p.add_argument("--name", help="report file name (default throughput_<platform>)")
    p.add_argument(
        "--topology",
        help="compile only, for one device of this TPU slice (e.g. v5e:1x1): the max-batch "
        "column from the TPU compiler's memory account (budget: the chip's HBM)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --topology: keep the layouts already in the report of the same search "
        "(it is rewritten after each layout) and search only the others",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def spec_from_args(args: argparse.Namespace, overrides: tuple[str, ...]) -> BenchSpec:
    """The :class:`~kvshare_jax.bench.BenchSpec` the flags of :func:`arg_parser` describe."""
    from kvshare_jax.bench import BenchSpec, default_lengths, parse_bytes
    from kvshare_jax.config import load_config, model_config_from
    from kvshare_jax.layout import preset_specs

    for flag in ("kv_layers", "prompt_len", "gen_len", "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    batch_sizes = [b.strip() for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or not all(b.isdigit() and int(b) >= 1 for b in batch_sizes):
        raise ValueError(f"--batch-sizes needs positive integers, got {args.batch_sizes!r}")
    cfg = model_config_from(load_config(args.config, overrides))
    kv_layers = args.kv_layers or max(1, cfg.num_layers // 2)
    layouts = args.layouts.split(",") if args.layouts else preset_specs(kv_layers)
    prompt_len, gen_len = default_lengths("tpu" if args.topology else None)
    return BenchSpec(
        base=cfg,
        layouts=[s.strip() for s in layouts if s.strip()],
        batch_sizes=[int(b) for b in batch_sizes],
        prompt_len=args.prompt_len or prompt_len,
        gen_len=args.gen_len or gen_len,
        memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None,
        warmup=args.warmup,
        repeats=args.repeats,
        prefill_settings=prefill_from_flags(args),
    )


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def run(argv: list[str]) -> int:
    import jax

    from kvshare_jax import bench, bench_report

    try:
        args, overrides = parse_with_overrides(argv, arg_parser())
        check_output_dir(args.out_dir, "--out-dir")  # before the benchmark runs
        spec = spec_from_args(args, overrides)
        name = args.name or (
            f"max_batch_{args.topology.replace(':', '_')}"
            if args.topology
            else f"throughput_{jax.default_backend()}"
        )
        if args.topology:
            done = _earlier_rows(args, spec, name) if args.resume else []
            write = functools.partial(_write, args.out_dir, name)  # each layout as found
            results = bench.compile_suite(
                spec, args.topology, progress=not args.quiet, done=done, on_row=write
            )
        else:
            if args.resume:
                raise ValueError("--resume needs --topology (a compile-only search)")
            results = bench.run_suite(spec, progress=not args.quiet)
    except (ValueError, OSError) as e:
        return _error(e)
    paths = bench_report.write_reports(results, args.out_dir, name)
    print(bench_report.markdown(results))
    print("wrote " + ", ".join(paths.values()))
    return 0


def _write(out_dir: str, name: str, results: dict) -> None:
    from kvshare_jax import bench_report

    bench_report.write_reports(results, out_dir, name)


def _earlier_rows(args, spec, name: str) -> list[dict]:
    """The rows of ``<out-dir>/<name>.json`` when it holds a search of the same model,
    lengths, budget and topology (else a one-line error: --resume would mix runs)."""
    import json

    from etils import epath

    from kvshare_jax import bench, paths

    path = paths.join(args.out_dir, f"{name}.json")
    if not epath.Path(path).exists():
        return []
    old = paths.read_json(path)
    meta = json.loads(json.dumps(bench.compile_meta(spec, args.topology)))  # as stored
    keys = ("model", "dtype", "param_dtype", "prompt_len", "gen_len", "memory_budget", "topology")
    differ = [k for k in keys if old.get("meta", {}).get(k) != meta[k]]
    if differ:
        raise ValueError(f"--resume: {path} is another search (differs in {', '.join(differ)})")
    return old["rows"]
