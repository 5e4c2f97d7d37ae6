"""NumPy archives (``.npz``), read without pickle, one array at a time."""

from __future__ import annotations

import functools
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pytest_convergence.errors import SnapshotFormatError
from pytest_convergence.snapshots.common import FLOAT8_DTYPES, is_str_table, reading
from pytest_convergence.snapshots.snapshot import Snapshot, TensorOrLoader

__all__ = ["read", "write"]

_NPZ_ENTRY = "__pytest_convergence__"
# NumPy has no bfloat16 or float8, so .npz stores them widened to a float type it has (exact)
# and records the original dtype for the reader to narrow back.
_NPZ_WIDENED: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "bfloat16": (torch.bfloat16, torch.float32),
    **{
        name: (getattr(torch, name), torch.float16)
        for name in FLOAT8_DTYPES
        if hasattr(torch, name)
    },
}
# Pairs where the narrow type is the top bits of the wide one: shifting the bits keeps NaN
# payloads that a value cast would canonicalize.
_TOP_BITS = frozenset(
    {(torch.bfloat16, torch.float32), (getattr(torch, "float8_e5m2", None), torch.float16)}
)
_SIGNED_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def read(path: Path) -> Snapshot:
    """Array headers now, each array when it is indexed; widened dtypes narrowed back."""
    with reading(path):
        dtypes = _npz_dtypes(path)
        info = _npz_info(path) if _NPZ_ENTRY in dtypes else {}
    step, metadata, widened = _checked_npz_info(path, info)
    loaders: dict[str, TensorOrLoader] = {}
    skipped: list[str] = []
    for name, dtype in dtypes.items():
        if name == _NPZ_ENTRY:
            continue
        if dtype.hasobject:
            raise SnapshotFormatError(
                path,
                f"tensor {name!r} holds Python objects (dtype {dtype}), which only pickle can "
                "read; pickles are refused because loading one can run code",
            )
        if dtype.kind == "c":
            raise SnapshotFormatError(
                path, f"tensor {name!r} is complex ({dtype}); LoGM needs reals"
            )
        if dtype.kind != "f":
            skipped.append(name)
        elif dtype.itemsize not in (2, 4, 8):
            raise SnapshotFormatError(path, f"tensor {name!r}: torch has no {dtype} dtype")
        else:
            loaders[name] = functools.partial(_npz_tensor, path, name, widened.get(name))
    return Snapshot(loaders, step=step, metadata=metadata, source=str(path), skipped=skipped)


def _npz_dtypes(path: Path) -> dict[str, np.dtype[Any]]:
    """Read only the array headers, so classifying tensors does not load them."""
    dtypes: dict[str, np.dtype[Any]] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                continue
            name = member.filename.removesuffix(".npy")
            if name in dtypes:
                raise SnapshotFormatError(path, f"two tensors are both named {name!r}")
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    dtypes[name] = np.lib.format.read_array_header_1_0(handle)[2]
                elif version == (2, 0):
                    dtypes[name] = np.lib.format.read_array_header_2_0(handle)[2]
                else:
                    dtypes[name] = _npz_array(path, name).dtype
    return dtypes


def _npz_array(path: Path, name: str) -> np.ndarray[Any, Any]:
    with np.load(path, allow_pickle=False) as archive:
        array: np.ndarray[Any, Any] = archive[name]
    return array


def _npz_info(path: Path) -> object:
    entry = _npz_array(path, _NPZ_ENTRY)
    if entry.shape != () or entry.dtype.kind != "U":
        raise SnapshotFormatError(path, f"{_NPZ_ENTRY!r} is not a JSON string")
    return json.loads(str(entry.item()))


def _checked_npz_info(
    path: Path, info: object
) -> tuple[int | None, dict[str, str], dict[str, torch.dtype]]:
    fields = info if isinstance(info, dict) else {}
    step = fields.get("step")
    metadata = fields.get("metadata", {})
    dtypes = fields.get("dtypes", {})
    valid = (
        isinstance(info, dict)
        and (step is None or (isinstance(step, int) and not isinstance(step, bool)))
        and is_str_table(metadata)
        and is_str_table(dtypes)
        and all(value in _NPZ_WIDENED for value in dtypes.values())
    )
    if not valid:
        raise SnapshotFormatError(path, f"malformed {_NPZ_ENTRY!r} entry: {info!r}")
    return step, dict(metadata), {name: _NPZ_WIDENED[value][0] for name, value in dtypes.items()}


def _npz_tensor(path: Path, name: str, widened_from: torch.dtype | None) -> torch.Tensor:
    with reading(path, name):
        array = _npz_array(path, name)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.writeable:
            array = array.copy()
        tensor = torch.from_numpy(array)
        return tensor if widened_from is None else _narrow(tensor, widened_from)


def _widen(narrow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if (narrow.dtype, dtype) not in _TOP_BITS:
        return narrow.to(dtype)
    shift = 8 * (dtype.itemsize - narrow.element_size())
    bits = narrow.view(_SIGNED_BITS[narrow.element_size()]).to(_SIGNED_BITS[dtype.itemsize])
    return (bits << shift).view(dtype)


def _narrow(wide: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if (dtype, wide.dtype) not in _TOP_BITS:
        return wide.to(dtype)
    shift = 8 * (wide.element_size() - dtype.itemsize)
    bits = wide.view(_SIGNED_BITS[wide.element_size()]) >> shift
    return bits.to(_SIGNED_BITS[dtype.itemsize]).view(dtype)


def write(
    tensors: dict[str, torch.Tensor], step: int | None, metadata: dict[str, str], temp: Path
) -> None:
    """Write ``tensors`` to ``temp``, which ``save_snapshot`` then renames into place."""
    if _NPZ_ENTRY in tensors:
        raise ValueError(f"{_NPZ_ENTRY!r} is reserved in .npz snapshots; rename that tensor")
    widened = {name: str(t.dtype).removeprefix("torch.") for name, t in tensors.items()}
    widened = {name: dtype for name, dtype in widened.items() if dtype in _NPZ_WIDENED}
    info = json.dumps({"step": step, "metadata": metadata, "dtypes": widened})
    # Written member by member rather than with np.savez, whose keyword arguments would
    # collide with tensors named "file" or "allow_pickle".
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, tensor in tensors.items():
            array = _widen(tensor, _NPZ_WIDENED[widened[name]][1]) if name in widened else tensor
            _write_npy(archive, name, array.numpy())
        _write_npy(archive, _NPZ_ENTRY, np.array(info))


def _write_npy(archive: zipfile.ZipFile, name: str, array: np.ndarray[Any, Any]) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
        np.lib.format.write_array(handle, array, allow_pickle=False)
