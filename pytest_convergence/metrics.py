"""LoGM and its companion per-parameter metrics, exact and fast.

LoGM (Shen et al., 2018) is the mean of log10|w| over the weights of a snapshot. We take it over
*nonzero* weights and count the zeros separately: pruned, quantized and dead weights are common, and
log10(0) = -inf must never leak into a verdict.

How it stays exact and fast without full-size temporaries: a product of two float32 (or float16,
bfloat16) values is exact in float64, and a product of a group of G weights carries the same
log10 as the sum of their logs up to G float64 roundings (~G * 1e-16). So each chunk of a tensor is
copied into one reused float64 buffer, multiplied down pairwise to one product per group, and only
the products go through the (slow) float64 log10. A chunk whose products leave float64's safe range
(zeros, extreme magnitudes, NaN, Inf) is redone element by element, which is exact for any input.

On CPU a compiled kernel (``_logm_kernel.c``, built at install time when a C compiler exists) does
the same in one pass without the float64 copy: exponent fields summed as integers, mantissas
multiplied in float64, several threads each taking a slice. The tensor path above is the exact
fallback, and the only one for accelerator tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np
import torch

from pytest_convergence.errors import NonFiniteWeightError

if TYPE_CHECKING:
    from numpy.typing import NDArray

try:
    from pytest_convergence import _logm_kernel
except ImportError:  # installed without a C compiler: the exact tensor path is used instead
    _logm_kernel = None  # type: ignore[assignment]

__all__ = [
    "CountedLogm",
    "DifferenceNorms",
    "LogmSum",
    "ParameterLogm",
    "ParameterStats",
    "WeightsLike",
    "compiled_kernel_available",
    "compose_logm_sum",
    "difference_norms",
    "logm",
    "logm_sum",
    "named_weights",
    "parameter_logms",
    "parameter_stats",
    "segment_log2_sums",
    "sums_of_squares",
    "trace_parameters",
]

WeightsLike: TypeAlias = "torch.nn.Module | Mapping[str, Any] | torch.Tensor | NDArray[Any]"

# Elements per chunk: the float64 buffer is 8 MiB on CPU. On an accelerator, larger chunks
# amortize the one host sync per chunk.
CPU_CHUNK = 1 << 20
ACCELERATOR_CHUNK = 1 << 24
# Tensors below this size take the element-by-element path: exact, and cheaper than the setup.
SMALL_TENSOR = 1 << 14
# Halvings before rescaling (products of 8 weights) and after it (8 * 16 = 128 weights per group).
HALVINGS_BEFORE_SCALE = 3
HALVINGS_AFTER_SCALE = 4
# Group products must stay inside float64's normal range, with margin, to be trusted.
SAFE_LOG10 = 290.0
# Compiled kernel: tensors from this size are split across threads; float16 and bfloat16 are
# widened to float32 (exactly) in chunks of KERNEL_CHUNK elements, 4 MiB per thread.
PARALLEL_TENSOR = 1 << 21
KERNEL_CHUNK = 1 << 20
LOG10_2 = math.log10(2.0)


@dataclass(frozen=True)
class LogmSum:
    """Sum of log10|w| over the nonzero weights of a tensor, and its counts.

    Sums, not means, are the unit of composition: the LoGM of a concatenation is the sum of the
    parts' log sums over the sum of their nonzero counts.
    """

    log10_sum: float
    nonzero: int
    zeros: int

    @property
    def count(self) -> int:
        return self.nonzero + self.zeros

    @property
    def logm(self) -> float | None:
        """Mean log10|w| over nonzero weights; None when there are none (all zero or empty)."""
        return self.log10_sum / self.nonzero if self.nonzero else None

    def __add__(self, other: LogmSum) -> LogmSum:
        return LogmSum(
            self.log10_sum + other.log10_sum, self.nonzero + other.nonzero, self.zeros + other.zeros
        )


@dataclass(frozen=True)
class ParameterLogm:
    """One parameter's LoGM with the counts a report needs beside it."""

    name: str
    logm: float | None
    count: int
    zeros: int


