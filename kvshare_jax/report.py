"""Study report: rows with ratios vs standard, Pareto fronts, report.md and the figures.

Every number comes from the cells' ``result.json`` (``kvshare_jax/study.py``); ratios
are taken against the ``standard`` cell, the "which layout" summary is derived from the
Pareto front of (perplexity, throughput) at each number of KV layers ``l``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from kvshare_jax.bench import device_info
from kvshare_jax.layout import STANDARD

FIGURES = {"tradeoff": "throughput_vs_ppl.png", "kv_layers": "kv_layers.png"}
_COLORS = {"pizza": "tab:orange", "sandwich": "tab:green", "lasagna": "tab:blue"}
_MARKERS = {"bottom": "v", "top": "^", "middle": "o"}


# ---------------------------------------------------------------- the cells
@dataclasses.dataclass(frozen=True)
class Cell:
    """One (layout, l) point of the study."""

    layout: str  # 'standard' or a preset name without ':l' ('pizza-top')
    kv_layers: int  # l (L for standard)
    mapping: str  # layer -> target string ('0_1_5_5_5_5')
    same_as: str | None = None  # name of the cell trained for this mapping, if another

    @property
    def name(self) -> str:
        return f"{self.layout}-l{self.kv_layers}"

    @property
    def spec(self) -> str:
        """The ``model.layout`` value of this cell."""
        return STANDARD if self.layout == STANDARD else f"{self.layout}:{self.kv_layers}"

    @property
    def trained(self) -> str:
        """Name of the cell directory holding this cell's run."""
        return self.same_as or self.name


# ---------------------------------------------------------------- the rows
def _row(cell: Cell, result: dict[str, Any], std: dict[str, Any]) -> dict[str, Any]:
    """One table row of ``cell`` (whose measurements are ``result``)."""
    b = result["bench"]
    tok_s = b["max_batch_run"]["e2e_tok_s"] if b["max_batch"] else 0.0
    std_tok_s = std["bench"]["max_batch_run"]["e2e_tok_s"] if std["bench"]["max_batch"] else 0.0
    prefill = b["runs"][0] if b["runs"] else b["max_batch_run"] or {}
    step_s = result["train_step"]["min_s"]
    return {
        "layout": cell.layout,
        "kv_layers": cell.kv_layers,
        "cell": cell.trained,
        "same_as": cell.same_as,
        "mapping": cell.mapping,
        "cache_fraction": result["cache_fraction"],
        "eval_loss": result["train"]["eval_loss"],
        "eval_ppl": result["train"]["eval_ppl"],
        "max_batch": b["max_batch"],
        "tok_s": tok_s,
        "tok_s_ratio": tok_s / std_tok_s if std_tok_s else None,
        "prefill_ms": prefill["prefill_s"] * 1e3 if prefill else None,
        "prefill_batch": prefill.get("batch", b["max_batch"]) if prefill else None,
        "train_step_ms": step_s * 1e3,
        "train_step_ratio": step_s / std["train_step"]["min_s"],
    }


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both perplexity (lower) and throughput (higher),
    by descending throughput."""

    def dominates(q: dict[str, Any], r: dict[str, Any]) -> bool:
        no_worse = q["eval_ppl"] <= r["eval_ppl"] and q["tok_s"] >= r["tok_s"]
        return no_worse and (q["eval_ppl"] < r["eval_ppl"] or q["tok_s"] > r["tok_s"])

    front = [r for r in rows if not any(dominates(q, r) for q in rows)]
    return sorted(front, key=lambda r: (-r["tok_s"], r["eval_ppl"]))


def rows_at(results: dict[str, Any], kv_layers: int) -> list[dict[str, Any]]:
    """The standard row followed by the presets' rows at ``kv_layers``."""
    rows = results["rows"]
    return [rows[0]] + [r for r in rows[1:] if r["kv_layers"] == kv_layers]


