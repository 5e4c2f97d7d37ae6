"""Per-step statistics of every parameter at once, for traces and comparisons.

A model has tens to hundreds of parameter tensors, and a small model's whole training step
takes a few hundred microseconds: computing LoGM, zero counts and norms one tensor and one
statistic at a time would cost more than the step. On the CPU one compiled call per step
(:meth:`ParameterLayout.compiled_trace`) reads the parameters in place and returns every
parameter's LoGM, zero count, weight and update norm and the global LoGM, with the step's
float64 weight vector. Elsewhere (CUDA, no compiler, half precision or strided tensors) the
parameters are flattened into one float64 vector and every statistic is a segment sum over it
(the kernel's segmented pass where it exists, exact float64 tensor operations otherwise): a
fixed handful of vectorized operations per step, whatever the number of parameters.
Comparisons of two such vectors are segment sums over them everywhere. (In this module a
weight vector is an in-memory :class:`FlatWeights`; a *snapshot* is a weights file,
:mod:`pytest_convergence.snapshots`.)

Gradient norms are taken earlier, between backward and the optimizer step
(:func:`gradient_norms`), from ``.grad`` itself: no copy of the gradients is needed for them.
A co-simulation copies the gradients (:class:`KeptGradients`) only for candidates that start
from the reference's.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, overload

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils import dlpack

from pytest_convergence import metrics
from pytest_convergence.traces import ParameterComparison, StepTrace

__all__ = [
    "FlatWeights",
    "KeptGradients",
    "ParameterLayout",
    "WeightSeries",
    "compare_weights",
    "gradient_norms",
    "step_trace",
]

# A model's weights as one float64 vector: NumPy where the compiled kernel wrote it, a tensor
# where tensor operations did (on an accelerator, a tensor on its device).
FlatVector: TypeAlias = "torch.Tensor | NDArray[np.float64]"

# torch's documented legacy DLPack export, absent from torch.utils.dlpack's __all__.
_to_dlpack: Callable[[torch.Tensor], Any] = dlpack.to_dlpack  # type: ignore[attr-defined]

# What the kernel reads for a parameter without a gradient: nothing, a sum of squares of 0.
_NO_GRADIENT = np.empty(0, dtype=np.float32)

# Models whose parameter views a layout keeps: the reference and candidate of a co-simulation,
# and the one-off models of a replay or diagnostic.
MAX_CACHED_VIEWS = 4


class KeptGradients(Sequence[torch.Tensor]):
    """A copy of a model's gradients, taken after backward into buffers kept across steps.

    A co-simulation keeps the gradients the reference's optimizer saw for its candidates that
    only transform gradients: they start from them instead of a forward pass of their own. One
    fused copy into buffers made once costs about half of cloning each gradient
    (docs/performance.md).

    The buffers are overwritten by the next :meth:`copy_from`: whoever keeps a gradient past
    the step clones it. A sparse gradient (``nn.Embedding(sparse=True)``) is kept as a sparse
    copy, as the optimizer saw it (its buffer then holds it densely).
    """

    def __init__(self, parameters: Sequence[torch.Tensor]) -> None:
        self._tensors = [
            torch.empty_like(p, memory_format=torch.contiguous_format).detach() for p in parameters
        ]
        self._sparse: dict[int, torch.Tensor] = {}

    def copy_from(self, parameters: Sequence[torch.Tensor]) -> KeptGradients:
        """Copy each parameter's ``.grad`` (zeros where it has none) into the buffers."""
        gradients = [p.grad for p in parameters]
        if len(gradients) != len(self._tensors):
            raise ValueError(
                f"kept gradients hold {len(self._tensors)} parameters, got {len(gradients)}"
            )
        self._sparse = {}
        targets, sources = [], []
        # No graph: a gradient taken with create_graph=True (double backward) has one, and the
        # copy, which becomes the candidates' .grad, must not.
        with torch.no_grad():
            for index, (tensor, gradient) in enumerate(zip(self._tensors, gradients, strict=True)):
                if gradient is None:
                    tensor.zero_()
                elif gradient.layout != torch.strided:
                    tensor.copy_(gradient.to_dense())
                    self._sparse[index] = gradient.detach().clone()
                else:
                    targets.append(tensor)
                    sources.append(gradient)
            if targets:
                torch._foreach_copy_(targets, sources)
        return self

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        position = range(len(self))[index]  # negative indices, and IndexError, as in a list
        return self._sparse.get(position, self._tensors[position])

    def __len__(self) -> int:
        return len(self._tensors)


