"""Batches as users have them, and the forward pass that turns one into a loss.

A batch is any tree of tensors a training loop feeds its model: an ``(inputs, targets)`` pair
(inputs a tensor, a tuple of tensors for several inputs, or a dict of keyword inputs), or a
dict of keyword inputs for a model that computes its own loss (``model(**batch).loss``, as
Hugging Face models do). Co-simulation needs four things of it, whatever its shape: to move it
to the workload's device and dtype, to split it along its first dimension (virtual workers,
micro-batches, DDP shards), to say what it is in an error, and a loss.

The loss comes from the workload's ``forward(model, batch)`` when it has one, else from
:func:`default_loss`: a pair is ``loss_fn(model(inputs), targets)``; a dict is
``model(**batch)``'s loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

__all__ = [
    "Batch",
    "BatchError",
    "Forward",
    "LossFunction",
    "batch_size",
    "call_model",
    "default_loss",
    "describe",
    "logits_of_output",
    "loss_of_output",
    "place",
    "split",
    "to_device",
    "validate",
]

# A tensor, or a tuple, list or dict of batches: what a training loop feeds its model.
Batch: TypeAlias = Any
LossFunction: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (model, batch) -> the scalar loss to back-propagate.
Forward: TypeAlias = Callable[[nn.Module, Batch], torch.Tensor]

_SHOWN_KEYS = 6


class BatchError(TypeError):
    """A batch the workload cannot use; the message names the workload, the batch, what it
    holds and what was expected."""


def describe(batch: Batch) -> str:
    """A batch's shape, for a message: ``{'input_ids': int64[8, 16], 'labels': int64[8, 16]}``."""
    if isinstance(batch, torch.Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')}{list(batch.shape)}"
    if isinstance(batch, Mapping):
        items = [f"{key!r}: {describe(value)}" for key, value in list(batch.items())[:_SHOWN_KEYS]]
        more = ", ..." if len(batch) > _SHOWN_KEYS else ""
        return "{" + ", ".join(items) + more + "}"
    if isinstance(batch, tuple | list):
        inner = ", ".join(describe(item) for item in batch[:_SHOWN_KEYS])
        more = ", ..." if len(batch) > _SHOWN_KEYS else ""
        return f"({inner}{more})" if isinstance(batch, tuple) else f"[{inner}{more}]"
    return type(batch).__name__


def validate(batch: Batch, where: str) -> None:
    """Refuse what no training step can use: leaves that are not tensors, a batch without any
    tensor, tensors whose first dimensions differ (a batch is split along it). ``where``
    names the batch ("workload 'lm': batch 0")."""
    leaves = list(_leaves(batch, where))
    if not leaves:
        raise BatchError(
            f"{where} holds no tensor ({describe(batch)}); a batch is an (inputs, targets) "
            "pair or a dict of tensors"
        )
    sizes = {tensor.shape[0] if tensor.dim() else None for tensor in leaves}
    if None in sizes or len(sizes) > 1:
        raise BatchError(
            f"{where}: its tensors must share their first dimension, the batch size "
            f"({describe(batch)})"
        )


def _leaves(batch: Batch, where: str) -> Sequence[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [leaf for value in batch.values() for leaf in _leaves(value, where)]
    if isinstance(batch, tuple | list):
        return [leaf for item in batch for leaf in _leaves(item, where)]
    raise BatchError(
        f"{where} holds a {type(batch).__name__} ({describe(batch)}); a batch is made of "
        "tensors: an (inputs, targets) pair, or a dict of tensors"
    )


def place(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """``batch`` on ``device``, its floating inputs in ``dtype``. The targets of a pair keep
    their dtype (soft labels are the loss's business); in a dict every floating tensor is an
    input."""
    if _is_pair(batch):
        inputs, targets = batch
        return (_moved(inputs, device, dtype), _moved(targets, device, None))
    return _moved(batch, device, dtype)


def _moved(batch: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            batch = batch.to(dtype=dtype)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _moved(value, device, dtype) for key, value in batch.items()}
    if isinstance(batch, list):
        return [_moved(item, device, dtype) for item in batch]
    return tuple(_moved(item, device, dtype) for item in batch)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device``, dtypes kept."""
    return _moved(batch, device, None)


def split(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut into ``parts`` along its first dimension (``Tensor.chunk``), every tensor
    alike: shards of virtual workers, micro-batches, ranks."""
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, Mapping):
        pieces = {key: split(value, parts) for key, value in batch.items()}
        count = min(len(piece) for piece in pieces.values())
        return [{key: piece[i] for key, piece in pieces.items()} for i in range(count)]
    columns = [split(item, parts) for item in batch]
    count = min(len(column) for column in columns)
    kind = list if isinstance(batch, list) else tuple
    return [kind(column[i] for column in columns) for i in range(count)]


def batch_size(batch: Batch) -> int:
    """The first dimension its tensors share."""
    leaves = _leaves(batch, "the batch")
    return int(leaves[0].shape[0]) if leaves else 0


def _is_pair(batch: Batch) -> bool:
    return isinstance(batch, tuple | list) and len(batch) == 2


def call_model(model: nn.Module, inputs: Batch) -> Any:
    """The model on its inputs: one tensor, several (a tuple or list), or keywords (a dict)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def loss_of_output(output: Any, where: str) -> torch.Tensor:
    """The loss a model returned: a scalar tensor, a ``loss`` attribute (an output object) or
    a ``"loss"`` entry (a dict)."""
    loss = output
    if not isinstance(output, torch.Tensor):
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise BatchError(
            f"{where}: the model returned {_output_kind(output)}, not a loss; a dict batch is "
            "passed as model(**batch), which must return a scalar loss, an object with a "
            "'loss' attribute or a dict with a 'loss' entry; otherwise give the workload "
            "forward=lambda model, batch: <the loss>"
        )
    return loss


def _output_kind(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {list(output.shape)}"
    if isinstance(output, Mapping):
        return f"a dict with keys {list(output)[:_SHOWN_KEYS]}"
    return f"a {type(output).__name__}"


def logits_of_output(output: Any) -> Any:
    """What a pair's loss function is given: the model's tensor, or an output object's
    ``logits`` (a Hugging Face model called without its labels)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = (
        output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    )
    return logits if logits is not None else output


def default_loss(loss_fn: LossFunction) -> Forward:
    """The forward pass of a workload without its own: ``loss_fn(model(inputs), targets)``
    for a pair, the model's own loss for a dict."""

    def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            return loss_of_output(model(**batch), "a dict batch")
        if not _is_pair(batch):
            raise BatchError(
                f"a batch of {describe(batch)}: the default forward pass takes an "
                "(inputs, targets) pair or a dict of keyword inputs; give the workload "
                "forward=lambda model, batch: <the loss> for any other"
            )
        inputs, targets = batch
        return loss_fn(logits_of_output(call_model(model, inputs)), targets)

    return forward
