"""Co-simulation: step a reference and candidates in lockstep from identical state.

Local (re-synced) co-simulation: before every step each candidate is reset to the reference's
weights, buffers, optimizer state and RNG state, then both take one step on the same batch. Each
step's difference is then the candidate's own, not the chaotic growth of earlier differences
(measurements, section 5), which is what lets a verdict name the first step and parameter.

Free-running training (:func:`train`) runs one implementation on its own for the cumulative view:
loss curves and LoGM trajectories, and the peer methods of the detection benchmark.

Memory: a run keeps the reference model and optimizer, one copy of the weights, buffers and
optimizer state before the step, the reference's gradients, and one model and optimizer per
candidate that needs its own forward pass; statistics per step, never weights per step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pytest_convergence.candidates import REFERENCE, Candidate, mean_exchange
from pytest_convergence.errors import NonFiniteWeightError
from pytest_convergence.metrics import LogmSum, logm_sum
from pytest_convergence.traces import (
    CoSimulation,
    ParameterComparison,
    ParameterStep,
    StepComparison,
    StepTrace,
    Trace,
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
        )
        for candidate in candidates
    ]
    initial = _step_trace(reference.model, 0, None, None, None)
    for result in results:
        result.reference.steps.append(initial)
    stopped = [False] * len(sides)
    for index, batch in enumerate(batches):
        step = index + 1
        before = _State.capture(reference)
        loss, gradients = reference.train_step(batch, step, keep_gradients=True)
        _require_finite(reference.model, step, "reference")
        reference_trace = _step_trace(reference.model, step, loss, before.parameters, gradients)
        for side, result, done in zip(sides, results, stopped, strict=True):
            if done:
                continue
            result.reference.steps.append(reference_trace)
            candidate_loss = side.step_from(before, batch, step, gradients)
            if candidate_loss is None:
                candidate_loss = loss
            comparison = _compare(
                reference.model,
                side.implementation.model,
                before,
                step=step,
                reference_loss=loss,
                candidate_loss=candidate_loss,
            )
            result.comparisons.append(comparison)
        stopped = [
            done or r.comparisons[-1].non_finite for r, done in zip(results, stopped, strict=True)
        ]
    return results


def train(workload: Workload, candidate: Candidate = REFERENCE) -> tuple[Trace, nn.Module]:
    """Free-running training of one implementation; its trace and its final model."""
    implementation = _Implementation.build(workload, candidate)
    trace = Trace(label=candidate.name)
    trace.steps.append(_step_trace(implementation.model, 0, None, None, None))
    for index, batch in enumerate(workload.make_batches()):
        before = [p.detach().clone() for p in implementation.model.parameters()]
        loss, gradients = implementation.train_step(batch, index + 1, keep_gradients=True)
        if not math.isfinite(loss) or _has_non_finite(implementation.model):
            break
        trace.steps.append(_step_trace(implementation.model, index + 1, loss, before, gradients))
    return trace, implementation.model


def _reference_side(candidate: Candidate) -> Candidate:
    """Reference counterpart: an exchanging candidate is compared with an exact mean exchange
    over the same virtual workers, so batch-norm statistics and summation match."""
    if candidate.workers == 1:
        return REFERENCE
    return Candidate(name="reference", exchange=mean_exchange, workers=candidate.workers)


@dataclass
class _Implementation:
    """A model, its optimizer and the candidate recipe that steps them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    recipe: Candidate
    workload: Workload

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
        self, batch: Batch, step: int, *, keep_gradients: bool
    ) -> tuple[float, list[torch.Tensor] | None]:
        """One training step; the gradients the optimizer saw, when asked for."""
        inputs, targets = batch
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.recipe.step_fn is not None:
            with self.recipe.forward_context():
                loss = self.recipe.step_fn(
                    self.model, self.optimizer, inputs, targets, self.workload.loss_fn
                )
            return float(loss.detach()), None
        with self.recipe.forward_context():
            if self.recipe.workers > 1:
                loss = self._exchanged_backward(inputs, targets, step)
            else:
                loss = self.workload.loss_fn(self.model(inputs), targets)
                loss.backward()  # type: ignore[no-untyped-call]
        parameters = list(self.model.named_parameters())
        if self.recipe.gradient_transform is not None:
            present = [(name, p.grad) for name, p in parameters if p.grad is not None]
            self.recipe.gradient_transform(present, step)
        gradients = None
        if keep_gradients:
            gradients = [_clone_or_zeros(p) for _, p in parameters]
        self.optimizer.step()
        return float(loss.detach()), gradients

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


