"""Student's t tails against published table values, and their properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_convergence.student_t import (
    MAX_EXACT_DEGREES,
    gaussian_two_sided_tail,
    limit_with_tail,
    two_sided_tail,
)

degrees = st.integers(1, 400)


@pytest.mark.parametrize(
    ("tail", "degrees", "expected"),
    [
        # Two-sided critical values from any t table (e.g. Abramowitz and Stegun, table 26.10).
        (0.05, 1, 12.706),
        (0.05, 2, 4.303),
        (0.05, 3, 3.182),
        (0.05, 10, 2.228),
        (0.01, 10, 3.169),
        (0.01, 30, 2.750),
        (0.001, 20, 3.850),
        (0.05, 120, 1.980),
    ],
)
def test_limits_match_table_values(tail: float, degrees: int, expected: float) -> None:
    assert limit_with_tail(tail, degrees) == pytest.approx(expected, abs=5e-4)


def test_the_regions_tail_at_16_degrees() -> None:
    """The false-alarm rate of a Gaussian 6, at the degrees of a 3-seed candidate region
    (scipy.stats.t.isf(gaussian_two_sided_tail(6) / 2, 16) = 12.03468707)."""
    assert limit_with_tail(gaussian_two_sided_tail(6.0), 16) == pytest.approx(12.0346871, 1e-6)


@given(st.floats(0.0, 50.0), st.floats(0.0, 50.0), degrees)
def test_the_tail_falls_as_t_grows(a: float, b: float, dof: int) -> None:
    low, high = sorted((a, b))
    # Up to rounding: the tail is 1 minus a sum, exact to about 1e-16 absolute.
    assert 0.0 <= two_sided_tail(high, dof) <= two_sided_tail(low, dof) + 1e-15 <= 1.0 + 1e-15
    assert two_sided_tail(0.0, dof) == pytest.approx(1.0)


@given(st.floats(1e-10, 0.5), degrees)
def test_the_limit_inverts_the_tail(tail: float, dof: int) -> None:
    limit = limit_with_tail(tail, dof)
    assert two_sided_tail(limit, dof) == pytest.approx(tail, rel=1e-5)


@given(st.floats(1e-10, 0.5), degrees)
def test_t_limits_exceed_gaussian_ones_and_shrink_with_degrees(tail: float, dof: int) -> None:
    gaussian = 0.0
    while gaussian_two_sided_tail(gaussian) > tail:
        gaussian += 1e-3
    assert limit_with_tail(tail, dof) >= limit_with_tail(tail, dof + 1) >= gaussian - 1e-3


def test_many_degrees_approach_the_gaussian_from_above() -> None:
    tail = gaussian_two_sided_tail(6.0)
    huge = limit_with_tail(tail, 10**9)
    assert huge == limit_with_tail(tail, MAX_EXACT_DEGREES)
    assert 6.0 < huge < 6.01


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, math.nan])
def test_a_tail_outside_0_1_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="lies in"):
        limit_with_tail(bad, 5)


def test_zero_degrees_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 degree"):
        two_sided_tail(1.0, 0)
