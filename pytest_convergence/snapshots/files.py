"""Reading and writing snapshot files: the suffix picks the format module that does the work."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from pytest_convergence._formats import SUPPORTED_SUFFIXES
from pytest_convergence.errors import SnapshotFormatError
from pytest_convergence.snapshots import npz_format, onnx_format, safetensors_format, torch_format
from pytest_convergence.snapshots.common import RESERVED_PREFIX, write_atomically
from pytest_convergence.snapshots.snapshot import Snapshot

__all__ = ["load_snapshot", "save_snapshot"]


def load_snapshot(path: str | os.PathLike[str], *, step: int | None = None) -> Snapshot:
    """Read a snapshot file; ``step`` overrides the step stored in the file, if any."""
    source = Path(path)
    kind = _format_of(source)
    if not source.is_file():
        raise SnapshotFormatError(source, _not_a_file(source))
    if source.stat().st_size == 0:
        raise SnapshotFormatError(source, "the file is empty")
    snapshot = _READERS[kind](source)
    if step is not None:
        snapshot.step = step
    return snapshot


def _not_a_file(path: Path) -> str:
    if path.exists():
        return "not a file"
    if path.is_symlink():
        return "a symbolic link that leads nowhere (its target is missing, or it loops)"
    return "no such file"


def save_snapshot(
    weights: Mapping[str, torch.Tensor] | torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    external_data: bool = False,
) -> Path:
    """Write weights in the format the suffix names, atomically, so readers never see half a file.

    A module contributes its parameters. A ``Snapshot`` contributes its step and metadata unless
    they are given here.
    """
    target = Path(path)
    kind = _format_of(target)
    if external_data and kind != "onnx":
        raise ValueError(f"{target}: external_data=True applies to .onnx files only")
    if isinstance(weights, Snapshot):
        step = weights.step if step is None else step
        metadata = weights.metadata if metadata is None else metadata
    _check_step(step)
    checked = _checked_metadata(metadata)
    data_file = onnx_format.external_data_file(target) if external_data else None
    _check_destination(target, data_file, overwrite=overwrite)
    tensors = _tensors_to_save(weights)
    if kind == "onnx":
        onnx_format.write(tensors, target, step, checked, external_data=external_data)
    else:
        write_atomically(target, functools.partial(_WRITERS[kind], tensors, step, checked))
    return target


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise SnapshotFormatError(path, f"unknown suffix {suffix!r}" if suffix else "no suffix")
    return SUPPORTED_SUFFIXES[suffix]


def _check_step(step: object) -> None:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be an int or None, not {type(step).__name__}")


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Metadata must be str -> str because safetensors and ONNX store nothing richer."""
    checked = dict(metadata or {})
    for key, value in checked.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; got {key!r}: {value!r}")
        if key.startswith(RESERVED_PREFIX):
            raise ValueError(f"metadata key {key!r}: the prefix {RESERVED_PREFIX!r} is reserved")
    return checked


def _check_destination(target: Path, data_file: Path | None, *, overwrite: bool) -> None:
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist; create it before saving there")
    for path in (target, data_file):
        if path is None:
            continue
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; a snapshot needs a file name")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")


def _tensors_to_save(
    weights: Mapping[str, torch.Tensor] | torch.nn.Module,
) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors that each own their storage.

    Owning storage matters twice: torch.save writes a view's whole base storage, and
    safetensors refuses tensors that share memory (tied weights in a state dict).
    """
    items: Iterable[tuple[object, object]]
    if isinstance(weights, torch.nn.Module):
        items = weights.named_parameters()
    elif isinstance(weights, Mapping):
        items = weights.items()
    else:
        raise TypeError(f"weights must be a mapping or a torch.nn.Module, not {type(weights)}")
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in items:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, not {type(name).__name__} ({name!r})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(value).__name__}, not a tensor")
        if value.dtype.is_complex:
            raise ValueError(f"{name!r} is complex ({value.dtype}): LoGM needs real weights")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        owns = storage.nbytes() == tensor.numel() * tensor.element_size()
        if storage.data_ptr() in storages or not owns:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


_READERS: dict[str, Callable[[Path], Snapshot]] = {
    "torch": torch_format.read,
    "safetensors": safetensors_format.read,
    "npz": npz_format.read,
    "onnx": onnx_format.read,
}
_WRITERS: dict[str, Callable[[dict[str, torch.Tensor], int | None, dict[str, str], Path], None]] = {
    "torch": torch_format.write,
    "safetensors": safetensors_format.write,
    "npz": npz_format.write,
}
