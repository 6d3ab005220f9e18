"""Study report: rows with ratios vs standard, Pareto fronts, report.md and the figures.

Every number comes from the cells' ``result.json`` (``kvshare_jax/study.py``); ratios
are taken against the ``standard`` cell, the "which layout" summary is derived from the
Pareto front of (perplexity, throughput) at each number of KV layers ``l``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from kvshare_jax import paths, plotting
from kvshare_jax.cells import Cell
from kvshare_jax.layout import STANDARD
from kvshare_jax.probes import device_info
from kvshare_jax.stats import mean_ci, paired
from kvshare_jax.tables import markdown_table

FIGURES = {"tradeoff": "throughput_vs_ppl.png", "kv_layers": "kv_layers.png"}
_COLORS = {"pizza": "tab:orange", "sandwich": "tab:green", "lasagna": "tab:blue"}
_MARKERS = {"bottom": "v", "top": "^", "middle": "o"}


# ---------------------------------------------------------------- the rows
def _measures(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers a row reports, of one trained cell."""
    b = result["bench"]
    prefill = b["runs"][0] if b["runs"] else b["max_batch_run"] or {}
    return {
        "eval_loss": result["train"]["eval_loss"],
        "eval_ppl": result["train"]["eval_ppl"],
        "max_batch": b["max_batch"],
        "tok_s": b["max_batch_run"]["e2e_tok_s"] if b["max_batch"] else 0.0,
        "prefill_ms": prefill["prefill_s"] * 1e3 if prefill else None,
        "prefill_batch": prefill.get("batch", b["max_batch"]) if prefill else None,
        "train_step_ms": result["train_step"]["min_s"] * 1e3,
    }


def _row(
    cells: Sequence[Cell],
    results: dict[str, dict[str, Any]],
    standard: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """One table row: the seeds ``cells`` of one (layout, l) point, as means with 95%
    intervals; ratios and paired tests against ``standard`` (measures by seed) over the
    seeds both have."""
    first = cells[0]
    seeds = [c.seed for c in cells]
    per = [_measures(results[c.trained]) for c in cells]
    row: dict[str, Any] = {
        "layout": first.layout,
        "kv_layers": first.kv_layers,
        "cell": first.trained,
        "same_as": first.same_as,
        "mapping": first.mapping,
        "cache_fraction": results[first.trained]["cache_fraction"],
        "seeds": len(cells),
        "max_batch": per[0]["max_batch"],  # a memory fit: the same for every seed
        "prefill_batch": per[0]["prefill_batch"],
    }
    for key in ("eval_loss", "eval_ppl", "tok_s", "train_step_ms", "prefill_ms"):
        values = [m[key] for m in per if m[key] is not None]
        row[key], row[f"{key}_ci"] = mean_ci(values) if values else (None, None)
    pairs = [(m, standard[s]) for m, s in zip(per, seeds, strict=True) if s in standard]
    ratios = {
        "tok_s_ratio": [m["tok_s"] / b["tok_s"] for m, b in pairs if b["tok_s"]],
        "train_step_ratio": [m["train_step_ms"] / b["train_step_ms"] for m, b in pairs],
    }
    for key, values in ratios.items():
        row[key], row[f"{key}_ci"] = mean_ci(values) if values else (None, None)
    row["vs_standard"] = {
        key: paired([m[key] for m, _ in pairs], [b[key] for _, b in pairs])
        for key in ("eval_ppl", "tok_s")
    }
    row["per_seed"] = {"seed": seeds, **{k: [m[k] for m in per] for k in ("eval_ppl", "tok_s")}}
    return row


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
    (``results``, keyed by trained cell name, kept as ``cells``): one row per (layout, l)
    over its seeds, ``rows[0]`` standard; ``pareto[str(l)]`` the front's layouts (of the
    means)."""
    points: dict[tuple[str, int], list[Cell]] = {}
    for c in cells:
        points.setdefault(c.point, []).append(c)
    std_cells = points[cells[0].point]
    standard = {c.seed: _measures(results[c.trained]) for c in std_cells}
    out = {
        "meta": _meta(config, results),
        "rows": [_row(group, results, standard) for group in points.values()],
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


def _between(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, Any]:
    """Paired test of rows ``a`` and ``b`` on ``key`` over the seeds both have."""
    xs = dict(zip(a["per_seed"]["seed"], a["per_seed"][key], strict=True))
    ys = dict(zip(b["per_seed"]["seed"], b["per_seed"][key], strict=True))
    common = sorted(xs.keys() & ys.keys())
    return paired([xs[s] for s in common], [ys[s] for s in common])


def _ci(value: float | None, ci: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}" + (f" ± {ci:{spec}}" if ci is not None else "")


def _verdict(test: dict[str, Any]) -> str:
    if test["p"] is None:
        return "not tested: one seed"
    word = "significant" if test["significant"] else "not significant"
    return f"{word}, p = {test['p']:.3f}"


def _same(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """``row``'s layout and those sharing its mapping (one trained cell): 'a = b'."""
    return _names([r for r in rows if r["mapping"] == row["mapping"]])


