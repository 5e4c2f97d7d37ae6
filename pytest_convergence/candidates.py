"""Candidates: what a candidate implementation changes relative to the reference.

Any combination of: a context manager around forward and backward (a monkeypatched kernel, a
backend flag), a model transform (module swap, ``torch.compile``), a gradient transform after
backward, a gradient exchange across W virtual workers, another optimizer or learning-rate
scheduler, micro-batches, a precision policy, or a whole other step function. Everything not
named stays the reference's (the workload's), so a co-simulation isolates exactly the change
under test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from pytest_convergence.compression import mean_over_workers
from pytest_convergence.precision import get_policy
from pytest_convergence.registry import Registry
from pytest_convergence.training_step import SchedulerFactory, StepFunction
from pytest_convergence.workloads import AfterStep, OptimizerFactory

__all__ = [
    "REFERENCE",
    "Candidate",
    "GradientExchange",
    "GradientTransform",
    "arithmetic_noise",
    "get_candidate",
    "gradient_noise",
    "mean_exchange",
    "register_candidate",
]

# In place, on (name, gradient) pairs, between backward and the optimizer step.
GradientTransform: TypeAlias = Callable[[Sequence[tuple[str, torch.Tensor]], int], None]
# Per-worker gradients (outer: workers, inner: parameters in order) -> averaged gradients.
GradientExchange: TypeAlias = Callable[[Sequence[Sequence[torch.Tensor]], int], list[torch.Tensor]]


def mean_exchange(per_worker: Sequence[Sequence[torch.Tensor]], step: int) -> list[torch.Tensor]:
    """Exact all-reduce mean: what a gradient exchange must reproduce."""
    return mean_over_workers(per_worker)


@dataclass(frozen=True)
class Candidate:
    """An implementation under test, described by how it differs from the reference."""

    name: str
    context: Callable[[], AbstractContextManager[object]] | None = None
    # Returns the transformed model (an OptimizedModule from torch.compile included), or None
    # when it changed the model in place (model.compile()).
    model_transform: Callable[[nn.Module], nn.Module | None] | None = None
    gradient_transform: GradientTransform | None = None
    exchange: GradientExchange | None = None
    workers: int = 1
    optimizer_factory: OptimizerFactory | None = None
    # The candidate's own training step (the StepContext contract of training_step.py).
    step_fn: StepFunction | None = None
    # The candidate's own post-optimizer-step code, run instead of the workload's: a pruning
    # loop that forgets to re-apply its masks is ``after_step=lambda model: None``.
    after_step: AfterStep | None = None
    description: str = ""
    scheduler_factory: SchedulerFactory | None = None
    # Gradient accumulation over this many micro-batches instead of the workload's.
    micro_batches: int | None = None
    # The precision policy the candidate trains under instead of the workload's: its check is
    # judged against a region calibrated for that policy.
    precision: str | None = None
    # The candidate legitimately draws its random numbers otherwise (fused dropout, another
    # attention kernel, micro-batches through dropout): judged against a region that admits a
    # different random stream.
    random_stream: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a candidate needs a non-empty name")
        if self.workers < 1:
            raise ValueError(f"candidate {self.name!r}: workers must be >= 1, got {self.workers}")
        if self.exchange is not None and self.workers < 2:
            raise ValueError(
                f"candidate {self.name!r}: a gradient exchange needs workers >= 2, "
                f"got {self.workers}"
            )
        if self.step_fn is not None and (
            self.exchange is not None or self.micro_batches is not None
        ):
            raise ValueError(
                f"candidate {self.name!r}: step_fn replaces the whole step; exchange gradients "
                "or accumulate micro-batches inside it instead"
            )
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError(
                f"candidate {self.name!r}: micro_batches must be >= 1, got {self.micro_batches}"
            )
        if self.precision is not None:
            get_policy(self.precision)

    @property
    def only_transforms_gradients(self) -> bool:
        """True when the reference's own gradients can be reused (no second forward/backward)."""
        return (
            self.gradient_transform is not None
            and self.context is None
            and self.model_transform is None
            and self.exchange is None
            and self.step_fn is None
            and self.after_step is None
            and self.scheduler_factory is None
            and self.micro_batches is None
            and self.precision is None
        )

    def forward_context(self) -> AbstractContextManager[object]:
        return self.context() if self.context is not None else contextlib.nullcontext()


