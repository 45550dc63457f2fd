"""istune.bench.stats: t quantiles against a numerical integral, intervals against hand computation."""

import math
import statistics

import pytest

from istune.bench.stats import mean_ci95, paired_item_ci95, seeds_for_power, t_quantile_975


def _t_mass_between(t: float, df: int, steps: int = 20000) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom, by Simpson's rule on its density."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x):
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    h = t / steps
    total = density(0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 2 * total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 29, 30, 31, 45, 100, 400])
def test_t_quantile_leaves_five_percent_in_the_tails(df):
    assert _t_mass_between(t_quantile_975(df), df) == pytest.approx(0.95, abs=2e-4)


def test_t_quantile_needs_one_degree_of_freedom():
    with pytest.raises(ValueError, match="df=0"):
        t_quantile_975(0)


def test_mean_ci95_is_t_times_standard_error():
    values = [0.14, 0.15, 0.17]
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(sum(values) / 3)
    assert half == pytest.approx(4.303 * statistics.stdev(values) / math.sqrt(3))


def test_mean_ci95_of_one_value_has_no_width():
    mean, half = mean_ci95([2.5])
    assert mean == 2.5 and math.isnan(half)
    with pytest.raises(ValueError, match="at least one"):
        mean_ci95([])


def test_paired_item_ci95_counts_each_item_once():
    # Two seeds, three items: the per-item means are (50, 0, 100).
    per_seed = [[100, 0, 100], [0, 0, 100]]
    mean, half = paired_item_ci95(per_seed)
    assert mean == pytest.approx(50)
    assert half == pytest.approx(4.303 * 50 / math.sqrt(3))
    # Pooling the six seed x item values as independent would give a narrower interval.
    assert half > mean_ci95(sum(per_seed, []))[1]


def test_paired_item_ci95_refuses_different_items_per_seed():
    with pytest.raises(ValueError, match="same items"):
        paired_item_ci95([[1, 0], [1]])


@pytest.mark.parametrize("sd, seeds", [(0.6, 3), (1.5, 8), (3.4, 30)])
def test_seeds_for_power_matches_scipy_t_quantiles(sd, seeds):
    # Reference: the same search with scipy.stats.t.ppf(0.975, k - 1) and norm.ppf(0.8), run once by hand.
    assert seeds_for_power(sd, 1.8) == seeds


def test_seeds_for_power_is_the_smallest_that_reaches_the_effect():
    k = seeds_for_power(2.0, 1.0)
    assert (t_quantile_975(k - 1) + 0.8416) * 2.0 / math.sqrt(k) <= 1.0
    assert (t_quantile_975(k - 2) + 0.8416) * 2.0 / math.sqrt(k - 1) > 1.0


def test_seeds_for_power_refuses_a_zero_effect():
    with pytest.raises(ValueError, match="effect > 0"):
        seeds_for_power(1.0, 0.0)
