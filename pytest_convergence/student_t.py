"""Student's t tails, for limits whose spread was estimated from a handful of runs.

A z-score divides by a spread estimated from calibration samples. With few samples (a
known-good candidate calibrated on 3 seeds leaves ~16 degrees of freedom) the estimate is often
too small, and the score is t-distributed, not Gaussian: holding it to the Gaussian limit raises
false alarms at a rate the limit does not promise. The regions therefore set each limit to the
t quantile with the same tail probability as the Gaussian limit.

Degrees of freedom here are whole numbers (pooled sample counts), so the tail has a closed form
(Abramowitz and Stegun 26.7.3 and 26.7.4) and needs no special functions beyond ``math``.
"""

from __future__ import annotations

import functools
import math

__all__ = ["gaussian_two_sided_tail", "limit_with_tail", "two_sided_tail"]

# Beyond this the t quantile is within 0.1% of the Gaussian one at the tails used here; larger
# counts reuse it, which errs on the wide side (quantiles shrink as degrees grow).
MAX_EXACT_DEGREES = 10_000


def gaussian_two_sided_tail(z: float) -> float:
    """P(|Z| > z) for a standard normal Z."""
    return math.erfc(z / math.sqrt(2.0))


def two_sided_tail(t: float, degrees: int) -> float:
    """P(|T| > t) for T Student-t distributed with ``degrees`` (>= 1) degrees of freedom."""
    if degrees < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {degrees}")
    t = abs(t)
    if math.isinf(t):
        return 0.0
    theta = math.atan(t / math.sqrt(degrees))
    sine, cosine_squared = math.sin(theta), math.cos(theta) ** 2
    if degrees % 2 == 0:
        term = total = 1.0
        for k in range(1, degrees // 2):
            term *= cosine_squared * (2 * k - 1) / (2 * k)
            total += term
        inside = sine * total
    else:
        total = 0.0
        if degrees > 1:
            term = total = math.cos(theta)
            for k in range(1, (degrees - 1) // 2):
                term *= cosine_squared * (2 * k) / (2 * k + 1)
                total += term
        inside = 2.0 / math.pi * (theta + sine * total)
    return max(0.0, 1.0 - inside)


@functools.cache
def limit_with_tail(tail: float, degrees: int) -> float:
    """The t value whose two-sided tail at ``degrees`` degrees of freedom is ``tail``."""
    if not 0.0 < tail < 1.0:
        raise ValueError(f"a two-sided tail probability lies in (0, 1), got {tail}")
    degrees = min(degrees, MAX_EXACT_DEGREES)
    low, high = 0.0, 1.0
    while two_sided_tail(high, degrees) > tail:
        low, high = high, 2.0 * high
    # Bisection: the tail is monotone in t, and 100 halvings exhaust a double's precision.
    for _ in range(100):
        middle = 0.5 * (low + high)
        if two_sided_tail(middle, degrees) > tail:
            low = middle
        else:
            high = middle
    return high
