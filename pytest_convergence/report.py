"""Failure messages and report folders: the verdict first, each number beside its limit.

The message answers, in order: did the candidate leave the region; where first (step,
parameter, module); by how much; how widespread; what the region tolerates; what to run next.
The report folder keeps the JSON trace and a plot for a reviewer who was not at the terminal,
and, where the candidate can be re-run in this process, the loss-landscape slice and norm
evolution of :mod:`diagnostics`.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_convergence.candidates import Candidate
from pytest_convergence.regions import Region, Verdict, Violation
from pytest_convergence.replay import ReplayFinding
from pytest_convergence.traces import CoSimulation, ParameterComparison
from pytest_convergence.workloads import Workload

__all__ = ["FailureContext", "format_failure", "write_report"]

TABLE_ROWS = 10
NOTES_FILE = "notes.txt"
# Written by a diagnostic, or in its place: removed before a report is (re)written into a
# folder, so a file left by an earlier run never sits beside a newer trace.
DIAGNOSTIC_FILES = ("landscape.png", "landscape.json", "norms.png", "norms.json", NOTES_FILE)


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


def write_report(
    run: CoSimulation,
    region: Region | None,
    verdict: Verdict | None,
    folder: Path,
    *,
    workload: Workload | None = None,
    candidate: Candidate | None = None,
) -> list[Path]:
    """Trace as JSON and a plot of per-step LoGM with the region band; returns the files.

    Given the ``workload`` and ``candidate`` that produced ``run``, also the loss-landscape
    slice at the first failing step (the worst step of a passing run) and the per-layer norm
    evolution, each as a PNG and its JSON. A diagnostic that cannot be computed (a candidate
    whose weights are NaN at that step, say) leaves its reason in ``notes.txt`` instead: a report
    is never lost to a diagnostic.
    """
    if (workload is None) != (candidate is None):
        raise ValueError(
            "write_report: pass both workload= and candidate= (for the diagnostics) or neither"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name in DIAGNOSTIC_FILES:
        (folder / name).unlink(missing_ok=True)
    written = [run.write(folder / "trace.json")]
    written.append(_plot_logm(run, region, folder / "logm.png"))
    if workload is not None and candidate is not None:
        written += _write_diagnostics(run, verdict, workload, candidate, folder)
    return written


def _write_diagnostics(
    run: CoSimulation,
    verdict: Verdict | None,
    workload: Workload,
    candidate: Candidate,
    folder: Path,
) -> list[Path]:
    from pytest_convergence import diagnostics

    step = _diagnosed_step(run, verdict)
    highlight = verdict.first_violation.parameter if verdict and verdict.first_violation else None
    # Each file is listed as soon as it exists: a plot that fails keeps its JSON listed.
    written: list[Path] = []

    def landscape() -> None:
        if step is None:
            raise ValueError("no step ran, so there is no step to slice")
        found = diagnostics.loss_landscape_slice(workload, candidate, step)
        written.append(_write_text(folder / "landscape.json", found.to_json()))
        written.append(diagnostics.plot_landscape(found, folder / "landscape.png"))

    def norms() -> None:
        evolution = diagnostics.free_running_norms(run, workload, candidate)
        written.append(_write_text(folder / "norms.json", evolution.to_json()))
        written.append(
            diagnostics.plot_norm_evolution(evolution, folder / "norms.png", highlight=highlight)
        )

    notes = [
        note
        for files, write in (
            ("landscape.png, landscape.json", landscape),
            ("norms.png, norms.json", norms),
        )
        if (note := _attempt(files, write)) is not None
    ]
    if notes:
        written.append(_write_text(folder / NOTES_FILE, "\n\n".join(notes) + "\n"))
    return written


def _attempt(files: str, write: Callable[[], None]) -> str | None:
    """Run one diagnostic; on any error, a note with its reason and traceback instead."""
    try:
        write()
    except Exception as error:  # a diagnostic must never cost the verdict its report
        return f"{files}: not written, {type(error).__name__}: {error}\n\n" + "".join(
            traceback.format_exception(type(error), error, error.__traceback__)
        )
    return None


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _diagnosed_step(run: CoSimulation, verdict: Verdict | None) -> int | None:
    """The first failing step; for a passing run, the step of its worst check, else the last."""
    if verdict is not None:
        worst = verdict.first_violation or verdict.worst
        if worst is not None:
            return worst.step
    return run.comparisons[-1].step if run.comparisons else None


def _plot_logm(run: CoSimulation, region: Region | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c.step for c in run.comparisons]
    reference = [c.reference_global_logm for c in run.comparisons]
    candidate = [c.candidate_global_logm for c in run.comparisons]
    previous = [c.previous_global_logm for c in run.comparisons]
    figure, (trajectory, deltas) = plt.subplots(1, 2, figsize=(11, 4))
    trajectory.plot(steps, reference, "o-", label="reference")
    trajectory.plot(steps, candidate, "x--", label=f"candidate {run.candidate}")
    trajectory.set(
        xlabel="step", ylabel="global LoGM", title=f"{run.workload}: LoGM after each step"
    )
    trajectory.legend()
    ref_delta = [_delta(a, b) for a, b in zip(previous, reference, strict=True)]
    cand_delta = [_delta(a, b) for a, b in zip(previous, candidate, strict=True)]
    deltas.plot(steps, ref_delta, "o-", label="reference")
    deltas.plot(steps, cand_delta, "x--", label="candidate")
    if region is not None:
        low, high = region.global_logm_delta
        deltas.axhspan(low, high, color="tab:green", alpha=0.15, label="region (calibration)")
    deltas.set(xlabel="step", ylabel="LoGM delta per step", title="per-iteration LoGM delta")
    deltas.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _delta(before: float | None, after: float | None) -> float:
    if before is None or after is None:
        return math.nan
    return after - before
