"""Report folders: what a reviewer who was not at the terminal needs to see a check again.

First the map of where the candidate left its region (each parameter's worst ratio to its
limit per step, :mod:`pytest_convergence.ratio_map`), then the JSON trace (re-plotted and
re-judged offline by the ``pytest-convergence report`` command), a plot of per-step LoGM with
the region band, and, where the candidate can be re-run in this process, the loss-landscape
slice and norm evolution of :mod:`pytest_convergence.diagnostics`.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from pathlib import Path

from pytest_convergence.candidates import Candidate
from pytest_convergence.ratio_map import (
    RATIO_CEILING,
    RATIO_FLOOR,
    RatioMap,
    ratio_color,
    ratio_map,
)
from pytest_convergence.regions import Region, Verdict
from pytest_convergence.report import NOTES_FILE
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload

__all__ = ["DIAGNOSTIC_FILES", "RATIO_MAP_FILE", "write_report"]

RATIO_MAP_FILE = "heatmap.png"
# Written by a diagnostic or a picture that may fail, or in its place: removed before a report
# is (re)written into a folder, so a file left by an earlier run never sits beside a newer trace.
DIAGNOSTIC_FILES = (
    RATIO_MAP_FILE,
    "landscape.png",
    "landscape.json",
    "norms.png",
    "norms.json",
    NOTES_FILE,
)


def write_report(
    run: CoSimulation,
    region: Region | None,
    verdict: Verdict | None,
    folder: Path,
    *,
    workload: Workload | None = None,
    candidate: Candidate | None = None,
) -> list[Path]:
    """The map of ratios to limits (given a ``region``), the trace as JSON and a plot of
    per-step LoGM with the region band; returns the files, the map first.

    Given the ``workload`` and ``candidate`` that produced ``run``, also the loss-landscape
    slice at the first failing step (the worst step of a passing run) and the per-layer norm
    evolution, each as a PNG and its JSON. A picture or diagnostic that cannot be computed (a
    candidate whose weights are NaN at that step, say) leaves its reason in ``notes.txt``
    instead: a report is never lost to one of them.
    """
    if (workload is None) != (candidate is None):
        raise ValueError(
            "write_report: pass both workload= and candidate= (for the diagnostics) or neither"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name in DIAGNOSTIC_FILES:
        (folder / name).unlink(missing_ok=True)
    written: list[Path] = []
    notes: list[str] = []
    trace = run.write(folder / "trace.json")
    if region is not None:
        path = folder / RATIO_MAP_FILE
        notes += _noted(RATIO_MAP_FILE, lambda: written.append(_plot_ratio_map(run, region, path)))
    written += [trace, _plot_logm(run, region, folder / "logm.png")]
    if workload is not None and candidate is not None:
        files, failed = _write_diagnostics(run, verdict, workload, candidate, folder)
        written += files
        notes += failed
    if notes:
        written.append(_write_text(folder / NOTES_FILE, "\n\n".join(notes) + "\n"))
    return written


def _write_diagnostics(
    run: CoSimulation,
    verdict: Verdict | None,
    workload: Workload,
    candidate: Candidate,
    folder: Path,
) -> tuple[list[Path], list[str]]:
    """The diagnostics' files, and a note for each diagnostic that could not be written."""
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

    notes = _noted("landscape.png, landscape.json", landscape)
    notes += _noted("norms.png, norms.json", norms)
    return written, notes


def _noted(files: str, write: Callable[[], None]) -> list[str]:
    """No notes if ``write`` succeeds; else one, saying why ``files`` are missing."""
    note = _attempt(files, write)
    return [] if note is None else [note]


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


def _plot_ratio_map(run: CoSimulation, region: Region, path: Path) -> Path:
    """The HTML report's map as a PNG: the same cells in the same colours, the same break."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, LogNorm, to_rgb
    from matplotlib.patches import Rectangle

    ratios = ratio_map(run, region)
    image = [[to_rgb(ratio_color(ratio)) for ratio in row] for row in ratios.ratios]
    rows, columns = len(ratios.parameters), len(ratios.steps)
    height = min(max(2.6, 0.24 * rows + 1.8), 40.0)
    figure, axes = plt.subplots(figsize=(11, height))
    axes.imshow(image, aspect="auto", interpolation="nearest")
    axes.set_yticks(range(rows), ratios.parameters, fontsize=8)
    every = max(1, columns // 20)
    axes.set_xticks(range(0, columns, every), [str(s) for s in ratios.steps[::every]])
    axes.set(xlabel="step", title=_ratio_map_title(run, ratios))
    first = ratios.first_violation_cell
    if first is not None:
        row, column = first
        frame = Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", lw=2)
        axes.add_patch(frame)
    scale = [
        ratio_color(RATIO_FLOOR * (RATIO_CEILING / RATIO_FLOOR) ** (k / 255)) for k in range(256)
    ]
    legend = plt.cm.ScalarMappable(LogNorm(RATIO_FLOOR, RATIO_CEILING), ListedColormap(scale))
    bar = figure.colorbar(legend, ax=axes, fraction=0.04, pad=0.02)
    bar.set_label("ratio to limit (red: outside)")
    bar.ax.axhline(1.0, color="black", lw=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _ratio_map_title(run: CoSimulation, ratios: RatioMap) -> str:
    first = ratios.verdict.first_violation
    if first is None:
        worst = ratios.verdict.worst_ratio
        return f"{run.workload} / {run.candidate}: passed, worst ratio {worst:.2g} of its limit"
    return (
        f"{run.workload} / {run.candidate}: failed at step {first.step}, {first.parameter}, "
        f"{first.check} (worst {ratios.verdict.worst_ratio:.3g}x its limit)"
    )
