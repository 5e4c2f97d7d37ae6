"""Report folders: what a reviewer who was not at the terminal needs to see a check again.

The JSON trace (re-plotted and re-judged offline by the ``pytest-convergence report`` command),
a plot of per-step LoGM with the region band, and, where the candidate can be re-run in this
process, the loss-landscape slice and norm evolution of :mod:`pytest_convergence.diagnostics`.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from pathlib import Path

from pytest_convergence.candidates import Candidate
from pytest_convergence.regions import Region, Verdict
from pytest_convergence.report import NOTES_FILE
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload

__all__ = ["DIAGNOSTIC_FILES", "write_report"]

# Written by a diagnostic, or in its place: removed before a report is (re)written into a
# folder, so a file left by an earlier run never sits beside a newer trace.
DIAGNOSTIC_FILES = ("landscape.png", "landscape.json", "norms.png", "norms.json", NOTES_FILE)


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
