"""Replay one step with hooks on both sides to find where a divergence starts.

A verdict says which parameter left its region; a kernel author needs to know which module
computed something different. Replaying the failing step from the reference's state with forward
hooks on every module, then comparing gradients, points at the first module whose output
diverged, or says that forward and backward agree and the difference arises after backward
(a gradient exchange, a compression, the optimizer). Both sides start the replay from the same
random state; when the candidate's forward and backward leave the generator elsewhere, it drew
its random numbers otherwise (other dropout masks), and the finding says so first: that is the
divergence, and it is legitimate for a candidate declared ``random_stream=True``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from pytest_convergence.batches import Batch
from pytest_convergence.candidates import Candidate
from pytest_convergence.compilation import compiled_code_required
from pytest_convergence.engine import Implementation, StepStart, start_of_step
from pytest_convergence.training_state import RandomState
from pytest_convergence.workloads import Workload

__all__ = ["Divergence", "ReplayFinding", "replay_step"]


@dataclass(frozen=True)
class Divergence:
    """Where reference and candidate first disagree beyond the dtype's precision."""

    kind: str  # "forward output" or "gradient"
    name: str  # module name, or parameter name for gradients
    module_type: str
    max_abs_error: float
    max_rel_error: float


@dataclass(frozen=True)
class ReplayFinding:
    """What a replay of ``step`` found; ``gradients_compared`` is False for a candidate with its
    own ``step_fn``, whose gradients the replay cannot take apart from its step."""

    step: int
    threshold: float
    divergence: Divergence | None
    modules_compared: int
    gradients_compared: bool = True
    # The candidate's forward and backward left the random generator in another state.
    random_stream_differs: bool = False

    def describe(self) -> str:
        modules = f"{self.modules_compared} module{'' if self.modules_compared == 1 else 's'}"
        if self.random_stream_differs:
            return (
                f"Replay of step {self.step}: the random stream differs: from the same random "
                "state, the candidate's forward and backward drew other random numbers than the "
                "reference's (other dropout masks, another number of draws), so its updates "
                "differ by that noise; if that is intended (a fused dropout or attention kernel, "
                "micro-batches through dropout), declare Candidate(random_stream=True) and "
                "record its region, which admits another random stream"
            )
        if self.divergence is None and not self.gradients_compared:
            return (
                f"Replay of step {self.step}: forward outputs of {modules} agree within "
                f"{self.threshold:.1e}; gradients not compared (the candidate's step_fn "
                "computes its own); the divergence arises after the forward pass"
            )
        if self.divergence is None:
            return (
                f"Replay of step {self.step}: forward outputs of {modules} "
                f"and all gradients agree within {self.threshold:.1e}; the divergence arises "
                "after backward (gradient transform, exchange or optimizer step)"
            )
        d = self.divergence
        what = "module whose output" if d.kind == "forward output" else "gradient that"
        return (
            f"First {what} diverged at step {self.step}: {d.name} ({d.module_type}), "
            f"max abs. error {d.max_abs_error:.2e}, max rel. error {d.max_rel_error:.2e} "
            f"(threshold {self.threshold:.1e})"
        )


def replay_step(workload: Workload, candidate: Candidate, step: int) -> ReplayFinding:
    """Re-run the reference to ``step`` and compare that step's forward and backward."""
    start = start_of_step(workload, candidate, step)
    reference, side, state = start.reference, start.side, start.state
    threshold = math.sqrt(torch.finfo(workload.dtype).eps)
    with compiled_code_required(f"replay of step {step}"):
        random_differs = not candidate.random_stream and _draws_otherwise(start, step)
    state.restore(reference)
    with compiled_code_required(f"replay of step {step}, the reference"):
        reference_outputs, reference_order = _forward_backward(reference, start.batch, step, None)
    state.restore(side.implementation)
    with compiled_code_required(f"replay of step {step}, candidate {candidate.name!r}"):
        candidate_outputs, _ = _forward_backward(side.implementation, start.batch, step, candidate)
    if random_differs:
        return ReplayFinding(
            step, threshold, None, len(reference_order), random_stream_differs=True
        )
    for name in reference_order:
        if name not in candidate_outputs:
            continue
        abs_error, rel_error = _errors(candidate_outputs[name], reference_outputs[name])
        if rel_error > threshold:
            module = reference.model.get_submodule(name)
            kind = type(module).__name__
            if not candidate.random_stream and "Dropout" in kind:
                return ReplayFinding(
                    step, threshold, None, len(reference_order), random_stream_differs=True
                )
            forward = Divergence("forward output", name, kind, abs_error, rel_error)
            return ReplayFinding(step, threshold, forward, len(reference_order))
    divergence = None
    compared = candidate.step_fn is None
    if compared:
        divergence = _first_gradient_divergence(
            reference.model, side.implementation.model, threshold
        )
    return ReplayFinding(step, threshold, divergence, len(reference_order), compared)


