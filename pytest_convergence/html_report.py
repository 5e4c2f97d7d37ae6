"""A self-contained HTML page of a co-simulation trace, for a reviewer who was not at the terminal.

The page is opened from CI artifacts, often offline or behind a proxy, and a chart library pulled
from a CDN would be both a network dependency and a supply-chain risk: so the charts are inline
SVG drawn here, the only script is a few lines that sort and filter the table, and the trace
itself is embedded as JSON so that the page is the whole record.

Importing this module does not import torch.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_convergence._version import __version__
from pytest_convergence.html_power import power_section
from pytest_convergence.html_verdict import verdict_section
from pytest_convergence.jsonfile import write_text_file
from pytest_convergence.traces import CoSimulation, ParameterComparison, StepComparison

if TYPE_CHECKING:
    from pytest_convergence.power import PowerReport
    from pytest_convergence.ratio_map import RatioMap

__all__ = ["ReportBand", "render_report", "write_html_report"]

_WIDTH, _HEIGHT = 640, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 86, 16, 40, 44
_Y_TICKS = 9
# A band this many times taller than the data's own spread would flatten every line: clip it.
_BAND_CLIP_RATIO = 20.0
_REFERENCE_COLOR = "#1f77b4"
_CANDIDATE_COLOR = "#d62728"
_BAND_COLOR = "#2ca02c"
# Presentation attributes rather than CSS classes: an SVG copied out of the page draws the same.
_TEXT = 'font-size="11" fill="#333" font-family="sans-serif"'
_LABEL = 'font-size="12" fill="#333" font-family="sans-serif"'


@dataclass(frozen=True)
class ReportBand:
    """The region of global LoGM deltas to draw, and where it came from."""

    low: float
    high: float
    label: str
    source: str


@dataclass(frozen=True)
class _Series:
    label: str
    points: tuple[tuple[float, float], ...]
    color: str
    dashed: bool = False


@dataclass(frozen=True)
class _Box:
    """A vertical interval at one step: where the region puts that step's candidate."""

    x: float
    low: float
    high: float


def write_html_report(
    run: CoSimulation,
    path: Path,
    *,
    band: ReportBand | None = None,
    ratios: RatioMap | None = None,
    power: PowerReport | None = None,
    source: str = "",
    overwrite: bool = False,
) -> Path:
    """Render and write atomically; an existing page is kept unless ``overwrite``."""
    page = render_report(run, band=band, ratios=ratios, power=power, source=source)
    return write_text_file(path, page, overwrite=overwrite)


def render_report(
    run: CoSimulation,
    *,
    band: ReportBand | None = None,
    ratios: RatioMap | None = None,
    power: PowerReport | None = None,
    source: str = "",
) -> str:
    """The whole page as one string: the verdict and the map of where the candidate left its
    region (given ``ratios``, :func:`pytest_convergence.ratio_map.ratio_map`), what that
    region catches (its ``power`` report, or a note that it has none), the header, three
    charts, two tables, the embedded trace."""
    title = f"pytest-convergence: {run.workload} / {run.candidate}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        verdict_section(run, ratios, band_given=band is not None),
        power_section(power) if ratios is not None else "",
        _header(run, band, source),
        '<section class="charts">',
        _logm_chart(run, band),
        _delta_chart(run, band),
        _loss_chart(run),
        "</section>",
        _steps_table(run, band),
        _comparison_table(run),
        '<script type="application/json" id="trace-data">',
        _embedded_json(run),
        "</script>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _embedded_json(run: CoSimulation) -> str:
    """The trace, safe inside a script element: no '<' can end it or open a comment."""
    return run.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _header(run: CoSimulation, band: ReportBand | None, source: str) -> str:
    region = (
        f"[{band.low:+.4e}, {band.high:+.4e}], {_e(band.label)} from {_e(band.source)}"
        if band is not None
        else "none given (pytest-convergence report --baseline FILE)"
    )
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = [
        ("workload", run.workload),
        ("candidate", run.candidate),
        ("steps", run.steps),
        ("seed", run.seed),
        ("dtype, device", f"{run.dtype}, {run.device}"),
        ("trace", source or "-"),
        ("generated", f"{created} by pytest-convergence {__version__}"),
    ]
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    cells += f"<tr><th>region</th><td>{region}</td></tr>"
    return f'<table class="meta">{cells}</table>'


