"""What the snapshot format modules share: reserved names, error translation, atomic writes.

Every reader turns a library's own error on damaged input into a ``SnapshotFormatError`` that
names the file (and the tensor), so these helpers live once rather than in each format.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import secrets
import stat
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import safetensors
import torch

from pytest_convergence.errors import SnapshotFormatError

__all__ = [
    "FLOAT8_DTYPES",
    "READ_ERRORS",
    "RESERVED_PREFIX",
    "STEP_KEY",
    "brief",
    "create_new_file",
    "is_str_table",
    "is_weight",
    "parse_step",
    "reading",
    "write_atomically",
]

# Formats whose metadata is a flat str -> str table keep our fields under this prefix so they
# cannot collide with the user's keys or with keys other tools write (safetensors' "format").
RESERVED_PREFIX = "pytest_convergence."
STEP_KEY = RESERVED_PREFIX + "step"

# protobuf ships no type information, so its error class is looked up rather than imported.
_ProtobufDecodeError: type[Exception] = importlib.import_module(
    "google.protobuf.message"
).DecodeError

# What the readers raise on damaged input. Our own bugs (AttributeError, NameError) stay out.
READ_ERRORS: tuple[type[Exception], ...] = (
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

FLOAT8_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


@contextlib.contextmanager
def reading(
    path: Path, tensor: str | None = None, errors: tuple[type[Exception], ...] = READ_ERRORS
) -> Iterator[None]:
    """Turn a library's error on damaged input into one that names the file and tensor."""
    try:
        yield
    except SnapshotFormatError:
        raise
    except errors as exc:
        where = "" if tensor is None else f"tensor {tensor!r}: "
        raise SnapshotFormatError(path, f"{where}cannot be read: {brief(exc)}") from exc


def brief(exc: BaseException) -> str:
    """One line of a library message; torch's weights-only refusal is a page long."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = _weights_unpickler_reason(lines)
    if line is None:
        line = lines[0] if lines else ""
    elif _UNSUPPORTED_GLOBAL.search(line):
        line = f"torch.load(weights_only=True) refuses its pickled Python objects ({line})"
    else:
        line = f"torch.load(weights_only=True) cannot read its pickle ({line})"
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


_WEIGHTS_ONLY_FAILED = "Weights only load failed"
_WEIGHTS_UNPICKLER = "WeightsUnpickler error:"
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported global", re.IGNORECASE)


def _weights_unpickler_reason(lines: list[str]) -> str | None:
    """torch's reason for a weights-only refusal, without its advice.

    The reason follows the marker on its line or, in recent releases, on the next one; for a
    legacy checkpoint it is a line of its own. The advice to allow-list the global is dropped,
    because that global is what would run code.
    """
    for index, line in enumerate(lines):
        if _WEIGHTS_UNPICKLER not in line:
            continue
        reason = line[line.index(_WEIGHTS_UNPICKLER) :]
        if reason == _WEIGHTS_UNPICKLER and index + 1 < len(lines):
            reason = f"{reason} {lines[index + 1]}"
        return reason.split(" Please use `torch.serialization", 1)[0]
    if lines and lines[0].startswith(_WEIGHTS_ONLY_FAILED):
        return next((ln for ln in lines[1:] if not ln.startswith("Check the documentation")), None)
    return None


def is_weight(path: Path, name: str, dtype: torch.dtype) -> bool:
    if dtype.is_complex:
        raise SnapshotFormatError(path, f"tensor {name!r} is complex ({dtype}); LoGM needs reals")
    return dtype.is_floating_point


def parse_step(path: Path, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise SnapshotFormatError(path, f"stored step {text!r} is not an integer") from None


def is_str_table(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    )


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write to a sibling temp file, then rename: a crash never leaves half a file at target."""
    temp, mode = _new_temp_file(target)
    try:
        write(temp)
        # Some writers (safetensors) replace the file with a private 0o600 one of their own.
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def create_new_file(path: Path) -> int:
    """Create ``path`` empty, failing if it exists; returns its permission bits.

    Created with mode 0o666 so the umask applies, as for any file ``open`` creates, unlike
    mkstemp's private 0o600: a snapshot is as readable as the rest of a user's files.
    """
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return stat.S_IMODE(os.stat(path).st_mode)


def _new_temp_file(target: Path) -> tuple[Path, int]:
    while True:
        temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return temp, create_new_file(temp)
        except FileExistsError:
            continue
