"""Rendering of generation-benchmark results (``kvshare_jax/bench.py`` measures):
markdown tables, bar charts and the JSON/markdown/PNG files.

A new benchmark column is one edit where ``bench.py`` measures it and one here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvshare_jax import paths, plotting
from kvshare_jax.tables import markdown_table

MIB = 2**20


def _model_text(meta: dict[str, Any]) -> str:
    m = meta["model"]
    return (
        f"dtype {meta['dtype']}; model L={m['num_layers']} d={m['d_model']} heads "
        f"{m['num_heads']}/{m['num_kv_heads']} d_ff={m['d_ff']} vocab {m['vocab_size']}; "
        f"attention {m.get('attention_impl', 'auto')}; "
        f"prompt {meta['prompt_len']} + {meta['gen_len']} new tokens"
    )


def markdown_compiled(results: dict[str, Any]) -> str:
    """The table of :func:`compile_suite`: max batch per layout on one TPU device."""
    meta, rows = results["meta"], results["rows"]
    chip = meta["chip"]
    std = next((r for r in rows if r["layout"] == "standard" and r["max_batch"]), None)
    lines = [
        f"Compiled, not run: one {meta['device_kind']} of {meta['topology']} (TPU compiler's "
        f"memory account, jax {meta['jax_version']}), budget "
        f"{meta['memory_budget'] / 2**30:.2f} GiB; {_model_text(meta)}. Roofline: the HBM "
        f"traffic of the compiled decode step at the max batch / "
        f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s.",
        "",
    ]
    header = (
        "layout", "KV layers", "cache MiB/seq", "max batch", "vs standard", "program GiB",
        "e2e tok/s", "roofline decode ms/step", "roofline tok/s", "step cache copies",
    )  # fmt: skip
    table = []
    for r in rows:
        cells = [r["layout"], str(r["kv_layers"]), f"{r['cache_bytes_per_seq'] / MIB:.2f}"]
        cells.append(str(r["max_batch"]))
        cells.append(f"{r['max_batch'] / std['max_batch']:.2f}x" if std else "-")
        if r["max_batch"]:
            roof = r.get("max_batch_roofline")  # (none where XLA gives no cost: GPUs)
            cells += [f"{r['max_batch_memory']['total_bytes'] / 2**30:.2f}", "not measured"]
            if roof:
                cells += [f"{roof['decode_step_s'] * 1e3:.2f}", f"{roof['decode_tok_s']:.0f}"]
                cells.append(str(roof.get("cache_copies", "-")))
            else:
                cells += ["-", "-", "-"]
        else:
            cells += ["-", "not measured", "-", "-", "-"]
        table.append(cells)
    return "\n".join([*lines, *markdown_table(header, table)]) + "\n"


def _bandwidth(meta: dict[str, Any]) -> str:
    """The roofline's bandwidth; results before the read bandwidth used a copy's."""
    if "read_bandwidth_bytes_s" in meta:
        return f"read bandwidth {meta['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s"
    return f"copy bandwidth {meta['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s"


def markdown(results: dict[str, Any]) -> str:
    """Tables of the results (throughput per batch size; the memory-budget search)."""
    meta, rows = results["meta"], results["rows"]
    if meta.get("measured") is False:
        return markdown_compiled(results)
    m = meta["model"]
    lines = [
        f"Device: {meta['device_kind']} ({meta['platform']}, {meta['cpu_count']} CPUs), "
        f"jax {meta['jax_version']}, dtype {meta['dtype']}, KV cache "
        f"{m.get('kv_cache_dtype') or meta['dtype']}; model L={m['num_layers']} "
        f"d={m['d_model']} heads {m['num_heads']}/{m['num_kv_heads']} d_ff={m['d_ff']} "
        f"vocab {m['vocab_size']}; prompt {meta['prompt_len']} + {meta['gen_len']} new "
        f"tokens; {_bandwidth(meta)}; "
        f"best of {meta['repeats']} after {meta['warmup']} warm-up.",
        "",
    ]
    batches = meta["batch_sizes"]
    head = ["layout", "mapping", "KV layers", "cache MiB/seq"]
    for b in batches:
        head += [f"b={b} e2e tok/s", f"b={b} decode tok/s", f"b={b} prefill ms"]
        head += [f"b={b} roofline", f"b={b} program MiB"]
    table = []
    for r in rows:
        cells = [r["layout"], f"`{r['mapping']}`", str(r["kv_layers"])]
        cells.append(f"{r['cache_bytes_per_seq'] / MIB:.2f}")
        for run in r["runs"]:
            cells += [f"{run['e2e_tok_s']:.0f}", f"{run['decode_tok_s']:.0f}"]
            cells += [f"{run['prefill_s'] * 1e3:.1f}", f"{run['roofline_fraction']:.0%}"]
            cells.append(f"{run['memory']['total_bytes'] / MIB:.0f}")
        table.append(cells)
    lines += markdown_table(head, table)
    if meta["memory_budget"] is not None:
        std = next((r for r in rows if r["layout"] == "standard" and r["max_batch"]), None)
        std_tok = std["max_batch_run"]["e2e_tok_s"] if std else None
        lines += [
            "",
            f"Memory budget {meta['memory_budget'] / MIB:.0f} MiB (compiled program: params "
            "+ cache + work space):",
            "",
        ]
        header = (
            "layout", "KV layers", "max batch", "program MiB", "e2e tok/s", "decode tok/s",
            "vs standard",
        )  # fmt: skip
        table = []
        for r in rows:
            if not r["max_batch"]:
                table.append([r["layout"], r["kv_layers"], 0, "-", "-", "-", "-"])
                continue
            run, mem = r["max_batch_run"], r["max_batch_memory"]
            ratio = f"{run['e2e_tok_s'] / std_tok:.2f}x" if std_tok else "-"
            table.append(
                [r["layout"], r["kv_layers"], r["max_batch"], f"{mem['total_bytes'] / MIB:.0f}",
                 f"{run['e2e_tok_s']:.0f}", f"{run['decode_tok_s']:.0f}", ratio]
            )  # fmt: skip
        lines += markdown_table(header, table)
    if "baseline" in results:
        base = results["baseline"]
        lines += [
            "",
            f"Against {base['name']} (same shape, prompt and batch; tokens/s include prefill):",
            "",
        ]
        std = next(r for r in rows if r["layout"] == "standard")
        ours = {run["batch"]: run["e2e_tok_s"] for run in std["runs"]}
        table = [
            [run["batch"], f"{run['e2e_tok_s']:.0f}", f"{ours[run['batch']]:.0f}",
             f"{ours[run['batch']] / run['e2e_tok_s']:.2f}x"]
            for run in base["runs"]
            if run["batch"] in ours
        ]  # fmt: skip
        lines += markdown_table(["batch", "baseline tok/s", "standard tok/s", "speedup"], table)
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    """Bar charts: e2e throughput per layout for each batch size (and at max batch); for
    compile-only results, max batch and roofline throughput. A value not measured (the
    baseline at max batch, a layout that fits no batch) is marked "n/a", not drawn as 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results["meta"].get("measured") is False:
        return _plot_compiled(results, path, plt)
    rows, meta = results["rows"], results["meta"]
    names = [f"{r['layout']}\n({r['kv_layers']} KV)" for r in rows]
    series: dict[str, list[float | None]] = {f"b={run['batch']}": [] for run in rows[0]["runs"]}
    for r in rows:
        for run in r["runs"]:
            series[f"b={run['batch']}"].append(run["e2e_tok_s"])
    if meta["memory_budget"] is not None:
        series[f"max batch @ {meta['memory_budget'] / MIB:.0f} MiB"] = [
            r["max_batch_run"]["e2e_tok_s"] if r["max_batch"] else None for r in rows
        ]
    series = {f"generation throughput, {k}": v for k, v in series.items()}
    colors = ["tab:blue"] * len(rows)
    if "baseline" in results:  # one more bar per panel: the baseline at that batch size
        base = {run["batch"]: run["e2e_tok_s"] for run in results["baseline"]["runs"]}
        names.append(results["baseline"]["name"].replace(" (", "\n("))
        colors.append("tab:orange")
        for label, values in series.items():
            batch = label.rsplit("b=", 1)[-1]
            values.append(base.get(int(batch)) if batch.isdigit() else None)
    title = (
        f"{meta['device_kind']} {meta['dtype']}, prompt {meta['prompt_len']} + "
        f"{meta['gen_len']} new tokens"
    )
    width = max(8, len(names))
    _bars(plt, names, series, title, path, width=width, color=colors, ylabel="tokens/s")


