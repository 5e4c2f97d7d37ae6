"""Type stub of the compiled LoGM kernel (see _logm_kernel.c)."""

from collections.abc import Sequence
from typing import Any

from numpy.typing import NDArray

VECTORIZED: int

def log2_sum(
    buffer: NDArray[Any] | bytes | memoryview, itemsize: int, /
) -> tuple[int, float, int, int, int, int]: ...
def segment_log2_sums(
    buffer: NDArray[Any], itemsize: int, ends: NDArray[Any], out: NDArray[Any], /
) -> None: ...
def trace_parameters(
    weights: Sequence[NDArray[Any]], previous: NDArray[Any] | None, out: NDArray[Any], /
) -> tuple[list[float | None], list[int], list[float], list[float], float | None] | None: ...
def sums_of_squares(arrays: Sequence[Any], /) -> list[float] | None: ...
def compare_segments(
    before: NDArray[Any],
    after: NDArray[Any],
    candidate: NDArray[Any],
    ends: NDArray[Any],
    out: NDArray[Any],
    /,
) -> None: ...
