"""Statistics against values computed by hand and against published t tables."""

from __future__ import annotations

import math

import pytest

from workloads.stats import modified_z_scores, paired_overhead, summarize, t_quantile_975


def test_summary_by_hand() -> None:
    s = summarize([1, 2, 3, 4, 5])
    assert (s.n, s.mean, s.median, s.min, s.max) == (5, 3.0, 3.0, 1.0, 5.0)
    assert s.stddev == pytest.approx(math.sqrt(2.5))
    assert s.mad == 1.0  # median of |x - 3| = (2, 1, 0, 1, 2)
    # 3 ± t(0.975, 4) * sqrt(2.5) / sqrt(5) = 3 ± 2.776445 * 0.7071068
    assert s.ci95_low == pytest.approx(3 - 1.963243, abs=1e-6)
    assert s.ci95_high == pytest.approx(3 + 1.963243, abs=1e-6)
    assert s.outliers == () and s.unstable  # stddev 1.58 is 53% of the mean


def test_t_table_and_approximation() -> None:
    assert t_quantile_975(1) == 12.706205
    assert t_quantile_975(4) == 2.776445
    assert t_quantile_975(30) == 2.042272
    # Beyond the table, the Cornish-Fisher series (published values to 6 decimals).
    for df, published in ((31, 2.039513), (40, 2.021075), (60, 2.000298), (120, 1.979930), (1000, 1.962339)):
        assert t_quantile_975(df) == pytest.approx(published, abs=2e-5)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_outlier_by_modified_z_score() -> None:
    values = [10, 10.1, 9.9, 10.05, 9.95, 30]
    s = summarize(values)
    assert s.mad == pytest.approx(0.075)
    assert s.outliers == (5,)  # 0.6745 * 19.975 / 0.075 ≈ 179.6
    assert modified_z_scores(values)[2] == pytest.approx(-0.6745 * 0.125 / 0.075)
    assert any("outlier" in w for w in s.warnings)


def test_outlier_when_mad_is_zero() -> None:
    # MAD 0: the mean absolute deviation (0.8) scaled by 1.253314 stands in: 4 / 1.00265 ≈ 3.99 > 3.5.
    assert summarize([5, 5, 5, 5, 9]).outliers == (4,)
    assert summarize([7, 7, 7]).outliers == ()


def test_unstable_warning_like_pyperf() -> None:
    s = summarize([100, 120])  # stddev 14.1 = 12.9% of 110
    assert s.unstable
    assert not summarize([100, 101, 99]).unstable


def test_one_value_has_no_interval() -> None:
    s = summarize([42.0])
    assert s.stddev is None and s.ci95_low is None and s.ci95_high is None
    assert s.median == 42.0
    with pytest.raises(ValueError):
        summarize([])


def test_paired_overhead_throughput() -> None:
    o = paired_overhead([100, 100, 100], [90, 90, 90], "higher")
    assert o.ratio == pytest.approx(0.9)
    assert o.percent == pytest.approx(10.0)  # B does 10% less work
    assert o.ci95_low == pytest.approx(0.9) and o.ci95_high == pytest.approx(0.9)
    assert o.distinguishable_from_noise


def test_paired_overhead_latency_direction() -> None:
    o = paired_overhead([10, 10], [12, 12], "lower")
    assert o.ratio == pytest.approx(1.2) and o.percent == pytest.approx(20.0)


def test_paired_overhead_noise_by_hand() -> None:
    # logs: ln 0.9 = -0.1053605, ln 1.1 = 0.0953102; mean -0.0050252, sd 0.1418971
    o = paired_overhead([100, 100], [90, 110], "higher")
    assert o.ratio == pytest.approx(math.exp(-0.0050252), rel=1e-6)
    half = 12.706205 * 0.1418971 / math.sqrt(2)
    assert o.ci95_low == pytest.approx(math.exp(-0.0050252 - half), rel=1e-4)
    assert o.ci95_high == pytest.approx(math.exp(-0.0050252 + half), rel=1e-4)
    assert not o.distinguishable_from_noise
    interval = o.percent_interval()
    assert interval is not None and interval[0] < 0 < interval[1]


def test_paired_overhead_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        paired_overhead([1, 2], [1], "higher")
    with pytest.raises(ValueError):
        paired_overhead([0, 1], [1, 1], "higher")
    single = paired_overhead([10], [11], "higher")
    assert single.ci95_low is None and not single.distinguishable_from_noise
