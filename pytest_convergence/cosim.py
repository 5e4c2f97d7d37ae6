"""Co-simulation: step a reference and candidates in lockstep from identical state.

Local (re-synced) co-simulation: before every step each candidate is reset to the reference's
weights, buffers, optimizer state and RNG state, then both take one step on the same batch. Each
step's difference is then the candidate's own, not the chaotic growth of earlier differences
(measurements, section 5), which is what lets a verdict name the first step and parameter.

Free-running training (:func:`train`) runs one implementation on its own for the cumulative view:
loss curves and LoGM trajectories, and the peer methods of the detection benchmark.

Memory: a run keeps the reference model and optimizer, one copy of the weights, buffers and
optimizer state before the step, one copy of the reference's gradients when a candidate only
transforms gradients (in buffers reused every step), and one model and optimizer per candidate
that needs its own forward pass; statistics per step, never weights per step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pytest_convergence.candidates import REFERENCE, Candidate, mean_exchange
from pytest_convergence.errors import NonFiniteWeightError
from pytest_convergence.traces import CoSimulation, StepComparison, Trace
from pytest_convergence.tracing import (
    FlatWeights,
    KeptGradients,
    ParameterLayout,
    SnapshotSeries,
    compare_weights,
    gradient_norms,
    step_trace,
)
from pytest_convergence.workloads import Batch, Workload

__all__ = ["cosimulate", "cosimulate_many", "train"]


def cosimulate(workload: Workload, candidate: Candidate) -> CoSimulation:
    """Run ``candidate`` against the reference of ``workload``, re-synced every step."""
    return cosimulate_many(workload, [candidate])[0]


def cosimulate_many(workload: Workload, candidates: Sequence[Candidate]) -> list[CoSimulation]:
    """Several candidates against one reference run (calibration draws share the reference)."""
    if not candidates:
        raise ValueError("cosimulate_many needs at least one candidate")
    workers = {candidate.workers for candidate in candidates}
    if len(workers) != 1:
        raise ValueError(
            f"candidates co-simulated together must use the same number of workers, got {workers}"
        )
    reference_side = _reference_side(candidates[0])
    reference = _Implementation.build(workload, reference_side)
    sides = [_CandidateSide.build(workload, reference, candidate) for candidate in candidates]
    batches = workload.make_batches()
    results = [
        CoSimulation(
            workload=workload.name,
            candidate=candidate.name,
            seed=workload.seed,
            steps=workload.steps,
            dtype=str(workload.dtype).removeprefix("torch."),
            device=workload.device,
            reference=Trace(label="reference"),
            module_types=_module_types(reference.model),
        )
        for candidate in candidates
    ]
    layout = _layout(reference.model)
    series = SnapshotSeries(layout, list(reference.model.parameters()))
    initial = step_trace(layout, series.latest, step=0, loss=None)
    for result in results:
        result.reference.steps.append(initial)
    stopped = [False] * len(sides)
    keep = any(side.candidate.only_transforms_gradients for side in sides)
    # Each side's snapshot from the step before, whose vector the next one overwrites.
    spent: list[FlatWeights | None] = [None] * len(sides)
    for index, batch in enumerate(batches):
        step = index + 1
        before = _State.capture(reference)
        trained = reference.train_step(batch, step, traced=True, keep_gradients=keep)
        loss, gradients = trained.loss, trained.gradients
        previous, after = series.advance(list(reference.model.parameters()), trained.gradient_norms)
        _require_finite(layout, after, reference.model, step)
        reference_trace = step_trace(layout, after, step=step, loss=loss)
        for position, (side, result) in enumerate(zip(sides, results, strict=True)):
            if stopped[position]:
                continue
            result.reference.steps.append(reference_trace)
            candidate_loss = side.step_from(before, batch, step, gradients)
            candidate = FlatWeights.of(
                layout, list(side.implementation.model.parameters()), reuse=spent[position]
            )
            spent[position] = candidate
            comparison = StepComparison(
                step=step,
                reference_loss=loss,
                candidate_loss=loss if candidate_loss is None else candidate_loss,
                reference_global_logm=after.global_logm,
                candidate_global_logm=candidate.global_logm,
                previous_global_logm=previous.global_logm,
                parameters=compare_weights(layout, previous, after, candidate),
            )
            result.comparisons.append(comparison)
            stopped[position] = comparison.non_finite
    return results


def train(workload: Workload, candidate: Candidate = REFERENCE) -> tuple[Trace, nn.Module]:
    """Free-running training of one implementation; its trace and its final model."""
    implementation = _Implementation.build(workload, candidate)
    trace = Trace(label=candidate.name)
    layout = _layout(implementation.model)
    series = SnapshotSeries(layout, list(implementation.model.parameters()))
    trace.steps.append(step_trace(layout, series.latest, step=0, loss=None))
    for index, batch in enumerate(workload.make_batches()):
        trained = implementation.train_step(batch, index + 1, traced=True)
        _, after = series.advance(list(implementation.model.parameters()), trained.gradient_norms)
        if not math.isfinite(trained.loss) or not all(after.finite):
            break
        trace.steps.append(step_trace(layout, after, step=index + 1, loss=trained.loss))
    return trace, implementation.model


def _reference_side(candidate: Candidate) -> Candidate:
    """Reference counterpart: an exchanging candidate is compared with an exact mean exchange
    over the same virtual workers, so batch-norm statistics and summation match."""
    if candidate.workers == 1:
        return REFERENCE
    return Candidate(name="reference", exchange=mean_exchange, workers=candidate.workers)


@dataclass
class _TrainedStep:
    """What one training step leaves for the trace and the candidates."""

    loss: float
    # Of the gradients the optimizer saw; None where a candidate's own step function hides them.
    gradient_norms: list[float] | None
    # A copy of those gradients, when asked for: valid until the implementation's next step.
    gradients: KeptGradients | None = None


@dataclass
class _Implementation:
    """A model, its optimizer and the candidate recipe that steps them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    recipe: Candidate
    workload: Workload
    _kept: KeptGradients | None = field(default=None, init=False, repr=False)

    @classmethod
    def build(
        cls, workload: Workload, recipe: Candidate, model: nn.Module | None = None
    ) -> _Implementation:
        if model is None:
            model = workload.build_model()
            if recipe.model_transform is not None:
                model = recipe.model_transform(model)
        factory = recipe.optimizer_factory or workload.optimizer_factory
        return cls(model, factory(model.parameters()), recipe, workload)

    def train_step(
        self, batch: Batch, step: int, *, traced: bool = False, keep_gradients: bool = False
    ) -> _TrainedStep:
        """One training step; when ``traced``, the norms of the gradients the optimizer saw,
        and with ``keep_gradients`` a copy of them (see :meth:`keep_gradients`)."""
        inputs, targets = batch
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.recipe.step_fn is not None:
            with self.recipe.forward_context():
                loss = self.recipe.step_fn(
                    self.model, self.optimizer, inputs, targets, self.workload.loss_fn
                )
            self.after_optimizer_step()
            return _TrainedStep(float(loss.detach()), None)
        with self.recipe.forward_context():
            if self.recipe.workers > 1:
                loss = self._exchanged_backward(inputs, targets, step)
            else:
                loss = self.workload.loss_fn(self.model(inputs), targets)
                loss.backward()  # type: ignore[no-untyped-call]
        named = list(self.model.named_parameters())
        if self.recipe.gradient_transform is not None:
            present = [(name, p.grad) for name, p in named if p.grad is not None]
            self.recipe.gradient_transform(present, step)
        parameters = [p for _, p in named]
        trained = _TrainedStep(float(loss.detach()), gradient_norms(parameters) if traced else None)
        if keep_gradients:
            trained.gradients = self.keep_gradients(parameters)
        self.optimizer.step()
        self.after_optimizer_step()
        return trained

    def keep_gradients(self, parameters: Sequence[torch.Tensor]) -> KeptGradients:
        """A copy of the gradients of the model's ``parameters`` as they are now, in buffers this
        implementation reuses every step: the optimizer may change ``.grad``, the next step
        overwrites it."""
        if self._kept is None:
            self._kept = KeptGradients(parameters)
        return self._kept.copy_from(parameters)

    def after_optimizer_step(self) -> None:
        """The training loop's post-step code: the candidate's own, else the workload's."""
        after_step = self.recipe.after_step or self.workload.after_step
        if after_step is not None:
            with torch.no_grad():
                after_step(self.model)

    def _exchanged_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, step: int
    ) -> torch.Tensor:
        parameters = list(self.model.parameters())
        per_worker: list[list[torch.Tensor]] = []
        losses = []
        for shard_inputs, shard_targets in zip(
            inputs.chunk(self.recipe.workers), targets.chunk(self.recipe.workers), strict=True
        ):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.workload.loss_fn(self.model(shard_inputs), shard_targets)
            loss.backward()  # type: ignore[no-untyped-call]
            per_worker.append([_clone_or_zeros(p) for p in parameters])
            losses.append(loss.detach())
        assert self.recipe.exchange is not None
        averaged = self.recipe.exchange(per_worker, step)
        for parameter, gradient in zip(parameters, averaged, strict=True):
            parameter.grad = gradient.to(parameter.dtype)
        return torch.stack(losses).mean()


