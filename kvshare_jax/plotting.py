"""Small matplotlib helpers shared by the report figures (bench_report, report and
experiments/*.py): bars where a missing value (None or NaN: a layout that did not fit,
a system not measured) is an "n/a" mark instead of a 0 bar."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MISSING = "n/a"


def is_missing(value: Any) -> bool:
    """Whether ``value`` is None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def bars(
    ax: Any,
    xs: Sequence[float],
    values: Sequence[float | None],
    width: float = 0.8,
    *,
    color: str | Sequence[str] = "tab:blue",
    missing: str = MISSING,
    **kwargs: Any,
) -> list[Any]:
    """Draws ``ax.bar`` for the present values only and a grey ``missing`` mark at the
    foot of each missing one; returns the bars drawn. ``color`` is one colour or one
    per value; other keywords (``label``...) go to ``ax.bar``."""
    colors = [color] * len(xs) if isinstance(color, str) else list(color)
    keep = [i for i, v in enumerate(values) if not is_missing(v)]
    drawn = ax.bar(
        [xs[i] for i in keep],
        [values[i] for i in keep],
        width,
        color=[colors[i] for i in keep],
        **kwargs,
    )
    for i, v in enumerate(values):
        if is_missing(v):
            ax.annotate(
                missing,
                (xs[i], 0),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                color="0.35",
                rotation=90 if width < 0.3 else 0,
            )
    return list(drawn)


def dodge(count: int, spacing: float = 1.0, fill: float = 0.7) -> list[float]:
    """Offsets of ``count`` series around a shared x, spread over ``fill`` of
    ``spacing`` (the distance between neighbouring x values)."""
    if count < 2:
        return [0.0] * count
    step = fill * spacing / (count - 1)
    return [(i - (count - 1) / 2) * step for i in range(count)]
