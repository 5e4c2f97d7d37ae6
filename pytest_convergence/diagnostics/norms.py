"""The norm evolution (the weight-evolution poster, 2017): per-layer L2 norms of weights and
gradients over free-running training, reference against candidate. A re-synced step shows each
step's own error; the free-running norms show where errors accumulate: a layer whose weights grow
or shrink away from the reference's, gradients that explode or die.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pytest_convergence import jsonfile
from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import train
from pytest_convergence.diagnostics.plotting import gaps, log_scale_if_wide, pyplot, symlog_if_wide
from pytest_convergence.traces import CoSimulation, MeasurementFile, MeasurementFormat, Trace
from pytest_convergence.training_state import preserved_random_state
from pytest_convergence.workloads import Workload

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "MAX_LINES",
    "NORMS_SCHEMA",
    "NormEvolution",
    "NormPoint",
    "chosen_parameters",
    "free_running_norms",
    "norm_evolution",
    "plot_norm_evolution",
]

NORMS_SCHEMA = "pytest-convergence/norms"
# Lines per panel of the norm plot: more are unreadable.
MAX_LINES = 6
_NORM_LAYERS = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "LocalResponseNorm")


@dataclass(frozen=True)
class NormPoint:
    """One parameter after one step of free-running training: L2 norms of its weights and of
    the gradient the optimizer used in that step, in the reference's and the candidate's run.

    Step 0 (the initial weights) has no gradients, nor has a step whose optimizer never stepped
    (a GradScaler skipping non-finite gradients); the candidate's values are None after its
    run stopped on non-finite weights.
    """

    step: int
    parameter: str
    reference_weight_norm: float
    candidate_weight_norm: float | None
    reference_grad_norm: float | None
    candidate_grad_norm: float | None


@dataclass(frozen=True)
class NormEvolution(MeasurementFile):
    """Per-parameter norms over the steps: one :class:`NormPoint` per step per parameter."""

    workload: str
    reference: str
    candidate: str
    parameters: tuple[str, ...]
    points: tuple[NormPoint, ...]
    # Parameter name -> class of the module that owns it, to plot weights, not norm layers.
    module_types: dict[str, str] = field(default_factory=dict)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(p.step for p in self.points))

    @property
    def candidate_gradients(self) -> bool:
        """False for a candidate with its own step function: its gradients are not seen."""
        return any(p.candidate_grad_norm is not None for p in self.points)

    @property
    def candidate_steps(self) -> int:
        """The last step the candidate's free-running run completed with finite weights."""
        done = [p.step for p in self.points if p.candidate_weight_norm is not None]
        return max(done, default=0)

    def series(self, parameter: str) -> list[NormPoint]:
        return [p for p in self.points if p.parameter == parameter]

    FILE_FORMAT: ClassVar[MeasurementFormat] = MeasurementFormat(
        jsonfile.Schema(NORMS_SCHEMA, None, "a norm evolution"), "norm evolution"
    )


def norm_evolution(
    reference: Trace,
    candidate: Trace,
    *,
    workload: str = "",
    module_types: Mapping[str, str] | None = None,
) -> NormEvolution:
    """Pair two runs' per-parameter norms step by step, over the reference's steps.

    ``reference``: a co-simulation's ``reference`` trace (a free-running reference: re-syncing
    never changes it); ``candidate``: ``cosim.train(workload, candidate)``'s trace.
    """
    if not reference.steps:
        raise ValueError(f"trace {reference.label!r} has no steps")
    candidate_steps = {s.step: {p.name: p for p in s.parameters} for s in candidate.steps}
    parameters = tuple(p.name for p in reference.steps[0].parameters)
    points = []
    for step in reference.steps:
        theirs = candidate_steps.get(step.step, {})
        for ours in step.parameters:
            other = theirs.get(ours.name)
            points.append(
                NormPoint(
                    step=step.step,
                    parameter=ours.name,
                    reference_weight_norm=ours.weight_norm,
                    candidate_weight_norm=other.weight_norm if other is not None else None,
                    reference_grad_norm=ours.grad_norm,
                    candidate_grad_norm=other.grad_norm if other is not None else None,
                )
            )
    return NormEvolution(
        workload=workload,
        reference=reference.label,
        candidate=candidate.label,
        parameters=parameters,
        points=tuple(points),
        module_types=dict(module_types or {}),
    )


def free_running_norms(
    run: CoSimulation, workload: Workload, candidate: Candidate
) -> NormEvolution:
    """The candidate's norms over one free-running run of ``workload``, beside the reference's
    from ``run`` (the co-simulation that judged it). The global RNG is left as found."""
    with preserved_random_state():
        trace, _ = train(workload, candidate)
    return norm_evolution(
        run.reference, trace, workload=run.workload, module_types=run.module_types
    )


