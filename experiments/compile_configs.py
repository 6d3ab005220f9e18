"""Every shipped config compiled for the TPU slice its docstring names (no TPU needed).

    JAX_PLATFORMS=cpu python experiments/compile_configs.py [--impls auto,xla] [--only NAME]

For each ``configs/**/*.py`` (and, for study configs, their most memory-hungry layout:
pizza-top at the smallest l) it runs ``kvshare compile`` (train step + generate, with a
fit search when the step does not fit) and writes
``experiments/results/compile_configs.{json,md}``: per config and attention
implementation, the slice, GiB per device, whether it fits, the roofline step time and
the MFU ceiling. The README's "Will it fit?" table comes from here.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from importlib.metadata import version as _version
from pathlib import Path

import jax

from kvshare_jax.aot import compile_config
from kvshare_jax.config import load_config
from kvshare_jax.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def target_slice(path: Path) -> str:
    """The ``Target slice: <topology>`` line of a config file's docstring."""
    m = re.search(r"Target slice: (\S+)", path.read_text())
    if m is None:
        raise ValueError(f"{path} names no 'Target slice:'")
    return m.group(1).rstrip(".")


def cases(only: str | None) -> list[tuple[Path, str]]:
    """(config file, layout override or '') pairs."""
    out = []
    for path in sorted(ROOT.glob("configs/**/*.py")):
        name = str(path.relative_to(ROOT / "configs"))
        if only and only not in name:
            continue
        out.append((path, ""))
        if path.parent.name == "study":
            kv = min(load_config(str(path)).study.kv_layers)
            out.append((path, f"pizza-top:{kv}"))
    return out


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        f"TPU compiler (libtpu {_version('libtpu')}) on a CPU host, jax {jax.__version__}; "
        "per device; roofline = "
        "max(executed FLOPs / peak, bytes / HBM bandwidth); MFU ceiling = model FLOPs / "
        "(roofline x peak).",
        "",
    ]
    header = ("config", "layout", "attention", "slice", "train GiB / HBM", "fits",
              "roofline step s", "MFU ceiling", "generate GiB", "suggested overrides")  # fmt: skip
    table = []
    for r in rows:
        t, g = r["report"]["programs"]["train_step"], r["report"]["programs"]["generate"]
        hbm = t["hbm_bytes_per_device"] / 2**30
        total = t["bytes_per_device"]["total"]
        sug = r["report"].get("suggestion")
        roof = t["roofline_step_s"]
        cells = [
            r["config"],
            r["layout"] or "config",
            r["impl"],
            r["slice"],
            f"{_gib(total)} / {hbm:.2f}",
            "yes" if t["fits"] else "NO",
            "-" if roof is None else f"{roof:.3g}",
            f"{t['mfu_ceiling']:.0%}" if "mfu_ceiling" in t else "-",
            _gib(g["bytes_per_device"]["total"]) + ("" if g["fits"] else " (NO)"),
            (sug or {}).get("overrides") or "-",
        ]
        table.append(cells)
    return "\n".join([*lines, *markdown_table(header, table)]) + "\n"


def _key(row: dict) -> tuple[str, str, str]:
    return row["config"], row["layout"], row["impl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="auto,xla", help="attention implementations")
    p.add_argument("--only", help="only configs whose path contains this (other rows kept)")
    p.add_argument("--name", default="compile_configs", help="result file name")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    # Rows are merged into the existing file by (config, layout, impl) and written after
    # every compile, so ``--only`` refreshes some rows and an interrupted run keeps the rest.
    rows = {_key(r): r for r in json.loads(out.read_text())} if out.exists() else {}
    for path, layout in cases(args.only):
        for impl in args.impls.split(","):
            overrides = [f"model.attention_impl={impl}"]
            if layout:
                overrides.append(f"model.layout={layout}")
            config = load_config(str(path), tuple(overrides))
            start = time.perf_counter()
            report = compile_config(config, target_slice(path))
            row = {
                "config": str(path.relative_to(ROOT)),
                "layout": layout,
                "impl": impl,
                "slice": target_slice(path),
                "compile_s": time.perf_counter() - start,
                "report": report,
            }
            rows[_key(row)] = row
            print(markdown([row]).splitlines()[-1], flush=True)
            ordered = [rows[k] for k in sorted(rows)]
            out.write_text(json.dumps(ordered, indent=2) + "\n")
            out.with_suffix(".md").write_text(markdown(ordered))
    print(f"wrote {out} and .md")


if __name__ == "__main__":
    main()
