"""A snapshot file's LoGM table, measured one tensor at a time.

Checkpoints of large models do not fit in memory twice, and often not once: each tensor is
loaded, measured and released before the next, and the global LoGM is composed from the
parameters' figures (:func:`~pytest_convergence.metrics.compose_logm_sum`) so that no file is
read twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pytest_convergence.metrics import compose_logm_sum, parameter_logms, parameter_stats
from pytest_convergence.snapshots.files import load_snapshot

__all__ = ["ParameterRow", "SnapshotLogm", "measure_snapshot", "measure_tensor"]


@dataclass(frozen=True)
class ParameterRow:
    """One parameter of one snapshot: its LoGM, counts and (when asked for) magnitudes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    logm: float | None
    count: int
    zeros: int
    l2_norm: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class SnapshotLogm:
    """A snapshot file's global LoGM and its parameters' rows; ``global_logm`` is None when no
    weight is nonzero, and ``skipped`` names the tensors left out as not floating point
    (integer, bool, string)."""

    path: str
    step: int | None
    global_logm: float | None
    count: int
    zeros: int
    parameters: tuple[ParameterRow, ...]
    skipped: tuple[str, ...]


def measure_snapshot(path: str | os.PathLike[str], *, with_stats: bool = False) -> SnapshotLogm:
    """Stream a snapshot file: each tensor is loaded, measured and released before the next.

    ``with_stats`` adds each parameter's L2 norm and standard deviation (one more pass over
    each tensor). Raises what :func:`~pytest_convergence.snapshots.load_snapshot` raises for an
    unreadable file, and :class:`~pytest_convergence.errors.NonFiniteWeightError` for NaN or Inf
    weights.
    """
    snapshot = load_snapshot(path)
    rows = [measure_tensor(name, snapshot[name], with_stats=with_stats) for name in snapshot]
    total = compose_logm_sum(rows)
    return SnapshotLogm(
        path=str(path),
        step=snapshot.step,
        global_logm=total.logm,
        count=total.count,
        zeros=total.zeros,
        parameters=tuple(rows),
        skipped=snapshot.skipped,
    )


def measure_tensor(name: str, tensor: torch.Tensor, *, with_stats: bool = False) -> ParameterRow:
    """One parameter's row: shape, dtype, LoGM and counts, and with ``with_stats`` its L2 norm
    and standard deviation."""
    shape = tuple(tensor.shape)
    dtype = str(tensor.dtype).removeprefix("torch.")
    if with_stats:
        stats = parameter_stats({name: tensor})[0]
        return ParameterRow(
            name, shape, dtype, stats.logm, stats.count, stats.zeros, stats.l2_norm, stats.std
        )
    part = parameter_logms({name: tensor})[0]
    return ParameterRow(name, shape, dtype, part.logm, part.count, part.zeros)
