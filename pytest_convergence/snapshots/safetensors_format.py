"""safetensors files, read one tensor at a time from the memory-mapped file."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from pytest_convergence.errors import SnapshotFormatError
from pytest_convergence.snapshots.common import (
    RESERVED_PREFIX,
    STEP_KEY,
    is_weight,
    parse_step,
    reading,
)
from pytest_convergence.snapshots.snapshot import Snapshot, TensorOrLoader

__all__ = ["read", "write"]

_ORDER_KEY = RESERVED_PREFIX + "order"
_SAFETENSORS_NOT_WEIGHTS = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})


def read(path: Path) -> Snapshot:
    """Headers now, each tensor when it is indexed; step and tensor order from the metadata."""
    with reading(path), safetensors.safe_open(str(path), framework="pt") as handle:
        names: list[str] = list(handle.keys())
        codes = {name: str(handle.get_slice(name).get_dtype()) for name in names}
        stored: dict[str, str] = dict(handle.metadata() or {})
    step = parse_step(path, stored.pop(STEP_KEY, None))
    order = _stored_order(path, stored.pop(_ORDER_KEY, None), names)
    loaders: dict[str, TensorOrLoader] = {}
    skipped: list[str] = []
    for name in order:
        if codes[name].startswith("C"):
            raise SnapshotFormatError(path, f"tensor {name!r} is complex; LoGM needs reals")
        if codes[name] in _SAFETENSORS_NOT_WEIGHTS:
            skipped.append(name)
        else:
            loaders[name] = functools.partial(_safetensors_tensor, path, name)
    return Snapshot(loaders, step=step, metadata=stored, source=str(path), skipped=skipped)


def _stored_order(path: Path, text: str | None, names: list[str]) -> list[str]:
    """safetensors sorts tensors on disk, so the writer's order travels in the metadata."""
    if text is None:
        return names
    try:
        order = json.loads(text)
    except ValueError:
        order = None
    if not isinstance(order, list) or sorted(order, key=str) != sorted(names):
        raise SnapshotFormatError(path, f"stored tensor order {_ORDER_KEY!r} does not match")
    return order


def _safetensors_tensor(path: Path, name: str) -> torch.Tensor:
    with reading(path, name), safetensors.safe_open(str(path), framework="pt") as handle:
        tensor: torch.Tensor = handle.get_tensor(name)
    if not is_weight(path, name, tensor.dtype):
        raise SnapshotFormatError(path, f"tensor {name!r} has dtype {tensor.dtype}, not a float")
    return tensor


def write(
    tensors: dict[str, torch.Tensor], step: int | None, metadata: dict[str, str], temp: Path
) -> None:
    """Write ``tensors`` to ``temp``, which ``save_snapshot`` then renames into place."""
    stored = {**metadata, _ORDER_KEY: json.dumps(list(tensors))}
    if step is not None:
        stored[STEP_KEY] = str(step)
    safetensors.torch.save_file(tensors, str(temp), metadata=stored)