def plot_norm_evolution(
    evolution: NormEvolution,
    path: Path,
    *,
    highlight: str | None = None,
    max_lines: int = MAX_LINES,
) -> Path:
    """Weight (and gradient) norms per step, reference solid and candidate dashed, with their
    relative difference below; at most ``max_lines`` parameters (see :func:`chosen_parameters`),
    ``highlight`` (the first violation's parameter) always among them."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    chosen = chosen_parameters(evolution, highlight=highlight, max_lines=max_lines)
    kinds = [("weight", "weights")]
    if evolution.candidate_gradients:
        kinds.append(("grad", "gradients"))
    figure, axes = plt.subplots(
        2, len(kinds), figsize=(max(9, 6 * len(kinds)), 7.5), squeeze=False, sharex=True
    )
    for column, (kind, label) in enumerate(kinds):
        _plot_norm_column(
            axes[0][column],
            axes[1][column],
            evolution,
            chosen=chosen,
            kind=kind,
            highlight=highlight,
        )
        axes[0][column].set(
            ylabel=f"L2 norm of {label}", title=f"{label}: reference -, candidate --"
        )
        axes[1][column].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(_norms_title(evolution, chosen, highlight), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_norm_column(
    norms: Axes,
    differences: Axes,
    evolution: NormEvolution,
    *,
    chosen: Sequence[str],
    kind: str,
    highlight: str | None,
) -> None:
    """One kind of norm (``weight`` or ``grad``): absolute above, relative difference below."""
    plotted: list[float] = []
    relative: list[float] = []
    for index, name in enumerate(chosen):
        color = f"C{index % 10}"
        series = evolution.series(name)
        steps = [p.step for p in series]
        ours = gaps([_norm(p, kind, "reference") for p in series])
        theirs = gaps([_norm(p, kind, "candidate") for p in series])
        shown = f"{name} (first violation)" if name == highlight else name
        norms.plot(steps, ours, "o-", color=color, ms=3, label=shown)
        norms.plot(steps, theirs, "x--", color=color, ms=4)
        differences.plot(steps, _relative(theirs, ours), "x-", color=color, ms=4)
        plotted += [*ours, *theirs]
        relative += _relative(theirs, ours)
    log_scale_if_wide(norms, plotted)
    symlog_if_wide(differences, relative)
    differences.axhline(0.0, color="gray", linewidth=0.8)
    differences.set(xlabel="step", ylabel="(candidate - reference) / reference")
    norms.legend(fontsize="x-small")


def chosen_parameters(
    evolution: NormEvolution, *, highlight: str | None = None, max_lines: int = MAX_LINES
) -> list[str]:
    """The parameters worth a line, in model order: ``highlight`` (the first violation's), the
    first and last weight tensors (where the forward pass starts and ends), then those whose
    candidate norms differ most from the reference's. Weight tensors only (no biases, no
    normalization layers), unless the model has none."""
    if max_lines < 1:
        raise ValueError(f"max_lines={max_lines}: plot at least one parameter")
    weights = [name for name in evolution.parameters if _is_weight(name, evolution.module_types)]
    pool = weights or list(evolution.parameters)
    # In order of priority, should max_lines be smaller than these three.
    picked = dict.fromkeys([highlight] if highlight in evolution.parameters else [])
    picked.update(dict.fromkeys([pool[0], pool[-1]] if pool else []))
    ranked = sorted(pool, key=lambda name: _largest_difference(evolution, name), reverse=True)
    for name in ranked:
        if len(picked) >= max_lines:
            break
        picked[name] = None
    order = {name: index for index, name in enumerate(evolution.parameters)}
    return sorted(list(picked)[:max_lines], key=order.__getitem__)


def _is_weight(name: str, module_types: Mapping[str, str]) -> bool:
    owner = module_types.get(name, "")
    return name.rpartition(".")[2] == "weight" and not any(n in owner for n in _NORM_LAYERS)


def _largest_difference(evolution: NormEvolution, name: str) -> float:
    largest = 0.0
    for point in evolution.series(name):
        for kind in ("weight", "grad"):
            ours, theirs = _norm(point, kind, "reference"), _norm(point, kind, "candidate")
            if ours is None or theirs is None:
                continue
            difference = _relative_value(theirs, ours)
            # A non-finite difference (a norm that exploded) outranks every finite one.
            largest = max(largest, abs(difference) if not math.isnan(difference) else math.inf)
    return largest


def _norm(point: NormPoint, kind: str, side: str) -> float | None:
    value: float | None = getattr(point, f"{side}_{kind}_norm")
    return value


def _relative(theirs: Sequence[float], ours: Sequence[float]) -> list[float]:
    return gaps([_relative_value(t, o) for t, o in zip(theirs, ours, strict=True)])


def _relative_value(theirs: float, ours: float) -> float:
    if ours == 0:
        return 0.0 if theirs == 0 else math.inf
    return (theirs - ours) / ours


def _norms_title(evolution: NormEvolution, chosen: Sequence[str], highlight: str | None) -> str:
    title = (
        f"{evolution.workload}: per-layer L2 norms over free-running training\n"
        f"{evolution.reference} (solid) against candidate {evolution.candidate!r} (dashed)"
    )
    if not evolution.candidate_gradients:
        title += "\nweights only: the candidate's optimizer never applied gradients"
    last = evolution.steps[-1] if evolution.points else 0
    if evolution.candidate_steps < last:
        title += (
            f"\ncandidate stopped after step {evolution.candidate_steps} "
            "(non-finite weights or loss)"
        )
    bad = sum(
        value is not None and not math.isfinite(value)
        for p in evolution.points
        if p.parameter in chosen
        for value in (p.candidate_weight_norm, p.candidate_grad_norm)
    )
    if bad:
        title += f"\n{bad} non-finite candidate norms, shown as gaps"
    if len(chosen) < len(evolution.parameters):
        violation = ", the first violation" if highlight in chosen else ""
        title += (
            f"\n{len(chosen)} of {len(evolution.parameters)} parameters: first and last "
            f"weights{violation}, the largest differences"
        )
    return title
