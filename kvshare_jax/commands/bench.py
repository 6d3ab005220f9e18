"""``kvshare bench``: decode throughput, prefill latency and memory of several layouts.

    kvshare bench --config configs/llama_tiny.py --batch-sizes 1,32 --memory-budget 2GiB

Layouts default to ``standard`` plus the nine presets at ``--kv-layers`` (default L/2).
Writes ``<out-dir>/<name>.json``, ``.md`` (tables) and ``.png`` (plot) and prints the
tables. Method: ``kvshare_jax/bench.py``.
"""

from __future__ import annotations

import functools

from kvshare_jax.commands import error
from kvshare_jax.config import check_output_dir, parse_with_overrides

PROG = "kvshare bench"


_error = functools.partial(error, PROG)  # one-line message, exit status 2 by default


def run(argv: list[str]) -> int:
    import jax

    from kvshare_jax import bench, bench_report

    try:
        args, overrides = parse_with_overrides(argv, bench.arg_parser(PROG))
        check_output_dir(args.out_dir, "--out-dir")  # before the benchmark runs
        spec = bench.spec_from_args(args, overrides)
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
    paths = bench_report.write_reports(results, args.out_dir, args.name or default_name)
    print(bench_report.markdown(results))
    print("wrote " + ", ".join(paths.values()))
    return 0
