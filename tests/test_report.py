"""Figures, read back from their matplotlib objects: a missing value is no bar but an
"n/a" mark in every bar plot; the study's figures have one panel per metric (or per l),
the series side by side, the legend outside the panels and a title naming the run."""

from __future__ import annotations

import copy
import importlib
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import trainutil as tu  # noqa: E402

from kvshare_jax import bench_report, paths, plotting, report  # noqa: E402

RESULTS = os.path.join(tu.ROOT, "experiments", "results")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept open and not written anywhere."""
    close, drawn = plt.close, []
    monkeypatch.setattr(paths, "save_figure", lambda fig, path, dpi=110: drawn.append(fig))
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    yield drawn
    close("all")


def committed(name: str) -> dict:
    return paths.read_json(os.path.join(RESULTS, name))


def heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches]


def marks(ax) -> list[float]:
    """x of each "n/a" mark of ``ax``."""
    return [t.xy[0] for t in ax.texts if t.get_text() == plotting.MISSING]


def test_missing_values_get_no_bar_but_a_mark():
    fig, ax = plt.subplots()
    drawn = plotting.bars(ax, [0, 1, 2, 3], [1.0, None, float("nan"), 2.0], color="C0")
    assert len(drawn) == 2 and heights(ax) == [1.0, 2.0]
    assert [p.get_x() + p.get_width() / 2 for p in ax.patches] == [0, 3]
    assert marks(ax) == [1, 2]
    plt.close(fig)


def test_throughput_plot_marks_what_was_not_measured(figures):
    results = committed("throughput_cpu.json")  # the HF baseline has no max-batch run
    results["rows"][1]["max_batch"] = 0  # and pizza-bottom fits no batch
    bench_report.plot(results, "unused.png")
    (fig,) = figures
    at_b1, _, at_max = fig.axes
    assert len(heights(at_b1)) == 11 and marks(at_b1) == []
    assert 0.0 not in heights(at_max) and len(heights(at_max)) == 9
    assert marks(at_max) == [1, 10]
    assert all(ax.get_ylabel() == "tokens/s" for ax in fig.axes)


def test_compiled_max_batch_plot_has_y_labels_and_marks_a_layout_that_does_not_fit(figures):
    results = copy.deepcopy(committed("max_batch_llama_110m_v5e.json"))  # read only
    results["rows"][0]["max_batch"] = 0
    bench_report.plot(results, "unused.png")
    (fig,) = figures
    assert [ax.get_ylabel() for ax in fig.axes] == ["sequences", "tokens/s (roofline)"]
    for ax in fig.axes:
        assert len(heights(ax)) == len(results["rows"]) - 1 and marks(ax) == [0]


def test_peer_plot_marks_a_system_not_measured(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(tu.ROOT, "experiments"))
    peer = importlib.import_module("peer_throughput")
    results = committed("peer_throughput_cpu.json")
    del results["rows"][0]["tok_s"]["ct2"]
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    peer.plot(results, str(tmp_path / "peer.png"))
    ax = plt.gcf().axes[0]
    assert len(heights(ax)) == 3 * len(results["rows"]) - 1 and len(marks(ax)) == 1
    close("all")


def _legend_outside(fig) -> None:
    """One figure legend, no axes legend, and the legend overlaps no panel."""
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert ax.get_legend() is None
        assert not box.overlaps(ax.get_window_extent(renderer))


def _labels(ax) -> list[str]:
    """The labels of ``ax``'s lines (the legend's entries)."""
    return [ln.get_label() for ln in ax.lines if not ln.get_label().startswith("_")]


def _markers(ax) -> dict[str, float]:
    """Labelled line with data -> its first x."""
    lines = [ln for ln in ax.lines if ln.get_label() in _labels(ax) and len(ln.get_xdata())]
    return {ln.get_label(): ln.get_xdata()[0] for ln in lines}


def test_kv_layers_figure_has_a_panel_per_metric_dodged_series_and_an_outside_legend(figures):
    results = committed("study_cpu_seeds/results.json")
    report.plot_vs_kv_layers(results, "unused.png")
    (fig,) = figures
    assert [ax.get_ylabel() for ax in fig.axes] == [label for _, label in report.METRICS]
    _legend_outside(fig)
    for ax in fig.axes:
        xs = _markers(ax)
        assert len(xs) == len(results["rows"]) == 10
        assert len(set(xs.values())) == 10  # side by side, none on another's x
    title = fig.get_suptitle()
    assert "L=6 d=128" in title and "16MiB" in title and "3 seeds" in title


def test_tradeoff_figure_has_an_outside_legend_and_a_title(figures):
    report.plot_tradeoff(committed("study_cpu/results.json"), "unused.png")  # an older schema
    (fig,) = figures
    assert len(fig.axes) == 1
    _legend_outside(fig)
    assert "24MiB" in fig.get_suptitle() and "1 seed" in fig.get_suptitle()


def test_study_figures_mark_a_layout_without_throughput(figures):
    results = copy.deepcopy(committed("study_cpu_seeds/results.json"))
    results["rows"][1]["max_batch"] = 0  # pizza-bottom: no batch fits the budget
    report.plot_vs_kv_layers(results, "unused.png")
    report.plot_tradeoff(results, "unused.png")
    kv_fig, tradeoff_fig = figures
    tok_s, ppl = kv_fig.axes
    assert "pizza-bottom: n/a" in _labels(tok_s) and "pizza-bottom" not in _markers(tok_s)
    assert len(marks(tok_s)) == 1 and marks(ppl) == []
    assert "pizza-bottom" in _markers(ppl)
    labels = [t.get_text() for t in tradeoff_fig.legends[0].get_texts()]
    assert "pizza-bottom: n/a" in labels