class ParameterLayout:
    """Names and sizes of a model's parameters, and how to sum a flat vector per parameter."""

    def __init__(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
        self.names = list(names)
        self.counts = [t.numel() for t in tensors]
        ends = list(itertools.accumulate(self.counts))
        self._bounds = list(zip([0, *ends[:-1]] if ends else [], ends, strict=True))
        self._ends = np.array(ends, dtype=np.int64)
        # reduceat sums [start_i, start_i+1) but returns element start_i for an empty segment
        # (and fails on one at the end): only non-empty parameters go through it.
        self._nonempty = np.flatnonzero(np.array(self.counts, dtype=np.int64) > 0)
        self._nonempty_starts = np.array([start for start, _ in self._bounds], dtype=np.int64)[
            self._nonempty
        ]
        self._size = ends[-1] if ends else 0
        self._device = tensors[0].device if tensors else torch.device("cpu")
        self._rows = torch.empty(4, self._size, dtype=torch.float64, device=self._device)
        # Elementwise work on the CPU goes through NumPy views of the same rows: its
        # single-threaded ufuncs cost a fraction of torch's per-call overhead, and do not wake
        # an idle OpenMP pool, on the few thousand weights of a small model.
        self._row_arrays = self._rows.numpy() if self._device.type == "cpu" else None
        # NumPy views of each model's parameters, by their storage addresses (see _views_of).
        self._views: dict[tuple[int, ...], list[NDArray[Any]]] = {}

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One float64 vector of all parameters, in layout order."""
        flat = torch.empty(self._size, dtype=torch.float64, device=self._device)
        views = self._views_of(tensors) if tensors and self._device.type == "cpu" else None
        if views is not None:
            # One NumPy call instead of a torch copy per parameter: the fixed cost of a step's
            # tracing, which small models notice.
            np.concatenate(views, out=flat.numpy(), casting="same_kind")
            return flat
        for tensor, (start, end) in zip(tensors, self._bounds, strict=True):
            flat[start:end].copy_(tensor.detach().reshape(-1))
        return flat

    def _views_of(self, tensors: Sequence[torch.Tensor]) -> list[NDArray[Any]] | None:
        """Flat NumPy views of contiguous float32/float64 CPU tensors, reused while every tensor
        keeps its storage; None where one does not qualify.

        An optimizer updates parameters in place, so the views stay current. A parameter whose
        ``.data`` is reassigned gets a new address, and because the cached view holds on to the
        old storage, no new tensor can take over that address while the entry exists. A few
        entries: a co-simulation alternates between its two models.
        """
        key = tuple(map(torch.Tensor.data_ptr, tensors))
        views = self._views.get(key)
        if views is not None:
            return views
        if len(tensors) != len(self.counts) or not all(
            tensor.device.type == "cpu"
            and tensor.dtype in (torch.float32, torch.float64)
            and tensor.is_contiguous()
            and tensor.numel() == count
            for tensor, count in zip(tensors, self.counts, strict=True)
        ):
            return None
        if len(self._views) >= MAX_CACHED_VIEWS:
            self._views.pop(next(iter(self._views)))
        views = [tensor.detach().numpy().reshape(-1) for tensor in tensors]
        self._views[key] = views
        return views

    def rows(self, count: int) -> torch.Tensor:
        """Scratch rows to write per-element statistics into before :meth:`sum_rows`."""
        return self._rows[:count]

    @contextlib.contextmanager
    def elementwise(self, count: int) -> Iterator[tuple[Any, Any]]:
        """The array module for elementwise work and ``count`` scratch rows: NumPy and views of
        the rows on the CPU, torch and the rows elsewhere. Both spell ``subtract``, ``multiply``
        and ``square`` with ``out=`` the same way; pass operands through :meth:`operand`.
        A diverged candidate's NaN and Inf are data here, so NumPy does not warn about them."""
        with np.errstate(over="ignore", invalid="ignore"):
            if self._row_arrays is not None:
                yield np, self._row_arrays[:count]
            else:
                yield torch, self._rows[:count]

    def operand(self, values: FlatVector) -> Any:
        """``values`` as the array type :meth:`elementwise` works in (no copy)."""
        if isinstance(values, np.ndarray):
            return values
        return values.numpy() if self._row_arrays is not None else values

    def sum_rows(self, rows: torch.Tensor | NDArray[Any]) -> list[list[float]]:
        """Per-parameter sums of each row: one NumPy ``add.reduceat`` call on the CPU, a small
        reduction per parameter elsewhere (both cheaper than a scatter over the whole vector)."""
        if isinstance(rows, torch.Tensor) and rows.device.type != "cpu":
            per_parameter = [rows[:, a:b].sum(dim=1) for a, b in self._bounds]
            if not per_parameter:
                return [[] for _ in range(rows.shape[0])]
            return torch.stack(per_parameter, dim=1).tolist()
        array = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        # A diverged candidate's NaN and Inf are data here, reported by the verdict.
        with np.errstate(invalid="ignore", over="ignore"):
            if len(self._nonempty) == len(self.counts) > 0:
                sums = np.add.reduceat(array, self._nonempty_starts, axis=1)
            else:
                sums = np.zeros((array.shape[0], len(self.counts)), dtype=np.float64)
                if len(self._nonempty):
                    some = np.add.reduceat(array, self._nonempty_starts, axis=1)
                    sums[:, self._nonempty] = some
        result: list[list[float]] = sums.tolist()
        return result

    def comparison_sums(
        self, before: FlatVector, after: FlatVector, candidate: FlatVector
    ) -> list[list[float]]:
        """Per parameter, the sums of u*u, e*e, e*u and e*after, with the update
        u = after - before and the error e = candidate - after: one pass of the compiled kernel
        over NumPy vectors (the same bits as NumPy's sums), elementwise rows and
        :meth:`sum_rows` elsewhere."""
        vectors = (before, after, candidate)
        if metrics.compiled_kernel_available() and all(
            isinstance(v, np.ndarray) and v.dtype == np.float64 and v.shape == (self._size,)
            for v in vectors
        ):
            out = np.empty((len(self.counts), 4), dtype=np.float64)
            metrics.compare_segments(before, after, candidate, self._ends, out)  # type: ignore[arg-type]
            sums: list[list[float]] = out.T.tolist()
            return sums
        with self.elementwise(4) as (xp, rows):
            update, error, projection, radial = rows
            start, end, other = (self.operand(v) for v in vectors)
            xp.subtract(end, start, out=update)
            xp.subtract(other, end, out=error)
            xp.multiply(error, update, out=projection)
            xp.multiply(error, end, out=radial)
            xp.square(update, out=update)
            xp.square(error, out=error)
        return self.sum_rows(rows)

    def non_finite_counts(self, values: FlatVector, index: int) -> tuple[int, int]:
        """The NaN and the infinite weights of parameter ``index`` in ``values``: counted only
        for a parameter whose norm is not finite, so a healthy step never pays for them."""
        start, end = self._bounds[index]
        segment = values[start:end]
        if isinstance(segment, torch.Tensor):
            return int(torch.isnan(segment).sum()), int(torch.isinf(segment).sum())
        return int(np.isnan(segment).sum()), int(np.isinf(segment).sum())

    def update_norms(self, values: FlatVector, before: FlatVector) -> list[float]:
        """Per-parameter norm of ``values - before``, two flat vectors of this layout."""
        with self.elementwise(1) as (xp, rows):
            xp.subtract(self.operand(values), self.operand(before), out=rows[0])
            xp.square(rows, out=rows)
        (squares,) = self.sum_rows(rows)
        return [math.sqrt(square) for square in squares]

    def kernel_sums(self, values: torch.Tensor) -> tuple[list[float], list[int], list[float]]:
        """Per-parameter sums of log10|w| over nonzero weights, zero counts and sums of squares
        of a flat CPU vector, in one pass of the compiled kernel (non-finite weights give a NaN
        log sum, as the tensor path does: the verdict reports them)."""
        out = np.empty((len(self._ends), 5), dtype=np.float64)
        metrics.segment_log2_sums(values.numpy(), self._ends, out)
        log10_sums = ((out[:, 0] + out[:, 1]) * metrics.LOG10_2).tolist()
        for index in np.flatnonzero(out[:, 3]).tolist():
            log10_sums[index] = math.nan
        return log10_sums, out[:, 2].astype(np.int64).tolist(), out[:, 4].tolist()

    def compiled_trace(
        self,
        tensors: Sequence[torch.Tensor],
        previous: FlatVector | None,
        into: FlatVector | None = None,
    ) -> tuple[NDArray[np.float64], metrics.TraceSums] | None:
        """The flat vector and :func:`metrics.trace_parameters`' sums, read straight from the
        parameters' storage in one compiled call; None where the kernel cannot take them (no
        compiler, an accelerator, a dtype other than float32/float64, a strided tensor). The
        vector is ``into`` where that is one of this layout's NumPy vectors, else a new one.

        A small model's whole training step takes a few hundred microseconds, so the fixed
        cost matters as much as the cost per weight: each weight is read once, and the
        statistics come back as lists, ready for the trace's records.
        """
        if not metrics.compiled_kernel_available() or self._row_arrays is None or not tensors:
            return None
        views = self._views_of(tensors)
        if views is None:
            return None
        # A NumPy vector: a tensor would cost three more binding calls per step.
        if (
            isinstance(into, np.ndarray)
            and into.shape == (self._size,)
            and into.dtype == np.float64
        ):
            values = into
        else:
            values = np.empty(self._size, dtype=np.float64)
        since = self.operand(previous) if previous is not None else None
        sums = metrics.trace_parameters(views, since, values)
        return (values, sums) if sums is not None else None


@dataclass(slots=True)
class FlatWeights:
    """A weight vector with each parameter's LoGM, zero count and squared norm, the global
    LoGM and, when taken after a step, each parameter's update and gradient norms for that
    step. A LoGM is None where its weights have no nonzero value or a NaN or Inf one.

    Read-only by convention, not frozen: one is built per model per step, and a frozen
    dataclass's constructor costs a few microseconds more, which a small model's step notices.
    """

    values: FlatVector
    logms: list[float | None]
    zeros: list[int]
    squares: list[float]
    global_logm: float | None
    update_norms: list[float] | None = None
    gradient_norms: list[float] | None = None

    @classmethod
    def of(
        cls,
        layout: ParameterLayout,
        tensors: Sequence[torch.Tensor],
        *,
        previous: FlatWeights | None = None,
        gradient_norms: list[float] | None = None,
        reuse: FlatWeights | None = None,
    ) -> FlatWeights:
        """Flat weights of ``tensors``; with ``previous`` (those before the step) the update
        norms, taken in the same pass. ``gradient_norms``, the step's (:func:`gradient_norms`,
        measured before the optimizer step), are kept beside them.

        ``reuse``: flat weights of the same layout that the caller is done with (a run's from two
        steps back), whose vector the new one may overwrite: on a small model, allocating a
        fresh vector and writing it while it is out of cache cost a measurable share of the
        step (benchmarks/tracing_overhead.py). It must not be used afterwards.
        """
        before = previous.values if previous is not None else None
        into = reuse.values if reuse is not None else None
        if into is not None and into is before:
            raise ValueError("FlatWeights.of: reuse must not be previous, which it reads")
        compiled = layout.compiled_trace(tensors, before, into)
        if compiled is not None:
            values, (logms, zeros, squares, update_norms, global_logm) = compiled
            return cls(
                values,
                logms,
                zeros,
                squares,
                global_logm,
                update_norms if previous is not None else None,
                gradient_norms,
            )
        flat = layout.flatten(tensors)
        logms, zeros, squares, global_logm = _weight_statistics(layout, flat)
        return cls(
            flat,
            logms,
            zeros,
            squares,
            global_logm,
            layout.update_norms(flat, before) if before is not None else None,
            gradient_norms,
        )

    @property
    def finite(self) -> list[bool]:
        """A parameter's weights are all finite exactly when their sum of squares is (float32
        weights cannot overflow it in float64; NaN and Inf propagate)."""
        return [math.isfinite(square) for square in self.squares]


class WeightSeries:
    """One implementation's flat weights, step after step: each taken with the one before it (its
    update norms) and written into the vector of the one before that, which nothing reads any
    more (:meth:`FlatWeights.of`'s ``reuse``). The one place that decides when a vector is
    spent, so no caller overwrites one it still needs."""

    def __init__(self, layout: ParameterLayout, tensors: Sequence[torch.Tensor]) -> None:
        self.layout = layout
        self.latest = FlatWeights.of(layout, tensors)
        self._spent: FlatWeights | None = None

    def advance(
        self, tensors: Sequence[torch.Tensor], gradient_norms: list[float] | None
    ) -> tuple[FlatWeights, FlatWeights]:
        """The flat weights before and after the step just taken; those before stay valid
        until the next call."""
        before = self.latest
        after = FlatWeights.of(
            self.layout,
            tensors,
            previous=before,
            gradient_norms=gradient_norms,
            reuse=self._spent,
        )
        self._spent, self.latest = before, after
        return before, after


def gradient_norms(parameters: Sequence[torch.Tensor]) -> list[float]:
    """L2 norm of each parameter's ``.grad`` as it is now, 0 where it has none.

    Taken between backward (and any gradient transform) and the optimizer step: the gradients
    the optimizer is about to see, read in place, which is cheaper than copying them for later
    and right whatever the optimizer then does to ``.grad``. On the CPU one compiled pass over
    DLPack capsules of them (new tensors every step: a capsule costs a third of
    ``Tensor.numpy()``); torch's fused ``_foreach_norm`` where the kernel cannot read one.
    """
    gradients = [p.grad for p in parameters]
    if metrics.compiled_kernel_available():
        try:
            capsules = [_NO_GRADIENT if g is None else _to_dlpack(g) for g in gradients]
        except (TypeError, RuntimeError, BufferError):  # sparse ones, for instance
            capsules = None
        sums = metrics.sums_of_squares(capsules) if capsules is not None else None
        if sums is not None:
            return list(map(math.sqrt, sums))
    return _tensor_norms(gradients, parameters)


def _tensor_norms(
    gradients: Sequence[torch.Tensor | None], parameters: Sequence[torch.Tensor]
) -> list[float]:
    """:func:`gradient_norms` with torch's ``_foreach_norm``. Float32 gradients are summed in
    float32 (the norms are reported, never judged); half-precision ones are widened first, or
    their norms would keep three digits. Sparse ones are made dense (``_foreach_norm`` has no
    sparse kernel), and a gradient with a graph (``create_graph=True``) is read without it."""
    with torch.no_grad():
        dense = [
            torch.zeros_like(p) if g is None else g.to_dense() if g.layout != torch.strided else g
            for g, p in zip(gradients, parameters, strict=True)
        ]
        wide = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in dense]
        return [float(norm) for norm in torch._foreach_norm(wide, 2.0)]


