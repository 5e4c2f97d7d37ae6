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
from typing import TYPE_CHECKING, Any

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


@dataclass
class TrainingState:
    """Everything a step depends on, captured before the reference takes it.

    ``optimizer`` is a deep copy of the reference optimizer's ``state_dict()``: its state
    tensors are live (momentum buffers), so sharing them would let a candidate's step change
    the reference's. Capturing again into the same object (``reuse``) overwrites its tensors
    in place: a small model's step is a few hundred microseconds, and a deep copy per step
    (Python's ``copy.deepcopy`` walks every entry) cost more than the step's tracing.
    """

    parameters: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: RandomState

    @classmethod
    def capture(
        cls, implementation: Implementation, reuse: TrainingState | None = None
    ) -> TrainingState:
        """The state of ``implementation`` now; ``reuse``: a state of the same implementation
        that nothing reads any more, whose tensors are overwritten."""
        model = implementation.model
        parameters = [p.detach() for p in model.parameters()]
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        optimizer = implementation.optimizer.state_dict()
        if reuse is not None and _copy_into(reuse.parameters, parameters):
            reused_buffers = reuse.buffers if _same_names(reuse.buffers, buffers) else None
            if reused_buffers is not None and _copy_into(
                list(reused_buffers.values()), list(buffers.values())
            ):
                copied = _copy_state_dict_into(reuse.optimizer, optimizer)
                return cls(
                    reuse.parameters,
                    reused_buffers,
                    copied if copied is not None else copy.deepcopy(optimizer),
                    RandomState.capture(),
                )
        return cls(
            parameters=[p.clone() for p in parameters],
            buffers={n: b.clone() for n, b in buffers.items()},
            optimizer=copy.deepcopy(optimizer),
            rng=RandomState.capture(),
        )

    def restore(self, implementation: Implementation) -> None:
        """Reset ``implementation`` to this state, keeping what is its own: the optimizer's
        hyper-parameters (an optimizer that differs only in them would be invisible
        otherwise), buffers of swapped-in modules the reference lacks, and per-parameter
        optimizer state the reference's has no entry for."""
        with torch.no_grad():
            torch._foreach_copy_(list(implementation.model.parameters()), self.parameters)
            # By name: a swapped-in module may carry buffers the reference lacks.
            for name, buffer in implementation.model.named_buffers():
                if name in self.buffers:
                    buffer.copy_(self.buffers[name])
        if not self._restore_optimizer_in_place(implementation.optimizer):
            self._load_optimizer_state(implementation.optimizer)
        self.rng.restore()

    def _restore_optimizer_in_place(self, optimizer: torch.optim.Optimizer) -> bool:
        """Copy the captured state into the candidate optimizer's own tensors, where it holds
        every captured entry with the same shapes and dtypes and its groups have the same
        layout and keys: the common case (the same optimizer, or one with SGD's state layout),
        exactly what :meth:`_load_optimizer_state` would leave, without its deep copy."""
        groups = optimizer.param_groups
        captured_groups = self.optimizer["param_groups"]
        if len(groups) != len(captured_groups) or any(
            len(group["params"]) != len(theirs["params"]) or group.keys() != theirs.keys()
            for group, theirs in zip(groups, captured_groups, strict=True)
        ):
            return False
        parameters = [p for group in groups for p in group["params"]]
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        assignments: list[tuple[dict[str, Any], str, Any]] = []
        for index, entries in self.optimizer["state"].items():
            if not isinstance(index, int) or not 0 <= index < len(parameters):
                return False
            own = optimizer.state.get(parameters[index])
            if own is None:
                return False
            for key, value in entries.items():
                mine = own.get(key, _MISSING)
                if isinstance(value, torch.Tensor):
                    if not _same_kind(mine, value):
                        return False
                    targets.append(mine)
                    sources.append(value)
                elif _is_immutable(value) and mine is not _MISSING:
                    assignments.append((own, key, value))
                else:
                    return False
        with torch.no_grad():
            if targets:
                torch._foreach_copy_(targets, sources)
        for own, key, value in assignments:
            own[key] = value
        return True

    def _load_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        # load_state_dict also copies the reference's hyper-parameters (lr, momentum, ...):
        # keep the candidate's own, or an optimizer that differs only in them is invisible.
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


_MISSING = object()


def _same_kind(mine: object, value: torch.Tensor) -> bool:
    return (
        isinstance(mine, torch.Tensor)
        and mine.shape == value.shape
        and mine.dtype == value.dtype
        and mine.device == value.device
        and mine.layout == value.layout == torch.strided
    )


def _is_immutable(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _same_names(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys()


def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> bool:
    """Copy ``sources`` into ``targets`` when each pair has the same shape, dtype, device and
    strided layout (then True); otherwise touch nothing (False)."""
    if len(targets) != len(sources) or not all(
        _same_kind(target, source) for target, source in zip(targets, sources, strict=True)
    ):
        return False
    with torch.no_grad():
        if targets:
            torch._foreach_copy_(targets, sources)
    return True


def _copy_state_dict_into(
    previous: dict[str, Any], state_dict: dict[str, Any]
) -> dict[str, Any] | None:
    """A deep copy of ``state_dict`` that writes its state tensors into those of ``previous``,
    an earlier copy of the same optimizer's state dict with the same entries; None where the
    entries differ (then a plain deep copy it is)."""
    state, old_state = state_dict["state"], previous["state"]
    if state.keys() != old_state.keys():
        return None
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    copied_state: dict[Any, dict[str, Any]] = {}
    for index, entries in state.items():
        old = old_state[index]
        if entries.keys() != old.keys():
            return None
        copied: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                if not _same_kind(old[key], value):
                    return None
                targets.append(old[key])
                sources.append(value.detach())
                copied[key] = old[key]
            elif _is_immutable(value):
                copied[key] = value
            else:
                return None
        copied_state[index] = copied
    with torch.no_grad():
        if targets:
            torch._foreach_copy_(targets, sources)
    return {"state": copied_state, "param_groups": copy.deepcopy(state_dict["param_groups"])}


def _cuda_initialized() -> bool:
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]
