"""The compiled kernel's comparison sums (``metrics.compare_segments``) are NumPy's to the last
bit, so the compiled and the NumPy path of a co-simulation write the same traces."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pytest_convergence import metrics

pytestmark = pytest.mark.skipif(
    not metrics.compiled_kernel_available(), reason="the compiled kernel was not built"
)


def numpy_sums(
    before: np.ndarray, after: np.ndarray, candidate: np.ndarray, lengths: list[int]
) -> np.ndarray:
    """What the NumPy path computes: the four products stored in rows, then reduceat."""
    sums = np.zeros((4, len(lengths)))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    nonempty = [i for i, length in enumerate(lengths) if length]
    with np.errstate(all="ignore"):
        update, error = after - before, candidate - after
        rows = np.stack([update * update, error * error, error * update, error * after])
        if nonempty:
            sums[:, nonempty] = np.add.reduceat(rows, starts[nonempty], axis=1)
    return sums.T


def compiled_sums(
    before: np.ndarray, after: np.ndarray, candidate: np.ndarray, lengths: list[int]
) -> np.ndarray:
    out = np.empty((len(lengths), 4))
    ends = np.cumsum(lengths).astype(np.int64)
    metrics.compare_segments(before, after, candidate, ends, out)
    return out


def assert_same_bits(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal values, NaN where NaN, and the same sign of zero (NaN's sign aside)."""
    assert np.array_equal(got, expected, equal_nan=True)
    numbers = ~np.isnan(expected)
    assert np.array_equal(np.signbit(got[numbers]), np.signbit(expected[numbers]))


values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([0.0, -0.0, 1.0, math.inf, math.nan]),
)


@given(lengths=st.lists(st.integers(0, 150), min_size=1, max_size=5), data=st.data())
def test_the_comparison_sums_are_numpys_to_the_last_bit(
    lengths: list[int], data: st.DataObject
) -> None:
    total = sum(lengths)
    before, after, candidate = (
        data.draw(hnp.arrays(np.float64, total, elements=values)) for _ in range(3)
    )
    if data.draw(st.booleans()):  # unchanged weights: runs of exact and negative zeros
        candidate[: total // 2] = after[: total // 2]
        before[::3] = -0.0
    assert_same_bits(
        compiled_sums(before, after, candidate, lengths),
        numpy_sums(before, after, candidate, lengths),
    )


@pytest.mark.parametrize("length", [1, 2, 7, 8, 9, 128, 129, 136, 8192, 8193, 100_003])
def test_the_comparison_sums_follow_numpys_pairwise_blocks_at_every_length(length: int) -> None:
    generator = np.random.default_rng(length)
    before = generator.standard_normal(length)
    after = before + generator.standard_normal(length) * 1e-3
    candidate = after + generator.standard_normal(length) * 1e-7
    short = min(3, length)
    lengths = [length, short, 0, length]
    repeat = np.concatenate([before, before[:short], before])
    stacked = [np.concatenate([v, v[:short], v]) for v in (after, candidate)]
    assert_same_bits(
        compiled_sums(repeat, *stacked, lengths), numpy_sums(repeat, *stacked, lengths)
    )


def test_a_run_of_negative_zeros_sums_to_negative_zero_as_in_numpy() -> None:
    """The sign decides whether a bias of zero is written as 0.0 or -0.0 in a trace."""
    before, after = np.zeros(5), np.zeros(5)
    candidate = np.full(5, -0.0)
    got = compiled_sums(before, after, candidate, [5])
    assert np.signbit(got[0, 2]) == np.signbit(numpy_sums(before, after, candidate, [5])[0, 2])


def test_vectors_of_other_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="three float64 buffers of one length"):
        metrics.compare_segments(
            np.zeros(3), np.zeros(4), np.zeros(4), np.array([4], np.int64), np.empty((1, 4))
        )
