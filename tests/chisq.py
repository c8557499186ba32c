"""Chi-square checks for the sampling tests (test_sampler.py, test_draft.py): goodness of fit of
draws against exact probabilities, and two sets of draws against each other. The threshold is
the chi-square quantile at p = 1e-4 (Wilson-Hilferty): a correct sampler fails once in 10,000
runs with a fixed seed set, that is never, while a wrong distribution fails at these sizes."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping

Z = 3.719  # the standard normal's 1 - 1e-4 quantile


def critical(df: int) -> float:
    """The chi-square quantile of `df` degrees of freedom at 1 - 1e-4."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + Z * math.sqrt(h)) ** 3


def fit(
    draws: Counter, probs: Mapping[Hashable, float], min_expected: float = 5.0
) -> tuple[float, int]:
    """(statistic, degrees of freedom) of `draws` against `probs`; outcomes expected fewer than
    `min_expected` times are pooled into one bin (with any outcome that has no probability)."""
    n = sum(draws.values())
    stat, bins, pooled_obs, pooled_exp = 0.0, 0, 0, 0.0
    for key, p in probs.items():
        e = n * p
        if e >= min_expected:
            stat += (draws.get(key, 0) - e) ** 2 / e
            bins += 1
        else:
            pooled_obs += draws.get(key, 0)
            pooled_exp += e
    pooled_obs += sum(c for key, c in draws.items() if key not in probs)
    if pooled_exp > 0 or pooled_obs:
        if pooled_exp < 1e-9:
            return math.inf, max(bins - 1, 1)  # draws where the distribution has none
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        bins += 1
    return stat, max(bins - 1, 1)


def two_sample(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int]:
    """(statistic, degrees of freedom) of two equally many draws being of one distribution;
    outcomes seen fewer than `min_count` times in both together are pooled."""
    assert sum(a.values()) == sum(b.values())
    stat, bins, pa, pb = 0.0, 0, 0, 0
    for key in set(a) | set(b):
        x, y = a.get(key, 0), b.get(key, 0)
        if x + y >= min_count:
            stat += (x - y) ** 2 / (x + y)
            bins += 1
        else:
            pa, pb = pa + x, pb + y
    if pa + pb:
        stat += (pa - pb) ** 2 / (pa + pb)
        bins += 1
    return stat, max(bins - 1, 1)
