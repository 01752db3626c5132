"""Small statistics for study reports: mean, spread and paired confidence intervals.

Pure functions on lists of floats; no scipy (not a dependency). The t quantiles are the
two-sided 95% values, from a table for up to 30 degrees of freedom and a Cornish-Fisher
expansion beyond (within 1e-3 of the exact value there).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# t_{0.975, df} for df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Paired:
    """The mean of paired differences (a - b, same seeds) with its 95% t interval; ``diffs`` are
    the differences themselves, seed by seed."""

    n: int
    mean: float
    low: float
    high: float
    diffs: tuple[float, ...] = ()

    @property
    def same_every_time(self) -> bool:
        """Every pair differed by the same amount (to float rounding): the interval has no width
        and says 'on each seed', not a precise estimate."""
        return self.n > 1 and max(self.diffs) - min(self.diffs) < 1e-9 * max(1.0, abs(self.mean))

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def paired_difference(a: list[float], b: list[float]) -> Paired:
    """95% confidence interval of mean(a - b) over pairs, with the t distribution (n - 1 df).
    With one pair the interval is unbounded."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    if not diffs:
        return Paired(0, math.nan, math.nan, math.nan)
    mean, sd = mean_std(diffs)
    if len(diffs) == 1:
        return Paired(1, mean, -math.inf, math.inf, tuple(diffs))
    half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Paired(len(diffs), mean, mean - half, mean + half, tuple(diffs))