@dataclass(frozen=True)
class _RandomState:
    """The CPU generator's state and, once CUDA is in use, every device's."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> _RandomState:
        cuda = torch.cuda.get_rng_state_all() if _cuda_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        """Back to this state: the same dropout masks, the same draws."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass
class _State:
    """Everything a step depends on, captured before the reference takes it."""

    parameters: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer: dict[str, object]
    rng: _RandomState

    @classmethod
    def capture(cls, implementation: _Implementation) -> _State:
        model = implementation.model
        return cls(
            parameters=[p.detach().clone() for p in model.parameters()],
            buffers={n: b.detach().clone() for n, b in model.named_buffers()},
            # Optimizer.state_dict() returns live momentum buffers: copy, never share.
            optimizer=copy.deepcopy(implementation.optimizer.state_dict()),
            rng=_RandomState.capture(),
        )

    def restore(self, implementation: _Implementation) -> None:
        with torch.no_grad():
            for parameter, source in zip(
                implementation.model.parameters(), self.parameters, strict=True
            ):
                parameter.copy_(source)
            # By name: a swapped-in module may carry buffers the reference lacks.
            for name, buffer in implementation.model.named_buffers():
                if name in self.buffers:
                    buffer.copy_(self.buffers[name])
        # load_state_dict also copies the reference's hyper-parameters (lr, momentum, ...):
        # keep the candidate's own, or an optimizer that differs only in them is invisible.
        optimizer = implementation.optimizer
        own_options = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
        own_state = self._state_the_reference_lacks(optimizer)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        for group, options in zip(optimizer.param_groups, own_options, strict=True):
            group.update(options)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        for index, entries in own_state.items():
            optimizer.state[parameters[index]].update(entries)
        self.rng.restore()

    def _state_the_reference_lacks(
        self, optimizer: torch.optim.Optimizer
    ) -> dict[int, dict[str, object]]:
        """The candidate optimizer's own per-parameter state that the reference's has no entry
        for (AMSGrad's running maximum, another optimizer's moments), by parameter index. As
        with buffers, it stays the candidate's own across re-syncs: loading the reference's
        state dict would drop it, and the candidate's next step would fail or start over."""
        reference_state = self.optimizer.get("state", {})
        assert isinstance(reference_state, dict)
        own: dict[int, dict[str, object]] = {}
        for index, entries in optimizer.state_dict()["state"].items():
            theirs = reference_state.get(index, {})
            extra = {key: value for key, value in entries.items() if key not in theirs}
            if extra:
                own[index] = extra
        return own


