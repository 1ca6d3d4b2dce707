"""Statistics of repeated measurements: summaries, outliers and paired overheads (pure functions).

Conventions (pyperf, hyperfine, PerfKitBenchmarker; docs/observability.md):

- :func:`summarize` gets the *measured* repetitions only; warm-ups are kept apart by the
  caller (the store flags them). It reports n, mean, median, the sample standard deviation
  (n - 1), the median absolute deviation (raw, not scaled by 1.4826), a 95% confidence
  interval of the mean by Student's t, min, max and the indices of outliers.
- Outliers: the modified z-score ``0.6745 * (x - median) / MAD`` above 3.5 (Iglewicz and
  Hoaglin; what hyperfine uses). When MAD is 0 (more than half the values equal), the mean
  absolute deviation scaled by 1.253314 stands in, as Iglewicz and Hoaglin suggest; if that
  is 0 too, every value is equal and none is an outlier.
- ``unstable``: pyperf's warning, the standard deviation at least 10% of the mean.
- :func:`paired_overhead` compares B against A over *pairs* run interleaved (A B A B ...),
  so that slow drift of the machine falls on both. It works on the log of each pair's ratio
  b/a: the mean of the logs, exponentiated, is the geometric mean ratio, and its t interval
  exponentiated is the ratio's 95% CI. The overhead is then positive when B is worse:
  ``(1 - ratio) * 100`` when higher is better (a throughput at 0.9271 of A is 7.29%
  overhead, as the study reports memory) and ``(ratio - 1) * 100`` when lower is better. It
  is *distinguishable from noise* when the CI of the ratio excludes 1.

The Student t quantile comes without scipy: an exact table of t(0.975, df) for df 1..30,
and above that the Cornish-Fisher expansion of t around the normal quantile z = 1.959964
in powers of 1/df (Abramowitz & Stegun 26.7.5), whose error at df = 31 is below 1e-5.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["higher", "lower"]

# t(0.975, df) for df = 1..30 (standard tables, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
T975_TABLE = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
)
Z975 = 1.959963984540054

OUTLIER_THRESHOLD = 3.5
UNSTABLE_FRACTION = 0.10


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError("degrees of freedom must be >= 1")
    if df <= len(T975_TABLE):
        return T975_TABLE[df - 1]
    z, v = Z975, float(df)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    median: float
    stddev: float | None  # None when n < 2
    mad: float
    ci95_low: float | None  # None when n < 2
    ci95_high: float | None
    min: float
    max: float
    outliers: tuple[int, ...] = ()  # indices into the values given
    warnings: tuple[str, ...] = field(default=())

    @property
    def unstable(self) -> bool:
        return any(w.startswith("unstable") for w in self.warnings)

    @property
    def relative_stddev(self) -> float | None:
        if self.stddev is None or self.mean == 0:
            return None
        return self.stddev / abs(self.mean)


def modified_z_scores(values: Sequence[float]) -> list[float]:
    """Iglewicz-Hoaglin modified z-scores (0.6745 (x - median) / MAD; see the module docstring)."""
    median = statistics.median(values)
    deviations = [abs(v - median) for v in values]
    mad = statistics.median(deviations)
    if mad > 0:
        return [0.6745 * (v - median) / mad for v in values]
    mean_ad = statistics.fmean(deviations)
    if mean_ad > 0:
        return [(v - median) / (1.253314 * mean_ad) for v in values]
    return [0.0 for _ in values]


def summarize(values: Sequence[float]) -> Summary:
    """Summary statistics of measured (non-warm-up) values; at least one value."""
    if not values:
        raise ValueError("no values to summarize")
    data = [float(v) for v in values]
    n = len(data)
    mean = statistics.fmean(data)
    median = statistics.median(data)
    mad = statistics.median(abs(v - median) for v in data)
    stddev: float | None = None
    low = high = None
    warnings: list[str] = []
    if n >= 2:
        stddev = statistics.stdev(data)
        half = t_quantile_975(n - 1) * stddev / math.sqrt(n)
        low, high = mean - half, mean + half
        if mean != 0 and stddev >= UNSTABLE_FRACTION * abs(mean):
            warnings.append(f"unstable: stddev is {stddev / abs(mean):.0%} of the mean (>= 10%)")
    else:
        warnings.append("one value: no spread or confidence interval")
    outliers = tuple(i for i, z in enumerate(modified_z_scores(data)) if abs(z) > OUTLIER_THRESHOLD)
    if outliers:
        warnings.append(f"{len(outliers)} outlier(s) by modified z-score > {OUTLIER_THRESHOLD}")
    return Summary(n, mean, median, stddev, mad, low, high, min(data), max(data), outliers, tuple(warnings))


@dataclass(frozen=True)
class Overhead:
    """B against A over paired runs; see the module docstring for the conventions."""

    pairs: int
    ratio: float  # geometric mean of b/a
    percent: float  # overhead of B, positive = B is worse
    ci95_low: float | None  # of the ratio
    ci95_high: float | None
    distinguishable_from_noise: bool
    direction: Direction

    def percent_interval(self) -> tuple[float, float] | None:
        """The CI of the overhead in percent (low, high), or None with fewer than 2 pairs."""
        if self.ci95_low is None or self.ci95_high is None:
            return None
        ends = sorted(overhead_percent(r, self.direction) for r in (self.ci95_low, self.ci95_high))
        return ends[0], ends[1]


def overhead_percent(ratio: float, direction: Direction) -> float:
    """Overhead of B in percent from the ratio b/a, positive when B is worse."""
    return (1.0 - ratio) * 100.0 if direction == "higher" else (ratio - 1.0) * 100.0


def paired_overhead(a: Sequence[float], b: Sequence[float], direction: Direction) -> Overhead:
    """Overhead of B relative to A from paired runs (same length, all values > 0)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_overhead needs two equally long, non-empty lists")
    if any(v <= 0 for v in (*a, *b)):
        raise ValueError("paired_overhead needs positive values (ratios of them)")
    logs = [math.log(y / x) for x, y in zip(a, b, strict=True)]
    n = len(logs)
    mean_log = statistics.fmean(logs)
    ratio = math.exp(mean_log)
    low = high = None
    distinguishable = False
    if n >= 2:
        half = t_quantile_975(n - 1) * statistics.stdev(logs) / math.sqrt(n)
        low, high = math.exp(mean_log - half), math.exp(mean_log + half)
        distinguishable = not (low <= 1.0 <= high)
    return Overhead(n, ratio, overhead_percent(ratio, direction), low, high, distinguishable, direction)
