"""Redraw result figures from their JSON with the current plotting code (nothing is
measured again).

    .venv/bin/python experiments/replot.py experiments/results/throughput_cpu.json \\
        experiments/results/study_cpu_seeds/results.json

Each ``X.json`` of a benchmark (``kvshare bench``, ``experiments/throughput.py``,
``experiments/peer_throughput.py``) is drawn to ``X.png``; a study's ``results.json`` to
the study figures beside it (``kvshare_jax/report.py``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from kvshare_jax import bench_report, paths, report


def replot(path: str) -> list[str]:
    """Draws the figures of the results file ``path``; returns the files written."""
    results: dict[str, Any] = paths.read_json(path)
    if "pareto" in results:  # a study
        folder = os.path.dirname(path)
        written = []
        for key, plot in (
            ("tradeoff", report.plot_tradeoff),
            ("kv_layers", report.plot_vs_kv_layers),
        ):
            written.append(os.path.join(folder, report.FIGURES[key]))
            plot(results, written[-1])
        return written
    out = os.path.splitext(path)[0] + ".png"
    if "systems" in results["meta"]:  # experiments/peer_throughput.py
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import peer_throughput

        peer_throughput.plot(results, out)
    else:
        bench_report.plot(results, out)
    return [out]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    for path in argv:
        print(f"{path}: wrote {', '.join(replot(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
