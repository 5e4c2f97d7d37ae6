"""ONNX initializers (``.onnx``), with external data confined to the model's folder."""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from pytest_convergence.errors import SnapshotFormatError, UnsafeExternalDataError
from pytest_convergence.snapshots.common import (
    FLOAT8_DTYPES,
    STEP_KEY,
    create_new_file,
    parse_step,
    reading,
    write_atomically,
)
from pytest_convergence.snapshots.snapshot import Snapshot, TensorOrLoader

__all__ = ["external_data_file", "read", "write"]

# By name, because older torch releases lack the unsigned and float8 dtypes.
_TORCH_TO_ONNX: dict[torch.dtype, int] = {
    getattr(torch, dtype): getattr(onnx.TensorProto, code)
    for dtype, code in (
        ("float32", "FLOAT"),
        ("float64", "DOUBLE"),
        ("float16", "FLOAT16"),
        ("bfloat16", "BFLOAT16"),
        *((name, name.upper().replace("_", "")) for name in FLOAT8_DTYPES),
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


def read(path: Path) -> Snapshot:
    """The floating initializers, each loaded (or memory-mapped) when it is indexed."""
    with reading(path):
        model = onnx.load(str(path), load_external_data=False)
    # Protobuf parses an empty or foreign file as an empty message rather than failing.
    if not model.HasField("graph") or model.ir_version <= 0:
        raise SnapshotFormatError(path, "not an ONNX model (no graph or IR version)")
    _check_onnx_strings(path, model)
    props = {prop.key: prop.value for prop in model.metadata_props}
    step = parse_step(path, props.pop(STEP_KEY, None))
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
    with reading(path, name):
        # A bytearray copy: torch warns about tensors over read-only bytes.
        return _from_buffer(bytearray(raw), dtype, dims, count)


def _typed_tensor(
    path: Path, proto: onnx.TensorProto, dtype: torch.dtype, dims: tuple[int, ...], count: int
) -> torch.Tensor:
    with reading(path, proto.name):
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
        what = "is not a regular file" if file.exists() else "does not exist"
        raise SnapshotFormatError(path, f"tensor {name!r}: external data file {location!r} {what}")
    with reading(path, name):
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
    with reading(model, tensor):
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
    with reading(path, name):
        if count == 0:
            return torch.empty(dims, dtype=dtype)
        with open(file, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        # The tensor keeps the mapping alive; it is unmapped when the tensor is freed.
        return _from_buffer(mapped, dtype, dims, count, offset)


def _from_buffer(
    buffer: Any, dtype: torch.dtype, dims: Sequence[int], count: int, offset: int = 0
) -> torch.Tensor:
    # torch.frombuffer rejects an empty buffer, and empty tensors are legal weights.
    if count == 0:
        return torch.empty(tuple(dims), dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(tuple(dims))


def write(
    tensors: dict[str, torch.Tensor],
    target: Path,
    step: int | None,
    metadata: dict[str, str],
    *,
    external_data: bool,
) -> None:
    """Write an initializers-only model atomically, its external data file first if any."""
    model = _onnx_model(tensors, step, metadata)
    if not external_data:
        write_atomically(target, lambda temp: onnx.save_model(model, str(temp)))
        return
    data_file = external_data_file(target)
    # Both files are written in a private sibling folder, then moved: the data first, so the
    # model never appears at its final name before the data it points to.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        mode = create_new_file(staging / target.name)
        onnx.save_model(
            model,
            str(staging / target.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file.name,
            size_threshold=0,
        )
        if (staging / data_file.name).exists():
            # onnx writes the data file private (0o600); it gets the model file's mode.
            os.chmod(staging / data_file.name, mode)
            os.replace(staging / data_file.name, data_file)
        os.chmod(staging / target.name, mode)
        os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def external_data_file(target: Path) -> Path:
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
        props[STEP_KEY] = str(step)
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
