"""Type stub of the compiled LoGM kernel (see _logm_kernel.c)."""

from typing import Any

from numpy.typing import NDArray

def log2_sum(
    buffer: NDArray[Any] | bytes | memoryview, itemsize: int, /
) -> tuple[int, float, int, int, int, int]: ...
def segment_log2_sums(
    buffer: NDArray[Any], itemsize: int, ends: NDArray[Any], out: NDArray[Any], /
) -> None: ...