# --- charts -----------------------------------------------------------------------------------


def _logm_chart(run: CoSimulation, band: ReportBand | None) -> str:
    reference = [(float(s.step), s.global_logm) for s in run.reference.steps]
    candidate = [(float(c.step), c.candidate_global_logm) for c in run.comparisons]
    boxes = []
    if band is not None:
        boxes = [
            _Box(
                float(c.step), c.previous_global_logm + band.low, c.previous_global_logm + band.high
            )
            for c in run.comparisons
            if c.previous_global_logm is not None
        ]
    return _chart(
        "Global LoGM after each step",
        [
            _Series("reference", _finite(reference), _REFERENCE_COLOR),
            _Series(f"candidate {run.candidate}", _finite(candidate), _CANDIDATE_COLOR, True),
        ],
        ylabel="global LoGM",
        boxes=boxes,
        band_label="region from each step's start",
    )


def _delta_chart(run: CoSimulation, band: ReportBand | None) -> str:
    reference = [
        (float(c.step), _delta(c.previous_global_logm, c.reference_global_logm))
        for c in run.comparisons
    ]
    candidate = [
        (float(c.step), _delta(c.previous_global_logm, c.candidate_global_logm))
        for c in run.comparisons
    ]
    return _chart(
        "Global LoGM delta of each step",
        [
            _Series("reference", _finite(reference), _REFERENCE_COLOR),
            _Series("candidate", _finite(candidate), _CANDIDATE_COLOR, True),
        ],
        ylabel="LoGM delta",
        band=None if band is None else (band.low, band.high),
        band_label="region",
    )


def _loss_chart(run: CoSimulation) -> str:
    reference = [(float(c.step), c.reference_loss) for c in run.comparisons]
    candidate = [(float(c.step), c.candidate_loss) for c in run.comparisons]
    return _chart(
        "Loss of each step",
        [
            _Series("reference", _finite(reference), _REFERENCE_COLOR),
            _Series("candidate", _finite(candidate), _CANDIDATE_COLOR, True),
        ],
        ylabel="loss",
    )


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _finite(points: Sequence[tuple[float, float | None]]) -> tuple[tuple[float, float], ...]:
    return tuple((x, y) for x, y in points if y is not None and math.isfinite(y))


