"""``kvshare compile``: will it fit? Compile a config for a TPU slice on any host.

    kvshare compile --config configs/tinyllama_1b.py --topology v5e:4x4 [--config.a.b=v]
    kvshare compile --config configs/llama_110m.py --topology h100:1   # needs [cuda]

AOT-compiles the sharded train step (and, on one device, the generation program and one
decode step at the generate batch and cache length) with the real TPU compiler and
prints, per device: argument, temporary and total bytes against the chip's HBM, whether
it fits, FLOPs, bytes accessed and a roofline step time; for the decode step also its
cache-sized copies and its bytes over the in-place floor. When
the train step does not fit, it searches (by compiling) for the smallest change that
does and prints the overrides. Exit status 0 when everything fits, 1 when not, 2 on bad
input. Method: ``kvshare_jax/aot.py``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from kvshare_jax import paths
from kvshare_jax.commands import ArgParser, error, parse_with_overrides
from kvshare_jax.config import check_output_dir
from kvshare_jax.tables import markdown_table

PROG = "kvshare compile"
_ALIASES = {
    "train": "train_step",
    "train_step": "train_step",
    "generate": "generate",
    "decode": "decode_step",
    "decode_step": "decode_step",
}


def parser() -> ArgParser:
    p = ArgParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file (overrides: --config.a.b=v)")
    p.add_argument(
        "--topology", required=True, help="TPU slice (v5e:4x4, v4:2x2x1) or GPUs (h100:1, h200:8)"
    )
    p.add_argument(
        "--programs", default="train,generate,decode", help="train, generate and/or decode"
    )
    p.add_argument("--gen-batch", type=int, default=1, help="batch of the generate program")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 512 or max_len/4)")
    p.add_argument("--gen-len", type=int, help="new tokens (default: fill the context)")
    p.add_argument("--no-search", action="store_true", help="do not search for a fit")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


_error = functools.partial(error, PROG)


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def render(report: dict[str, Any]) -> str:
    """The human-readable table of a :func:`compile_config` report."""
    lines = [
        f"{report['topology']}: {report['num_devices']} x {report['device_kind']} on "
        f"{report['num_hosts']} host(s); HBM {_gib(report['chip']['hbm_bytes'])} GiB per device",
        "",
    ]
    header = (
        "program", "fits", "arguments GiB", "temporaries GiB", "total GiB", "TFLOP", "HBM GB",
        "XLA GB accessed", "roofline s", "MFU ceiling",
    )  # fmt: skip
    rows, table = list(report["programs"].items()), []
    if "suggestion" in report and report["suggestion"]["overrides"]:
        rows.append(("train_step (suggested)", report["suggestion"]["train_step"]))
    for name, p in rows:
        b = p["bytes_per_device"]
        flops = p.get("executed_flops_per_device") or p["flops_per_device"]
        cells = [
            name,
            "yes" if p["fits"] else "NO",
            _gib(b["arguments"]),
            _gib(b["temporaries"]),
            _gib(b["total"]),
            "-" if flops is None else f"{flops / 1e12:.2f}",
            *(
                "-" if p.get(key) is None else f"{p[key] / 1e9:.1f}"
                for key in ("hbm_traffic_per_device", "bytes_accessed_per_device")
            ),
            "-" if p["roofline_step_s"] is None else f"{p['roofline_step_s']:.3g}",
            f"{p['mfu_ceiling']:.0%}" if "mfu_ceiling" in p else "-",
        ]
        table.append(cells)
    lines += markdown_table(header, table)
    step = report["programs"].get("decode_step")
    if step and "cache_copies" in step:
        floor = (
            f", HBM traffic {step['hbm_traffic_ratio_to_floor']:.2f}x the in-place floor "
            f"({step['hbm_traffic_floor_per_device'] / 1e9:.2f} GB; XLA's bytes accessed "
            f"{step['ratio_to_floor']:.2f}x its count of the floor)"
            if step.get("ratio_to_floor")
            else " (no cost analysis for this device: no floor)"
        )
        lines += [
            "",
            f"decode_step ({step['cache_layout']} cache, {_gib(step['cache_bytes_per_device'])} "
            f"GiB): {step['cache_copies']} cache copies, {step['rematerialized']} "
            f"rematerialized instructions, temporaries "
            f"{step['temporaries_over_cache']:.1%} of the cache{floor}",
        ]
    gen = report["programs"].get("generate")
    if gen and "temporaries_over_cache" in gen:
        lines.append(
            f"generate: {gen['cache_copies']} cache copies, temporaries "
            f"{gen['temporaries_over_cache']:.1%} of the cache"
        )
    train = report["programs"].get("train_step")
    if train:
        mesh = " ".join(f"{k}={v}" for k, v in train["mesh"].items())
        lines += ["", f"train_step mesh {mesh}; settings {train['settings']}"]
        if "flops_ratio" in train:
            lines.append(
                f"train_step FLOPs compiled / counted from the model (loop bodies once): "
                f"{train['flops_ratio']:.2f}"
            )
    if "suggestion" in report:
        s = report["suggestion"]
        lines.append(
            f"suggestion: {s['overrides']}" if s["overrides"] else f"suggestion: {s['note']}"
        )
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    from kvshare_jax import aot
    from kvshare_jax.config import load_config

    try:
        args, overrides = parse_with_overrides(argv, parser())
        names = [n.strip() for n in args.programs.split(",") if n.strip()]
        bad = [n for n in names if n not in _ALIASES]
        if bad or not names:
            raise ValueError(
                f"--programs takes train, generate and/or decode, got {args.programs!r}"
            )
        if args.json and os.path.isdir(args.json):
            raise ValueError(f"--json {args.json} is a directory")
        if args.json:
            check_output_dir(os.path.dirname(os.path.abspath(args.json)), "--json's folder")
        config = load_config(args.config, overrides)
        report = aot.compile_config(
            config,
            args.topology,
            tuple(dict.fromkeys(_ALIASES[n] for n in names)),
            gen_batch=args.gen_batch,
            prompt_len=args.prompt_len,
            gen_len=args.gen_len,
            search=not args.no_search,
            progress=not args.quiet,
        )
    except (ValueError, KeyError, OSError) as e:
        return _error(e)
    print(render(report))
    if args.json:
        paths.write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0 if all(p["fits"] for p in report["programs"].values()) else 1
