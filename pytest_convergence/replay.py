"""Replay one step with hooks on both sides to find where a divergence starts.

A verdict says which parameter left its region; a kernel author needs to know which module
computed something different. Replaying the failing step from the reference's state with forward
hooks on every module, then comparing gradients, points at the first module whose output
diverged, or says that forward and backward agree and the difference arises after backward
(a gradient exchange, a compression, the optimizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pytest_convergence.candidates import Candidate
from pytest_convergence.engine import Implementation, start_of_step
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

    def describe(self) -> str:
        modules = f"{self.modules_compared} module{'' if self.modules_compared == 1 else 's'}"
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
    inputs, targets = start.batch
    state.restore(reference)
    reference_outputs, reference_order = _forward_backward(reference, inputs, targets, None)
    state.restore(side.implementation)
    candidate_outputs, _ = _forward_backward(side.implementation, inputs, targets, candidate)
    for name in reference_order:
        if name not in candidate_outputs:
            continue
        abs_error, rel_error = _errors(candidate_outputs[name], reference_outputs[name])
        if rel_error > threshold:
            module = reference.model.get_submodule(name)
            kind = type(module).__name__
            forward = Divergence("forward output", name, kind, abs_error, rel_error)
            return ReplayFinding(step, threshold, forward, len(reference_order))
    divergence = None
    compared = candidate.step_fn is None
    if compared:
        divergence = _first_gradient_divergence(
            reference.model, side.implementation.model, threshold
        )
    return ReplayFinding(step, threshold, divergence, len(reference_order), compared)


def _forward_backward(
    implementation: Implementation,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    candidate: Candidate | None,
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
    try:
        context = candidate.forward_context() if candidate is not None else None
        if context is not None:
            with context:
                loss = implementation.workload.loss_fn(model(inputs), targets)
                loss.backward()  # type: ignore[no-untyped-call]
        else:
            loss = implementation.workload.loss_fn(model(inputs), targets)
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