@dataclass(frozen=True)
class _Scale:
    x_low: float
    x_high: float
    y_low: float
    y_high: float

    def x(self, value: float) -> float:
        span = self.x_high - self.x_low
        return _LEFT + (value - self.x_low) / span * (_WIDTH - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        span = self.y_high - self.y_low
        clamped = min(max(value, self.y_low), self.y_high)
        return _HEIGHT - _BOTTOM - (clamped - self.y_low) / span * (_HEIGHT - _TOP - _BOTTOM)


def _chart(
    title: str,
    series: Sequence[_Series],
    *,
    ylabel: str,
    band: tuple[float, float] | None = None,
    boxes: Sequence[_Box] = (),
    band_label: str = "",
) -> str:
    points = [point for s in series for point in s.points]
    if not points:
        return f'<figure><figcaption>{_e(title)}</figcaption><p class="empty">no data</p></figure>'
    scale, clipped = _scale(points, band, boxes)
    body = [
        _band_svg(scale, band),
        *(_box_svg(scale, box) for box in boxes),
        _axes_svg(scale, ylabel),
        *(_series_svg(scale, s) for s in series),
        _legend_svg(series, band_label if band is not None or boxes else ""),
    ]
    note = (
        '<p class="note">The region extends beyond the plotted range; it is clipped.</p>'
        if clipped
        else ""
    )
    return (
        f"<figure><figcaption>{_e(title)}</figcaption>"
        f'<svg viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="{_e(title)}">'
        + "".join(body)
        + f"</svg>{note}</figure>"
    )


def _scale(
    points: Sequence[tuple[float, float]],
    band: tuple[float, float] | None,
    boxes: Sequence[_Box],
) -> tuple[_Scale, bool]:
    """Axis ranges from the data, widened to the region unless that would flatten the data."""
    xs = [x for x, _ in points] + [b.x for b in boxes]
    ys = [y for _, y in points]
    low, high = min(ys), max(ys)
    spread = max(high - low, abs(high) * 1e-9, 1e-12)
    extents = [b.low for b in boxes] + [b.high for b in boxes] + list(band or ())
    clipped = False
    if extents:
        wide_low, wide_high = min(low, *extents), max(high, *extents)
        if wide_high - wide_low <= _BAND_CLIP_RATIO * spread:
            low, high = wide_low, wide_high
        else:
            clipped = True
            low, high = low - spread, high + spread
    pad = max(high - low, spread) * 0.08
    x_low, x_high = min(xs), max(xs)
    if x_high == x_low:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    x_pad = max((x_high - x_low) * 0.04, 0.4)
    return _Scale(x_low - x_pad, x_high + x_pad, low - pad, high + pad), clipped


def _band_svg(scale: _Scale, band: tuple[float, float] | None) -> str:
    if band is None:
        return ""
    top, bottom = scale.y(band[1]), scale.y(band[0])
    width = _WIDTH - _LEFT - _RIGHT
    return (
        f'<rect x="{_LEFT}" y="{top:.1f}" width="{width}" height="{max(bottom - top, 1):.1f}" '
        f'fill="{_BAND_COLOR}" fill-opacity="0.15"><title>region [{band[0]:+.4e}, '
        f"{band[1]:+.4e}]</title></rect>"
    )


def _box_svg(scale: _Scale, box: _Box) -> str:
    span = scale.x(box.x + 0.3) - scale.x(box.x - 0.3)
    top, bottom = scale.y(box.high), scale.y(box.low)
    return (
        f'<rect x="{scale.x(box.x - 0.3):.1f}" y="{top:.1f}" width="{span:.1f}" '
        f'height="{max(bottom - top, 1):.1f}" fill="{_BAND_COLOR}" fill-opacity="0.18">'
        f"<title>step {box.x:g}: region [{box.low:.6f}, {box.high:.6f}]</title></rect>"
    )


def _axes_svg(scale: _Scale, ylabel: str) -> str:
    bottom, right = _HEIGHT - _BOTTOM, _WIDTH - _RIGHT
    parts = [
        f'<line x1="{_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}" stroke="#444"/>',
    ]
    labels = _tick_labels(scale.y_low, scale.y_high)
    for value, label in labels:
        y = scale.y(value)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e4e4e4"/>'
        )
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" {_TEXT} text-anchor="end">')
        parts.append(f"{_e(label)}</text>")
    for step in _x_ticks(scale.x_low, scale.x_high):
        x = scale.x(step)
        parts.append(
            f'<text x="{x:.1f}" y="{bottom + 16}" {_TEXT} text-anchor="middle">{step}</text>'
        )
    parts.append(
        f'<text x="{(_LEFT + right) / 2:.1f}" y="{_HEIGHT - 8}" {_LABEL} '
        'text-anchor="middle">step</text>'
    )
    middle = (_TOP + bottom) / 2
    parts.append(
        f'<text x="14" y="{middle:.1f}" {_LABEL} text-anchor="middle" '
        f'transform="rotate(-90 14 {middle:.1f})">{_e(ylabel)}</text>'
    )
    return "".join(parts)


def _tick_labels(low: float, high: float) -> list[tuple[float, str]]:
    """Round ticks (1, 2 or 5 times a power of ten apart), with just the digits they need."""
    raw = (high - low) / (_Y_TICKS - 1)
    if not raw > 0:
        return [(low, f"{low:.6g}")]
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step)
    values = [k * step for k in range(first, math.floor(high / step) + 1)]
    magnitude = max(abs(low), abs(high))
    decimals = max(0, -math.floor(math.log10(step)))
    if decimals > 6 or magnitude >= 1e5:
        return [(v, f"{v:.2e}") for v in values]
    return [(v, f"{v:.{decimals}f}") for v in values]


