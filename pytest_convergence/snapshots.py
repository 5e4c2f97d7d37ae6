"""Weight snapshots from any framework, behind one lazy mapping type.

Convergence checks compare weights that were written by many tools: PyTorch checkpoints,
Hugging Face safetensors, NumPy archives from JAX or TensorFlow code, ONNX exports. Reading them
all into one ``Snapshot`` lets LoGM code stay format-blind, and reading tensors lazily lets it
stream a multi-gigabyte checkpoint one tensor at a time instead of holding all of it in memory.

Snapshot files are often downloaded, so reading never executes code: ``.pt`` files are loaded
weights-only, ``.npz`` files without pickle, and ONNX external data only from the model's folder.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import mmap
import os
import pickle
import re
import secrets
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeAlias

import numpy as np
import onnx
import safetensors
import safetensors.torch
import torch
from onnx import numpy_helper

from pytest_convergence._formats import SUPPORTED_SUFFIXES
from pytest_convergence.errors import SnapshotFormatError, UnsafeExternalDataError

__all__ = ["Snapshot", "load_snapshot", "save_snapshot"]

TensorOrLoader: TypeAlias = "torch.Tensor | Callable[[], torch.Tensor]"

# Formats whose metadata is a flat str -> str table keep our fields under this prefix so they
# cannot collide with the user's keys or with keys other tools write (safetensors' "format").
_RESERVED_PREFIX = "pytest_convergence."
_STEP_KEY = _RESERVED_PREFIX + "step"
_ORDER_KEY = _RESERVED_PREFIX + "order"
_TORCH_ENTRY = "pytest_convergence"
_NPZ_ENTRY = "__pytest_convergence__"

# protobuf ships no type information, so its error class is looked up rather than imported.
_ProtobufDecodeError: type[Exception] = importlib.import_module(
    "google.protobuf.message"
).DecodeError

# What the readers raise on damaged input. Our own bugs (AttributeError, NameError) stay out.
_READ_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    KeyError,
    IndexError,
    TypeError,
    OverflowError,
    MemoryError,
    struct.error,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    safetensors.SafetensorError,
    _ProtobufDecodeError,
)

_FLOAT8 = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
# By name, because older torch releases lack the unsigned and float8 dtypes.
_TORCH_TO_ONNX: dict[torch.dtype, int] = {
    getattr(torch, dtype): getattr(onnx.TensorProto, code)
    for dtype, code in (
        ("float32", "FLOAT"),
        ("float64", "DOUBLE"),
        ("float16", "FLOAT16"),
        ("bfloat16", "BFLOAT16"),
        *((name, name.upper().replace("_", "")) for name in _FLOAT8),
        ("uint8", "UINT8"),
        ("int8", "INT8"),
        ("uint16", "UINT16"),
        ("int16", "INT16"),
        ("uint32", "UINT32"),
        ("int32", "INT32"),
        ("uint64", "UINT64"),
        ("int64", "INT64"),
        ("bool", "BOOL"),
    )
    if hasattr(torch, dtype) and hasattr(onnx.TensorProto, code)
}
_ONNX_TO_TORCH_FLOAT: dict[int, torch.dtype] = {
    code: dtype for dtype, code in _TORCH_TO_ONNX.items() if dtype.is_floating_point
}
_ONNX_DATA_TYPE_CODES = frozenset(onnx.TensorProto.DataType.values())
_ONNX_COMPLEX = frozenset({onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128})
_ONNX_NOT_WEIGHTS = frozenset(
    code
    for name, code in onnx.TensorProto.DataType.items()
    if name.startswith(("INT", "UINT")) or name in {"BOOL", "STRING"}
)
_SAFETENSORS_NOT_WEIGHTS = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
# NumPy has no bfloat16 or float8, so .npz stores them widened to a float type it has (exact)
# and records the original dtype for the reader to narrow back.
_NPZ_WIDENED: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "bfloat16": (torch.bfloat16, torch.float32),
    **{name: (getattr(torch, name), torch.float16) for name in _FLOAT8 if hasattr(torch, name)},
}
# Pairs where the narrow type is the top bits of the wide one: shifting the bits keeps NaN
# payloads that a value cast would canonicalize.
_TOP_BITS = frozenset(
    {(torch.bfloat16, torch.float32), (getattr(torch, "float8_e5m2", None), torch.float16)}
)
_SIGNED_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


def load_snapshot(path: str | os.PathLike[str], *, step: int | None = None) -> Snapshot:
    """Read a snapshot file; ``step`` overrides the step stored in the file, if any."""
    source = Path(path)
    kind = _format_of(source)
    if not source.is_file():
        raise SnapshotFormatError(source, "not a file" if source.exists() else "no such file")
    if source.stat().st_size == 0:
        raise SnapshotFormatError(source, "the file is empty")
    snapshot = _READERS[kind](source)
    if step is not None:
        snapshot.step = step
    return snapshot


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
    data_file = _external_data_file(target) if external_data else None
    _check_destination(target, data_file, overwrite=overwrite)
    tensors = _tensors_to_save(weights)
    if kind == "onnx":
        _write_onnx(tensors, target, step, checked, external_data=external_data)
    else:
        _write_atomically(target, functools.partial(_WRITERS[kind], tensors, step, checked))
    return target


# --- shared helpers ---------------------------------------------------------------------------


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise SnapshotFormatError(path, f"unknown suffix {suffix!r}" if suffix else "no suffix")
    return SUPPORTED_SUFFIXES[suffix]


@contextlib.contextmanager
def _reading(
    path: Path, tensor: str | None = None, errors: tuple[type[Exception], ...] = _READ_ERRORS
) -> Iterator[None]:
    """Turn a library's error on damaged input into one that names the file and tensor."""
    try:
        yield
    except SnapshotFormatError:
        raise
    except errors as exc:
        where = "" if tensor is None else f"tensor {tensor!r}: "
        raise SnapshotFormatError(path, f"{where}cannot be read: {_brief(exc)}") from exc


