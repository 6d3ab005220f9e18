"""Small-sample statistics for seeded studies: means with t confidence intervals and
paired t-tests (two layouts trained on the same seeds and data order), from
``scipy.stats``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

LEVEL = 0.95  # confidence level of every interval and test (two-sided)


def mean_ci(xs: Sequence[float], level: float = LEVEL) -> tuple[float, float | None]:
    """``(mean, half-width)`` of the ``level`` t interval of the mean; the half-width is
    None for fewer than two values (no spread to estimate)."""
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, None
    from scipy import stats  # imported on use: scipy.stats takes a second or two to load

    t = float(stats.t.ppf(0.5 + level / 2, len(xs) - 1))
    return mean, t * statistics.stdev(xs) / math.sqrt(len(xs))


def paired(xs: Sequence[float], ys: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Paired t-test of ``xs - ys`` (same seeds, same order): ``{"n", "mean_diff", "ci",
    "p", "significant"}``. With fewer than two pairs nothing can be tested: ``p`` and
    ``ci`` are None and ``significant`` False."""
    if len(xs) != len(ys):
        raise ValueError(f"paired samples need equal lengths, got {len(xs)} and {len(ys)}")
    diffs = [x - y for x, y in zip(xs, ys, strict=True)]
    mean, ci = mean_ci(diffs, level)
    out = {"n": len(diffs), "mean_diff": mean, "ci": ci, "p": None, "significant": False}
    if ci is None:
        return out
    if statistics.stdev(diffs) == 0:  # every pair differs by the same amount (scipy: nan)
        p = 1.0 if mean == 0 else 0.0
    else:
        from scipy import stats

        p = float(stats.ttest_rel(xs, ys).pvalue)
    return {**out, "p": p, "significant": p < 1 - level}
