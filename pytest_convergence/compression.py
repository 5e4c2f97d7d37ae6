"""Gradient compression arithmetic shared by the simulated and the real (DDP) exchanges.

The virtual-worker exchanges of the zoo (:func:`pytest_convergence.zoo.candidates.int8_exchange`)
and the DDP communication hook (:func:`pytest_convergence.distributed.int8_comm_hook`) must
quantize exactly alike, or a bug found in one would say nothing about the other: both call
:func:`quantize_int8_partitions`. Core code, so that the engine and the DDP hooks never import
the zoo of examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "flatten_gradients",
    "last_partition_parameters",
    "mean_over_workers",
    "quantize_int8_partitions",
    "unflatten_gradients",
]


def mean_over_workers(per_worker: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per parameter, the sum over workers divided by their count: an exact all-reduce mean,
    summed in one order so that every exchange that averages rounds alike."""
    workers = len(per_worker)
    return [torch.stack(grads).sum(dim=0) / workers for grads in zip(*per_worker, strict=True)]


def quantize_int8_partitions(
    flat: torch.Tensor, partitions: int, last_partition_scale: float = 1.0
) -> torch.Tensor:
    """Quantize and de-quantize ``flat`` to int8 in ``partitions`` nearly equal chunks.

    Each chunk gets its own scale ``max|x| / 127`` and round-to-nearest; the last chunk's
    de-quantization is multiplied by ``last_partition_scale`` (1.0 is correct).
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    pieces = []
    chunks = flat.tensor_split(partitions)
    for index, chunk in enumerate(chunks):
        largest = chunk.abs().max() if chunk.numel() else chunk.new_zeros(())
        if float(largest) == 0.0:
            pieces.append(torch.zeros_like(chunk))
            continue
        scale = largest / 127
        restored = torch.round(chunk / scale).clamp_(-127, 127).mul_(scale)
        if index == len(chunks) - 1 and last_partition_scale != 1.0:
            restored.mul_(last_partition_scale)
        pieces.append(restored)
    return torch.cat(pieces)


def flatten_gradients(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """One vector of every gradient in order, as a bucketed exchange sends them."""
    return torch.cat([g.reshape(-1) for g in gradients])


def unflatten_gradients(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` cut back into tensors shaped like ``like``."""
    sizes = [g.numel() for g in like]
    return [piece.reshape(g.shape) for piece, g in zip(torch.split(flat, sizes), like, strict=True)]


def last_partition_parameters(
    named_parameters: Iterable[tuple[str, torch.Tensor]], partitions: int
) -> list[str]:
    """Names of the parameters with at least one element in the last of ``partitions`` chunks
    of the flattened gradient vector, as the int8 exchange splits it."""
    named = list(named_parameters)
    total = sum(p.numel() for _, p in named)
    sizes = [len(c) for c in torch.arange(total).tensor_split(partitions)]
    start = total - sizes[-1]
    names, offset = [], 0
    for name, parameter in named:
        end = offset + parameter.numel()
        if end > start and parameter.numel() > 0:
            names.append(name)
        offset = end
    return names