def _tied(best: dict[str, Any], rows: Sequence[dict[str, Any]], key: str) -> list[dict]:
    """``best`` and the rows whose difference from it on ``key`` is not significant (all
    rows when nothing can be tested)."""
    return [r for r in rows if r is best or not _between(r, best, key)["significant"]]


def summary(results: dict[str, Any]) -> list[str]:
    """Markdown bullet lines answering "which layout should I use?" from the numbers.
    A layout is called better than another only when the paired test over the seeds
    says the difference is significant; with one seed no difference is claimed."""
    std, lines = results["rows"][0], []
    seeds = std["seeds"]
    best_at: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for kv in results["meta"]["study"]["kv_layers"]:
        rows = rows_at(results, kv)
        shared = rows[1:]
        if not shared:  # a partial report: no cell at this l finished yet
            continue
        best_ppl = min(shared, key=lambda r: r["eval_ppl"])
        fastest = max(shared, key=lambda r: r["tok_s"])
        cheapest = min(shared, key=lambda r: r["train_step_ms"])
        tied_ppl = _tied(best_ppl, shared, "eval_ppl")
        best_at[kv] = (best_ppl, tied_ppl)
        points = "; ".join(
            f"{r['layout']} (ppl {r['eval_ppl']:.2f}, {r['tok_s_ratio'] or 0:.2f}x)"
            for r in pareto_front(rows)
        )
        vs_std = best_ppl["vs_standard"]["eval_ppl"]
        ties = [r["layout"] for r in tied_ppl if r["mapping"] != best_ppl["mapping"]]
        tie_text = (
            f" Not significantly different from it: {', '.join(ties)}."
            if ties and seeds > 1
            else ""
        )
        lines += [
            f"- **l = {kv}** (cache {shared[0]['cache_fraction']:.0%} of standard). "
            f"Pareto front of the means, fastest first: {points}.",
            f"  Lowest mean perplexity: {_same(best_ppl, shared)} (ppl "
            f"{_ci(best_ppl['eval_ppl'], best_ppl['eval_ppl_ci'], '.2f')}, "
            f"{_pct(best_ppl['eval_ppl'], std['eval_ppl'])} vs standard: {_verdict(vs_std)})."
            f"{tie_text} Highest throughput: {_same(fastest, shared)} "
            f"({_ci(fastest['tok_s_ratio'] or 0, fastest['tok_s_ratio_ci'], '.2f')}x, max "
            f"batch {fastest['max_batch']} vs {std['max_batch']}). Cheapest to train: "
            f"{_same(cheapest, shared)} ({cheapest['train_step_ratio']:.2f}x standard's "
            "step time).",
            f"  The {shared[0]['cache_fraction']:.0%} cache fits "
            f"{_span(shared, 'max_batch', std['max_batch'])} standard's max batch; "
            f"throughput at that batch is {_span(shared, 'tok_s', std['tok_s'])} standard's.",
        ]
    kvs = sorted(best_at, reverse=True)
    if not kvs:
        return lines
    if len(kvs) > 1:
        fronts = [set(results["pareto"][str(kv)]) for kv in kvs]
        everywhere = sorted(set.intersection(*fronts) - {STANDARD})
        lines.append(
            f"- On the Pareto front of the means at every l: {', '.join(everywhere)}."
            if everywhere
            else "- No KV-sharing layout is on the Pareto front of the means at every l."
        )
    if seeds < 2:
        lines.append(
            "- Quality first at a given cache size, lowest measured perplexity: "
            + "; ".join(f"l = {kv}: {best_at[kv][0]['layout']}" for kv in kvs)
            + ". One seed: no difference between layouts is claimed (run with "
            "`--config.study.seeds=3` to test them)."
        )
        return lines
    picks = []
    for kv in kvs:
        best, tied = best_at[kv]
        picks.append(
            f"l = {kv}: {best['layout']}"
            + (
                f" (tied within noise with {', '.join(r['layout'] for r in tied if r is not best)})"
                if len(tied) > 1
                else " (significantly better than every other layout)"
            )
        )
    lines.append(
        f"- Quality first at a given cache size ({seeds} seeds, paired t-test at 95%): "
        + "; ".join(picks)
        + ". To trade quality for speed, move along that l's Pareto front."
    )
    return lines


