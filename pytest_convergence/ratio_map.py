"""Where a candidate left its region: per parameter and step, its worst ratio to a limit.

A verdict names the first and the worst check; a reviewer also needs to see at a glance which
layers left the region and when, which global LoGM curves cannot show (a bug caught at 124x
draws a candidate curve on top of the reference's). The map is made of the judge's own rows
(:func:`pytest_convergence.regions.check_rows`), so it cannot disagree with the verdict: its
largest cell is the verdict's worst ratio, and the cell of the first violation is over 1.

The colour scale is here too, so that the HTML page and the report folder's PNG break at the
same ratio in the same colours. Importing this module does not import torch: the judge is
imported when a map is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_convergence.regions import Region, Verdict, Violation
    from pytest_convergence.traces import CoSimulation

__all__ = [
    "RATIO_CEILING",
    "RATIO_FLOOR",
    "RatioMap",
    "ratio_color",
    "ratio_map",
]

# The colour scale is logarithmic in the ratio and saturates three decades either side of the
# limit: below a thousandth of its limit a check is as inside as it gets, and beyond a
# thousand times over (the 124x bug, a NaN) the reader needs no finer shade to act.
RATIO_FLOOR = 1e-3
RATIO_CEILING = 1e3
# Inside: a light-to-mid blue; outside: a red ramp from salmon to dark red. The break at 1
# is a change of hue, not of shade, so "outside" is seen before it is read.
_INSIDE = ((0xF4, 0xF7, 0xFB), (0x5B, 0x86, 0xC0))
_OUTSIDE = ((0xF6, 0x8A, 0x70), (0x8B, 0x00, 0x0C))


@dataclass(frozen=True)
class RatioMap:
    """The verdict, and per parameter (model order) and step the check with the largest ratio.

    A cell's check is a :class:`~pytest_convergence.regions.Violation` by its fields only: it
    broke its limit where its ratio is over 1, as the verdict's ``worst`` does.
    """

    verdict: Verdict
    parameters: tuple[str, ...]
    steps: tuple[int, ...]
    cells: tuple[tuple[Violation | None, ...], ...]  # [parameter][step index]; None: no check

    @property
    def ratios(self) -> list[list[float]]:
        """worst_ratio[parameter][step index]; 0 where no check ran."""
        return [[0.0 if cell is None else cell.ratio for cell in row] for row in self.cells]

    @property
    def first_violation_cell(self) -> tuple[int, int] | None:
        """(parameter index, step index) of the verdict's first violation, if it failed."""
        first = self.verdict.first_violation
        if first is None:
            return None
        return self.parameters.index(first.parameter), self.steps.index(first.step)


def ratio_map(run: CoSimulation, region: Region) -> RatioMap:
    """Judge ``run`` against ``region`` and keep, per (parameter, step), its worst check."""
    from pytest_convergence.regions import Violation, check_rows, judge

    steps = tuple(comparison.step for comparison in run.comparisons)
    parameters: dict[str, None] = {}  # model order: the order of the rows of a step
    worst: dict[tuple[str, int], Violation] = {}
    for row in check_rows(run, region):
        step, parameter = row[0], row[1]
        parameters.setdefault(parameter, None)
        check = Violation(*row)
        kept = worst.get((parameter, step))
        if kept is None or check.ratio > kept.ratio:
            worst[(parameter, step)] = check
    cells = tuple(tuple(worst.get((parameter, step)) for step in steps) for parameter in parameters)
    return RatioMap(judge(run, region), tuple(parameters), steps, cells)


def ratio_color(ratio: float) -> str:
    """The ``#rrggbb`` of a ratio: blues up to the limit (1), reds beyond it, log-scaled."""
    if math.isnan(ratio) or ratio > 1.0:
        position = _log_position(ratio, 1.0, RATIO_CEILING)
        return _blend(_OUTSIDE, position)
    return _blend(_INSIDE, _log_position(ratio, RATIO_FLOOR, 1.0))


def _log_position(ratio: float, low: float, high: float) -> float:
    """Where ``ratio`` lies from ``low`` (0) to ``high`` (1) on a log scale, clamped; NaN is
    as far over as a ratio goes."""
    if math.isnan(ratio) or ratio >= high:
        return 1.0
    if ratio <= low:
        return 0.0
    return math.log(ratio / low) / math.log(high / low)


def _blend(ends: Sequence[tuple[int, int, int]], position: float) -> str:
    start, end = ends
    channels = (round(a + (b - a) * position) for a, b in zip(start, end, strict=True))
    return "#" + "".join(f"{channel:02x}" for channel in channels)
