"""The loss-landscape slice at a failing step (Li et al. 2018, "Visualizing the loss landscape
of neural nets"): the loss on that step's batch along the straight line from the reference's
weights after the step to the candidate's, and along filter-normalized random directions around
each. The loss of every point is the reference implementation's (its model, forward pass and
loss function): the landscape is one function, and the candidate's weights are a point on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from pytest_convergence import jsonfile
from pytest_convergence.batches import Batch, split
from pytest_convergence.candidates import Candidate
from pytest_convergence.diagnostics.plotting import fit_to, gaps, log_scale_if_wide, pyplot
from pytest_convergence.engine import Implementation, start_of_step
from pytest_convergence.errors import NonFiniteWeightError
from pytest_convergence.traces import MeasurementFile, MeasurementFormat
from pytest_convergence.training_state import RandomState, preserved_random_state
from pytest_convergence.workloads import Workload

__all__ = [
    "ALPHAS",
    "BETAS",
    "DIRECTIONS",
    "LANDSCAPE_SCHEMA",
    "LandscapeSlice",
    "filter_normalized_direction",
    "loss_landscape_slice",
    "plot_landscape",
]

LANDSCAPE_SCHEMA = "pytest-convergence/landscape"
# Line from the reference (0) to the candidate (1), half the distance beyond each end: enough to
# see a barrier between the two, or that the candidate stopped short of or overshot a minimum.
# Steps of 1/8 hit 0 and 1 exactly; 17 points keep the curves smooth at a forward pass each.
ALPHAS: tuple[float, ...] = tuple(-0.5 + i / 8 for i in range(17))
# Li et al.'s range: at 1 each filter moves by its own norm, the scale of a whole basin.
BETAS: tuple[float, ...] = tuple(-1.0 + i / 8 for i in range(17))
# Two random directions: one curve could be a fluke of its draw; two show what is typical.
DIRECTIONS = 2


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
    with preserved_random_state():
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
            # Virtual workers (an exchanging candidate's reference) each see their own shard,
            # and batch norm its statistics; the step's loss is the mean over the shards.
            workers = self.implementation.recipe.workers
            context = self.implementation.context(step=0)
            with self.implementation.recipe.forward_context():
                losses = [context.loss(shard) for shard in split(self.batch, workers)]
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


def plot_landscape(landscape: LandscapeSlice, path: Path) -> Path:
    """Line and random-direction panels side by side; non-finite losses are gaps."""
    plt = pyplot()
    figure, (line_axis, random_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    line_axis.plot(landscape.alphas, gaps(landscape.line_losses), "o-", color="tab:purple", ms=3)
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
    if not log_scale_if_wide(line_axis, landscape.line_losses):
        fit_to(line_axis, landscape.line_losses)
    line_axis.legend(fontsize="small")
    for index, (reference, candidate) in enumerate(
        zip(landscape.reference_losses, landscape.candidate_losses, strict=True)
    ):
        marker = "os^v"[index % 4]
        first = index == 0
        random_axis.plot(
            landscape.betas,
            gaps(reference),
            f"{marker}-",
            color="tab:blue",
            ms=3,
            label="around reference" if first else None,
        )
        random_axis.plot(
            landscape.betas,
            gaps(candidate),
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
    log_scale_if_wide(random_axis, _random_losses(landscape))
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