def _weight_statistics(
    layout: ParameterLayout, values: torch.Tensor
) -> tuple[list[float | None], list[int], list[float], float | None]:
    """Per-parameter LoGMs, zero counts and sums of squares, and the global LoGM, of a flat
    vector where the compiled trace did not apply: the kernel over the float64 copy on the
    CPU, float64 tensor operations elsewhere."""
    if values.device.type == "cpu" and metrics.compiled_kernel_available():
        log10_sums, zeros, squares = layout.kernel_sums(values)
    else:
        zero = values == 0
        rows = layout.rows(3)
        torch.abs(values, out=rows[0]).masked_fill_(zero, 1.0).log10_()
        rows[1].copy_(zero)
        torch.square(values, out=rows[2])
        log10_sums, zero_sums, squares = layout.sum_rows(rows)
        zeros = [int(z) for z in zero_sums]
    columns = zip(log10_sums, layout.counts, zeros, squares, strict=True)
    logms = [
        total / (count - zero) if count != zero and math.isfinite(square) else None
        for total, count, zero, square in columns
    ]
    nonzero = sum(layout.counts) - sum(zeros)
    finite = all(map(math.isfinite, squares))
    global_logm = math.fsum(log10_sums) / nonzero if finite and nonzero else None
    return logms, zeros, squares, global_logm