@dataclass(frozen=True)
class ParameterStats:
    """LoGM plus the companion magnitudes: L2 norm (weight-evolution poster) and standard
    deviation (the metric the LoGM paper tried first)."""

    name: str
    logm: float | None
    count: int
    zeros: int
    l2_norm: float
    std: float | None


class CountedLogm(Protocol):
    """A part's LoGM with its weight and zero counts: what :func:`compose_logm_sum` combines
    (:class:`ParameterLogm`, :class:`ParameterStats` and the CLI's rows all are one)."""

    @property
    def logm(self) -> float | None: ...

    @property
    def count(self) -> int: ...

    @property
    def zeros(self) -> int: ...


@dataclass(frozen=True)
class DifferenceNorms:
    """How far tensor b lies from tensor a: ``||b - a|| / ||a||`` and ``max |b - a|``.

    ``relative_l2_error`` is ``inf`` when a is all zeros and b is not, and 0 when both are.
    """

    relative_l2_error: float
    max_abs_diff: float


def logm(weights: WeightsLike) -> float:
    """Global LoGM: mean log10|w| over all nonzero floating-point weights.

    Accepts an ``nn.Module`` (its parameters), a state dict or any name -> tensor/array mapping
    (a :class:`~pytest_convergence.snapshots.Snapshot` streams tensor by tensor), a single tensor
    or a NumPy array. Raises ``ValueError`` when no nonzero weight exists, and
    :class:`~pytest_convergence.errors.NonFiniteWeightError` naming the parameter on NaN or Inf.
    """
    total = LogmSum(0.0, 0, 0)
    for name, tensor in named_weights(weights):
        total = total + logm_sum(tensor, name=name)
    if total.nonzero == 0:
        raise ValueError(
            f"LoGM is undefined: no nonzero weights ({total.count} weights, {total.zeros} zeros)"
        )
    return total.log10_sum / total.nonzero


def parameter_logms(weights: WeightsLike) -> list[ParameterLogm]:
    """Each parameter's LoGM, weight count and zero count, in the weights' own order."""
    results = []
    for name, tensor in named_weights(weights):
        part = logm_sum(tensor, name=name)
        results.append(ParameterLogm(name, part.logm, part.count, part.zeros))
    return results


def parameter_stats(weights: WeightsLike) -> list[ParameterStats]:
    """Per-parameter LoGM, counts, L2 norm and standard deviation, for reports."""
    results = []
    for name, tensor in named_weights(weights):
        part = logm_sum(tensor, name=name)
        l2_norm, std = _norm_and_std(tensor)
        results.append(ParameterStats(name, part.logm, part.count, part.zeros, l2_norm, std))
    return results


def compose_logm_sum(parts: Iterable[CountedLogm]) -> LogmSum:
    """The :class:`LogmSum` of a concatenation, from its parts' LoGMs and counts.

    Tables and traces keep each parameter's LoGM (a mean), not its log sum; the mean times the
    nonzero count recovers the sum, and ``fsum`` adds them without the rounding a running sum
    would accumulate over thousands of parameters. A part without a LoGM has no nonzero weight
    and contributes its zeros only. ``.logm`` of the result is the global LoGM.
    """
    weighted: list[float] = []
    nonzero = zeros = 0
    for part in parts:
        part_nonzero = part.count - part.zeros
        if part.logm is not None:
            weighted.append(part.logm * part_nonzero)
        nonzero += part_nonzero
        zeros += part.zeros
    return LogmSum(math.fsum(weighted), nonzero, zeros)


def difference_norms(
    tensor_a: torch.Tensor, tensor_b: torch.Tensor, *, chunk: int = CPU_CHUNK
) -> DifferenceNorms:
    """Relative L2 error and largest absolute difference of b from a, in float64.

    Taken ``chunk`` elements at a time, so that comparing two large tensors never makes a
    full-size float64 copy; the tensors may differ in dtype (a float16 implementation against a
    float32 one) but not in element count.
    """
    flat_a, flat_b = tensor_a.reshape(-1), tensor_b.reshape(-1)
    error_sq, norm_sq, largest = 0.0, 0.0, 0.0
    for start in range(0, flat_a.numel(), chunk):
        piece_a = flat_a[start : start + chunk].to(torch.float64)
        difference = piece_a - flat_b[start : start + chunk].to(torch.float64)
        error_sq += float(torch.dot(difference, difference))
        norm_sq += float(torch.dot(piece_a, piece_a))
        largest = max(largest, float(difference.abs().max()))
    if norm_sq > 0:
        return DifferenceNorms(math.sqrt(error_sq) / math.sqrt(norm_sq), largest)
    return DifferenceNorms(math.inf if error_sq > 0 else 0.0, largest)


