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
    from pytest_convergence.triage import SeedOutcome, Triage

__all__ = [
    "NOTES_FILE",
    "SUMMARY_PREFIX",
    "FailureContext",
    "format_failure",
    "recorded_baselines",
    "summary_lines",
    "summary_rows",
    "summary_section",
    "triage_figures",
    "triage_lines",
    "violation_lines",
]

TABLE_ROWS = 10
# The prefix of a check's figures among a test's user properties (JUnit XML, the summary).
SUMMARY_PREFIX = "convergence_"
# A report folder's note of the diagnostics that could not be computed.
NOTES_FILE = "notes.txt"
# The name pytest_convergence.regions gives the check of NaN and Inf weights.
_NON_FINITE = "non-finite weights"


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
    # What re-runs the check at the triage's example seed ("" when it was not triaged).
    rerun_seed: str = ""


def format_failure(
    run: CoSimulation,
    verdict: Verdict,
    region: Region,
    context: FailureContext,
    replay: ReplayFinding | None = None,
    *,
    triage: Triage | None = None,
) -> str:
    first = verdict.first_violation
    assert first is not None, "format_failure needs a failing verdict"
    lines = [
        f"candidate {run.candidate!r} left the divergence region of {run.workload!r} "
        f"({context.baseline_path})",
        "",
        *violation_lines(run, first, "First violation"),
    ]
    # The first violation is where the divergence started (what the replay examines); the
    # worst, when another, is how far it went.
    worst = verdict.worst
    if worst is not None and worst != first:
        lines += violation_lines(run, worst, "Worst violation")
    lines += ["", _spread_line(run, verdict), *_violation_table(run, verdict.violations, context)]
    if replay is not None:
        lines.append(replay.describe())
    zeros = _zero_line(run, verdict.violations)
    if zeros is not None:
        lines.append(zeros)
    if triage is not None:
        lines += triage_lines(triage, context.rerun_seed)
    lines.append(
        f"Region calibrated against: {region.calibration.description}; {context.provenance}"
    )
    if context.report_dir is not None:
        lines.append(_report_line(context))
    lines.append(f"Reproduce:   {context.reproduce}")
    lines.append(f"If intended: {context.rerecord}  (review the diff, commit)")
    return "\n".join(lines)


def triage_lines(triage: Triage, rerun: str = "") -> list[str]:
    """How many further seeds fail too, each seed's worst ratio, the seconds it took, what it
    suggests, and (``rerun``) what re-runs one seed. The check fails whatever it says."""
    tried = len(triage.outcomes)
    seeds = "; ".join(_seed_text(outcome) for outcome in triage.outcomes)
    # Tenths of a second hide a fast triage's time; hundredths say it is short.
    seconds = f"{triage.seconds:.1f}" if triage.seconds >= 1 else f"{triage.seconds:.2f}"
    head = (
        f"Triage: reproduces on {triage.reproduced} of {_counted(tried, 'further seed')} "
        f"({seeds}), in {seconds} s: "
    )
    lines = [head + _triage_reading(triage)]
    if rerun:
        lines.append(f"  Rerun seed {triage.example_seed}: {rerun}")
    return lines


def _seed_text(outcome: SeedOutcome) -> str:
    if outcome.error:
        return f"seed {outcome.seed} could not run: {outcome.error}"
    ratio = outcome.worst_ratio
    shown = f"{ratio:.3g}x" if math.isfinite(ratio) else "non-finite"
    return f"seed {outcome.seed} {'fails' if outcome.failed else 'passes'}, worst {shown} its limit"


def _triage_reading(triage: Triage) -> str:
    """What the count suggests; every reading but a persistent failure says the check still
    fails, so a failure that does not reproduce is never read as a pass."""
    if triage.judged == 0:
        return "no further seed ran to a verdict; the check still fails"
    if triage.reproduced == triage.judged:
        return f"a persistent failure, not an unlucky seed {triage.seed}"
    if triage.reproduced == 0:
        return (
            f"does not reproduce, possibly an unlucky seed {triage.seed} or a marginal "
            "candidate; the check still fails"
        )
    return "seed-dependent, a marginal candidate or a bug some seeds hide; the check still fails"


