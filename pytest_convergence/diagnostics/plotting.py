"""Plotting helpers the report diagnostics share: matplotlib without a display, axes fitted to
curves that may hold NaN or Inf, log scales where values span decades."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["fit_to", "gaps", "log_scale_if_wide", "pyplot", "symlog_if_wide"]


def pyplot() -> ModuleType:
    """matplotlib without a display, imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gaps(values: Sequence[float | None]) -> list[float]:
    """NaN where a value is missing or non-finite: matplotlib leaves a gap there."""
    return [v if v is not None and math.isfinite(v) else math.nan for v in values]


def fit_to(axis: Axes, values: Sequence[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and max(finite) > min(finite):
        low, high = min(finite), max(finite)
        margin = 0.08 * (high - low)
        axis.set_ylim(low - margin, high + margin)


def symlog_if_wide(axis: Axes, values: Sequence[float]) -> None:
    """Relative differences beyond 100% (a layer that exploded) on a symmetric log axis, so
    they do not flatten the small differences of every other layer to zero."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    if finite and max(finite) > 1.0:
        axis.set_yscale("symlog", linthresh=1e-3)


def log_scale_if_wide(axis: Axes, values: Sequence[float]) -> bool:
    """A log axis when losses span decades (far along a random direction), so the detail near
    the two points is not flattened; only for positive losses. True when it set one."""
    finite = [v for v in values if math.isfinite(v)]
    wide = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 30
    if wide:
        axis.set_yscale("log")
    return wide
