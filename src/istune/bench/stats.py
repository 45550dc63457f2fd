"""95% confidence intervals for benchmark reports: a mean over seeds, and paired differences over items."""

from __future__ import annotations

import math
import statistics

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), for df = 1 … 30.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
          2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
          2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t_{0.975}(df): the table up to 30 degrees of freedom, the Cornish-Fisher expansion beyond."""
    if df < 1:
        raise ValueError(f"df={df}: a t-interval needs at least 1 degree of freedom (2 values)")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval; the half-width is NaN for a single value."""
    if not values:
        raise ValueError("mean_ci95 needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def paired_item_ci95(per_seed: list[list[float]]) -> tuple[float, float]:
    """Mean paired difference and its 95% half-width, with the items as the unit.

    ``per_seed[k][i]`` is the difference (strategy A minus B) on item ``i`` at seed ``k``; every seed
    scores the same items. Each item's differences are averaged over the seeds first, so an item
    counts once however many seeds saw it (treating seed x item pairs as independent would
    narrow the interval by up to sqrt(seeds)).
    """
    if not per_seed or any(len(row) != len(per_seed[0]) for row in per_seed):
        lengths = [len(r) for r in per_seed]
        raise ValueError(f"paired_item_ci95 needs the same items at every seed; got lengths {lengths}")
    per_item = [statistics.fmean(column) for column in zip(*per_seed)]
    return mean_ci95(per_item)


def seeds_for_power(sd: float, effect: float, power_z: float = 0.8416, max_seeds: int = 1000) -> int:
    """Seeds per arm for a paired t-test over seeds to detect ``effect`` with about 80% power.

    ``sd`` is the standard deviation across seeds of the paired difference; the answer is the
    smallest k >= 2 with (t_{0.975}(k - 1) + z_power) * sd / sqrt(k) <= effect (``power_z`` is
    the normal quantile of the power: 0.8416 for 80%).
    """
    if not (sd >= 0 and effect > 0):
        raise ValueError(f"seeds_for_power needs sd >= 0 and effect > 0; got sd={sd}, effect={effect}")
    for k in range(2, max_seeds + 1):
        if (t_quantile_975(k - 1) + power_z) * sd / math.sqrt(k) <= effect:
            return k
    raise ValueError(f"sd={sd} and effect={effect} need more than {max_seeds} seeds")