@dataclass
class _CandidateSide:
    """A candidate's model and optimizer, re-synced to the reference before every step."""

    candidate: Candidate
    implementation: _Implementation

    @classmethod
    def build(
        cls, workload: Workload, reference: _Implementation, candidate: Candidate
    ) -> _CandidateSide:
        model = copy.deepcopy(reference.model)
        if candidate.model_transform is not None:
            model = candidate.model_transform(model)
            _check_same_parameters(reference.model, model, candidate.name)
        return cls(candidate, _Implementation.build(workload, candidate, model))

    def step_from(
        self,
        before: _State,
        batch: Batch,
        step: int,
        reference_gradients: Sequence[torch.Tensor] | None,
    ) -> float | None:
        """One step from the reference's state; None when the reference's loss applies."""
        try:
            before.restore(self.implementation)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ValueError(
                f"candidate {self.candidate.name!r}: cannot re-sync its optimizer to the "
                f"reference's state at step {step} ({error}); a candidate optimizer must accept "
                "the reference optimizer's state dict"
            ) from None
        if self.candidate.only_transforms_gradients and reference_gradients is not None:
            self._step_with_gradients(reference_gradients, step)
            return None
        return self.implementation.train_step(batch, step).loss

    def _step_with_gradients(self, gradients: Sequence[torch.Tensor], step: int) -> None:
        """Reuse the reference's gradients: a gradient-only candidate needs no forward pass."""
        named = list(self.implementation.model.named_parameters())
        for (_, parameter), gradient in zip(named, gradients, strict=True):
            parameter.grad = gradient.clone()
        assert self.candidate.gradient_transform is not None
        self.candidate.gradient_transform(
            [(n, p.grad) for n, p in named if p.grad is not None], step
        )
        self.implementation.optimizer.step()
        self.implementation.after_optimizer_step()


