"""PyTorch state dicts (``.pt``, ``.pth``), read weights-only and memory-mapped."""

from __future__ import annotations

import mmap
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
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
    with reading(path):
        is_zip = zipfile.is_zipfile(path)
        if not _starts_a_checkpoint(path):
            raise SnapshotFormatError(
                path,
                "not a PyTorch checkpoint: neither a zip archive (what torch.save writes) nor a "
                "pickle (its legacy format)",
            )
    with reading(path, errors=(Exception,)):
        payload = _torch_load(path)
    if not isinstance(payload, Mapping):
        raise SnapshotFormatError(path, f"holds a {type(payload).__name__}, not a state dict")
    step, metadata = _torch_info(path, payload.get(_TORCH_ENTRY))
    state = payload.get("state_dict")
    if not isinstance(state, Mapping):
        state = {key: value for key, value in payload.items() if key != _TORCH_ENTRY}
    tensors, skipped = _flatten(path, state)
    for name, tensor in tensors.items():
        _check_dense(path, name, tensor)
    if is_zip:
        with reading(path):
            _check_records(path, tensors)
    return Snapshot(tensors, step=step, metadata=metadata, source=str(path), skipped=skipped)


def _starts_a_checkpoint(path: Path) -> bool:
    """A zip archive's first member header, or the PROTO opcode of a pickle of protocol 2 or
    later: how what torch.save writes begins, damaged further on or not."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start == b"PK\x03\x04" or start[:1] == b"\x80"


def _torch_load(path: Path) -> object:
    """Load weights-only, keeping torch's warnings to ourselves.

    They are about torch's own workings (a deprecated TypedStorage inside its rebuilding of a
    quantized tensor, a pickle protocol it may not read), nothing a reader of the file can act
    on: a file either loads or is refused with the reason. The protocol warning comes before a
    refusal, and becomes a hint in it.
    """
    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")
        try:
            return _load_weights_only(path)
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


def _flatten(path: Path, state: Mapping[Any, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Nested dicts of tensors become dotted names, the way nn.Module names its parameters.

    Depth first with a stack of its own, not recursion: the weights-only unpickler builds
    dicts nested far deeper than Python's recursion limit.
    """
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    stack: list[tuple[str, Iterator[tuple[Any, Any]]]] = [("", iter(state.items()))]
    while stack:
        prefix, items = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        key, value = entry
        name = f"{prefix}{key}"
        if name in tensors or name in skipped:
            raise SnapshotFormatError(path, f"two tensors are both named {name!r}")
        if isinstance(value, Mapping):
            stack.append((f"{name}.", iter(value.items())))
        elif isinstance(value, torch.Tensor) and is_weight(path, name, value.dtype):
            tensors[name] = value.detach()
        else:
            skipped.append(name)
    return tensors, skipped


def _check_dense(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse at load what would fail deep inside torch, or never finish, when measured."""
    if tensor.device.type == "meta":
        raise SnapshotFormatError(
            path,
            f"tensor {name!r} is on the meta device: it has a shape but no values (saved from a "
            "model built on device='meta' before its weights were loaded)",
        )
    if tensor.layout != torch.strided:
        kind = "sparse" if "sparse" in str(tensor.layout) else "not a dense tensor"
        raise SnapshotFormatError(
            path,
            f"tensor {name!r} is {kind} ({tensor.layout}); LoGM reads dense weights: save "
            "tensor.to_dense()",
        )
    needed = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if needed > held:
        # A stride-0 view (expand()) is a few bytes on disk and any size to measure.
        raise SnapshotFormatError(
            path,
            f"tensor {name!r} addresses {tensor.numel():,} elements in {held:,} bytes of "
            "storage (a view whose elements overlap, as expand() makes): save "
            "tensor.contiguous()",
        )


def _check_records(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Each memory-mapped storage must fit in its record of the zip.

    torch checks a record's size against the pickle when it copies the record, but not when it
    maps it: the storage of a record cut short runs on into the zip's next member, whose bytes
    become the tensor's values. A storage is a slice of the file's mapping, at its record's
    data offset; the mapping's start (page-aligned) is the one that puts every storage at the
    start of a record.
    """
    records = _data_records(path)
    storages: dict[int, tuple[str, int]] = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        if storage.nbytes() > 0:
            storages.setdefault(storage.data_ptr(), (name, storage.nbytes()))
    bases: set[int] | None = None
    for pointer in storages:
        candidates = {
            pointer - start for start in records if (pointer - start) % mmap.PAGESIZE == 0
        }
        bases = candidates if bases is None else bases & candidates
    if not bases or len(bases) > 1:
        return  # not mapped from this file, or no single way to tell; torch's own checks stand
    (base,) = bases
    for pointer, (name, needed) in storages.items():
        member, size = records[pointer - base]
        if needed > size:
            raise SnapshotFormatError(
                path,
                f"tensor {name!r} needs {needed:,} bytes; the file's record {member!r} holds "
                f"{size:,} (a damaged or truncated checkpoint)",
            )


def _data_records(path: Path) -> dict[int, tuple[str, int]]:
    """The zip's tensor records by the file offset of their data: (name, size)."""
    records: dict[int, tuple[str, int]] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            if "/data/" not in f"/{info.filename}" or info.compress_type != zipfile.ZIP_STORED:
                continue
            handle.seek(info.header_offset)
            header = handle.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size:
                continue
            *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            records[start] = (info.filename, info.file_size)
    return records


# A zip member's local header: signature, versions, flags, ... name and extra field lengths.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def write(
    tensors: dict[str, torch.Tensor], step: int | None, metadata: dict[str, str], temp: Path
) -> None:
    """Write ``tensors`` to ``temp``, which ``save_snapshot`` then renames into place."""
    info = {"step": step, "metadata": metadata}
    torch.save({"state_dict": tensors, _TORCH_ENTRY: info}, temp)
