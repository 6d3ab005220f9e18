"""The decode step against its in-place floor on TPU chips, from the TPU compiler (no TPU).

    JAX_PLATFORMS=cpu python experiments/decode_floor.py [--configs configs/llama_110m.py]
        [--topologies v5e:1x1,v6e:1x1] [--impls xla,pallas] [--layouts all|standard,...]

For each accelerator model config, standard and the nine presets at l = L/2, each
attention implementation and chip, it compiles one decode step at batch 1 and at the
layout's max batch for that implementation (`max_batches`; else ``--max-batch``) with
``aot.decode_step_program`` and writes
``experiments/results/decode_floor_tpu.{json,md}``: HBM traffic over the in-place
floor's (`kvshare_jax.hbm_traffic`), XLA's bytes accessed over its count of the floor,
cache-sized copies, temporaries over the cache bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from importlib.metadata import version as _version
from pathlib import Path

import jax

from kvshare_jax import aot, paths
from kvshare_jax.config import load_config, model_config_from
from kvshare_jax.layout import PRESETS, STANDARD, from_spec
from kvshare_jax.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def max_batch_report(config: str, impl: str) -> Path:
    """The committed compile-only max-batch search of ``config`` on a v5e chip for an
    attention implementation: ``max_batch_<model>_v5e.json`` is the default program's
    (``auto``: Pallas on TPU), ``max_batch_<model>_v5e_xla.json`` the XLA reference's,
    whose f32 scores need memory the kernel never materializes (a smaller max batch)."""
    suffix = "" if impl in ("auto", "pallas") else f"_{impl}"
    return RESULTS / f"max_batch_{Path(config).stem}_v5e{suffix}.json"


def max_batches(config: str, impl: str) -> dict[str, int]:
    """Layout -> max batch of `max_batch_report`, if it exists (checked to be that
    implementation's search)."""
    path = max_batch_report(config, impl)
    if not path.exists():
        return {}
    results = json.loads(path.read_text())
    searched = results["meta"]["model"]["attention_impl"]
    if searched not in ({"auto", "pallas"} if impl in ("auto", "pallas") else {impl}):
        raise ValueError(f"{path} is a search with attention_impl={searched}, not {impl}")
    return {r["layout"]: int(r["max_batch"]) for r in results["rows"]}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"One decode step compiled by the TPU compiler (libtpu {meta['libtpu']}, jax "
        f"{meta['jax']}) on a CPU host, per chip: HBM traffic (read from the optimized HLO: "
        "`kvshare_jax/hbm_traffic.py`) over the in-place floor's (every weight product + "
        "each KV layer's token write and one attention read of its target's slot per "
        "layer); XLA's bytes accessed over its count of the same floor (it also counts "
        "weights staged in VMEM, two or three times); copies of cache data; temporaries "
        "over the cache bytes; *remat*: instructions the compiler rematerialized "
        "(recomputed from their operands, e.g. a score fusion reading a K slot twice) to "
        "fit its memory limit.",
        "",
    ]
    header = ("config", "layout", "attention", "chip", "batch", "cache MiB", "HBM GiB",
              "floor GiB", "ratio", "XLA bytes ratio", "cache copies", "remat",
              "temporaries / cache")  # fmt: skip
    table = []
    for r in rows:
        cells = [r["config"], r["layout"], r["impl"], r["topology"], str(r["batch"])]
        cells += [
            f"{r['cache_bytes'] / 2**20:.1f}",
            f"{r['hbm_traffic'] / 2**30:.3f}",
            f"{r['hbm_traffic_floor'] / 2**30:.3f}",
            f"{r['hbm_traffic_ratio_to_floor']:.3f}",
            f"{r['ratio_to_floor']:.3f}",
            str(r["cache_copies"]),
            str(r.get("rematerialized", "-")),  # (not recorded in older cells)
            f"{r['temporaries_over_cache']:.2%}",
        ]
        table.append(cells)
    lines += markdown_table(header, table)
    worst = max(rows, key=lambda r: r["hbm_traffic_ratio_to_floor"])
    xla = max(rows, key=lambda r: r["ratio_to_floor"])
    lines += [
        "",
        f"{len(rows)} cells; worst HBM traffic ratio {worst['hbm_traffic_ratio_to_floor']:.3f} "
        f"({worst['config']} {worst['layout']} {worst['impl']} {worst['topology']} batch "
        f"{worst['batch']}); worst XLA bytes ratio {xla['ratio_to_floor']:.3f} "
        f"({xla['config']} {xla['layout']} {xla['impl']} {xla['topology']} batch "
        f"{xla['batch']}); "
        f"cache copies in all cells: {sum(r['cache_copies'] for r in rows)}; largest "
        f"temporaries / cache: {max(r['temporaries_over_cache'] for r in rows):.2%}.",
    ]
    return "\n".join(lines) + "\n"


