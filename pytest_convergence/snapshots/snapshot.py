"""``Snapshot``: an ordered, possibly lazy mapping of parameter name -> tensor, with its step."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeAlias

import torch

__all__ = ["Snapshot", "TensorOrLoader"]

TensorOrLoader: TypeAlias = "torch.Tensor | Callable[[], torch.Tensor]"


class Snapshot(Mapping[str, torch.Tensor]):
    """Ordered parameter name -> tensor mapping plus step and metadata.

    Values may be lazy: indexing loads one tensor and does not cache it, so iterating a
    file-backed snapshot streams it tensor by tensor and peak memory stays at one tensor.
    Use :meth:`materialize` when the same tensors are read repeatedly.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]],
        *,
        step: int | None = None,
        metadata: Mapping[str, str] | None = None,
        source: str | None = None,
        skipped: Sequence[str] = (),
    ) -> None:
        values: dict[str, TensorOrLoader] = {}
        left_out: list[str] = []
        for name, value in tensors.items():
            if isinstance(value, torch.Tensor):
                if value.dtype.is_complex:
                    raise ValueError(
                        f"{name!r} is complex ({value.dtype}): LoGM needs real weights"
                    )
                if not value.dtype.is_floating_point:
                    left_out.append(name)
                    continue
            elif not callable(value):
                raise TypeError(f"{name!r} is a {type(value).__name__}, not a tensor or a loader")
            values[name] = value
        self._values = values
        self.step: int | None = step
        self.metadata: dict[str, str] = dict(metadata or {})
        self.source: str | None = source
        self.skipped: tuple[str, ...] = (*skipped, *left_out)

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        *,
        step: int | None = None,
        include_buffers: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> Snapshot:
        """Clone the module's weights, because training goes on mutating them in place."""
        named: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
        if include_buffers:
            named += list(module.named_buffers())
        tensors = {
            name: tensor.detach().clone() if tensor.is_floating_point() else tensor
            for name, tensor in named
        }
        return cls(tensors, step=step, metadata=metadata)

    def materialize(self) -> Snapshot:
        """Load every tensor once, for callers that read them more than once."""
        return Snapshot(
            {name: self[name] for name in self},
            step=self.step,
            metadata=self.metadata,
            source=self.source,
            skipped=self.skipped,
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._values[name]
        return value if isinstance(value, torch.Tensor) else value()

    def __contains__(self, name: object) -> bool:
        # Mapping's default would load the tensor just to answer membership.
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        # Mapping's value comparison would load both snapshots and then fail on ambiguous
        # tensor truth values; compare weights explicitly instead.
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"Snapshot(source={self.source!r}, step={self.step!r}, tensors={len(self)})"