def _draws_otherwise(start: StepStart, step: int) -> bool:
    """Whether the candidate's step draws its random numbers otherwise than the reference's:
    from the same state its whole step leaves the generator elsewhere (another number of
    draws), or it cuts the batch into other micro-batches through a model with active dropout
    (the same draws, in another order: other masks)."""
    reference, side = start.reference, start.side
    start.state.restore(reference)
    reference.train_step(start.batch, step)
    after_reference = RandomState.capture()
    start.state.restore(side.implementation)
    side.implementation.train_step(start.batch, step)
    if not RandomState.capture().same_as(after_reference):
        return True
    parts = (side.candidate.micro_batches or side.implementation.workload.micro_batches) != (
        reference.recipe.micro_batches or reference.workload.micro_batches
    )
    return (parts or side.candidate.step_fn is not None) and _has_active_dropout(reference.model)


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _has_active_dropout(model: nn.Module) -> bool:
    return any(isinstance(module, _DROPOUT) and module.p > 0 for module in model.modules())


def _forward_backward(
    implementation: Implementation, batch: Batch, step: int, candidate: Candidate | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Outputs of every module in call order, with gradients left on the parameters."""
    outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []
    handles = []
    for name, module in implementation.model.named_modules():
        if not name:
            continue

        def record(_: nn.Module, __: object, output: object, name: str = name) -> None:
            if isinstance(output, torch.Tensor) and name not in outputs:
                outputs[name] = output.detach().clone()
                order.append(name)

        handles.append(module.register_forward_hook(record))
    model = implementation.model
    model.train()
    model.zero_grad(set_to_none=True)
    kernels = candidate.forward_context() if candidate is not None else contextlib.nullcontext()
    try:
        with kernels:
            loss = implementation.context(step).loss(batch)
            loss.backward()  # type: ignore[no-untyped-call]
    finally:
        for handle in handles:
            handle.remove()
    return outputs, order


def _first_gradient_divergence(
    reference: nn.Module, candidate: nn.Module, threshold: float
) -> Divergence | None:
    """In backward order: the last layers' gradients are computed first."""
    named = list(zip(reference.named_parameters(), candidate.parameters(), strict=True))
    for (name, ref_param), cand_param in reversed(named):
        if ref_param.grad is None or cand_param.grad is None:
            continue
        abs_error, rel_error = _errors(cand_param.grad, ref_param.grad)
        if rel_error > threshold:
            owner = name.rpartition(".")[0]
            kind = type(reference.get_submodule(owner)).__name__ if owner else "parameter"
            return Divergence("gradient", name, kind, abs_error, rel_error)
    return None


def _errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Max absolute error, and relative to the expected tensor's largest magnitude (elementwise
    relative errors explode where the expected value is near zero)."""
    if actual.shape != expected.shape:
        return math.inf, math.inf
    difference = (actual.double() - expected.double()).abs()
    abs_error = float(difference.max()) if difference.numel() else 0.0
    scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    if not math.isfinite(abs_error):
        return math.inf, math.inf
    return abs_error, abs_error / scale if scale > 0 else (0.0 if abs_error == 0 else math.inf)
