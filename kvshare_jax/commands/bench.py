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
