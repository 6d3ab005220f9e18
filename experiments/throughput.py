"""Decode throughput of cross-layer KV sharing on the llama_tiny shape.

Runs ``kvshare bench`` (its flags, ``kvshare_jax/commands/bench.py``, and the same
``kvshare_jax/bench.py`` code) with this experiment's defaults: configs/llama_tiny.py,
``standard`` + the nine presets at l=4, batch 1 and 32, and a memory budget small enough
that the KV cache decides the max batch. When
``--baseline`` names a JSON written by ``experiments/hf_generate_baseline.py``, the
report adds the speedup over HF ``generate`` at equal batch sizes.

    python experiments/throughput.py
    python experiments/throughput.py --memory-budget 2GiB --name throughput_cpu_2gib
"""

from __future__ import annotations

import json
import os
import sys

DEFAULTS = dict(
    batch_sizes="1,32",
    memory_budget="256MiB",
    name="throughput_cpu",
    baseline="experiments/results/throughput_hf_baseline.json",
)


def main(argv: list[str]) -> int:
    import jax

    from kvshare_jax import bench, bench_report
    from kvshare_jax.commands import parse_with_overrides
    from kvshare_jax.commands.bench import arg_parser, spec_from_args

    p = arg_parser("experiments/throughput.py", config="configs/llama_tiny.py")
    p.add_argument("--baseline", help="HF baseline JSON (hf_generate_baseline.py)")
    p.set_defaults(**DEFAULTS)
    args, overrides = parse_with_overrides(argv, p)
    results = bench.run_suite(spec_from_args(args, overrides), progress=not args.quiet)
    if args.baseline and os.path.exists(args.baseline):
        with open(args.baseline, encoding="utf-8") as f:
            baseline = json.load(f)
        meta = baseline["meta"]
        name = f"HF transformers {meta['transformers']} (torch {meta['torch']}) generate"
        results["baseline"] = {"name": name, **baseline}
    paths = bench_report.write_reports(results, args.out_dir, args.name)
    print(bench_report.markdown(results))
    for row in results["rows"]:
        if row["layout"] == "standard":
            for run in row["runs"]:
                print(
                    f"standard, batch {run['batch']}: decode step {run['decode_step_s'] * 1e3:.2f}"
                    f" ms vs roofline {run['roofline_step_s'] * 1e3:.2f} ms = "
                    f"{run['roofline_fraction']:.0%} of the memory-bandwidth roofline"
                )
    print(f"device {jax.devices()[0].device_kind}; wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
