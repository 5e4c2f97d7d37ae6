"""Failure messages and the terminal summary: text only, the verdict first, each number beside
its limit.

The message answers, in order: did the candidate leave the region; where first (step,
parameter, module); by how much; how widespread; what the region tolerates; what to run next.
The summary lists every check of a session, worst first. Writing a report folder is
:mod:`pytest_convergence.report_folder`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_convergence.regions import Region, Verdict, Violation
    from pytest_convergence.replay import ReplayFinding
    from pytest_convergence.traces import CoSimulation, ParameterComparison

__all__ = [
    "NOTES_FILE",
    "SUMMARY_PREFIX",
    "FailureContext",
    "format_failure",
    "summary_lines",
    "summary_rows",
    "summary_section",
]

TABLE_ROWS = 10
# The prefix of a check's figures among a test's user properties (JUnit XML, the summary).
SUMMARY_PREFIX = "convergence_"
# A report folder's note of the diagnostics that could not be computed.
NOTES_FILE = "notes.txt"


@dataclass(frozen=True)
class FailureContext:
    """Where the verdict came from and how to act on it."""

    baseline_path: Path
    provenance: str
    reproduce: str
    rerecord: str
    report_dir: Path | None = None
    # The files written into ``report_dir``. The checker fills this list when it writes the
    # report, which happens before the message is formatted.
    report_files: Sequence[Path] = ()


def format_failure(
    run: CoSimulation,
    verdict: Verdict,
    region: Region,
    context: FailureContext,
    replay: ReplayFinding | None = None,
) -> str:
    first = verdict.first_violation
    assert first is not None, "format_failure needs a failing verdict"
    lines = [
        f"candidate {run.candidate!r} left the divergence region of {run.workload!r} "
        f"({context.baseline_path})",
        "",
        _first_violation_lines(run, first, context),
        "",
        _spread_line(verdict),
        *_violation_table(run, verdict.violations),
    ]
    if replay is not None:
        lines.append(replay.describe())
    lines.append(_zero_line(run, verdict.violations))
    lines.append(
        f"Region calibrated against: {region.calibration.description}; {context.provenance}"
    )
    if context.report_dir is not None:
        lines.append(_report_line(context))
    lines.append(f"Reproduce:  {context.reproduce}")
    lines.append(f"If intended: {context.rerecord}  (review the diff, commit)")
    return "\n".join(lines)


def _first_violation_lines(run: CoSimulation, first: Violation, context: FailureContext) -> str:
    parameter = _comparison(run, first.step, first.parameter)
    kind = run.module_types.get(first.parameter, "")
    size = f"{parameter.count:,} weights" if parameter is not None else ""
    described = ", ".join(part for part in (kind, size) if part)
    head = f"First violation: step {first.step} of {run.steps}, parameter {first.parameter!r}" + (
        f" ({described})" if described else ""
    )
    over = "non-finite" if math.isinf(first.ratio) else f"{first.ratio:.1f}x over"
    detail = f"  {first.check} = {_number(first.value)}, limit {_number(first.limit)} ({over})"
    if parameter is not None and parameter.logm_gap is not None:
        detail += (
            f"\n  LoGM: reference {parameter.reference_logm:.5f}, candidate "
            f"{parameter.candidate_logm:.5f}, |diff| {abs(parameter.logm_gap):.2e}"
        )
    return f"{head}\n{detail}"


def _report_line(context: FailureContext) -> str:
    names = [path.name for path in context.report_files]
    line = f"Report: {context.report_dir}"
    if names:
        line += f" ({', '.join(names)})"
    if NOTES_FILE in names:
        line += f"; {NOTES_FILE} says which diagnostics could not be computed"
    return line


def _spread_line(verdict: Verdict) -> str:
    inside = verdict.global_logm_gap <= verdict.global_logm_gap_limit
    return (
        f"Violations: {len(verdict.violations)} of {verdict.checks} (step, parameter) checks; "
        f"global LoGM gap {'stayed inside' if inside else 'left its calibration range'} "
        f"({verdict.global_logm_gap:.1e} {'<=' if inside else '>'} "
        f"{verdict.global_logm_gap_limit:.1e})"
    )


def _violation_table(run: CoSimulation, violations: Sequence[Violation]) -> list[str]:
    header = (
        f"  {'step':>4}  {'parameter':<28} {'check':<42} {'value':>10} {'limit':>10}"
        f" {'ref LoGM':>10} {'cand LoGM':>10}"
    )
    rows = [header]
    for violation in violations[:TABLE_ROWS]:
        comparison = _comparison(run, violation.step, violation.parameter)
        ref_logm = _logm_text(comparison.reference_logm if comparison else None)
        cand_logm = _logm_text(comparison.candidate_logm if comparison else None)
        rows.append(
            f"  {violation.step:>4}  {violation.parameter:<28.28} {violation.check:<42.42} "
            f"{_number(violation.value):>10} {_number(violation.limit):>10} "
            f"{ref_logm:>10} {cand_logm:>10}"
        )
    hidden = len(violations) - TABLE_ROWS
    if hidden > 0:
        rows.append(f"  ... {hidden} more violations (full list in the report's trace)")
    return rows


def _zero_line(run: CoSimulation, violations: Sequence[Violation]) -> str:
    names = list(dict.fromkeys(v.parameter for v in violations))[:TABLE_ROWS]
    last = run.comparisons[-1] if run.comparisons else None
    if last is None:
        return "Zero weights: no step ran"
    parts = []
    for parameter in last.parameters:
        if parameter.name in names:
            parts.append(
                f"{parameter.name} {parameter.reference_zeros}/{parameter.candidate_zeros}"
            )
    return f"Zero weights at step {last.step} (reference/candidate): " + ", ".join(parts)


def _comparison(run: CoSimulation, step: int, name: str) -> ParameterComparison | None:
    for comparison in run.comparisons:
        if comparison.step == step:
            return next((p for p in comparison.parameters if p.name == name), None)
    return None


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.2e}"


def _logm_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


def summary_lines(rows: Sequence[dict[str, object]]) -> list[str]:
    """Workload, candidate, steps, worst ratio to limit and verdict for every check.

    Worst first; a check without a worst ratio (it errored, or its figures did not arrive)
    comes before them all and shows ``-``, never the 0 of a clean pass.
    """
    header = (
        f"{'verdict':<9} {'worst/limit':>11}  {'workload':<18} {'candidate':<26} {'steps':>5}  test"
    )
    lines = [header]
    for row in sorted(rows, key=_rank):
        ratio = _ratio(row)
        shown = "-" if ratio is None else f"{ratio:.3g}"
        lines.append(
            f"{row.get('verdict', '?')!s:<9} {shown:>11}  "
            f"{row.get('workload', '')!s:<18.18} {row.get('candidate', '')!s:<26.26} "
            f"{row.get('steps', '')!s:>5}  {row.get('nodeid', '')}"
        )
        for label in ("error", "first_violation"):
            text = row.get(label)
            if text:
                lines.append(f"{'':<23}{label.replace('_', ' ')}: {text}")
    return lines


def _ratio(row: dict[str, object]) -> float | None:
    value = row.get("worst_ratio")
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _rank(row: dict[str, object]) -> float:
    ratio = _ratio(row)
    return -math.inf if ratio is None else -ratio


def summary_rows(properties: Iterable[tuple[str, object]], nodeid: str) -> list[dict[str, object]]:
    """A test's check figures, one summary row per check; empty when the test made no check.

    A test's checks record the same names in turn, so a name seen again starts the next row.
    """
    rows: list[dict[str, object]] = []
    row: dict[str, object] = {}
    for key, value in properties:
        if not key.startswith(SUMMARY_PREFIX):
            continue
        name = key.removeprefix(SUMMARY_PREFIX)
        if name in row:
            rows.append(row)
            row = {}
        row[name] = value
    if row:
        rows.append(row)
    for each in rows:
        each["nodeid"] = nodeid
    return rows


def summary_section(
    rows: Sequence[dict[str, object]], changes: Mapping[Path, list[str]]
) -> list[str]:
    """The terminal summary's lines: every check, worst first, then re-recorded baselines."""
    lines = summary_lines(rows) if rows else []
    for path, changed in changes.items():
        lines.append(f"re-recorded {path}:")
        lines.extend(f"  {line}" for line in changed)
    return lines
