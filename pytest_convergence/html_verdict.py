"""The opening of the HTML report: the verdict, then where the candidate left its region.

The map is drawn as inline SVG (no script, no network, as the rest of the page): parameters
down in model order, steps across, each cell coloured by its worst ratio of a check to its
limit (:mod:`pytest_convergence.ratio_map`, whose colours break at 1), a tooltip per cell with
its numbers, and a frame around the first violation. A page drawn without a per-parameter
region says so and shows no map: an empty map would read as "nothing left the region".

Importing this module does not import torch.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

from pytest_convergence.ratio_map import RATIO_CEILING, RATIO_FLOOR, RatioMap, ratio_color
from pytest_convergence.report import violation_lines

if TYPE_CHECKING:
    from pytest_convergence.regions import Violation
    from pytest_convergence.traces import CoSimulation

__all__ = ["FIRST_VIOLATION_ID", "verdict_section"]

# The frame around the first violating cell, by id: a reader's link and a test's handle.
FIRST_VIOLATION_ID = "first-violation"
_TEXT = 'font-size="11" fill="#333" font-family="sans-serif"'
_TOP, _GAP = 8, 6
_GRID_WIDTH = 900  # the cells' total width at most, in SVG units
_CELL_WIDTH = (3.0, 36.0)
_ROW_HEIGHT = (4.0, 16.0)
_GRID_HEIGHT = 560  # rows shrink to fit this, down to the smallest row height
_LABEL_CHARACTER = 6.4  # width of one 11px sans-serif character, about
_LABEL_WIDTH = (60.0, 300.0)
_LEGEND_WIDTH, _LEGEND_HEIGHT, _LEGEND_STOPS = 360, 12, 60


def verdict_section(run: CoSimulation, ratios: RatioMap | None, *, band_given: bool) -> str:
    """The verdict and the map, or, without a per-parameter region, why there is neither."""
    if ratios is None:
        reason = (
            "the region given is a global LoGM-delta region, with no per-parameter limits"
            if band_given
            else "no region given"
        )
        return (
            '<section class="verdict"><p class="no-map">No verdict and no map of where the '
            f"candidate left its region: {_e(reason)}. Draw them against a co-simulation "
            "baseline: <code>pytest-convergence report TRACE.json --baseline "
            f"baselines/{_e(run.workload)}.json</code></p></section>"
        )
    return (
        f'<section class="verdict">{_verdict_text(run, ratios)}'
        '<figure class="map"><figcaption>Where the candidate left its region: each '
        "parameter's worst ratio of a check to its limit, per step</figcaption>"
        f"{_map_svg(ratios)}</figure></section>"
    )


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _verdict_text(run: CoSimulation, ratios: RatioMap) -> str:
    verdict = ratios.verdict
    pairs = sum(len(row) for row in ratios.cells)
    first, worst = verdict.first_violation, verdict.worst
    if first is None:
        where = (
            ""
            if worst is None
            else f"; the closest to its limit is {worst.check} of {worst.parameter!r} at step "
            f"{worst.step}, {worst.value:.3g} against {worst.limit:.3g} "
            f"({worst.ratio:.2g} of the limit)"
        )
        head = (
            f'<p class="passed"><strong>Passed</strong>: all {verdict.checks} checks stayed '
            f"inside the region{_e(where)}.</p>"
        )
        lines: list[str] = []
    else:
        head = (
            f'<p class="failed"><strong>Failed</strong>: {len(verdict.violations)} of '
            f"{verdict.checks} checks left the region, at {verdict.violating_pairs} of {pairs} "
            f"(step, parameter) cells; worst ratio {_ratio_text(verdict.worst_ratio)} "
            "its limit.</p>"
        )
        lines = violation_lines(run, first, "First violation")
        if worst is not None and worst != first:
            lines += violation_lines(run, worst, "Worst violation")
    return head + (f"<pre>{_e(chr(10).join(lines))}</pre>" if lines else "")


def _ratio_text(ratio: float) -> str:
    if math.isinf(ratio):
        return "infinitely over"
    return f"{ratio:.3g}x" if ratio < 100 else f"{ratio:,.0f}x"


def _map_svg(ratios: RatioMap) -> str:
    rows, columns = len(ratios.parameters), len(ratios.steps)
    cell = min(max(_GRID_WIDTH / max(columns, 1), _CELL_WIDTH[0]), _CELL_WIDTH[1])
    row = min(max(_GRID_HEIGHT / max(rows, 1), _ROW_HEIGHT[0]), _ROW_HEIGHT[1])
    longest = max((len(name) for name in ratios.parameters), default=0)
    left = min(max(12 + _LABEL_CHARACTER * longest, _LABEL_WIDTH[0]), _LABEL_WIDTH[1])
    grid_bottom = _TOP + rows * row
    # The legend's caption runs about 330 units past its bar.
    width = max(left + columns * cell, left + _LEGEND_WIDTH + 330) + 12
    height = grid_bottom + 24 + _GAP + _LEGEND_HEIGHT + 34
    parts = [
        *_cells_svg(ratios, left, cell, row),
        *_labels_svg(ratios, left, row),
        *_step_ticks_svg(ratios, left, cell, grid_bottom),
        _first_violation_svg(ratios, left, cell, row),
        _legend_svg(left, grid_bottom + 24 + _GAP),
    ]
    return (
        f'<svg class="map" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
        f'height="{height:.0f}" role="img" aria-label="worst ratio of a check to its limit, '
        'per parameter and step">' + "".join(parts) + "</svg>"
    )


def _cells_svg(ratios: RatioMap, left: float, cell: float, row: float) -> list[str]:
    parts = []
    for r, (name, checks) in enumerate(zip(ratios.parameters, ratios.cells, strict=True)):
        y = _TOP + r * row
        for c, (step, check) in enumerate(zip(ratios.steps, checks, strict=True)):
            x = left + c * cell
            fill = "#ffffff" if check is None else ratio_color(check.ratio)
            title = f"{name}, step {step}: " + ("no check" if check is None else _tooltip(check))
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{row:.1f}" '
                f'fill="{fill}"><title>{_e(title)}</title></rect>'
            )
    return parts


def _tooltip(check: Violation) -> str:
    over = "outside" if check.ratio > 1 else "inside"
    return (
        f"{check.check} = {check.value:.3g}, limit {check.limit:.3g}: "
        f"ratio {check.ratio:.3g}, {over} the region"
    )


def _labels_svg(ratios: RatioMap, left: float, row: float) -> list[str]:
    """Parameter names beside their rows; every k-th one where rows are too thin for all."""
    every = max(1, math.ceil(11 / row))
    return [
        f'<text x="{left - 6:.1f}" y="{_TOP + (r + 0.5) * row + 4:.1f}" {_TEXT} '
        f'text-anchor="end">{_e(name)}</text>'
        for r, name in enumerate(ratios.parameters)
        if r % every == 0
    ]


def _step_ticks_svg(ratios: RatioMap, left: float, cell: float, bottom: float) -> list[str]:
    every = max(1, math.ceil(28 / cell))  # a step number is about 28 units wide with its space
    parts = [
        f'<text x="{left + (c + 0.5) * cell:.1f}" y="{bottom + 14:.1f}" {_TEXT} '
        f'text-anchor="middle">{step}</text>'
        for c, step in enumerate(ratios.steps)
        if c % every == 0
    ]
    parts.append(
        f'<text x="{left - 6:.1f}" y="{bottom + 14:.1f}" {_TEXT} text-anchor="end">step</text>'
    )
    return parts


def _first_violation_svg(ratios: RatioMap, left: float, cell: float, row: float) -> str:
    found = ratios.first_violation_cell
    first = ratios.verdict.first_violation
    if found is None or first is None:
        return ""
    r, c = found
    return (
        f'<rect id="{FIRST_VIOLATION_ID}" x="{left + c * cell + 1:.1f}" '
        f'y="{_TOP + r * row + 1:.1f}" width="{max(cell - 2, 1):.1f}" '
        f'height="{max(row - 2, 1):.1f}" fill="none" stroke="#000" stroke-width="2">'
        f"<title>first violation: {_e(first.parameter)}, step {first.step}: "
        f"{_e(_tooltip(first))}</title></rect>"
    )


def _legend_svg(left: float, top: float) -> str:
    """The colour scale from RATIO_FLOOR to RATIO_CEILING, log-spaced, the limit marked."""
    decades = math.log10(RATIO_CEILING / RATIO_FLOOR)
    stop = _LEGEND_WIDTH / _LEGEND_STOPS
    parts = []
    for k in range(_LEGEND_STOPS):
        ratio = RATIO_FLOOR * 10 ** (decades * (k + 0.5) / _LEGEND_STOPS)
        parts.append(
            f'<rect x="{left + k * stop:.1f}" y="{top:.1f}" width="{stop + 0.2:.1f}" '
            f'height="{_LEGEND_HEIGHT}" fill="{ratio_color(ratio)}"/>'
        )
    for power in range(round(math.log10(RATIO_FLOOR)), round(math.log10(RATIO_CEILING)) + 1):
        x = left + (power - math.log10(RATIO_FLOOR)) / decades * _LEGEND_WIDTH
        label = f"{10.0**power:g}" + (" (limit)" if power == 0 else "")
        label += "+" if 10.0**power == RATIO_CEILING else ""
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 2:.1f}" x2="{x:.1f}" '
            f'y2="{top + _LEGEND_HEIGHT + 3:.1f}" stroke="#333" '
            f'stroke-width="{2 if power == 0 else 1}"/>'
            f'<text x="{x:.1f}" y="{top + _LEGEND_HEIGHT + 15:.1f}" {_TEXT} '
            f'text-anchor="middle">{_e(label)}</text>'
        )
    parts.append(
        f'<text x="{left + _LEGEND_WIDTH + 30:.1f}" y="{top + 10:.1f}" {_TEXT}>'
        "ratio to limit (log); red: outside the region</text>"
    )
    return "".join(parts)