@dataclass
class _StepStart:
    """Both sides built and the reference trained up to just before ``step``: where a replay or
    a diagnostic of that step begins."""

    reference: _Implementation
    side: _CandidateSide
    batch: Batch
    state: _State


def _start_of_step(workload: Workload, candidate: Candidate, step: int) -> _StepStart:
    reference = _Implementation.build(workload, _reference_side(candidate))
    side = _CandidateSide.build(workload, reference, candidate)
    batches = workload.make_batches()
    for index in range(step - 1):
        reference.train_step(batches[index], index + 1)
    return _StepStart(reference, side, batches[step - 1], _State.capture(reference))


def _check_same_parameters(reference: nn.Module, candidate: nn.Module, name: str) -> None:
    expected = [(n, tuple(p.shape)) for n, p in reference.named_parameters()]
    actual = [(n, tuple(p.shape)) for n, p in candidate.named_parameters()]
    if expected != actual:
        missing = sorted(set(expected) - set(actual))[:5]
        extra = sorted(set(actual) - set(expected))[:5]
        raise ValueError(
            f"candidate {name!r}: its model_transform changed the parameters (missing "
            f"{missing}, unexpected {extra}); a co-simulated candidate must keep the reference's "
            "parameter names and shapes"
        )


def _cuda_initialized() -> bool:
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def _clone_or_zeros(parameter: torch.Tensor) -> torch.Tensor:
    grad = parameter.grad
    return grad.detach().clone() if grad is not None else torch.zeros_like(parameter)


def _module_types(model: nn.Module) -> dict[str, str]:
    owners = dict(model.named_modules())
    return {
        name: type(owners.get(name.rpartition(".")[0], model)).__name__
        for name, _ in model.named_parameters()
    }


def _layout(model: nn.Module) -> ParameterLayout:
    named = list(model.named_parameters())
    return ParameterLayout([n for n, _ in named], [p for _, p in named])


def _require_finite(
    layout: ParameterLayout, weights: FlatWeights, model: nn.Module, step: int
) -> None:
    """The reference itself diverging is a broken workload, not a verdict on a candidate."""
    for finite, (name, parameter) in zip(weights.finite, model.named_parameters(), strict=True):
        if not finite:
            values = parameter.detach()
            raise NonFiniteWeightError(
                f"{name} (reference)",
                nan_count=int(torch.isnan(values).sum()),
                inf_count=int(torch.isinf(values).sum()),
                step=step,
            )