def _brief(exc: BaseException) -> str:
    """One line of a library message; torch's weights-only refusal is a page long."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
    if isinstance(exc, pickle.UnpicklingError):
        line = f"torch.load(weights_only=True) refuses its pickled Python objects ({line})"
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _is_weight(path: Path, name: str, dtype: torch.dtype) -> bool:
    if dtype.is_complex:
        raise SnapshotFormatError(path, f"tensor {name!r} is complex ({dtype}); LoGM needs reals")
    return dtype.is_floating_point


def _parse_step(path: Path, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise SnapshotFormatError(path, f"stored step {text!r} is not an integer") from None


def _check_step(step: object) -> None:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be an int or None, not {type(step).__name__}")


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Metadata must be str -> str because safetensors and ONNX store nothing richer."""
    checked = dict(metadata or {})
    for key, value in checked.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; got {key!r}: {value!r}")
        if key.startswith(_RESERVED_PREFIX):
            raise ValueError(f"metadata key {key!r}: the prefix {_RESERVED_PREFIX!r} is reserved")
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


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write to a sibling temp file, then rename: a crash never leaves half a file at target."""
    temp = _new_temp_file(target)
    try:
        write(temp)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def _new_temp_file(target: Path) -> Path:
    # Created with mode 0o666 so the umask applies, unlike mkstemp's private 0o600.
    while True:
        temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return temp


def _from_buffer(
    buffer: Any, dtype: torch.dtype, dims: Sequence[int], count: int, offset: int = 0
) -> torch.Tensor:
    # torch.frombuffer rejects an empty buffer, and empty tensors are legal weights.
    if count == 0:
        return torch.empty(tuple(dims), dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(tuple(dims))


# --- PyTorch ----------------------------------------------------------------------------------


def _read_torch(path: Path) -> Snapshot:
    # torch's unpickler rebuilds objects from the file's own instructions, so damaged input
    # can fail with nearly any exception (AttributeError included), not only the usual ones.
    with _reading(path, errors=(Exception,)):
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
    if not (fields and valid_step and _is_str_table(metadata)):
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
        elif isinstance(value, torch.Tensor) and _is_weight(path, name, value.dtype):
            tensors[name] = value.detach()
        else:
            skipped.append(name)


def _write_torch(
    tensors: dict[str, torch.Tensor], step: int | None, metadata: dict[str, str], temp: Path
) -> None:
    info = {"step": step, "metadata": metadata}
    torch.save({"state_dict": tensors, _TORCH_ENTRY: info}, temp)


# --- safetensors ------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> Snapshot:
    with _reading(path), safetensors.safe_open(str(path), framework="pt") as handle:
        names: list[str] = list(handle.keys())
        codes = {name: str(handle.get_slice(name).get_dtype()) for name in names}
        stored: dict[str, str] = dict(handle.metadata() or {})
    step = _parse_step(path, stored.pop(_STEP_KEY, None))
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
    with _reading(path, name), safetensors.safe_open(str(path), framework="pt") as handle:
        tensor: torch.Tensor = handle.get_tensor(name)
    if not _is_weight(path, name, tensor.dtype):
        raise SnapshotFormatError(path, f"tensor {name!r} has dtype {tensor.dtype}, not a float")
    return tensor


def _write_safetensors(
    tensors: dict[str, torch.Tensor], step: int | None, metadata: dict[str, str], temp: Path
) -> None:
    stored = {**metadata, _ORDER_KEY: json.dumps(list(tensors))}
    if step is not None:
        stored[_STEP_KEY] = str(step)
    safetensors.torch.save_file(tensors, str(temp), metadata=stored)


# --- NumPy ------------------------------------------------------------------------------------


def _read_npz(path: Path) -> Snapshot:
    with _reading(path):
        dtypes = _npz_dtypes(path)
        info = _npz_info(path) if _NPZ_ENTRY in dtypes else {}
    step, metadata, widened = _checked_npz_info(path, info)
    loaders: dict[str, TensorOrLoader] = {}
    skipped: list[str] = []
    for name, dtype in dtypes.items():
        if name == _NPZ_ENTRY:
            continue
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
        and _is_str_table(metadata)
        and _is_str_table(dtypes)
        and all(value in _NPZ_WIDENED for value in dtypes.values())
    )
    if not valid:
        raise SnapshotFormatError(path, f"malformed {_NPZ_ENTRY!r} entry: {info!r}")
    return step, dict(metadata), {name: _NPZ_WIDENED[value][0] for name, value in dtypes.items()}


def _is_str_table(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    )


def _npz_tensor(path: Path, name: str, widened_from: torch.dtype | None) -> torch.Tensor:
    with _reading(path, name):
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


def _write_npz(
    tensors: dict[str, torch.Tensor], step: int | None, metadata: dict[str, str], temp: Path
) -> None:
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


# --- ONNX -------------------------------------------------------------------------------------


def _read_onnx(path: Path) -> Snapshot:
    with _reading(path):
        model = onnx.load(str(path), load_external_data=False)
    # Protobuf parses an empty or foreign file as an empty message rather than failing.
    if not model.HasField("graph") or model.ir_version <= 0:
        raise SnapshotFormatError(path, "not an ONNX model (no graph or IR version)")
    _check_onnx_strings(path, model)
    props = {prop.key: prop.value for prop in model.metadata_props}
    step = _parse_step(path, props.pop(_STEP_KEY, None))
    loaders: dict[str, TensorOrLoader] = {}
    skipped: list[str] = []
    for proto in model.graph.initializer:
        if proto.name in loaders or proto.name in skipped:
            raise SnapshotFormatError(path, f"two initializers are both named {proto.name!r}")
        dtype = _onnx_weight_dtype(path, proto)
        if dtype is None:
            skipped.append(proto.name)
        else:
            loaders[proto.name] = _onnx_loader(path, proto, dtype)
    return Snapshot(loaders, step=step, metadata=props, source=str(path), skipped=skipped)


def _check_onnx_strings(path: Path, model: onnx.ModelProto) -> None:
    """Protobuf returns bytes, not str, for a string field that is not valid UTF-8."""
    texts: list[object] = [text for prop in model.metadata_props for text in (prop.key, prop.value)]
    for proto in model.graph.initializer:
        texts.append(proto.name)
        texts += [text for entry in proto.external_data for text in (entry.key, entry.value)]
    if not all(isinstance(text, str) for text in texts):
        raise SnapshotFormatError(path, "a tensor name or metadata string is not valid UTF-8")


def _onnx_weight_dtype(path: Path, proto: onnx.TensorProto) -> torch.dtype | None:
    code = proto.data_type
    if code in _ONNX_TO_TORCH_FLOAT:
        return _ONNX_TO_TORCH_FLOAT[code]
    if code in _ONNX_NOT_WEIGHTS:
        return None
    kind = onnx.TensorProto.DataType.Name(code) if code in _ONNX_DATA_TYPE_CODES else str(code)
    what = "is complex; LoGM needs reals" if code in _ONNX_COMPLEX else "has no torch dtype"
    raise SnapshotFormatError(path, f"tensor {proto.name!r} of ONNX type {kind} {what}")


def _onnx_loader(path: Path, proto: onnx.TensorProto, dtype: torch.dtype) -> TensorOrLoader:
    """Check sizes now, so a damaged file fails at load time rather than mid-iteration."""
    name = proto.name
    dims = tuple(proto.dims)
    if any(dim < 0 for dim in dims):
        raise SnapshotFormatError(path, f"tensor {name!r} has negative dimensions {dims}")
    count = math.prod(dims)
    nbytes = count * dtype.itemsize
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        file, offset = _external_data(path, proto, nbytes)
        return functools.partial(
            _mapped_tensor,
            path,
            name,
            file=file,
            offset=offset,
            dtype=dtype,
            dims=dims,
            count=count,
        )
    if proto.HasField("raw_data"):
        raw = proto.raw_data
        if len(raw) != nbytes:
            raise SnapshotFormatError(
                path, f"tensor {name!r} holds {len(raw)} bytes of data; its shape needs {nbytes}"
            )
        return functools.partial(
            _raw_tensor, path, name, raw=raw, dtype=dtype, dims=dims, count=count
        )
    return functools.partial(_typed_tensor, path, proto, dtype, dims, count)


def _raw_tensor(
    path: Path, name: str, *, raw: bytes, dtype: torch.dtype, dims: tuple[int, ...], count: int
) -> torch.Tensor:
    with _reading(path, name):
        # A bytearray copy: torch warns about tensors over read-only bytes.
        return _from_buffer(bytearray(raw), dtype, dims, count)


def _typed_tensor(
    path: Path, proto: onnx.TensorProto, dtype: torch.dtype, dims: tuple[int, ...], count: int
) -> torch.Tensor:
    with _reading(path, proto.name):
        if dtype in (torch.float32, torch.float64):
            array = numpy_helper.to_array(proto)
            return torch.from_numpy(array if array.flags.writeable else array.copy())
        # ONNX keeps 16- and 8-bit floats as bit patterns in int32_data; numpy cannot hold
        # bfloat16 or float8, so the bits are reinterpreted by torch.
        bits = np.asarray(proto.int32_data, dtype=np.int32)
        if bits.size != count:
            raise ValueError(f"{bits.size} values stored; its shape {dims} needs {count}")
        container = np.uint16 if dtype.itemsize == 2 else np.uint8
        return torch.from_numpy(bits.astype(container)).view(dtype).reshape(dims)


def _external_data(path: Path, proto: onnx.TensorProto, nbytes: int) -> tuple[Path, int]:
    name = proto.name
    entries = {entry.key: entry.value for entry in proto.external_data}
    location = entries.get("location", "")
    if not location:
        raise SnapshotFormatError(path, f"tensor {name!r}: external data without a location")
    file = _safe_external_file(path, name, location)
    offset = _byte_count(path, name, entries, "offset", 0)
    length = _byte_count(path, name, entries, "length", nbytes)
    if length != nbytes:
        raise SnapshotFormatError(
            path, f"tensor {name!r}: external length {length} but its shape needs {nbytes} bytes"
        )
    if not file.is_file():
        raise SnapshotFormatError(
            path, f"tensor {name!r}: external data file {location!r} does not exist"
        )
    with _reading(path, name):
        size = file.stat().st_size
    if offset + nbytes > size:
        raise SnapshotFormatError(
            path,
            f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie beyond the end of "
            f"{location!r} ({size} bytes)",
        )
    return file, offset


def _safe_external_file(model: Path, tensor: str, location: str) -> Path:
    """Refuse locations that escape the model's folder: a downloaded model must not read
    arbitrary files (keys, /etc/passwd) into tensors that a report might then echo."""
    parts = re.split(r"[\\/]", location)
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).anchor or ".." in parts:
        raise UnsafeExternalDataError(
            model,
            f"tensor {tensor!r}: external data location {location!r} must be a relative path "
            "inside the model's folder, without '..'",
        )
    with _reading(model, tensor):
        folder = os.path.realpath(model.parent)
        resolved = os.path.realpath(os.path.join(folder, location))
    if os.path.commonpath([folder, resolved]) != folder:
        raise UnsafeExternalDataError(
            model,
            f"tensor {tensor!r}: external data location {location!r} resolves to {resolved}, "
            "outside the model's folder",
        )
    return Path(resolved)


def _byte_count(path: Path, name: str, entries: dict[str, str], key: str, default: int) -> int:
    text = entries.get(key)
    if text is None:
        return default
    if not text.isdecimal():
        raise SnapshotFormatError(path, f"tensor {name!r}: external {key} {text!r} is invalid")
    return int(text)


def _mapped_tensor(
    path: Path,
    name: str,
    *,
    file: Path,
    offset: int,
    dtype: torch.dtype,
    dims: tuple[int, ...],
    count: int,
) -> torch.Tensor:
    """Map the external file instead of reading it: only the pages the caller touches load.

    ACCESS_COPY gives a private writable mapping, so torch does not warn about read-only
    memory and writes through the tensor never reach the file.
    """
    with _reading(path, name):
        if count == 0:
            return torch.empty(dims, dtype=dtype)
        with open(file, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        # The tensor keeps the mapping alive; it is unmapped when the tensor is freed.
        return _from_buffer(mapped, dtype, dims, count, offset)


def _write_onnx(
    tensors: dict[str, torch.Tensor],
    target: Path,
    step: int | None,
    metadata: dict[str, str],
    *,
    external_data: bool,
) -> None:
    model = _onnx_model(tensors, step, metadata)
    if not external_data:
        _write_atomically(target, lambda temp: onnx.save_model(model, str(temp)))
        return
    data_file = _external_data_file(target)
    # Both files are written in a private sibling folder, then moved: the data first, so the
    # model never appears at its final name before the data it points to.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        onnx.save_model(
            model,
            str(staging / target.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file.name,
            size_threshold=0,
        )
        if (staging / data_file.name).exists():
            os.replace(staging / data_file.name, data_file)
        os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _external_data_file(target: Path) -> Path:
    return target.with_name(f"{target.name}.data")


def _onnx_model(
    tensors: dict[str, torch.Tensor], step: int | None, metadata: dict[str, str]
) -> onnx.ModelProto:
    """A graph of initializers only: ONNX has no other container for bare weights."""
    graph = onnx.helper.make_graph(
        [],
        "pytest_convergence_snapshot",
        [],
        [],
        initializer=[_onnx_tensor(name, tensor) for name, tensor in tensors.items()],
    )
    model = onnx.helper.make_model(graph, producer_name="pytest_convergence")
    props = dict(metadata)
    if step is not None:
        props[_STEP_KEY] = str(step)
    onnx.helper.set_model_props(model, props)
    return model


def _onnx_tensor(name: str, tensor: torch.Tensor) -> onnx.TensorProto:
    if tensor.dtype not in _TORCH_TO_ONNX:
        raise ValueError(f"{name!r}: ONNX has no type for {tensor.dtype}")
    proto = onnx.TensorProto()
    proto.name = name
    proto.data_type = _TORCH_TO_ONNX[tensor.dtype]
    proto.dims.extend(tensor.shape)
    # raw_data is little-endian bytes for every type, bfloat16 included, which numpy lacks.
    proto.raw_data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return proto


_READERS: dict[str, Callable[[Path], Snapshot]] = {
    "torch": _read_torch,
    "safetensors": _read_safetensors,
    "npz": _read_npz,
    "onnx": _read_onnx,
}
_WRITERS: dict[str, Callable[[dict[str, torch.Tensor], int | None, dict[str, str], Path], None]] = {
    "torch": _write_torch,
    "safetensors": _write_safetensors,
    "npz": _write_npz,
}