def _x_ticks(low: float, high: float) -> list[int]:
    first, last = math.ceil(low), math.floor(high)
    every = max(1, (last - first) // 10 + 1)
    return list(range(first, last + 1, every))


def _series_svg(scale: _Scale, series: _Series) -> str:
    if not series.points:
        return ""
    coordinates = " ".join(f"{scale.x(x):.1f},{scale.y(y):.1f}" for x, y in series.points)
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    parts = [
        f'<polyline points="{coordinates}" fill="none" stroke="{series.color}" '
        f'stroke-width="2"{dash}/>'
    ]
    for x, y in series.points:
        parts.append(
            f'<circle cx="{scale.x(x):.1f}" cy="{scale.y(y):.1f}" r="3.5" fill="{series.color}">'
            f"<title>{_e(series.label)}, step {x:g}: {y:.8g}</title></circle>"
        )
    return "".join(parts)


def _legend_svg(series: Sequence[_Series], band_label: str) -> str:
    parts = []
    x = _LEFT
    for item in series:
        dash = ' stroke-dasharray="6 4"' if item.dashed else ""
        parts.append(
            f'<line x1="{x}" y1="16" x2="{x + 24}" y2="16" stroke="{item.color}" '
            f'stroke-width="2"{dash}/><text x="{x + 30}" y="20" {_TEXT}>'
            f"{_e(item.label)}</text>"
        )
        x += 44 + round(6.5 * len(item.label))
    if band_label:
        parts.append(
            f'<rect x="{x}" y="9" width="24" height="14" fill="{_BAND_COLOR}" '
            f'fill-opacity="0.25"/><text x="{x + 30}" y="20" {_TEXT}>{_e(band_label)}</text>'
        )
    return "".join(parts)


# --- tables -----------------------------------------------------------------------------------


def _number(value: float | None, spec: str = ".4e") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _cell(value: float | int | str | None, spec: str = ".4e") -> str:
    """A table cell whose sort key is the number itself, not its text."""
    if value is None or isinstance(value, str):
        return f"<td>{_e('-' if value is None else value)}</td>"
    sort_key = value if math.isfinite(value) else (1e308 if value > 0 else -1e308)
    text = str(value) if isinstance(value, int) else _number(value, spec)
    return f'<td data-v="{sort_key!r}">{_e(text)}</td>'


def _steps_table(run: CoSimulation, band: ReportBand | None) -> str:
    headers = [
        "step",
        "reference loss",
        "candidate loss",
        "reference LoGM",
        "candidate LoGM",
        "LoGM gap",
        "reference delta",
        "candidate delta",
    ]
    if band is not None:
        headers.append("candidate delta in region")
    rows = [_step_row(c, band) for c in run.comparisons]
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return (
        "<h2>Steps</h2>"
        f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _step_row(comparison: StepComparison, band: ReportBand | None) -> str:
    previous = comparison.previous_global_logm
    candidate_delta = _delta(previous, comparison.candidate_global_logm)
    cells = [
        _cell(comparison.step),
        _cell(comparison.reference_loss, ".6g"),
        _cell(comparison.candidate_loss, ".6g"),
        _cell(comparison.reference_global_logm, ".8f"),
        _cell(comparison.candidate_global_logm, ".8f"),
        _cell(_delta(comparison.reference_global_logm, comparison.candidate_global_logm)),
        _cell(_delta(previous, comparison.reference_global_logm)),
        _cell(candidate_delta),
    ]
    css = ' class="bad"' if comparison.non_finite else ""
    if band is not None:
        inside = candidate_delta is not None and band.low <= candidate_delta <= band.high
        cells.append("<td>yes</td>" if inside else '<td class="out">no</td>')
        css = css or ("" if inside else ' class="bad"')
    return f"<tr{css}>{''.join(cells)}</tr>"


_COMPARISON_HEADERS = (
    "step",
    "parameter",
    "count",
    "reference LoGM",
    "candidate LoGM",
    "LoGM gap",
    "update bias",
    "update noise",
    "radial shift",
    "relative error",
    "reference zeros",
    "candidate zeros",
    "zero change",
)


def _comparison_table(run: CoSimulation) -> str:
    head = "".join(f'<th title="click to sort">{_e(h)}</th>' for h in _COMPARISON_HEADERS)
    rows = [
        _comparison_row(comparison.step, parameter)
        for comparison in run.comparisons
        for parameter in comparison.parameters
    ]
    return (
        "<h2>Parameters at each step</h2>"
        '<p><input id="filter" type="search" placeholder="filter parameters" '
        'aria-label="filter parameters"> <span class="hint">Click a column to sort; '
        "relative error is the candidate's update error over the reference's update.</span></p>"
        f'<table class="data" id="comparisons"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _comparison_row(step: int, p: ParameterComparison) -> str:
    cells = [
        _cell(step),
        f'<td class="name">{_e(p.name)}</td>',
        _cell(p.count),
        _cell(p.reference_logm, ".6f"),
        _cell(p.candidate_logm, ".6f"),
        _cell(p.logm_gap),
        _cell(p.bias, ".3e"),
        _cell(p.noise, ".3e"),
        _cell(p.radial, ".3e"),
        _cell(p.relative_error, ".3e"),
        _cell(p.reference_zeros),
        _cell(p.candidate_zeros),
        _cell(p.zero_change),
    ]
    css = ' class="bad"' if p.non_finite else ""
    return f"<tr{css}>{''.join(cells)}</tr>"


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px;
       padding: 0 16px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; }
table.meta th { text-align: left; padding-right: 16px; color: #555; font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; flex: 1 1 600px; max-width: 680px; border: 1px solid #ddd;
         border-radius: 6px; padding: 8px; }
figcaption { font-weight: 600; }
svg { width: 100%; height: auto; }
figure.map { max-width: none; flex: none; margin-bottom: 16px; overflow-x: auto; }
svg.map { width: auto; max-width: 100%; }
.verdict pre, .power pre { font-size: 12.5px; background: #f7f7f7; padding: 8px; overflow-x: auto; }
p.failed strong { color: #b00; } p.passed strong { color: #1a7f37; }
.no-map { color: #555; }
.note, .hint, .empty { color: #666; font-size: 12px; }
table.data { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 12.5px; }
table.data th, table.data td { border-bottom: 1px solid #e6e6e6; padding: 3px 8px;
                               text-align: right; }
table.data th { background: #f4f4f4; cursor: pointer; position: sticky; top: 0; }
table.data td.name { text-align: left; font-family: ui-monospace, monospace; }
tr.bad td { background: #fde8e8; } td.out { color: #b00; font-weight: 600; }
"""

_SCRIPT = """
(function () {
  var table = document.getElementById("comparisons");
  if (!table) { return; }
  var body = table.tBodies[0];
  var headers = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(headers, function (th, column) {
    th.addEventListener("click", function () {
      var descending = th.getAttribute("data-order") !== "desc";
      th.setAttribute("data-order", descending ? "desc" : "asc");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column], y = b.cells[column];
        var u = x.getAttribute("data-v"), v = y.getAttribute("data-v");
        if (u === null && v === null) {
          var text = x.textContent.localeCompare(y.textContent);
          return descending ? -text : text;
        }
        if (u === null) { return 1; }  // cells without a number sort last either way
        if (v === null) { return -1; }
        var order = parseFloat(u) - parseFloat(v);
        return descending ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  var filter = document.getElementById("filter");
  filter.addEventListener("input", function () {
    var needle = filter.value.toLowerCase();
    Array.prototype.forEach.call(body.rows, function (row) {
      var name = row.cells[1].textContent.toLowerCase();
      row.style.display = name.indexOf(needle) === -1 ? "none" : "";
    });
  });
})();
"""