def step_trace(
    layout: ParameterLayout, weights: FlatWeights, *, step: int, loss: float | None
) -> StepTrace:
    """One implementation's statistics after ``step``: update and gradient norms are those
    ``weights`` was taken with (0 and None without). Its records are built when first read
    (:class:`StepTrace`), from the flat weights' lists, which nothing changes afterwards."""
    columns = (
        layout.names,
        layout.counts,
        weights.zeros,
        weights.logms,
        weights.squares,
        weights.update_norms,
        weights.gradient_norms,
    )
    return StepTrace.from_columns(step, loss, weights.global_logm, columns)


def compare_weights(
    layout: ParameterLayout, start: FlatWeights, reference: FlatWeights, candidate: FlatWeights
) -> tuple[ParameterComparison, ...]:
    """Candidate against reference after one step taken from ``start`` by both."""
    update_squared, error_squared, projections, radials = layout.comparison_sums(
        start.values, reference.values, candidate.values
    )
    return tuple(
        _comparison(
            name,
            count,
            layout=layout,
            index=i,
            reference=reference,
            candidate=candidate,
            reference_logm=reference.logms[i],
            candidate_logm=candidate.logms[i],
            update_squared=update_squared[i],
            error_squared=error_squared[i],
            projection=projections[i],
            radial=radials[i],
        )
        for i, (name, count) in enumerate(zip(layout.names, layout.counts, strict=True))
    )