def violation_lines(run: CoSimulation, violation: Violation, title: str) -> list[str]:
    """Where a check broke its limit (step, parameter, module) and its value beside the limit:
    the failure message's wording, which the HTML report's verdict repeats."""
    parameter = _comparison(run, violation.step, violation.parameter)
    kind = run.module_types.get(violation.parameter, "")
    size = _counted(parameter.count, "weight") if parameter is not None else ""
    described = ", ".join(part for part in (kind, size) if part)
    head = f"{title}: step {violation.step} of {run.steps}, parameter {violation.parameter!r}" + (
        f" ({described})" if described else ""
    )
    lines = [head, _detail(violation, parameter)]
    if parameter is not None and parameter.logm_gap is not None:
        lines.append(
            f"  LoGM: reference {parameter.reference_logm:.5f}, candidate "
            f"{parameter.candidate_logm:.5f}, |diff| {abs(parameter.logm_gap):.2e}"
        )
    return lines


def _detail(violation: Violation, parameter: ParameterComparison | None) -> str:
    """The check's value beside its limit, and how far over."""
    if (
        violation.check == _NON_FINITE
        and parameter is not None
        and parameter.nan_count + parameter.inf_count > 0
    ):
        return (
            f"  {violation.check} = {parameter.nan_count + parameter.inf_count:,} "
            f"({parameter.nan_count:,} NaN, {parameter.inf_count:,} Inf), limit 0: the "
            "candidate's weights, and LoGM, are undefined from this step on"
        )
    value, limit = _numbers(violation.value, violation.limit)
    return f"  {violation.check} = {value}, limit {limit} ({_over(violation)})"


def _over(violation: Violation) -> str:
    if math.isnan(violation.value):
        return "not a number"
    if math.isinf(violation.value):
        return "non-finite"
    if violation.limit == 0:
        return "over a zero limit"
    return f"{_times(violation.ratio)}x over"


def _times(ratio: float) -> str:
    """A ratio over 1 with three significant digits, or as many more as keep it over 1
    (1.0004 is not 1.0x); whole times from 100 on."""
    if ratio >= 100:
        return f"{ratio:,.0f}"
    text = f"{ratio:.3g}"
    for digits in range(4, 18):
        if float(text) > 1.0 or ratio <= 1.0:
            break
        text = f"{ratio:.{digits}g}"
    return text


def _report_line(context: FailureContext) -> str:
    names = [path.name for path in context.report_files]
    line = f"Report: {context.report_dir}"
    if names:
        line += f" ({', '.join(names)})"
    if NOTES_FILE in names:
        line += f"; {NOTES_FILE} says which diagnostics could not be computed"
    return line


def _spread_line(run: CoSimulation, verdict: Verdict) -> str:
    pairs = sum(len(comparison.parameters) for comparison in run.comparisons)
    head = (
        f"Violations: {len(verdict.violations)} of {verdict.checks} checks, at "
        f"{verdict.violating_pairs} of "
        f"{pairs} (step, parameter) pairs; "
    )
    if verdict.global_logm_undefined_from is not None:
        return head + (
            f"global LoGM gap undefined from step {verdict.global_logm_undefined_from} "
            "(the candidate's global LoGM is undefined)"
        )
    gap, limit = verdict.global_logm_gap, verdict.global_logm_gap_limit
    inside = gap <= limit
    shown, bound = _numbers(gap, limit, digits=1)
    return head + (
        f"global LoGM gap {'stayed inside' if inside else 'left its calibration range'} "
        f"({shown} {'<=' if inside else '>'} {bound})"
    )


def _violation_table(
    run: CoSimulation, violations: Sequence[Violation], context: FailureContext
) -> list[str]:
    header = (
        f"  {'step':>4}  {'parameter':<28} {'check':<42} {'value':>10} {'limit':>10}"
        f" {'ref LoGM':>10} {'cand LoGM':>10}"
    )
    rows = [header]
    for violation in violations[:TABLE_ROWS]:
        comparison = _comparison(run, violation.step, violation.parameter)
        ref_logm = _logm_text(comparison.reference_logm if comparison else None)
        cand_logm = _logm_text(comparison.candidate_logm if comparison else None)
        value, limit = _numbers(violation.value, violation.limit)
        rows.append(
            f"  {violation.step:>4}  {violation.parameter:<28.28} {violation.check:<42.42} "
            f"{value:>10} {limit:>10} {ref_logm:>10} {cand_logm:>10}"
        )
    hidden = len(violations) - TABLE_ROWS
    if hidden > 0:
        where = (
            "full list in the report's trace.json"
            if context.report_dir is not None
            else "no report was written; --convergence-report-dir DIR keeps the full list in a "
            "trace.json"
        )
        rows.append(f"  ... {_counted(hidden, 'more violation')} ({where})")
    return rows