def merge(old: list[dict], new: list[dict], only_max: bool) -> list[dict]:
    """``old`` report rows with the cells of ``new`` replaced (their batch-1 rows too,
    unless ``only_max``), in the report's order."""
    cell = ("config", "layout", "impl", "topology")
    rerun = {tuple(r[f] for f in cell) for r in new}

    def stale(r: dict) -> bool:
        return tuple(r[f] for f in cell) in rerun and (r["batch"] != 1 or not only_max)

    rows = [r for r in old if not stale(r)] + new
    fields = ("config", "layout", "topology", "impl")  # the loop order of main
    first = {f: list(dict.fromkeys(r[f] for r in rows)) for f in fields}
    return sorted(rows, key=lambda r: (*(first[f].index(r[f]) for f in fields), r["batch"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="configs/llama_110m.py,configs/tinyllama_1b.py")
    p.add_argument("--topologies", default="v5e:1x1,v6e:1x1")
    p.add_argument("--impls", default="xla,pallas")
    p.add_argument("--layouts", default="all", help="'all' = standard + the nine presets")
    p.add_argument("--max-batch", type=int, default=64, help="when no max-batch result exists")
    p.add_argument("--out", default=str(RESULTS / "decode_floor_tpu"))
    p.add_argument("--only-max", action="store_true", help="skip the batch-1 cells")
    p.add_argument(
        "--merge", action="store_true", help="replace only the re-run cells of --out's report"
    )
    args = p.parse_args()
    rows = []
    for path in args.configs.split(","):
        base = model_config_from(load_config(path))
        study = load_config(str(ROOT / "configs" / "study" / Path(path).name)).study
        prompt, gen = int(study.prompt_len), int(study.gen_len)  # the max-batch lengths
        half = base.num_layers // 2
        specs = [STANDARD, *(f"{p}:{half}" for p in PRESETS)]
        specs = specs if args.layouts == "all" else args.layouts.split(",")
        best = {impl: max_batches(path, impl) for impl in args.impls.split(",")}
        for spec in specs:
            cfg = dataclasses.replace(base, layout=from_spec(spec, base.num_layers))
            for topology in args.topologies.split(","):
                device = aot.topology(topology)[0]
                for impl in args.impls.split(","):
                    found = best[impl].get(spec, args.max_batch)
                    batches = {found} | (set() if args.only_max else {1})
                    for batch in sorted(batches):
                        start = time.time()
                        one = dataclasses.replace(cfg, attention_impl=impl)
                        out = aot.decode_step_program(one, device, batch, prompt + gen - 1)
                        row = {
                            "config": path,
                            "layout": spec,
                            "impl": impl,
                            "topology": topology,
                            "batch": batch,
                            "cache_len": prompt + gen - 1,
                            "cache_bytes": out["cache_bytes_per_device"],
                            "bytes_accessed": out["bytes_accessed_per_device"],
                            "floor_bytes": out["floor_bytes_per_device"],
                            "ratio_to_floor": out["ratio_to_floor"],
                            "hbm_traffic": out["hbm_traffic_per_device"],
                            "hbm_traffic_floor": out["hbm_traffic_floor_per_device"],
                            "hbm_traffic_ratio_to_floor": out["hbm_traffic_ratio_to_floor"],
                            "cache_copies": out["cache_copies"],
                            "rematerialized": out["rematerialized"],
                            "temporaries_over_cache": out["temporaries_over_cache"],
                        }
                        rows.append(row)
                        print(
                            f"{path} {spec} {impl} {topology} b={batch}: "
                            f"traffic {row['hbm_traffic_ratio_to_floor']:.3f} (XLA bytes "
                            f"{row['ratio_to_floor']:.3f}) copies {row['cache_copies']} "
                            f"remat {row['rematerialized']} "
                            f"temps {row['temporaries_over_cache']:.2%} "
                            f"({time.time() - start:.0f} s)",
                            flush=True,
                        )
                jax.clear_caches()
    if args.merge and Path(f"{args.out}.json").exists():
        rows = merge(json.loads(Path(f"{args.out}.json").read_text())["rows"], rows, args.only_max)
    meta = {"libtpu": _version("libtpu"), "jax": jax.__version__}
    paths.write_json(f"{args.out}.json", {"meta": meta, "rows": rows})
    paths.write_text(f"{args.out}.md", markdown(rows, meta))
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
