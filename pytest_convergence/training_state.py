"""The state a training step depends on, captured before the reference takes it and restored
into each candidate: weights, buffers, optimizer state and RNG state.

Capturing and restoring happen twice per step of every co-simulation, so their cost counts:
capturing again writes into the tensors of the previous capture, and restoring copies into the
candidate optimizer's own tensors where its entries match the reference's, rather than deep
copies (Python's ``copy.deepcopy`` walks every entry) and ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

if TYPE_CHECKING:
    from pytest_convergence.engine import Implementation

__all__ = ["RandomState", "TrainingState", "preserved_random_state"]


@dataclass(frozen=True)
class RandomState:
    """The CPU generator's state and, once CUDA is in use, every device's."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if _cuda_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def same_as(self, other: RandomState) -> bool:
        """Whether both generators are in the same state (have drawn alike since)."""
        cuda_equal = (self.cuda is None) == (other.cuda is None) and all(
            torch.equal(a, b) for a, b in zip(self.cuda or [], other.cuda or [], strict=True)
        )
        return torch.equal(self.cpu, other.cpu) and cuda_equal

    def restore(self) -> None:
        """Back to this state: the same dropout masks, the same draws."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Leave the global RNG as found: work after a verdict (a replay, a diagnostic) runs in a
    test that may go on drawing from it."""
    found = RandomState.capture()
    try:
        yield
    finally:
        found.restore()


# One parameter's optimizer state (momentum buffers, Adam's moments and step), copied.
ParameterState: TypeAlias = dict[str, Any]


@dataclass
class TrainingState:
    """Everything a step depends on, captured before the reference takes it: weights, buffers,
    optimizer state, GradScaler state and RNG state.

    Optimizer state is kept per parameter of the model, by its position in
    ``model.parameters()``, not by its place in the optimizer's parameter groups: a candidate
    optimizer with other groups (one group where the reference has decay and no-decay ones,
    the natural form of a weight-decay bug) re-syncs parameter by parameter. Its own
    hyper-parameters and per-parameter state the reference has no entry for (AMSGrad's maximum,
    another optimizer's moments) stay its own. The learning-rate scheduler is not re-synced:
    each side's steps in lockstep with its own optimizer, so a schedule bug shows as the
    candidate's own learning rate.

    Capturing again into the same object (``reuse``) overwrites its tensors in place: a small
    model's step is a few hundred microseconds, and fresh copies every step cost more than the
    step's tracing.
    """

    parameters: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer: list[ParameterState | None]
    rng: RandomState
    scaler: dict[str, Any] | None = None

    @classmethod
    def capture(
        cls, implementation: Implementation, reuse: TrainingState | None = None
    ) -> TrainingState:
        """The state of ``implementation`` now; ``reuse``: a state of the same implementation
        that nothing reads any more, whose tensors are overwritten."""
        model = implementation.model
        parameters: list[torch.Tensor] = list(model.parameters())
        buffers = dict(model.named_buffers())
        kept = reuse if reuse is not None and reuse.buffers.keys() == buffers.keys() else None
        scaler = implementation.scaler
        return cls(
            parameters=_copies(parameters, kept.parameters if kept else None),
            buffers=dict(
                zip(
                    buffers,
                    _copies(list(buffers.values()), list(kept.buffers.values()) if kept else None),
                    strict=True,
                )
            ),
            optimizer=_optimizer_state(
                implementation.optimizer, parameters, kept.optimizer if kept else None
            ),
            rng=RandomState.capture(),
            scaler=copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
        )

    def restore(self, implementation: Implementation) -> None:
        """Reset ``implementation`` to this state, keeping what is its own (see above), and
        buffers of swapped-in modules the reference lacks."""
        parameters: list[torch.Tensor] = list(implementation.model.parameters())
        if len(parameters) != len(self.parameters):
            raise ValueError(
                f"the model has {len(parameters)} parameters, the captured state "
                f"{len(self.parameters)}"
            )
        with torch.no_grad():
            torch._foreach_copy_(parameters, self.parameters)
            # By name: a swapped-in module may carry buffers the reference lacks.
            for name, buffer in implementation.model.named_buffers():
                if name in self.buffers:
                    buffer.copy_(self.buffers[name])
        _restore_optimizer(implementation.optimizer, parameters, self.optimizer)
        if self.scaler is not None and implementation.scaler is not None:
            implementation.scaler.load_state_dict(copy.deepcopy(self.scaler))
        self.rng.restore()


def _copies(tensors: list[torch.Tensor], into: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Copies of ``tensors``, written into ``into`` (earlier copies) where they fit."""
    if (
        into is not None
        and len(into) == len(tensors)
        and all(_same_kind(target, source) for target, source in zip(into, tensors, strict=True))
    ):
        with torch.no_grad():
            if into:
                torch._foreach_copy_(into, tensors)
        return into
    return [tensor.detach().clone() for tensor in tensors]


def _optimizer_state(
    optimizer: torch.optim.Optimizer,
    parameters: list[torch.Tensor],
    previous: list[ParameterState | None] | None,
) -> list[ParameterState | None]:
    """Each model parameter's optimizer state, copied (into ``previous``' tensors where the
    same entries are there). State of tensors that are not the model's parameters is refused:
    it could not be given to a candidate's."""
    position = {id(parameter): index for index, parameter in enumerate(parameters)}
    captured: list[ParameterState | None] = [None] * len(parameters)
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for key, entries in optimizer.state.items():
        index = position.get(id(key))
        if index is None:
            raise ValueError(
                "the optimizer keeps state for a tensor that is not one of the model's "
                "parameters; co-simulation re-syncs optimizer state parameter by parameter"
            )
        old = previous[index] if previous is not None and len(previous) == len(parameters) else None
        copied: ParameterState = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                target = old.get(name) if old is not None else None
                if isinstance(target, torch.Tensor) and _same_kind(target, value):
                    targets.append(target)
                    sources.append(value.detach())
                    copied[name] = target
                else:
                    copied[name] = value.detach().clone()
            else:
                copied[name] = value if _is_immutable(value) else copy.deepcopy(value)
        captured[index] = copied
    with torch.no_grad():
        if targets:
            torch._foreach_copy_(targets, sources)
    return captured


def _restore_optimizer(
    optimizer: torch.optim.Optimizer,
    parameters: list[torch.Tensor],
    captured: list[ParameterState | None],
) -> None:
    """Write the captured per-parameter state into the optimizer's, parameter by parameter:
    into its own tensors where they fit (no allocation), as copies where it has none."""
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for parameter, entries in zip(parameters, captured, strict=True):
        if entries is None or id(parameter) not in managed:
            continue
        own = optimizer.state[parameter]
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                mine = own.get(name)
                if isinstance(mine, torch.Tensor) and _same_kind(mine, value):
                    targets.append(mine)
                    sources.append(value)
                else:
                    own[name] = value.clone()
            else:
                own[name] = value if _is_immutable(value) else copy.deepcopy(value)
    with torch.no_grad():
        if targets:
            torch._foreach_copy_(targets, sources)


def _same_kind(mine: object, value: torch.Tensor) -> bool:
    return (
        isinstance(mine, torch.Tensor)
        and mine.shape == value.shape
        and mine.dtype == value.dtype
        and mine.device == value.device
        and mine.layout == value.layout == torch.strided
    )


def _is_immutable(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str | tuple)


def _cuda_initialized() -> bool:
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]
