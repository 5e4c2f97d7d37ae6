"""Report diagnostics: where the candidate's weights lie on the loss surface, and how per-layer
weight and gradient norms drift apart over training.

A verdict says that, and where, a candidate left its region; a reviewer then asks what kind of
damage it is. Two pictures answer that cheaply:

- A **loss-landscape slice** at the first failing step (Li et al. 2018, "Visualizing the loss
  landscape of neural nets"): the loss on that step's batch along the straight line from the
  reference's weights after the step to the candidate's (alpha 0 to 1, extended on both sides),
  and along filter-normalized random directions around each. A smooth line and random-direction
  curves of the same shape around both points: the candidate drifted inside the reference's
  basin. A barrier between the two, or a different basin around the candidate: it left it.
- The **norm evolution** (the weight-evolution poster, 2017): per-layer L2 norms of weights and
  gradients over free-running training, reference against candidate. A re-synced step shows each
  step's own error; the free-running norms show where errors accumulate: a layer whose weights
  grow or shrink away from the reference's, gradients that explode or die.

Both are bounded in cost and run only when a report folder is written. The slice replays the
reference to the failing step (as :mod:`replay` does), takes one step of each side and, by
default, 86 forward passes without backward on one batch; the norms need one free-running
candidate run (the reference's norms are already in the co-simulation's trace).

The loss of every point is the reference implementation's (its model, forward pass and loss
function): the landscape is one function, and the candidate's weights are a point on it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from pytest_convergence import jsonfile
from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import train
from pytest_convergence.engine import Implementation, RandomState, start_of_step
from pytest_convergence.errors import NonFiniteWeightError
from pytest_convergence.traces import CoSimulation, MeasurementFile, MeasurementFormat, Trace
from pytest_convergence.workloads import Batch, Workload

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "ALPHAS",
    "BETAS",
    "DIRECTIONS",
    "LandscapeSlice",
    "NormEvolution",
    "NormPoint",
    "chosen_parameters",
    "filter_normalized_direction",
    "free_running_norms",
    "loss_landscape_slice",
    "norm_evolution",
    "plot_landscape",
    "plot_norm_evolution",
]

LANDSCAPE_SCHEMA = "pytest-convergence/landscape"
NORMS_SCHEMA = "pytest-convergence/norms"

# Line from the reference (0) to the candidate (1), half the distance beyond each end: enough to
# see a barrier between the two, or that the candidate stopped short of or overshot a minimum.
# Steps of 1/8 hit 0 and 1 exactly; 17 points keep the curves smooth at a forward pass each.
ALPHAS: tuple[float, ...] = tuple(-0.5 + i / 8 for i in range(17))
# Li et al.'s range: at 1 each filter moves by its own norm, the scale of a whole basin.
BETAS: tuple[float, ...] = tuple(-1.0 + i / 8 for i in range(17))
# Two random directions: one curve could be a fluke of its draw; two show what is typical.
DIRECTIONS = 2
# Lines per panel of the norm plot: more are unreadable.
MAX_LINES = 6
_NORM_LAYERS = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "LocalResponseNorm")


# --- the loss-landscape slice ----------------------------------------------------------------


@dataclass(frozen=True)
class LandscapeSlice(MeasurementFile):
    """Losses on one step's batch along the reference-candidate line and random directions.

    ``line_losses[i]`` is the loss at ``(1 - alphas[i]) * reference + alphas[i] * candidate``;
    ``reference_losses[k][j]`` at ``reference + betas[j] * d_k``, ``candidate_losses[k][j]`` at
    ``candidate + betas[j] * d_k'``, with ``d_k`` and ``d_k'`` the same Gaussian draw (seed
    ``seed + k``) filter-normalized to each point's own weights. ``relative_distance`` is
    ``|candidate - reference|`` over the norm of the weights a direction moves (biases and
    one-dimensional parameters excluded): a beta of that size moves as far as the candidate is
    from the reference. Non-finite losses are kept as NaN or Inf.
    """

    workload: str
    candidate: str
    step: int
    seed: int
    loss_before: float
    relative_distance: float
    alphas: tuple[float, ...]
    line_losses: tuple[float, ...]
    betas: tuple[float, ...]
    reference_losses: tuple[tuple[float, ...], ...]
    candidate_losses: tuple[tuple[float, ...], ...]

    FILE_FORMAT: ClassVar[MeasurementFormat] = MeasurementFormat(
        jsonfile.Schema(LANDSCAPE_SCHEMA, None, "a loss-landscape slice"), "landscape slice"
    )


def filter_normalized_direction(
    weights: Sequence[torch.Tensor], generator: torch.Generator
) -> list[torch.Tensor]:
    """A Gaussian direction with each filter scaled to the norm of the weight's filter.

    ReLU and batch norm make a network (nearly) invariant to each filter's scale, so a raw
    Gaussian direction moves small filters relatively far and large ones hardly at all, and the
    loss along it says more about filter scales than about the basin (Li et al. 2018). Scaled
    filter by filter (a filter: one output slice, ``w[i]``, of a convolution or linear weight),
    curves around different points and models become comparable. One-dimensional parameters
    (biases, batch-norm scales and shifts) get zero, as in the paper.

    Drawn on the CPU in float64 from ``generator`` whatever the weights' device and dtype, so a
    seed gives the same direction everywhere.
    """
    direction = []
    for weight in weights:
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        if weight.dim() <= 1:
            draw.zero_()
        else:
            target = weight.detach().to("cpu", torch.float64).flatten(1).norm(dim=1)
            current = draw.flatten(1).norm(dim=1)
            scale = torch.where(current > 0, target / current, torch.zeros_like(target))
            draw.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
        direction.append(draw.to(device=weight.device, dtype=weight.dtype))
    return direction


def loss_landscape_slice(
    workload: Workload,
    candidate: Candidate,
    step: int,
    *,
    alphas: Sequence[float] = ALPHAS,
    betas: Sequence[float] = BETAS,
    directions: int = DIRECTIONS,
    seed: int = 0,
) -> LandscapeSlice:
    """The loss on step ``step``'s batch around the reference's and the candidate's weights
    after that step, both taken from the reference's state before it (as in co-simulation).

    Costs ``step - 1`` reference training steps, one step of each, and
    ``len(alphas) + 2 * directions * len(betas) + 1`` forward passes on one batch. The global
    RNG is left as found. ``NonFiniteWeightError`` when the candidate's step produced NaN or Inf
    weights: there is no line to draw.
    """
    if not 1 <= step <= workload.steps:
        raise ValueError(
            f"step={step}: workload {workload.name!r} runs steps 1 to {workload.steps}"
        )
    if directions < 0:
        raise ValueError(f"directions={directions}: use 0 or more random directions")
    with _rng_preserved():
        points = _step_points(workload, candidate, step)
        probe = points.probe
        line = tuple(
            probe.loss(
                [
                    # lerp is exact at both ends: alpha 1 is the candidate's weights, bit for bit.
                    torch.lerp(r, c, alpha)
                    for r, c in zip(points.reference, points.candidate, strict=True)
                ]
            )
            for alpha in alphas
        )
        around_reference = []
        around_candidate = []
        for index in range(directions):
            around_reference.append(_along_direction(probe, points.reference, betas, seed + index))
            around_candidate.append(_along_direction(probe, points.candidate, betas, seed + index))
        loss_before = probe.loss(points.before)
    return LandscapeSlice(
        workload=workload.name,
        candidate=candidate.name,
        step=step,
        seed=seed,
        loss_before=loss_before,
        relative_distance=_relative_distance(points.reference, points.candidate),
        alphas=tuple(float(alpha) for alpha in alphas),
        line_losses=line,
        betas=tuple(float(beta) for beta in betas),
        reference_losses=tuple(around_reference),
        candidate_losses=tuple(around_candidate),
    )


@dataclass
class _LossProbe:
    """The reference's training loss on one batch at any weights, without side effects.

    Buffers (batch-norm running statistics, a spectral norm's power-iteration vector) are reset
    before every forward pass and the RNG is set to the state the step started from: every point
    sees that step's dropout masks, and the loss is a function of the weights alone.
    """

    implementation: Implementation
    batch: Batch
    buffers: dict[str, torch.Tensor]
    rng: RandomState  # the step's, so every point sees its dropout masks

    def loss(self, weights: Sequence[torch.Tensor]) -> float:
        model = self.implementation.model
        with torch.no_grad():
            for parameter, value in zip(model.parameters(), weights, strict=True):
                parameter.copy_(value)
            for name, buffer in model.named_buffers():
                buffer.copy_(self.buffers[name])
            self.rng.restore()
            model.train()
            inputs, targets = self.batch
            # Virtual workers (an exchanging candidate's reference) each see their own shard,
            # and batch norm its statistics; the step's loss is the mean over the shards.
            workers = self.implementation.recipe.workers
            loss_fn = self.implementation.workload.loss_fn
            with self.implementation.recipe.forward_context():
                losses = [
                    loss_fn(model(shard_inputs), shard_targets)
                    for shard_inputs, shard_targets in zip(
                        inputs.chunk(workers), targets.chunk(workers), strict=True
                    )
                ]
            return float(torch.stack(losses).mean())


@dataclass
class _StepPoints:
    """Weights before the step and after it, the reference's and the candidate's."""

    before: list[torch.Tensor]
    reference: list[torch.Tensor]
    candidate: list[torch.Tensor]
    probe: _LossProbe


def _step_points(workload: Workload, candidate: Candidate, step: int) -> _StepPoints:
    start = start_of_step(workload, candidate, step)
    reference, side, state, batch = start.reference, start.side, start.state, start.batch
    trained = reference.train_step(batch, step, keep_gradients=True)
    reference_after = _weights(reference.model)
    buffers = {name: b.detach().clone() for name, b in reference.model.named_buffers()}
    side.step_from(state, batch, step, trained)
    candidate_after = _weights(side.implementation.model)
    _require_finite(reference.model, candidate_after, step)
    probe = _LossProbe(reference, batch, buffers, state.rng)
    return _StepPoints(state.parameters, reference_after, candidate_after, probe)


def _along_direction(
    probe: _LossProbe, center: Sequence[torch.Tensor], betas: Sequence[float], seed: int
) -> tuple[float, ...]:
    direction = filter_normalized_direction(center, torch.Generator().manual_seed(seed))
    return tuple(
        probe.loss([torch.add(c, d, alpha=beta) for c, d in zip(center, direction, strict=True)])
        for beta in betas
    )


def _relative_distance(
    reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]
) -> float:
    """|candidate - reference| over the norm of the weights a filter-normalized direction moves
    (one-dimensional parameters excluded): the beta at which a random direction has gone as far
    as the candidate is from the reference."""
    difference = math.fsum(
        float((c.double() - r.double()).square().sum())
        for r, c in zip(reference, candidate, strict=True)
    )
    scale = math.fsum(float(r.double().square().sum()) for r in reference if r.dim() > 1)
    if scale == 0:
        return math.inf if difference > 0 else 0.0
    return math.sqrt(difference / scale)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _require_finite(model: nn.Module, weights: Sequence[torch.Tensor], step: int) -> None:
    for (name, _), values in zip(model.named_parameters(), weights, strict=True):
        if not bool(torch.isfinite(values).all()):
            raise NonFiniteWeightError(
                f"{name} (candidate)",
                nan_count=int(torch.isnan(values).sum()),
                inf_count=int(torch.isinf(values).sum()),
                step=step,
            )


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Diagnostics run after a verdict, in a test that may go on: leave its RNG as found."""
    found = RandomState.capture()
    try:
        yield
    finally:
        found.restore()


def plot_landscape(landscape: LandscapeSlice, path: Path) -> Path:
    """Line and random-direction panels side by side; non-finite losses are gaps."""
    plt = _pyplot()
    figure, (line_axis, random_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    line_axis.plot(landscape.alphas, _gaps(landscape.line_losses), "o-", color="tab:purple", ms=3)
    line_axis.axvline(0.0, color="tab:blue", linestyle=":", label="reference (alpha 0)")
    line_axis.axvline(1.0, color="tab:orange", linestyle=":", label="candidate (alpha 1)")
    # Off the axis when the step's own progress dwarfs the gap between the two points; the
    # legend still gives the value, and the line keeps its detail (a barrier, a minimum).
    line_axis.axhline(
        landscape.loss_before,
        color="gray",
        linestyle="--",
        label=f"reference before the step ({landscape.loss_before:.4g})",
    )

    line_axis.set(
        xlabel="alpha: weights (1 - alpha) * reference + alpha * candidate",
        ylabel=f"loss on the batch of step {landscape.step}",
        title=f"{landscape.workload}, step {landscape.step}: reference to candidate",
    )
    if not _log_scale_if_wide(line_axis, landscape.line_losses):
        _fit_to(line_axis, landscape.line_losses)
    line_axis.legend(fontsize="small")
    for index, (reference, candidate) in enumerate(
        zip(landscape.reference_losses, landscape.candidate_losses, strict=True)
    ):
        marker = "os^v"[index % 4]
        first = index == 0
        random_axis.plot(
            landscape.betas,
            _gaps(reference),
            f"{marker}-",
            color="tab:blue",
            ms=3,
            label="around reference" if first else None,
        )
        random_axis.plot(
            landscape.betas,
            _gaps(candidate),
            f"{marker}--",
            color="tab:orange",
            ms=3,
            label="around candidate" if first else None,
        )
    distance = landscape.relative_distance
    if math.isfinite(distance) and distance > 0:
        random_axis.axvspan(
            -distance,
            distance,
            color="gray",
            alpha=0.2,
            label=f"+/- reference-candidate distance ({distance:.1e})",
        )
    random_axis.set(
        xlabel="beta (filter-normalized: at 1 each filter moves by its own norm)",
        ylabel=f"loss on the batch of step {landscape.step}",
        title=f"{len(landscape.reference_losses)} filter-normalized random directions "
        f"(seed {landscape.seed})",
    )
    _log_scale_if_wide(random_axis, _random_losses(landscape))
    random_axis.legend(fontsize="small")
    figure.suptitle(_gap_note(landscape), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _gap_note(landscape: LandscapeSlice) -> str:
    values = [*landscape.line_losses, *_random_losses(landscape)]
    bad = sum(not math.isfinite(x) for x in values)
    head = f"candidate {landscape.candidate!r}: loss landscape at step {landscape.step}"
    return head + (f" ({bad} of {len(values)} losses non-finite, shown as gaps)" if bad else "")


def _random_losses(landscape: LandscapeSlice) -> list[float]:
    curves = [*landscape.reference_losses, *landscape.candidate_losses]
    return [loss for curve in curves for loss in curve]


# --- the norm evolution ----------------------------------------------------------------------


@dataclass(frozen=True)
class NormPoint:
    """One parameter after one step of free-running training: L2 norms of its weights and of
    the gradient the optimizer used in that step, in the reference's and the candidate's run.

    Step 0 (the initial weights) has no gradients; a candidate with its own ``step_fn`` reports
    none; the candidate's values are None after its run stopped on non-finite weights.
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
    with _rng_preserved():
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
    plt = _pyplot()
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
        ours = _gaps([_norm(p, kind, "reference") for p in series])
        theirs = _gaps([_norm(p, kind, "candidate") for p in series])
        shown = f"{name} (first violation)" if name == highlight else name
        norms.plot(steps, ours, "o-", color=color, ms=3, label=shown)
        norms.plot(steps, theirs, "x--", color=color, ms=4)
        differences.plot(steps, _relative(theirs, ours), "x-", color=color, ms=4)
        plotted += [*ours, *theirs]
        relative += _relative(theirs, ours)
    _log_scale_if_wide(norms, plotted)
    _symlog_if_wide(differences, relative)
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
    return _gaps([_relative_value(t, o) for t, o in zip(theirs, ours, strict=True)])


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
        title += "\nweights only: the candidate's gradients are not seen (its own step_fn)"
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


# --- plotting helpers ------------------------------------------------------------------------


def _pyplot() -> ModuleType:
    """matplotlib without a display, imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _gaps(values: Sequence[float | None]) -> list[float]:
    """NaN where a value is missing or non-finite: matplotlib leaves a gap there."""
    return [v if v is not None and math.isfinite(v) else math.nan for v in values]


def _fit_to(axis: Axes, values: Sequence[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and max(finite) > min(finite):
        low, high = min(finite), max(finite)
        margin = 0.08 * (high - low)
        axis.set_ylim(low - margin, high + margin)


def _symlog_if_wide(axis: Axes, values: Sequence[float]) -> None:
    """Relative differences beyond 100% (a layer that exploded) on a symmetric log axis, so
    they do not flatten the small differences of every other layer to zero."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    if finite and max(finite) > 1.0:
        axis.set_yscale("symlog", linthresh=1e-3)


def _log_scale_if_wide(axis: Axes, values: Sequence[float]) -> bool:
    """A log axis when losses span decades (far along a random direction), so the detail near
    the two points is not flattened; only for positive losses. True when it set one."""
    finite = [v for v in values if math.isfinite(v)]
    wide = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 30
    if wide:
        axis.set_yscale("log")
    return wide