def _plot_compiled(results: dict[str, Any], path: str, plt: Any) -> None:
    rows, meta = results["rows"], results["meta"]
    names = [f"{r['layout']}\n({r['kv_layers']} KV)" for r in rows]
    series: dict[str, list[float | None]] = {
        "max batch (n/a: no batch fits the budget)": [r["max_batch"] or None for r in rows],
        "roofline tokens/s at max batch": [
            (r.get("max_batch_roofline") or {}).get("decode_tok_s") if r["max_batch"] else None
            for r in rows
        ],
    }
    title = (
        f"{meta['device_kind']} ({meta['topology']}), {meta['memory_budget'] / 2**30:.1f} GiB, "
        f"prompt {meta['prompt_len']} + {meta['gen_len']} (compiled, not run)"
    )
    width = max(8, 0.9 * len(rows))
    ylabels = ["sequences", "tokens/s (roofline)"]
    _bars(plt, names, series, title, path, width=width, color="tab:green", ylabel=ylabels)


def _bars(
    plt: Any,
    names: list[str],
    series: dict[str, list[float | None]],
    title: str,
    path: str,
    *,
    width: float,
    color: str | list[str] = "tab:blue",
    ylabel: str | list[str] = "",
) -> None:
    """One bar panel per series (one bar per layout; "n/a" for a missing value), saved
    to ``path``; ``ylabel`` is one label for all panels or one per panel."""
    fig, axes = plt.subplots(len(series), 1, figsize=(width, 3 * len(series)))
    ylabels = [ylabel] * len(series) if isinstance(ylabel, str) else ylabel
    for ax, (label, values), yl in zip(np.atleast_1d(axes), series.items(), ylabels, strict=True):
        plotting.bars(ax, range(len(names)), values, color=color)
        ax.set_ylabel(yl)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.save_figure(fig, path)
    plt.close(fig)


def write_reports(results: dict[str, Any], out_dir: str, name: str) -> dict[str, str]:
    """Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``out_dir`` (local
    or ``gs://``)."""
    out = {ext: paths.join(out_dir, f"{name}.{ext}") for ext in ("json", "md", "png")}
    paths.write_json(out["json"], results)
    paths.write_text(out["md"], markdown(results))
    plot(results, out["png"])
    return out
