"""The stepping engine: implementations, the state a step depends on, and the lockstep loop.

Every co-simulation is the same loop (:func:`run_lockstep`): before each step the reference's
weights, buffers, optimizer state and RNG state are captured (:class:`TrainingState`), the
reference takes the step, every candidate is reset to the captured state and takes the same
step on the same batch, and each candidate's weights are compared with the reference's. Each
step's difference is then the candidate's own, not the chaotic growth of earlier differences
(measurements, section 5), which is what lets a verdict name the first step and parameter.

What differs between the ways of running it is how a side takes its step, and nothing else:
an :class:`Implementation` steps its model through ``forward_model``, the model itself in one
process, a ``DistributedDataParallel`` wrapper of it on a rank of a real process group
(:mod:`pytest_convergence.distributed`). Replays and report diagnostics start from the same
place, the reference trained up to just before a step (:func:`start_of_step`).

Memory: a run keeps the reference model and optimizer, one copy of the weights, buffers and
optimizer state before the step and one copy of the reference's gradients when a candidate only
transforms gradients (both in buffers reused every step), and one model and optimizer per
candidate that needs its own forward pass; statistics per step, never weights per step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pytest_convergence.batches import Batch, split
from pytest_convergence.candidates import REFERENCE, Candidate, mean_exchange
from pytest_convergence.compilation import (
    StepPosition,
    compiled_code_required,
    reset_compiled_code,
)
from pytest_convergence.errors import NonFiniteWeightError
from pytest_convergence.precision import PrecisionPolicy, get_policy
from pytest_convergence.step_statistics import (
    FlatWeights,
    KeptGradients,
    ParameterLayout,
    WeightSeries,
    compare_weights,
    gradient_norms,
    step_trace,
)
from pytest_convergence.traces import CoSimulation, StepComparison, Trace
from pytest_convergence.training_state import RandomState, TrainingState, preserved_random_state
from pytest_convergence.training_step import (
    NamedParameters,
    StepContext,
    StepFunction,
    before_optimizer_step,
    finish_step,
    forward_backward,
)
from pytest_convergence.workloads import Workload

__all__ = [
    "CandidateSide",
    "Implementation",
    "LossAgreement",
    "Progress",
    "RandomState",
    "StepStart",
    "TrainedStep",
    "TrainingState",
    "check_same_parameters",
    "compile_ahead",
    "module_types",
    "parameter_layout",
    "reference_recipe",
    "require_finite",
    "run_lockstep",
    "start_of_step",
]

# (step, the reference's loss, each side's) as the sides report them -> the losses recorded: in
# one process as they are; across ranks their means over the ranks (a collective every rank
# joins). A side's None stands for the reference's loss.
LossAgreement = Callable[[int, float, list[float | None]], tuple[float, list[float | None]]]
# Told (step, "reference") and (step, "candidate") as each side starts its step: a rank that
# hangs is then reported where it hangs.
Progress = Callable[[int, str], None]


@dataclass
class TrainedStep:
    """What one training step leaves for the trace and the candidates."""

    loss: float
    # Of the gradients the optimizer saw; None where a candidate's own step function hides them.
    gradient_norms: list[float] | None
    # A copy of those gradients, when asked for: valid until the implementation's next step.
    gradients: KeptGradients | None = None


@dataclass
class Implementation:
    """A model, its optimizer (and learning-rate scheduler and GradScaler) and the candidate
    recipe that steps them.

    ``forward_model`` is what the forward pass calls: the model itself, or a wrapper around the
    same parameters that owns how gradients are reduced (``DistributedDataParallel``) or how
    the forward is computed (``torch.compile``'s ``OptimizedModule``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    recipe: Candidate
    workload: Workload
    forward_model: nn.Module | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    _kept: KeptGradients | None = field(default=None, init=False, repr=False)

    @classmethod
    def build(
        cls, workload: Workload, recipe: Candidate, model: nn.Module | None = None
    ) -> Implementation:
        """The workload's model (or ``model``) with the recipe's optimizer and scheduler, else
        the workload's; a model built here gets the recipe's model transform."""
        forward_model = None
        if model is None:
            model, forward_model = transformed(workload.build_model(), recipe)
        return cls.around(workload, recipe, model, forward_model)

    @classmethod
    def around(
        cls,
        workload: Workload,
        recipe: Candidate,
        model: nn.Module,
        forward_model: nn.Module | None = None,
    ) -> Implementation:
        """An implementation that trains ``model`` (through ``forward_model``)."""
        factory = recipe.optimizer_factory or workload.optimizer_factory
        optimizer = factory(NamedParameters(model))
        schedule = recipe.scheduler_factory or workload.scheduler_factory
        policy = get_policy(recipe.precision or workload.precision)
        device_type = torch.device(workload.device).type
        return cls(
            model,
            optimizer,
            recipe,
            workload,
            forward_model=forward_model,
            scheduler=schedule(optimizer) if schedule is not None else None,
            scaler=policy.make_scaler(device_type),
        )

    @property
    def policy(self) -> PrecisionPolicy:
        return get_policy(self.recipe.precision or self.workload.precision)

    def context(self, step: int) -> StepContext:
        """What this implementation's step function is given at ``step``."""
        device_type = torch.device(self.workload.device).type
        policy = self.policy
        return StepContext(
            model=self.model,
            optimizer=self.optimizer,
            step=step,
            scheduler=self.scheduler,
            scaler=self.scaler,
            forward=self.workload.loss,
            forward_model=self.forward_model,
            autocast=lambda: policy.context(device_type),
        )

    def train_step(
        self, batch: Batch, step: int, *, traced: bool = False, keep_gradients: bool = False
    ) -> TrainedStep:
        """One training step; when ``traced``, the norms of the gradients the optimizer saw,
        and with ``keep_gradients`` a copy of the gradients (see :meth:`keep_gradients`)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        context = self.context(step)
        step_fn = self.recipe.step_fn or self.workload.step_fn
        if step_fn is not None:
            return self._own_step(step_fn, context, batch, traced=traced, keep=keep_gradients)
        with self.recipe.forward_context():
            if self.recipe.workers > 1:
                loss = self._exchanged_backward(context, batch, step)
            else:
                micro_batches = self.recipe.micro_batches or self.workload.micro_batches
                loss = forward_backward(context, batch, micro_batches=micro_batches)
        trained = TrainedStep(float(loss.detach()), None)
        parameters = list(self.model.parameters())

        def gradients_ready() -> None:
            self._transform_gradients(step)
            if keep_gradients:
                trained.gradients = self.keep_gradients(parameters)

        def before_update() -> None:
            if traced:
                trained.gradient_norms = gradient_norms(parameters)

        finish_step(
            context,
            clip_grad_norm=self.workload.clip_grad_norm,
            gradients_ready=gradients_ready,
            before_update=before_update,
        )
        self.after_optimizer_step()
        return trained

    def _own_step(
        self,
        step_fn: StepFunction,
        context: StepContext,
        batch: Batch,
        *,
        traced: bool,
        keep: bool,
    ) -> TrainedStep:
        """A step function's step: the gradient transform, the traced norms and the kept
        gradients happen right before its optimizer applies the gradients."""
        trained = TrainedStep(0.0, None)
        parameters = list(self.model.parameters())

        def gradients_seen() -> None:
            self._transform_gradients(context.step)
            if traced:
                trained.gradient_norms = gradient_norms(parameters)
            if keep:
                trained.gradients = self.keep_gradients(parameters)

        with (
            before_optimizer_step(self.optimizer, gradients_seen),
            self.recipe.forward_context(),
        ):
            loss = step_fn(context, batch)
        trained.loss = float(loss.detach())
        self.after_optimizer_step()
        return trained

    def _transform_gradients(self, step: int) -> None:
        transform = self.recipe.gradient_transform
        if transform is not None:
            named = self.model.named_parameters()
            transform([(name, p.grad) for name, p in named if p.grad is not None], step)

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

    def _exchanged_backward(self, context: StepContext, batch: Batch, step: int) -> torch.Tensor:
        parameters = list(self.model.parameters())
        per_worker: list[list[torch.Tensor]] = []
        losses = []
        for shard in split(batch, self.recipe.workers):
            self.optimizer.zero_grad(set_to_none=True)
            loss = context.loss(shard)
            loss.backward()  # type: ignore[no-untyped-call]
            per_worker.append([_clone_or_zeros(p) for p in parameters])
            losses.append(loss.detach())
        assert self.recipe.exchange is not None
        averaged = self.recipe.exchange(per_worker, step)
        for parameter, gradient in zip(parameters, averaged, strict=True):
            parameter.grad = gradient.to(parameter.dtype)
        return torch.stack(losses).mean()


def compile_ahead(workload: Workload, candidate: Candidate) -> float | None:
    """Compile a ``torch.compile`` candidate before its check: one training step of a throwaway
    copy on the first batch, the RNG left as found; its seconds, None when the candidate's model
    transform compiles nothing. Compiled code is cached per module class, so the check's own
    candidate then steps at its compiled speed and its time is the check's. The caches are
    emptied first: what earlier checks compiled counts toward Dynamo's recompile limit, past
    which it runs the model eagerly (:mod:`pytest_convergence.compilation`)."""
    implementation = Implementation.build(workload, candidate)
    if not _compiles(implementation):
        return None
    reset_compiled_code()
    start = time.perf_counter()
    with preserved_random_state(), compiled_code_required(f"compiling {candidate.name!r}"):
        implementation.train_step(workload.make_batches()[0], 1)
    return time.perf_counter() - start


def _compiles(implementation: Implementation) -> bool:
    forward = implementation.forward_model
    return hasattr(forward, "_orig_mod") or (
        getattr(implementation.model, "_compiled_call_impl", None) is not None
    )


def transformed(model: nn.Module, recipe: Candidate) -> tuple[nn.Module, nn.Module | None]:
    """The model after ``recipe``'s model transform, and the module its forward pass calls
    when that is another one: ``torch.compile(model)`` returns an ``OptimizedModule`` around
    the same parameters (named ``_orig_mod.*``), which trains the model inside it; a transform
    that returns None (``model.compile()``) changed the model in place."""
    if recipe.model_transform is None:
        return model, None
    result = recipe.model_transform(model)
    if result is None:
        return model, None
    inner = getattr(result, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        return inner, result
    return result, None


@dataclass
class CandidateSide:
    """A candidate's model and optimizer, re-synced to the reference before every step."""

    candidate: Candidate
    implementation: Implementation

    @classmethod
    def build(
        cls, workload: Workload, reference: Implementation, candidate: Candidate
    ) -> CandidateSide:
        """A copy of the reference's model, transformed as the candidate says."""
        model, forward_model = transformed(copy.deepcopy(reference.model), candidate)
        if candidate.model_transform is not None:
            check_same_parameters(reference.model, model, candidate.name)
        return cls(candidate, Implementation.around(workload, candidate, model, forward_model))

    @property
    def reuses_reference_gradients(self) -> bool:
        """A gradient-only candidate starts from the reference's gradients: no forward pass
        (unless the workload's own step function owns the step, or a GradScaler may skip it)."""
        implementation = self.implementation
        return (
            self.candidate.only_transforms_gradients
            and implementation.workload.step_fn is None
            and implementation.scaler is None
        )

    def step_from(
        self, before: TrainingState, batch: Batch, step: int, reference: TrainedStep
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
        if self.reuses_reference_gradients and reference.gradients is not None:
            self._step_with_gradients(reference.gradients, step)
            return None
        return self.implementation.train_step(batch, step).loss

    def _step_with_gradients(self, gradients: Sequence[torch.Tensor], step: int) -> None:
        """The declared step after backward, from the reference's gradients."""
        implementation = self.implementation
        for parameter, gradient in zip(implementation.model.parameters(), gradients, strict=True):
            parameter.grad = gradient.clone()
        finish_step(
            implementation.context(step),
            clip_grad_norm=implementation.workload.clip_grad_norm,
            gradients_ready=lambda: implementation._transform_gradients(step),
            before_update=lambda: None,
        )
        implementation.after_optimizer_step()


def run_lockstep(
    workload: Workload,
    reference: Implementation,
    sides: Sequence[CandidateSide],
    batches: Sequence[Batch],
    *,
    record: bool = True,
    agree_on_losses: LossAgreement | None = None,
    step_after_divergence: bool = False,
    progress: Progress | None = None,
) -> list[CoSimulation]:
    """Step ``reference`` and every side through ``batches``, each side re-synced to the
    reference before every step; one co-simulation per side (none without ``record``).

    A side whose weights turn non-finite is recorded no further: later steps would only
    compare NaN with numbers. It stops stepping too, unless ``step_after_divergence`` (ranks
    of a process group must keep issuing the same collectives). ``agree_on_losses`` turns
    each step's local losses into the recorded ones (the mean over ranks); ``progress`` hears
    where the loop is.
    """
    layout = parameter_layout(reference.model)
    results = [_new_run(workload, side.candidate.name, reference.model) for side in sides]
    series = WeightSeries(layout, list(reference.model.parameters()))
    if record:
        initial = step_trace(layout, series.latest, step=0, loss=None)
        for result in results:
            result.reference.steps.append(initial)
    stopped = [False] * len(sides)
    keep = any(side.reuses_reference_gradients for side in sides)
    # Each side's flat weights from the step before, whose vector the next ones overwrite.
    spent: list[FlatWeights | None] = [None] * len(sides)
    before: TrainingState | None = None
    where = StepPosition()
    with compiled_code_required(where):
        for index, batch in enumerate(batches):
            step = index + 1
            if progress is not None:
                progress(step, "reference")
            before = TrainingState.capture(reference, reuse=before)
            where.at(step, "the reference")
            trained = reference.train_step(batch, step, traced=record, keep_gradients=keep)
            previous, after = series.advance(
                list(reference.model.parameters()), trained.gradient_norms
            )
            require_finite(layout, after, reference.model, step)
            losses: list[float | None] = []
            weights: list[FlatWeights | None] = []
            for position, side in enumerate(sides):
                if stopped[position] and not step_after_divergence:
                    losses.append(None)
                    weights.append(None)
                    continue
                if progress is not None:
                    progress(step, "candidate")
                where.at(step, f"candidate {side.candidate.name!r}")
                losses.append(side.step_from(before, batch, step, trained))
                candidate = None
                if record and not stopped[position]:
                    parameters = list(side.implementation.model.parameters())
                    candidate = FlatWeights.of(layout, parameters, reuse=spent[position])
                    spent[position] = candidate
                weights.append(candidate)
            reference_loss, losses = (
                agree_on_losses(step, trained.loss, losses)
                if agree_on_losses is not None
                else (trained.loss, losses)
            )
            if not record:
                continue
            reference_trace = step_trace(layout, after, step=step, loss=reference_loss)
            for position, (result, candidate) in enumerate(zip(results, weights, strict=True)):
                if candidate is None:
                    continue
                result.reference.steps.append(reference_trace)
                candidate_loss = losses[position]
                comparison = StepComparison(
                    step=step,
                    reference_loss=reference_loss,
                    candidate_loss=reference_loss if candidate_loss is None else candidate_loss,
                    reference_global_logm=after.global_logm,
                    candidate_global_logm=candidate.global_logm,
                    previous_global_logm=previous.global_logm,
                    parameters=compare_weights(layout, previous, after, candidate),
                )
                result.comparisons.append(comparison)
                stopped[position] = comparison.non_finite
    return results if record else []


def _new_run(workload: Workload, candidate: str, model: nn.Module) -> CoSimulation:
    return CoSimulation(
        workload=workload.name,
        candidate=candidate,
        seed=workload.seed,
        steps=workload.steps,
        dtype=str(workload.dtype).removeprefix("torch."),
        device=workload.device,
        reference=Trace(label="reference"),
        module_types=module_types(model),
    )


def reference_recipe(candidate: Candidate) -> Candidate:
    """The reference's counterpart of ``candidate``: an exchanging candidate is compared with an
    exact mean exchange over the same virtual workers, so batch-norm statistics and summation
    match."""
    if candidate.workers == 1:
        return REFERENCE
    return Candidate(name="reference", exchange=mean_exchange, workers=candidate.workers)


@dataclass
class StepStart:
    """Both sides built and the reference trained up to just before ``step``: where a replay or
    a diagnostic of that step begins."""

    reference: Implementation
    side: CandidateSide
    batch: Batch
    state: TrainingState


def start_of_step(workload: Workload, candidate: Candidate, step: int) -> StepStart:
    """Build the reference and ``candidate``'s side, and train the reference to ``step`` - 1."""
    reference = Implementation.build(workload, reference_recipe(candidate))
    side = CandidateSide.build(workload, reference, candidate)
    batches = workload.make_batches()
    for index in range(step - 1):
        reference.train_step(batches[index], index + 1)
    return StepStart(reference, side, batches[step - 1], TrainingState.capture(reference))


def check_same_parameters(reference: nn.Module, candidate: nn.Module, name: str) -> None:
    """A co-simulated candidate compares weights by position: its names and shapes must be the
    reference's."""
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


def module_types(model: nn.Module) -> dict[str, str]:
    """Parameter name -> class name of the module that owns it, for reports ("Conv2d")."""
    owners = dict(model.named_modules())
    return {
        name: type(owners.get(name.rpartition(".")[0], model)).__name__
        for name, _ in model.named_parameters()
    }


def parameter_layout(model: nn.Module) -> ParameterLayout:
    named = list(model.named_parameters())
    return ParameterLayout([n for n, _ in named], [p for _, p in named])


def require_finite(
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


def _clone_or_zeros(parameter: torch.Tensor) -> torch.Tensor:
    grad = parameter.grad
    return grad.detach().clone() if grad is not None else torch.zeros_like(parameter)