@dataclass
class _State:
    """Everything a step depends on, captured before the reference takes it."""

    parameters: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer: dict[str, object]
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None

    @classmethod
    def capture(cls, implementation: _Implementation) -> _State:
        model = implementation.model
        return cls(
            parameters=[p.detach().clone() for p in model.parameters()],
            buffers={n: b.detach().clone() for n, b in model.named_buffers()},
            # Optimizer.state_dict() returns live momentum buffers: copy, never share.
            optimizer=copy.deepcopy(implementation.optimizer.state_dict()),
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if _cuda_initialized() else None,
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
        implementation.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


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
        reference_gradients: list[torch.Tensor] | None,
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
        loss, _ = self.implementation.train_step(batch, step, keep_gradients=False)
        return loss

    def _step_with_gradients(self, gradients: list[torch.Tensor], step: int) -> None:
        """Reuse the reference's gradients: a gradient-only candidate needs no forward pass."""
        named = list(self.implementation.model.named_parameters())
        for (_, parameter), gradient in zip(named, gradients, strict=True):
            parameter.grad = gradient.clone()
        assert self.candidate.gradient_transform is not None
        self.candidate.gradient_transform(
            [(n, p.grad) for n, p in named if p.grad is not None], step
        )
        self.implementation.optimizer.step()


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


def _step_trace(
    model: nn.Module,
    step: int,
    loss: float | None,
    before: list[torch.Tensor] | None,
    gradients: list[torch.Tensor] | None,
) -> StepTrace:
    records = []
    total = None
    for index, (name, parameter) in enumerate(model.named_parameters()):
        weights = parameter.detach()
        part = logm_sum(weights, name=name)
        total = part if total is None else total + part
        update = (weights - before[index]) if before is not None else None
        records.append(
            ParameterStep(
                name=name,
                count=part.count,
                zeros=part.zeros,
                logm=part.logm,
                weight_norm=_norm(weights),
                update_norm=_norm(update) if update is not None else 0.0,
                grad_norm=_norm(gradients[index]) if gradients is not None else None,
            )
        )
    global_logm = total.logm if total is not None else None
    return StepTrace(step=step, loss=loss, global_logm=global_logm, parameters=tuple(records))


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))


def _compare(
    reference: nn.Module,
    candidate: nn.Module,
    before: _State,
    *,
    step: int,
    reference_loss: float,
    candidate_loss: float,
) -> StepComparison:
    comparisons = []
    reference_total = candidate_total = None
    previous_total = None
    for (name, ref_param), cand_param, start in zip(
        reference.named_parameters(),
        candidate.parameters(),
        before.parameters,
        strict=True,
    ):
        comparison, ref_part, cand_part, start_part = _compare_parameter(
            name, start, ref_param.detach(), cand_param.detach()
        )
        comparisons.append(comparison)
        reference_total = ref_part if reference_total is None else reference_total + ref_part
        previous_total = start_part if previous_total is None else previous_total + start_part
        if cand_part is not None:
            candidate_total = cand_part if candidate_total is None else candidate_total + cand_part
    return StepComparison(
        step=step,
        reference_loss=reference_loss,
        candidate_loss=candidate_loss,
        reference_global_logm=reference_total.logm if reference_total else None,
        candidate_global_logm=candidate_total.logm if candidate_total else None,
        previous_global_logm=previous_total.logm if previous_total else None,
        parameters=tuple(comparisons),
    )


def _compare_parameter(
    name: str, start: torch.Tensor, reference: torch.Tensor, candidate: torch.Tensor
) -> tuple[ParameterComparison, LogmSum, LogmSum | None, LogmSum]:
    ref_part = logm_sum(reference, name=name)
    start_part = logm_sum(start, name=name)
    if _has_non_finite_tensor(candidate):
        return (
            ParameterComparison(
                name=name,
                count=reference.numel(),
                reference_logm=ref_part.logm,
                candidate_logm=None,
                reference_zeros=ref_part.zeros,
                candidate_zeros=0,
                reference_update_norm=math.nan,
                error_norm=math.inf,
                bias=None,
                noise=math.inf,
                non_finite=True,
            ),
            ref_part,
            None,
            start_part,
        )
    cand_part = logm_sum(candidate, name=name)
    update = (reference - start).to(torch.float64).reshape(-1)
    error = (candidate - reference).to(torch.float64).reshape(-1)
    update_squared = float(torch.dot(update, update))
    error_squared = float(torch.dot(error, error))
    if update_squared > 0:
        projection = float(torch.dot(error, update))
        bias: float | None = projection / update_squared
        residual = max(error_squared - projection * projection / update_squared, 0.0)
        noise = math.sqrt(residual / update_squared)
    else:
        bias = None
        noise = math.inf if error_squared > 0 else 0.0
    comparison = ParameterComparison(
        name=name,
        count=reference.numel(),
        reference_logm=ref_part.logm,
        candidate_logm=cand_part.logm,
        reference_zeros=ref_part.zeros,
        candidate_zeros=cand_part.zeros,
        reference_update_norm=math.sqrt(update_squared),
        error_norm=math.sqrt(error_squared),
        bias=bias,
        noise=noise,
    )
    return comparison, ref_part, cand_part, start_part


def _has_non_finite_tensor(tensor: torch.Tensor) -> bool:
    return not bool(torch.isfinite(tensor).all())


def _has_non_finite(model: nn.Module) -> bool:
    return any(_has_non_finite_tensor(p.detach()) for p in model.parameters())


def _require_finite(model: nn.Module, step: int, label: str) -> None:
    for name, parameter in model.named_parameters():
        values = parameter.detach()
        if _has_non_finite_tensor(values):
            nan_count = int(torch.isnan(values).sum())
            inf_count = int(torch.isinf(values).sum())
            raise NonFiniteWeightError(
                f"{name} ({label})", nan_count=nan_count, inf_count=inf_count, step=step
            )