def _zero_line(run: CoSimulation, violations: Sequence[Violation]) -> str | None:
    """Exact zeros of the violating parameters that have any (a mask that stopped applying,
    dead units); None when none has: a list of 0/0 says nothing."""
    names = list(dict.fromkeys(v.parameter for v in violations))[:TABLE_ROWS]
    last = run.comparisons[-1] if run.comparisons else None
    if last is None:
        return "Zero weights: no step ran"
    parts = [
        f"{parameter.name} {parameter.reference_zeros}/{parameter.candidate_zeros}"
        for parameter in last.parameters
        if parameter.name in names and (parameter.reference_zeros or parameter.candidate_zeros)
    ]
    if not parts:
        return None
    return f"Zero weights at step {last.step} (reference/candidate): " + ", ".join(parts)


def _comparison(run: CoSimulation, step: int, name: str) -> ParameterComparison | None:
    for comparison in run.comparisons:
        if comparison.step == step:
            return next((p for p in comparison.parameters if p.name == name), None)
    return None


def _numbers(value: float, limit: float, *, digits: int = 2) -> tuple[str, str]:
    """``value`` and ``limit`` as text, with as many more digits than ``digits`` as tell two
    different numbers apart (6.04e-05 > 6.00e-05, not 6.0e-05 > 6.0e-05)."""
    shown, bound = _number(value, digits), _number(limit, digits)
    while shown == bound and value != limit and digits < 17:
        digits += 1
        shown, bound = _number(value, digits), _number(limit, digits)
    return shown, bound


def _number(value: float, digits: int = 2) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.{digits}e}"


def _counted(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


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
        triaged = row.get("triage")
        if isinstance(triaged, str) and "/" in triaged:
            reproduced, tried = triaged.split("/", 1)
            lines.append(
                f"{'':<23}triage: reproduces on {reproduced} of {tried} further seeds "
                f"(seed: worst/limit {row.get('triage_ratios', '?')})"
            )
        compiled = row.get("compile_seconds")
        if isinstance(compiled, int | float):
            lines.append(f"{'':<23}compiled in {compiled:.1f} s, apart from the check")
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


def triage_figures(triage: Triage) -> list[tuple[str, object]]:
    """A triage's figures for JUnit XML and the summary: ``triage`` (``k/n``, failing further
    seeds out of those tried), ``triage_ratios`` (``seed: worst ratio``, or ``seed: error``,
    each) and ``triage_seconds``."""
    return [
        ("triage", triage.fraction),
        ("triage_ratios", ", ".join(map(_seed_figure, triage.outcomes))),
        ("triage_seconds", round(triage.seconds, 2)),
    ]


def _seed_figure(outcome: SeedOutcome) -> str:
    return f"{outcome.seed}: {'error' if outcome.error else f'{outcome.worst_ratio:.4g}'}"


def recorded_baselines(rows: Sequence[dict[str, object]]) -> dict[Path, list[str]]:
    """Each baseline recorded in the run and its summary lines, from the figures of the check
    that recorded it: they reach the xdist controller with the test's report, as the rows do."""
    recorded: dict[Path, list[str]] = {}
    for row in rows:
        changes = row.get("baseline_changes")
        if isinstance(changes, str) and changes:
            recorded[Path(str(row.get("baseline", "?")))] = changes.split("\n")
    return recorded


def summary_section(
    rows: Sequence[dict[str, object]], changes: Mapping[Path, list[str]]
) -> list[str]:
    """The terminal summary's lines: every check, worst first, then the baselines recorded
    (what changed, and what each can catch)."""
    lines = summary_lines(rows) if rows else []
    for path, changed in changes.items():
        new = bool(changed) and changed[0].startswith("new baseline")
        lines.append(f"{'recorded' if new else 're-recorded'} {path}:")
        lines.extend(f"  {line}" for line in changed)
    return lines
