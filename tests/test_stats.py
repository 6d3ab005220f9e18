"""Confidence intervals and paired tests against scipy's own implementations."""

import numpy as np
import pytest
from scipy import stats as sp

from kvshare_jax.stats import mean_ci, paired


def test_mean_ci_matches_scipy_t_interval():
    xs = [12.1, 11.7, 12.6, 12.0]
    mean, half = mean_ci(xs)
    lo, hi = sp.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=sp.sem(xs))
    assert mean == pytest.approx(np.mean(xs))
    assert (mean - half, mean + half) == pytest.approx((lo, hi))
    assert mean_ci([3.0]) == (3.0, None)  # one value: no spread, no interval


@pytest.mark.parametrize("shift, significant", [(1.0, True), (0.0, False)])
def test_paired_matches_scipy_ttest_rel(shift, significant):
    rng = np.random.default_rng(0)
    ys = rng.normal(20.0, 1.0, 5)
    xs = ys + shift + rng.normal(0.0, 0.1, 5)
    out = paired(list(xs), list(ys))
    ref = sp.ttest_rel(xs, ys)
    assert out["p"] == pytest.approx(ref.pvalue)
    assert out["mean_diff"] == pytest.approx(np.mean(xs - ys))
    assert out["significant"] is significant and out["n"] == 5


def test_paired_edge_cases():
    assert paired([1.0], [2.0]) == {
        "n": 1, "mean_diff": -1.0, "ci": None, "p": None, "significant": False
    }  # fmt: skip
    assert paired([2.0, 3.0], [1.0, 2.0])["significant"]  # the same gap on every seed
    assert paired([2.0, 3.0], [2.0, 3.0])["p"] == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired([1.0, 2.0], [1.0])