# -------------------------------------------------------------- markdown
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


TABLE_HEADER = (
    "layout", "mapping", "KV layers", "cache fraction", "val ppl", "ppl vs standard",
    "max batch", "tok/s @ max batch", "vs standard", "prefill ms", "train step ms",
    "train step vs standard",
)  # fmt: skip


def _table_row(r: dict[str, Any], std: dict[str, Any]) -> list[str]:
    """The cells of row ``r`` in its l's table; ``std``: the standard row."""
    test = r["vs_standard"]["eval_ppl"]
    vs = "-" if r is std else _pct(r["eval_ppl"], std["eval_ppl"])
    if test["p"] is not None:
        vs += f" (p = {test['p']:.3f}{', significant' if test['significant'] else ''})"
    ratio = _ci(r["tok_s_ratio"], r["tok_s_ratio_ci"], ".2f")
    return [
        r["layout"] + (f" (= {r['same_as']})" if r["same_as"] else ""),
        f"`{r['mapping']}`",
        str(r["kv_layers"]),
        f"{r['cache_fraction']:.3f}",
        _ci(r["eval_ppl"], r["eval_ppl_ci"], ".2f"),
        vs,
        str(r["max_batch"]),
        _ci(r["tok_s"], r["tok_s_ci"], ".0f"),
        ratio + ("x" if ratio != "-" else ""),
        _fmt(r["prefill_ms"], ".1f", f" (b={r['prefill_batch']})"),
        f"{r['train_step_ms']:.0f}",
        f"{r['train_step_ratio']:.2f}x",
    ]


