"""The training step contract: what a step is given, and the standard step.

A co-simulation steps the reference and every candidate the way the user's training code does:
forward and loss, backward (scaled under a GradScaler), micro-batch accumulation, clipping, the
optimizer step, the learning-rate scheduler step. Either the workload declares those pieces
(``Workload(micro_batches=4, clip_grad_norm=1.0, scheduler_factory=..., precision=...)``) and
:func:`forward_backward` and :func:`finish_step` run them, or it brings its own step function,
``step_fn(context, batch) -> loss``, which is given a :class:`StepContext` and does what the
user's loop does.

A candidate may differ in any one piece and inherit the rest: a kernel context, a module swap, a
gradient transform, an optimizer, a scheduler, micro-batches, a precision policy, or a whole
step function of its own. Whoever owns the step, a gradient transform runs and the traced
gradient norms are taken right before the optimizer applies the gradients (an optimizer step
pre-hook), so they see the gradients the optimizer sees, after unscaling and clipping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import nn

from pytest_convergence.batches import Batch, Forward, batch_size, split

__all__ = [
    "NamedParameters",
    "SchedulerFactory",
    "StepContext",
    "StepFunction",
    "before_optimizer_step",
    "finish_step",
    "forward_backward",
]

# (the step's context, the batch) -> the step's loss, with the optimizer stepped.
StepFunction: TypeAlias = Callable[["StepContext", Batch], torch.Tensor]
SchedulerFactory: TypeAlias = Callable[
    [torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler
]


class NamedParameters(Sequence[nn.Parameter]):
    """A model's parameters as an optimizer factory receives them.

    Iterate it as ``model.parameters()`` (``torch.optim.SGD(parameters, ...)`` works as it
    is), or build parameter groups by name, as training code does for weight decay::

        def adamw(parameters):
            decay = [p for name, p in parameters.named() if not name.endswith("bias")]
            rest = [p for name, p in parameters.named() if name.endswith("bias")]
            return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0}])

    ``model`` is the module itself, for rules by module type (no decay on ``nn.LayerNorm``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._named = list(model.named_parameters())

    def named(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs in the model's order."""
        return list(self._named)

    def __getitem__(self, index: int) -> nn.Parameter:  # type: ignore[override]
        return self._named[index][1]

    def __len__(self) -> int:
        return len(self._named)

    def __iter__(self) -> Iterator[nn.Parameter]:
        return (parameter for _, parameter in self._named)


@dataclass
class StepContext:
    """What one training step is given. A step function uses :meth:`loss` for the forward
    pass (it applies the workload's forward, the side's forward wrapper and the precision
    policy's autocast), :meth:`backward` for backward (it scales under a GradScaler), and
    steps ``optimizer`` (through ``scaler`` when there is one) and ``scheduler`` itself."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    forward: Forward | None = None
    forward_model: nn.Module | None = None
    autocast: Callable[[], contextlib.AbstractContextManager[object]] = field(
        default=contextlib.nullcontext
    )

    def loss(self, batch: Batch, model: nn.Module | None = None) -> torch.Tensor:
        """The workload's loss on ``batch`` (on ``model``, another module, when given)."""
        assert self.forward is not None
        if model is None:
            model = self.forward_model if self.forward_model is not None else self.model
        chosen = model
        with self.autocast():
            return self.forward(chosen, batch)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the GradScaler when the policy has one."""
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        scaled.backward()  # type: ignore[no-untyped-call]

    def split(self, batch: Batch, parts: int) -> list[Batch]:
        """``batch`` in ``parts`` micro-batches along its first dimension."""
        return split(batch, parts)

    def unscale(self) -> None:
        """Bring scaled gradients back to their true size (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def optimizer_step(self) -> None:
        """The optimizer step, through the GradScaler when there is one (it skips a step with
        non-finite gradients and updates its scale)."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def scheduler_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()


def forward_backward(context: StepContext, batch: Batch, *, micro_batches: int) -> torch.Tensor:
    """Forward and backward of the declared step, over ``micro_batches`` (each loss weighted
    by its share of the batch, so that the accumulated gradient is the batch's); the batch's
    loss."""
    if micro_batches == 1:
        loss = context.loss(batch)
        context.backward(loss)
        return loss.detach()
    size = batch_size(batch)
    parts = split(batch, micro_batches)
    total = torch.zeros((), device=_device_of(parts[0]))
    for micro in parts:
        loss = context.loss(micro) * (batch_size(micro) / size)
        context.backward(loss)
        total = total + loss.detach()
    return total


def finish_step(
    context: StepContext,
    *,
    clip_grad_norm: float | None,
    gradients_ready: Callable[[], None],
    before_update: Callable[[], None],
) -> None:
    """The declared step after backward: unscale, ``gradients_ready`` (a candidate's gradient
    transform goes here, before clipping, as an exchange or compression does), clip the global
    gradient norm, ``before_update`` (the gradients the optimizer sees), optimizer step,
    scheduler step."""
    context.unscale()
    gradients_ready()
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(context.model.parameters(), clip_grad_norm)
    before_update()
    context.optimizer_step()
    context.scheduler_step()


def _device_of(batch: Batch) -> torch.device:
    if isinstance(batch, torch.Tensor):
        return batch.device
    values = batch.values() if isinstance(batch, dict) else batch
    return _device_of(next(iter(values)))


@contextlib.contextmanager
def before_optimizer_step(
    optimizer: torch.optim.Optimizer, action: Callable[[], None]
) -> Iterator[None]:
    """Run ``action`` right before ``optimizer`` applies its gradients, however the step was
    written (``optimizer.step()``, ``scaler.step(optimizer)``): an optimizer step pre-hook,
    removed when the step is done."""

    def hook(_: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        action()

    handle = optimizer.register_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
