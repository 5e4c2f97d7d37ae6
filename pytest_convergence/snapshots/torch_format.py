"""PyTorch state dicts (``.pt``, ``.pth``), read weights-only and memory-mapped."""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pytest_convergence.errors import SnapshotFormatError
from pytest_convergence.snapshots.common import brief, is_str_table, is_weight, reading
from pytest_convergence.snapshots.snapshot import Snapshot

__all__ = ["read", "write"]

_TORCH_ENTRY = "pytest_convergence"


def read(path: Path) -> Snapshot:
    """A state dict, flat, nested or under ``"state_dict"``; step and metadata from our
    ``"pytest_convergence"`` entry."""
    # torch's unpickler rebuilds objects from the file's own instructions, so damaged input
    # can fail with nearly any exception (AttributeError included), not only the usual ones.
    with reading(path, errors=(Exception,)):
        payload = _torch_load(path)
    if not isinstance(payload, Mapping):
        raise SnapshotFormatError(path, f"holds a {type(payload).__name__}, not a state dict")
    step, metadata = _torch_info(path, payload.get(_TORCH_ENTRY))
    state = payload.get("state_dict")
    if not isinstance(state, Mapping):
        state = {key: value for key, value in payload.items() if key != _TORCH_ENTRY}
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    _flatten(path, state, "", tensors, skipped)
    return Snapshot(tensors, step=step, metadata=metadata, source=str(path), skipped=skipped)


def _torch_load(path: Path) -> object:
    """Load weights-only; torch's warnings reach the caller only when the file loads.

    torch warns about a pickle protocol it may not read before it refuses the file, and that
    warning printed above the refusal would be the first thing a reader sees; it becomes a
    hint in the refusal instead.
    """
    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")
        try:
            payload = _load_weights_only(path)
        except Exception as exc:
            protocol = next(filter(None, map(_warned_protocol, issued)), None)
            if protocol is None:
                raise
            raise SnapshotFormatError(
                path,
                f"cannot be read: {brief(exc)}; it was pickled with protocol {protocol}, whose "
                "instructions torch's weights-only loader may not support (torch.save "
                "writes protocol 2 by default)",
            ) from exc
    for warning in issued:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return payload


def _warned_protocol(warning: warnings.WarningMessage) -> str | None:
    match = re.search(r"Detected pickle protocol (\d+)", str(warning.message))
    return match.group(1) if match else None


def _load_weights_only(path: Path) -> object:
    """Memory-map the checkpoint so its tensors are paged in only when read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        if zipfile.is_zipfile(path):
            raise
    # Legacy (pre-zip) checkpoints cannot be memory-mapped; they are read whole.
    return torch.load(path, map_location="cpu", weights_only=True)


def _torch_info(path: Path, entry: object) -> tuple[int | None, dict[str, str]]:
    if entry is None:
        return None, {}
    fields = entry if isinstance(entry, Mapping) else {}
    step = fields.get("step")
    metadata = fields.get("metadata", {})
    valid_step = step is None or (isinstance(step, int) and not isinstance(step, bool))
    if not (fields and valid_step and is_str_table(metadata)):
        raise SnapshotFormatError(path, f"malformed {_TORCH_ENTRY!r} entry: {entry!r}")
    return step, dict(metadata)


def _flatten(
    path: Path,
    state: Mapping[Any, Any],
    prefix: str,
    tensors: dict[str, torch.Tensor],
    skipped: list[str],
) -> None:
    """Nested dicts of tensors become dotted names, the way nn.Module names its parameters."""
    for key, value in state.items():
        name = f"{prefix}{key}"
        if name in tensors or name in skipped:
            raise SnapshotFormatError(path, f"two tensors are both named {name!r}")
        if isinstance(value, Mapping):
            _flatten(path, value, f"{name}.", tensors, skipped)
        elif isinstance(value, torch.Tensor) and is_weight(path, name, value.dtype):
            _check_has_values(path, name, value)
            tensors[name] = value.detach()
        else:
            skipped.append(name)


def _check_has_values(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse at load what would fail deep inside torch when measured."""
    if tensor.device.type == "meta":
        raise SnapshotFormatError(
            path,
            f"tensor {name!r} is on the meta device: it has a shape but no values (saved from a "
            "model built on device='meta' before its weights were loaded)",
        )


def write(
    tensors: dict[str, torch.Tensor], step: int | None, metadata: dict[str, str], temp: Path
) -> None:
    """Write ``tensors`` to ``temp``, which ``save_snapshot`` then renames into place."""
    info = {"step": step, "metadata": metadata}
    torch.save({"state_dict": tensors, _TORCH_ENTRY: info}, temp)