def markdown(results: dict[str, Any]) -> str:
    """``report.md``: settings, one table per l, the derived summary and the figures."""
    meta = results["meta"]
    m, t, s = meta["model"], meta["train"], meta["study"]
    budget = s["memory_budget"]
    done, total = meta.get("cells_done"), meta.get("cells_total")
    seeds = results["rows"][0]["seeds"]
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
    for kv in s["kv_layers"]:
        rows = [_table_row(r, results["rows"][0]) for r in rows_at(results, kv)]
        lines += [f"## l = {kv} KV layers", "", *markdown_table(TABLE_HEADER, rows), ""]
    lines += ["## Which layout should I use?", "", *summary(results), ""]
    lines += [
        (
            f"Derived from this run's numbers: means over {seeds} seeds with 95% t intervals "
            "(±); 'significant' = paired t-test against standard over the same seeds and "
            "data order, p < 0.05. CPU timings vary with machine load."
            if seeds > 1
            else "Derived from this run's numbers (one seed, so no interval or test; set "
            "`study.seeds` >= 2 for them; CPU timings vary with machine load)."
        ),
        "",
        f"![throughput vs perplexity]({FIGURES['tradeoff']})",
        "",
        f"![throughput and perplexity vs KV layers]({FIGURES['kv_layers']})",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------- figures
METRICS = (("tok_s", "tokens/s at max batch"), ("eval_ppl", "validation perplexity"))
_L = "$l$"  # an italic l, which no font draws like a 1 or an I


_OTHER_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red")
_OTHER_MARKERS = ("s", "D", "P", "X", "h", "p")


def _style(layout: str) -> dict[str, Any]:
    """Colour and marker of a layout: one colour per preset family and one marker per
    position; any other layout (a named method such as ``cla:2``, a mapping string) a
    colour and marker of its own, the same in every figure (from a hash of its name)."""
    if layout == STANDARD:
        return {"color": "black", "marker": "*", "markersize": 12}
    part, _, position = layout.partition("-")
    if part in _COLORS and position in _MARKERS:
        return {"color": _COLORS[part], "marker": _MARKERS[position], "markersize": 7}
    h = zlib.crc32(layout.encode())
    return {
        "color": _OTHER_COLORS[h % len(_OTHER_COLORS)],
        "marker": _OTHER_MARKERS[(h // len(_OTHER_COLORS)) % len(_OTHER_MARKERS)],
        "markersize": 7,
    }


def _value(row: dict[str, Any], key: str) -> float | None:
    """``row[key]``, None where it was not measured (no throughput when no batch fits)."""
    if key == "tok_s" and not row.get("max_batch"):
        return None
    return row.get(key)


def _seeds(results: dict[str, Any]) -> int:
    return int(results["rows"][0].get("seeds") or 1)


def figure_title(results: dict[str, Any]) -> str:
    """The model, training, budget and seeds of a study, for the figures' titles."""
    meta = results["meta"]
    m, t, s = meta["model"], meta["train"], meta["study"]
    seeds = _seeds(results)
    stats = " (means, bars: 95% t intervals, dots: the seeds)" if seeds > 1 else ""
    return (
        f"KV sharing study: L={m['num_layers']} d={m['d_model']} heads {m['num_heads']}/"
        f"{m['num_kv_heads']} vocab {meta['vocab_size']}, {t['num_steps']} steps on "
        f"{meta['dataset']}; {seeds} seed{'s' if seeds > 1 else ''}\n"
        f"throughput: the max batch under {s['memory_budget']}, {s['prompt_len']} + "
        f"{s['gen_len']} tokens{stats}"
    )


def _label(row: dict[str, Any]) -> str:
    return row["layout"] + (f" (= {row['same_as']})" if row.get("same_as") else "")


def _figure(plt: Any, panels: int, width: float) -> tuple[Any, list[Any]]:
    """A figure of ``panels`` axes side by side, room on the right for the legend."""
    fig, axes = plt.subplots(
        1, panels, figsize=(width * panels + 2.6, 4.6), squeeze=False, layout="constrained"
    )
    return fig, list(axes[0])


def _finish(fig: Any, axes: list[Any], results: dict[str, Any], path: str, plt: Any) -> None:
    """The legend outside the panels (right), the study's title, saved to ``path``."""
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(figure_title(results), fontsize=9)
    paths.save_figure(fig, path)
    plt.close(fig)


def plot_tradeoff(results: dict[str, Any], path: str) -> None:
    """Throughput vs perplexity, one marker per layout, one panel per l (the paper's plot);
    the dashed line joins the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kvs = results["meta"]["study"]["kv_layers"]
    fig, axes = _figure(plt, len(kvs), 5.0)
    for ax, kv in zip(axes, kvs, strict=True):
        rows = rows_at(results, kv)
        for r in rows:
            style = _style(r["layout"])
            x, y = _value(r, "tok_s"), r["eval_ppl"]
            if x is None:  # no batch fits: no throughput to place it at
                ax.plot([], [], linestyle="none", label=f"{_label(r)}: n/a", **style)
                continue
            ax.plot(x, y, linestyle="none", label=_label(r), **style)
            _seed_dots(ax, r, style["color"])
            if r.get("eval_ppl_ci") is not None:  # 95% intervals over the seeds
                ax.errorbar(
                    x,
                    y,
                    xerr=r.get("tok_s_ci"),
                    yerr=r["eval_ppl_ci"],
                    fmt="none",
                    ecolor=style["color"],
                    alpha=0.6,
                    lw=0.8,
                    capsize=2,
                )
        front = [r for r in pareto_front(rows) if _value(r, "tok_s") is not None]
        ax.plot([r["tok_s"] for r in front], [r["eval_ppl"] for r in front], "k--", lw=0.8)
        cache = rows[-1]["cache_fraction"]
        ax.set_title(f"{_L} = {kv} KV layers (cache {cache:.0%} of standard)", fontsize=10)
        ax.set_xlabel("tokens/s at max batch")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
    _finish(fig, axes, results, path, plt)


def _seed_dots(ax: Any, row: dict[str, Any], color: str) -> None:
    """Each seed's (tokens/s, perplexity) as a small dot, when there are several."""
    seeds = row.get("per_seed") or {}
    if len(seeds.get("tok_s") or []) > 1 and row.get("max_batch"):
        dots = {"linestyle": "none", "marker": ".", "markersize": 3, "alpha": 0.6}
        ax.plot(seeds["tok_s"], seeds["eval_ppl"], color=color, **dots)


def _point(ax: Any, x: float, row: dict[str, Any], key: str, label: str | None) -> None:
    """One row's mean (marker), 95% interval (bar) and seeds (small dots) at ``x``; an
    "n/a" mark at the foot of the panel where the value is missing."""
    style, value = _style(row["layout"]), _value(row, key)
    if value is None:
        ax.plot([], [], linestyle="none", label=label and f"{label}: n/a", **style)
        where = {"xycoords": ("data", "axes fraction"), "ha": "center", "fontsize": 7}
        ax.annotate("n/a", (x, 0.02), color=style["color"], **where)
        return
    if row.get(f"{key}_ci") is not None:
        ax.errorbar(x, value, yerr=row[f"{key}_ci"], fmt="none", ecolor=style["color"], lw=1)
    seeds = (row.get("per_seed") or {}).get(key) or []
    if len(seeds) > 1:
        dots = {"linestyle": "none", "marker": ".", "markersize": 3, "alpha": 0.6}
        ax.plot([x] * len(seeds), seeds, color=style["color"], **dots)
    ax.plot(x, value, linestyle="none", label=label, **style)


def _line(ax: Any, xs: list[float], rows: list[dict[str, Any]], key: str) -> None:
    """A thin line through the present means of one layout's rows."""
    points = [(x, _value(r, key)) for x, r in zip(xs, rows, strict=True)]
    points = [(x, v) for x, v in points if v is not None]
    color = _style(rows[0]["layout"])["color"]
    ax.plot([x for x, _ in points], [v for _, v in points], lw=0.8, alpha=0.45, color=color)


def plot_vs_kv_layers(results: dict[str, Any], path: str) -> None:
    """Throughput and perplexity (one panel each) against the number of KV layers, one
    series per layout, the series side by side at each l; every series' line ends at
    standard (any preset with ``l = L`` is the standard layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, std = results["rows"], results["rows"][0]
    layouts = list(dict.fromkeys(r["layout"] for r in rows[1:]))
    kvs = sorted({r["kv_layers"] for r in rows})
    offset = dict(zip(layouts, plotting.dodge(len(layouts), fill=0.75), strict=True))
    fig, axes = _figure(plt, len(METRICS), 5.0)
    for ax, (key, label) in zip(axes, METRICS, strict=True):
        if _value(std, key) is not None:
            ax.axhline(std[key], color="black", lw=0.6, ls=":")
        for layout in layouts:
            own = sorted((r for r in rows[1:] if r["layout"] == layout), key=_kv)
            xs = [kvs.index(r["kv_layers"]) + offset[layout] for r in own]
            _line(ax, [*xs, kvs.index(std["kv_layers"])], [*own, std], key)
            for i, (x, r) in enumerate(zip(xs, own, strict=True)):
                name = _label(r) if len(own) == 1 else layout  # same_as is per l
                _point(ax, x, r, key, name if i == 0 else None)
        _point(ax, kvs.index(std["kv_layers"]), std, key, STANDARD)
        ticks = [f"{_L} = {kv}" + (" (standard)" if kv == std["kv_layers"] else "") for kv in kvs]
        ax.set_xticks(range(len(kvs)), ticks)
        ax.set_xlim(-0.6, len(kvs) - 0.4)
        ax.set_xlabel(f"KV layers {_L}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    _finish(fig, axes, results, path, plt)


def _kv(row: dict[str, Any]) -> int:
    return row["kv_layers"]


def write_report(results: dict[str, Any], out_dir: str) -> list[str]:
    """Writes ``report.md`` and the figures under ``out_dir`` (local or ``gs://``);
    returns their paths."""
    written = [paths.join(out_dir, "report.md")]
    paths.write_text(written[0], markdown(results))
    for key, plot in (("tradeoff", plot_tradeoff), ("kv_layers", plot_vs_kv_layers)):
        written.append(paths.join(out_dir, FIGURES[key]))
        plot(results, written[-1])
    return written