def named_weights(weights: WeightsLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating-point weight in ``weights``.

    Integer and bool tensors in a mapping (``num_batches_tracked``, say) are not weights and are
    skipped; a single non-floating tensor passed on its own is a ``TypeError``.
    """
    if isinstance(weights, torch.nn.Module):
        yield from ((name, p.detach()) for name, p in weights.named_parameters())
    elif isinstance(weights, torch.Tensor | np.ndarray):
        tensor = _as_tensor(weights, "tensor")
        _require_floating(tensor, "tensor")
        yield "tensor", tensor
    elif isinstance(weights, Mapping):
        yield from _mapping_weights(weights, prefix="")
    else:
        raise TypeError(
            "weights must be an nn.Module, a mapping of name -> tensor or array, a tensor or a "
            f"NumPy array, not {type(weights).__name__}"
        )


def _mapping_weights(mapping: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _mapping_weights(value, prefix=f"{name}.")
            continue
        tensor = _as_tensor(value, name)
        if tensor.is_floating_point():
            yield name, tensor
        elif tensor.is_complex():
            raise TypeError(
                f"parameter {name!r} is complex ({tensor.dtype}): LoGM needs real weights"
            )


def _as_tensor(value: object, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub":
            raise TypeError(f"parameter {name!r} has unsupported NumPy dtype {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"parameter {name!r} is a {type(value).__name__}, not a tensor or array")


def _require_floating(tensor: torch.Tensor, name: str) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{name} has dtype {tensor.dtype}: LoGM is defined for floating weights")


def logm_sum(tensor: torch.Tensor, *, name: str = "tensor") -> LogmSum:
    """Exact sum of log10|w| over the nonzero elements of one tensor, computed where it lives."""
    _require_floating(tensor, f"parameter {name!r}")
    if tensor.numel() == 0:
        return LogmSum(0.0, 0, 0)
    if _logm_kernel is not None and tensor.device.type == "cpu":
        return _compiled_log10_sum(tensor, name)
    chunk = CPU_CHUNK if tensor.device.type == "cpu" else ACCELERATOR_CHUNK
    buffer = torch.empty(min(chunk, tensor.numel()), dtype=torch.float64, device=tensor.device)
    total = LogmSum(0.0, 0, 0)
    for piece in _flat_chunks(tensor, chunk):
        part = None
        if piece.numel() >= SMALL_TENSOR:
            # Most chunks hold no zero, so try without the masking pass first.
            part = _grouped_log10_sum(piece, buffer, name, mask_zeros=False)
            if part is None:
                part = _grouped_log10_sum(piece, buffer, name, mask_zeros=True)
        if part is None:
            part = _elementwise_log10_sum(piece, buffer, name)
        total = total + part
    return total


def compiled_kernel_available() -> bool:
    """Whether CPU tensors take the compiled one-pass kernel (benchmarks report it)."""
    return _logm_kernel is not None


def _compiled_log10_sum(tensor: torch.Tensor, name: str) -> LogmSum:
    threads = max(1, torch.get_num_threads())
    if tensor.numel() < PARALLEL_TENSOR or threads == 1:
        parts = [_kernel_totals(piece) for piece in _kernel_pieces(tensor, tensor.numel())]
    else:
        # One slice per thread for float32/float64 (no copy at all); widened types in chunks.
        size = tensor.numel() if _native(tensor) else KERNEL_CHUNK
        slice_size = -(-min(size, tensor.numel()) // threads)
        parts = list(_kernel_pool().map(_kernel_totals, _kernel_pieces(tensor, slice_size)))
    exponents = sum(part[0] for part in parts)
    mantissas = math.fsum(part[1] for part in parts)
    nonzero, zeros, nans, infs = (sum(int(part[i]) for part in parts) for i in range(2, 6))
    if nans or infs:
        raise NonFiniteWeightError(name, nan_count=nans, inf_count=infs)
    return LogmSum((exponents + mantissas) * LOG10_2, nonzero, zeros)


def segment_log2_sums(values: NDArray[Any], ends: NDArray[Any], out: NDArray[Any]) -> None:
    """Row i of ``out``: exponent sum, mantissa log2 sum, zeros, non-finite count and sum of
    squares of ``values[ends[i-1]:ends[i]]`` (float32 or float64, C-contiguous), by the
    compiled kernel."""
    assert _logm_kernel is not None, "check compiled_kernel_available() first"
    _logm_kernel.segment_log2_sums(values, values.itemsize, ends, out)


def compare_segments(
    before: NDArray[np.float64],
    after: NDArray[np.float64],
    candidate: NDArray[np.float64],
    ends: NDArray[np.int64],
    out: NDArray[np.float64],
) -> None:
    """Row i of ``out``: the sums of u*u, e*e, e*u and e*after over segment i (ending before
    ``ends[i]``) of three float64 vectors, u = after - before, e = candidate - after; the bits
    of ``np.add.reduceat`` over those products (NaN signs aside), by the compiled kernel."""
    assert _logm_kernel is not None, "check compiled_kernel_available() first"
    _logm_kernel.compare_segments(before, after, candidate, ends, out)


# Per parameter LoGM, zero count, sum of squares and update norm; then the global LoGM.
TraceSums: TypeAlias = tuple[list[float | None], list[int], list[float], list[float], float | None]


def trace_parameters(
    weights: Sequence[NDArray[Any]], previous: NDArray[Any] | None, out: NDArray[Any]
) -> TraceSums | None:
    """One step's trace of flat NumPy views of a model's parameters, by the compiled kernel:
    ``out`` gets their float64 concatenation; returned, per parameter, the LoGM (None without
    a nonzero weight or with a NaN or Inf one), zero count, sum of squares and norm of the
    change from ``previous``, then the global LoGM (None likewise). None, with nothing
    written, when a view is not a C-contiguous float32/float64 array (the caller takes the
    general path)."""
    assert _logm_kernel is not None, "check compiled_kernel_available() first"
    return _logm_kernel.trace_parameters(weights, previous, out)


def sums_of_squares(arrays: Sequence[Any]) -> list[float] | None:
    """Float64 sum of squares of each of ``arrays`` (C-contiguous float32/float64 NumPy arrays
    or DLPack capsules of CPU tensors like them), by the compiled kernel; None when one is
    neither (the caller takes the general path)."""
    assert _logm_kernel is not None, "check compiled_kernel_available() first"
    return _logm_kernel.sums_of_squares(arrays)


def _native(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float32, torch.float64)


def _kernel_pieces(tensor: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """Contiguous 1-D pieces of at most ``size`` elements; copies only of strided pieces."""
    for piece in _flat_chunks(tensor, max(1, size)):
        yield piece.contiguous()


def _kernel_totals(piece: torch.Tensor) -> tuple[int, float, int, int, int, int]:
    """(exponent sum, mantissa log2 sum, nonzero, zeros, NaNs, Infs) of one piece."""
    assert _logm_kernel is not None
    if _native(piece):
        array = piece.numpy()
        return _logm_kernel.log2_sum(array, array.itemsize)
    totals = (0, 0.0, 0, 0, 0, 0)
    for start in range(0, piece.numel(), KERNEL_CHUNK):
        # float16 and bfloat16 values are exactly representable in float32.
        array = piece[start : start + KERNEL_CHUNK].to(torch.float32).numpy()
        part = _logm_kernel.log2_sum(array, array.itemsize)
        totals = tuple(a + b for a, b in zip(totals, part, strict=True))  # type: ignore[assignment]
    return totals


@functools.cache
def _kernel_pool() -> ThreadPoolExecutor:
    """Threads for the kernel, which releases the GIL; sized on first use, reused after."""
    return ThreadPoolExecutor(
        max_workers=max(2, torch.get_num_threads()), thread_name_prefix="logm"
    )


def _flat_chunks(tensor: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """1-D pieces of at most ``size`` elements: views when contiguous, small copies otherwise."""
    if tensor.is_contiguous() or tensor.dim() <= 1:
        flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor
        for start in range(0, flat.numel(), size):
            yield flat[start : start + size]
        return
    rows_per_piece = max(1, size // max(1, tensor[0].numel()))
    for start in range(0, tensor.shape[0], rows_per_piece):
        block = tensor[start : start + rows_per_piece]
        if block.numel() <= size:
            yield block.reshape(-1)
        else:
            for row in block:
                yield from _flat_chunks(row, size)


def _grouped_log10_sum(
    piece: torch.Tensor, buffer: torch.Tensor, name: str, *, mask_zeros: bool
) -> LogmSum | None:
    """Fast path; None when a partial product is zero, non-finite or near float64's limits."""
    n = _round_down_to_groups(piece.numel())
    products = buffer[:n]
    products.copy_(piece[:n])
    zeros = 0
    if mask_zeros:
        zeros = n - int(torch.count_nonzero(products))
        products.masked_fill_(products == 0, 1.0)
    n = _halve(products, n, HALVINGS_BEFORE_SCALE)
    # A zero, NaN, Inf or a subnormal (precision already lost) in any partial product sends the
    # chunk down the exact path.
    low, high = torch.aminmax(products[:n].abs_())
    if not (low.item() > 10.0**-SAFE_LOG10 and high.item() < 10.0**SAFE_LOG10):
        return None
    # Rescale so group products of typical weights sit near 1 whatever their magnitude (1e-2
    # weights multiply to 1e-256 over 128 of them), using an estimate that need not be exact.
    scale_log10 = math.floor(float(products[:64].log10().mean()))
    products[:n].mul_(10.0**-scale_log10)
    n = _halve(products, n, HALVINGS_AFTER_SCALE)
    logs = products[:n].log10_()
    low, high = torch.aminmax(logs)
    if not (low.item() > -SAFE_LOG10 and high.item() < SAFE_LOG10):
        return None
    log10_sum = float(logs.sum()) + scale_log10 * (n << HALVINGS_AFTER_SCALE)
    grouped = LogmSum(log10_sum, products.numel() - zeros, zeros)
    remainder = piece[products.numel() :]
    if remainder.numel() == 0:
        return grouped
    return grouped + _elementwise_log10_sum(remainder, buffer[products.numel() :], name)


def _round_down_to_groups(n: int) -> int:
    group = 1 << (HALVINGS_BEFORE_SCALE + HALVINGS_AFTER_SCALE)
    return n - n % group


def _halve(values: torch.Tensor, n: int, times: int) -> int:
    for _ in range(times):
        n //= 2
        values[:n].mul_(values[n : 2 * n])
    return n


def _elementwise_log10_sum(piece: torch.Tensor, buffer: torch.Tensor, name: str) -> LogmSum:
    values = buffer[: piece.numel()]
    values.copy_(piece)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        nan_count = int(torch.isnan(values).sum())
        raise NonFiniteWeightError(
            name, nan_count=nan_count, inf_count=int((~finite).sum()) - nan_count
        )
    values.abs_()
    zeros = values.numel() - int(torch.count_nonzero(values))
    values.masked_fill_(values == 0, 1.0).log10_()
    return LogmSum(float(values.sum()), values.numel() - zeros, zeros)


def _norm_and_std(tensor: torch.Tensor) -> tuple[float, float | None]:
    """L2 norm and population standard deviation, accumulated chunk by chunk in float64.

    Chunk variances are merged with Chan et al.'s formula, which stays accurate when the mean is
    large next to the spread (as it is for batch-norm scales near 1).
    """
    squares = 0.0
    count, mean, m2 = 0, 0.0, 0.0
    for piece in _flat_chunks(tensor, CPU_CHUNK):
        values = piece.to(torch.float64)
        squares += float(torch.dot(values, values))
        var, piece_mean = torch.var_mean(values, correction=0)
        n = values.numel()
        delta = float(piece_mean) - mean
        total = count + n
        mean += delta * n / total
        m2 += float(var) * n + delta * delta * count * n / total
        count = total
    std = math.sqrt(m2 / count) if count else None
    return math.sqrt(squares), std