def _comparison(
    name: str,
    count: int,
    *,
    layout: ParameterLayout,
    index: int,
    reference: FlatWeights,
    candidate: FlatWeights,
    reference_logm: float | None,
    candidate_logm: float | None,
    update_squared: float,
    error_squared: float,
    projection: float,
    radial: float,
) -> ParameterComparison:
    if not math.isfinite(candidate.squares[index]):  # as `finite`, without a list per parameter
        nan_count, inf_count = layout.non_finite_counts(candidate.values, index)
        return ParameterComparison(
            name=name,
            count=count,
            reference_logm=reference_logm,
            candidate_logm=None,
            reference_zeros=reference.zeros[index],
            candidate_zeros=candidate.zeros[index],
            reference_update_norm=math.sqrt(update_squared),
            error_norm=math.inf,
            bias=None,
            noise=math.inf,
            non_finite=True,
            nan_count=nan_count,
            inf_count=inf_count,
        )
    weight_squared = reference.squares[index]
    radial_shift: float | None = None
    if update_squared > 0:
        bias: float | None = projection / update_squared
        residual = max(error_squared - projection * projection / update_squared, 0.0)
        noise = math.sqrt(residual / update_squared)
        if weight_squared > 0:
            radial_shift = radial / math.sqrt(weight_squared * update_squared)
    else:
        bias = None
        noise = math.inf if error_squared > 0 else 0.0
    return ParameterComparison(
        name=name,
        count=count,
        reference_logm=reference_logm,
        candidate_logm=candidate_logm,
        reference_zeros=reference.zeros[index],
        candidate_zeros=candidate.zeros[index],
        reference_update_norm=math.sqrt(update_squared),
        error_norm=math.sqrt(error_squared),
        bias=bias,
        noise=noise,
        radial=radial_shift,
    )