REFERENCE = Candidate(name="reference", description="the reference implementation itself")

_REGISTRY = Registry[Candidate]("candidate")


def register_candidate(candidate: Candidate, *, replace_existing: bool = False) -> Candidate:
    """Make ``candidate`` available by name, e.g. to ``@pytest.mark.convergence(candidate=...)``."""
    return _REGISTRY.register(candidate.name, candidate, replace_existing=replace_existing)


def get_candidate(name: str) -> Candidate:
    """The registered candidate ``name``; ``ValueError`` lists the known names otherwise."""
    return _REGISTRY.get(name)


def gradient_noise(relative: float, draw: int) -> Candidate:
    """The reference with every gradient element scaled by (1 + relative * N(0, 1)).

    Calibration uses these as stand-ins for any legitimate implementation whose arithmetic is at
    least as precise as ``relative``: unbiased, elementwise, proportional to the gradient, like
    rounding. Draws are seeded so a recorded region can be reproduced exactly.
    """

    def perturb(named_gradients: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        generator = torch.Generator().manual_seed(1_000_003 * (draw + 1) + step)
        for _, gradient in named_gradients:
            noise = torch.randn(gradient.shape, generator=generator)
            gradient.mul_(noise.mul_(relative).add_(1).to(gradient.device, gradient.dtype))

    return Candidate(
        name=f"gradient-noise-{relative:.3g}-{draw}",
        gradient_transform=perturb,
        description=f"reference with gradients perturbed by relative noise {relative:.3g}",
    )


def arithmetic_noise(
    relative: float,
    draw: int,
    *,
    gradient_relative: float | None = None,
    random_stream: bool = False,
) -> Candidate:
    """The reference with every leaf module's output perturbed by relative Gaussian noise
    ``relative``, and every gradient by ``gradient_relative`` (default: the same): a stand-in for
    any implementation whose operations, and whose gradient exchange, are that accurate.

    Perturbing outputs, not only gradients, matters: a batch-norm gradient is a sum with heavy
    cancellation, so a legitimately different convolution kernel changes it by far more than the
    kernel's own relative error. Noise injected where the kernels are reproduces that downstream
    amplification; noise injected on the final gradients alone does not.

    ``random_stream``: the draw's forward passes also take their random numbers (dropout masks)
    from a stream of their own, seeded by the draw and the step: a stand-in for any
    implementation that draws them otherwise (a fused dropout kernel, micro-batches).
    """
    gradient_part = gradient_noise(
        relative if gradient_relative is None else gradient_relative, draw
    )

    @contextlib.contextmanager
    def perturbed_outputs() -> Iterator[None]:
        generator = torch.Generator().manual_seed(7_919 * (draw + 1))

        def hook(module: nn.Module, inputs: object, output: object) -> object:
            if next(module.children(), None) is not None or not isinstance(output, torch.Tensor):
                return None
            if not output.is_floating_point():
                return None
            noise = torch.randn(output.shape, generator=generator)
            return output * noise.mul_(relative).add_(1).to(output.device, output.dtype)

        # torch annotates the hook as returning None, yet a returned value replaces the output.
        handle = register_module_forward_hook(hook)  # type: ignore[arg-type]
        try:
            if random_stream:
                steps_taken[0] += 1
                torch.manual_seed(104_729 * (draw + 1) + steps_taken[0])
            yield
        finally:
            handle.remove()

    steps_taken = [0]
    suffix = "-random-stream" if random_stream else ""
    return Candidate(
        name=f"arithmetic-noise-{relative:.3g}-{draw}{suffix}",
        context=perturbed_outputs,
        random_stream=random_stream,
        gradient_transform=gradient_part.gradient_transform,
        description=f"reference with module outputs perturbed by {relative:.3g} and gradients "
        f"by {relative if gradient_relative is None else gradient_relative:.3g}",
    )
