"""Confidence intervals and paired tests against scipy's own implementations and
against closed-form golden values."""

import math
import statistics

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


# Golden values without scipy: the t distribution has closed forms for 1 and 2 degrees of
# freedom (two-sided p = 1 - 2 atan(t) / pi and 1 - t / sqrt(2 + t^2); the quantiles
# invert them), and 3.182446305284263 is the table's 97.5% quantile for 3.
@pytest.mark.parametrize(
    "xs, quantile",
    [
        ([1.0, 2.0], math.tan(math.pi * 0.475)),  # 12.706...
        ([1.0, 2.0, 4.0], 0.95 / math.sqrt(2 * 0.975 * 0.025)),  # 4.302...
        ([12.1, 11.7, 12.6, 12.0], 3.182446305284263),
    ],
)
def test_mean_ci_golden_quantiles(xs, quantile):
    mean, half = mean_ci(xs)
    assert mean == pytest.approx(sum(xs) / len(xs), rel=1e-12)
    assert half == pytest.approx(quantile * statistics.stdev(xs) / math.sqrt(len(xs)), rel=1e-9)
    assert mean_ci([1.0, 2.0], level=0.99)[1] == pytest.approx(math.tan(math.pi * 0.495) / 2)


def test_paired_golden_p_values():
    two = paired([3.0, 5.0], [1.0, 2.0])  # diffs 2, 3: t = 5 on 1 degree of freedom
    assert two["p"] == pytest.approx(1 - 2 * math.atan(5.0) / math.pi, rel=1e-9)
    assert (two["n"], two["mean_diff"], two["significant"]) == (2, 2.5, False)
    three = paired([2.0, 4.0, 7.0], [1.0, 2.0, 3.0])  # diffs 1, 2, 4: t = sqrt(7), 2 dof
    assert three["p"] == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-9)
    assert three["ci"] == pytest.approx(0.95 / math.sqrt(0.04875) * math.sqrt(7 / 9), rel=1e-9)
    assert three["significant"] is False  # p = 0.118
    assert paired([5.0, 5.0, 5.1], [1.0, 1.1, 1.0])["significant"] is True