def _meta(config: ml_collections.ConfigDict, results: dict[str, dict[str, Any]]) -> dict:
    m, t = config.model, config.train
    return {
        **device_info(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": m.to_dict(),  # every model field
        "vocab_size": config.data.vocab_size,
        "dataset": config.data.dataset,
        "train": {k: t[k] for k in ("seq_len", "batch_size", "num_steps", "eval_steps")},
        "study": config.study.to_dict(),
        "cell_wall_s": sum(r["wall_s"] for r in results.values()),
    }


def build_results(
    config: ml_collections.ConfigDict, cells: Sequence[Cell], results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``{"meta", "rows", "pareto", "cells"}`` from the cells and their measurements
    (``results``, keyed by trained cell name, kept as ``cells``); ``rows[0]`` is standard,
    ``pareto[str(l)]`` the front's layouts."""
    std = results[cells[0].trained]
    out = {
        "meta": _meta(config, results),
        "rows": [_row(c, results[c.trained], std) for c in cells],
    }
    out["pareto"] = {
        str(kv): [r["layout"] for r in pareto_front(rows_at(out, int(kv)))]
        for kv in config.study.kv_layers
    }
    out["cells"] = results
    return out


# ------------------------------------------------------------ the summary
def _names(rows: Sequence[dict[str, Any]]) -> str:
    """Layout names, those sharing a mapping joined by ' = '."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r["mapping"], []).append(r["layout"])
    return ", ".join(" = ".join(g) for g in groups.values())


def _pct(value: float, base: float) -> str:
    return f"{(value / base - 1) * 100:+.1f}%"


def _span(rows: Sequence[dict[str, Any]], key: str, base: float) -> str:
    """``"a-bx"``: the range of ``rows[key] / base``."""
    ratios = [r[key] / base for r in rows] if base else [0.0]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def summary(results: dict[str, Any]) -> list[str]:
    """Markdown bullet lines answering "which layout should I use?" from the numbers."""
    std, lines = results["rows"][0], []
    best_ppl_at = {}
    for kv in results["meta"]["study"]["kv_layers"]:
        rows = rows_at(results, kv)
        shared = rows[1:]
        if not shared:  # a partial report: no cell at this l finished yet
            continue
        best_ppl = min(shared, key=lambda r: r["eval_ppl"])
        fastest = max(shared, key=lambda r: r["tok_s"])
        cheapest = min(shared, key=lambda r: r["train_step_ms"])
        best_ppl_at[kv] = best_ppl

        def tied(key: str, best: dict[str, Any], shared=shared) -> str:
            return _names([r for r in shared if r[key] == best[key]])

        points = "; ".join(
            f"{r['layout']} (ppl {r['eval_ppl']:.2f}, {r['tok_s_ratio'] or 0:.2f}x)"
            for r in pareto_front(rows)
        )
        lines += [
            f"- **l = {kv}** (cache {shared[0]['cache_fraction']:.0%} of standard). "
            f"Pareto front, fastest first: {points}.",
            f"  Lowest perplexity: {tied('eval_ppl', best_ppl)} (ppl "
            f"{best_ppl['eval_ppl']:.2f}, {_pct(best_ppl['eval_ppl'], std['eval_ppl'])} vs "
            f"standard) at {best_ppl['tok_s_ratio'] or 0:.2f}x standard's throughput. "
            f"Highest throughput: {tied('tok_s', fastest)} "
            f"({fastest['tok_s_ratio'] or 0:.2f}x, max batch {fastest['max_batch']} vs "
            f"{std['max_batch']}). Cheapest to train: {tied('train_step_ms', cheapest)} "
            f"({cheapest['train_step_ratio']:.2f}x standard's step time).",
            f"  The {shared[0]['cache_fraction']:.0%} cache fits "
            f"{_span(shared, 'max_batch', std['max_batch'])} standard's max batch; "
            f"throughput at that batch is {_span(shared, 'tok_s', std['tok_s'])} standard's.",
        ]
    kvs = sorted(best_ppl_at, reverse=True)
    if not kvs:
        return lines
    if len(kvs) > 1:
        fronts = [set(results["pareto"][str(kv)]) for kv in kvs]
        everywhere = sorted(set.intersection(*fronts) - {STANDARD})
        lines.append(
            f"- On the Pareto front at every l: {', '.join(everywhere)}."
            if everywhere
            else "- No KV-sharing layout is on the Pareto front at every l."
        )
    lines.append(
        "- Quality first at a given cache size: "
        + "; ".join(f"l = {kv}: {best_ppl_at[kv]['layout']}" for kv in kvs)
        + ". To trade quality for speed, move along that l's Pareto front."
    )
    return lines


# -------------------------------------------------------------- markdown
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(results: dict[str, Any]) -> str:
    """``report.md``: settings, one table per l, the derived summary and the figures."""
    meta = results["meta"]
    m, t, s = meta["model"], meta["train"], meta["study"]
    budget = s["memory_budget"]
    done, total = meta.get("cells_done"), meta.get("cells_total")
    lines = [
        "# Cross-layer KV sharing study",
        "",
        *(
            [f"**Partial report: {done} of {total} cells finished** (rebuilt after each cell).", ""]
            if done is not None and done < total
            else []
        ),
        f"Model L={m['num_layers']} d={m['d_model']} heads {m['num_heads']}/"
        f"{m['num_kv_heads']} d_ff={m['d_ff']} vocab {meta['vocab_size']} ({m['dtype']}; "
        f"cyclic blocks iterate {m['forward_passes']}+{m['backward_passes']} times), trained "
        f"{t['num_steps']} steps of {t['batch_size']}x{t['seq_len']} tokens on "
        f"`{meta['dataset']}`. Device: {meta['device_kind']} ({meta['platform']}, "
        f"{meta['cpu_count']} CPUs), jax {meta['jax_version']}. Cells took "
        f"{meta['cell_wall_s'] / 60:.1f} min in total (each cell's last run); finished "
        f"{meta['time']}.",
        "",
        f"- **val ppl**: exp of the mean token cross-entropy over {t['eval_steps']} "
        "validation batches after the last step.",
        f"- **tok/s @ max batch**: greedy generation of {s['gen_len']} tokens after "
        f"{s['prompt_len']}-token prompts (prefill included) at the largest batch whose "
        f"compiled program (params + KV cache + work space) fits {budget}; best of 3 runs "
        "after a warm-up. **vs standard** divides by standard's tok/s.",
        "- **prefill ms**: the prompt's forward pass (iterated cyclic blocks included) at "
        "the batch in brackets.",
        f"- **train step**: best of {s['train_step_timing_steps']} optimizer steps on a "
        "fixed batch (after a warm-up), relative to standard.",
        "",
    ]
    head = (
        "| layout | mapping | KV layers | cache fraction | val ppl | max batch "
        "| tok/s @ max batch | vs standard | prefill ms | train step ms | train step vs standard |"
    )
    for kv in s["kv_layers"]:
        lines += [f"## l = {kv} KV layers", "", head, "|" + "---|" * 11]
        for r in rows_at(results, kv):
            name = r["layout"] + (f" (= {r['same_as']})" if r["same_as"] else "")
            prefill = _fmt(r["prefill_ms"], ".1f", f" (b={r['prefill_batch']})")
            lines.append(
                f"| {name} | `{r['mapping']}` | {r['kv_layers']} | {r['cache_fraction']:.3f} "
                f"| {r['eval_ppl']:.2f} | {r['max_batch']} | {r['tok_s']:.0f} "
                f"| {_fmt(r['tok_s_ratio'], '.2f', 'x')} | {prefill} | {r['train_step_ms']:.0f} "
                f"| {r['train_step_ratio']:.2f}x |"
            )
        lines.append("")
    lines += ["## Which layout should I use?", "", *summary(results), ""]
    lines += [
        "Derived from this run's numbers (one seed; CPU timings vary with machine load).",
        "",
        f"![throughput vs perplexity]({FIGURES['tradeoff']})",
        "",
        f"![throughput and perplexity vs KV layers]({FIGURES['kv_layers']})",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------- figures
def _style(layout: str) -> dict[str, Any]:
    if layout == STANDARD:
        return {"color": "black", "marker": "*", "markersize": 12}
    part, _, position = layout.partition("-")
    return {"color": _COLORS[part], "marker": _MARKERS[position], "markersize": 8}


def plot_tradeoff(results: dict[str, Any], path: str) -> None:
    """Throughput vs perplexity, one marker per layout, one panel per l (the paper's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kvs = results["meta"]["study"]["kv_layers"]
    fig, axes = plt.subplots(1, len(kvs), figsize=(5.5 * len(kvs), 4.5), squeeze=False)
    for ax, kv in zip(axes[0], kvs, strict=True):
        rows = rows_at(results, kv)
        for r in rows:
            label = r["layout"] + (f" (= {r['same_as']})" if r["same_as"] else "")
            style = _style(r["layout"])
            ax.plot(r["tok_s"], r["eval_ppl"], linestyle="none", label=label, **style)
        front = pareto_front(rows)
        ax.plot([r["tok_s"] for r in front], [r["eval_ppl"] for r in front], "k--", lw=0.8)
        ax.set_title(f"l = {kv} KV layers (cache {rows[-1]['cache_fraction']:.0%})")
        ax.set_xlabel(f"tokens/s at max batch ({results['meta']['study']['memory_budget']})")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_kv_layers(results: dict[str, Any], path: str) -> None:
    """Throughput and perplexity against the number of KV layers, one line per layout;
    every line ends at standard (any preset with ``l = L`` is the standard layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, std = results["rows"], results["rows"][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in (
        (axes[0], "tok_s", "tokens/s at max batch"),
        (axes[1], "eval_ppl", "validation perplexity"),
    ):
        for layout in dict.fromkeys(r["layout"] for r in rows[1:]):
            line = [(r["kv_layers"], r[key]) for r in rows[1:] if r["layout"] == layout]
            line = sorted([*line, (std["kv_layers"], std[key])])
            style = _style(layout)
            ax.plot(*zip(*line, strict=True), label=layout, lw=1, **style)
        ax.plot(std["kv_layers"], std[key], linestyle="none", label=STANDARD, **_style(STANDARD))
        ax.axhline(std[key], color="black", lw=0.6, ls=":")
        ax.set_xlabel("KV layers l")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: str) -> list[str]:
    """Writes ``report.md`` and the figures under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "report.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(markdown(results))
    for key, plot in (("tradeoff", plot_tradeoff), ("kv_layers", plot_vs_kv_layers)):
        paths.append(os.path.join(out_dir, FIGURES[key]))
        plot(results, paths[-1])
    return paths
