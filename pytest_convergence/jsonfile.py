"""Strict JSON files: one way to read, check and write every file this package keeps.

Baselines, region files, traces, landscape slices and norm evolutions are read by people in code
review and by later runs that must not judge against a damaged file. So reading refuses what
``json`` lets through (a duplicate key, left by a botched merge and resolved silently in favour
of the last one), and every problem names its place in the document, such as
``parameters["fc1.weight"].noise_limit[3]``; the format module then names the file, through its
own :class:`~pytest_convergence.errors.FileFormatError` subclass. A format reads as a declaration
of its fields::

    _SCHEMA = Schema("pytest-convergence/baseline", 4, "a pytest-convergence baseline")
    _PROVENANCE = record(Provenance, {"workload": string, "threads": positive, ...})

    def load_baseline(path):
        return load_file(path, _parse, BaselineError)  # "path: provenance.threads: expected ..."

    def _parse(document):
        top = fields(_SCHEMA.body(document), TOP, {"provenance": _PROVENANCE, ...})

A parser is a function ``(value, where) -> parsed`` raising :class:`DocumentError` at ``where``;
:func:`record`, :func:`array_of`, :func:`dict_of` and :func:`optional` build larger ones from
smaller ones. Measurement files keep the Inf and NaN of a diverged run as text
(:func:`dumps_text_floats`, :func:`text_float`). Every file is written by
:func:`write_text_file`, atomically, under :func:`exclusive_lock` where several processes may
read, decide and write the same file.

Nothing here imports torch, so the CLI validates files and prints its help quickly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from pytest_convergence.errors import FileFormatError

if sys.platform != "win32":
    import fcntl

__all__ = [
    "TOP",
    "DocumentError",
    "ErrorFactory",
    "Parser",
    "Schema",
    "array_of",
    "boolean",
    "check_keys",
    "count",
    "decode",
    "dict_of",
    "dumps_text_floats",
    "encode_non_finite",
    "entry",
    "exclusive_lock",
    "fields",
    "finite",
    "integer",
    "interval",
    "key",
    "load_file",
    "load_text",
    "mapping",
    "non_empty_string",
    "optional",
    "positive",
    "read_text",
    "record",
    "string",
    "text_float",
    "timestamp",
    "write_text_file",
]

T = TypeVar("T")
Parser: TypeAlias = Callable[[object, str], T]
# Turns (path, "where: problem") into the format's own FileFormatError subclass.
ErrorFactory: TypeAlias = Callable[[str, str], FileFormatError]

# The location of the document itself; keys directly under it are named alone ("provenance").
TOP = ""
# JSON has no Inf or NaN: a trace stores them as these strings (repr of the float).
_NON_FINITE_TEXT = ("inf", "-inf", "nan")
# mkstemp creates files readable by their owner only; these files are shared, committed data.
_NEW_FILE_MODE = 0o644
_WINDOWS_REPLACE_ATTEMPTS = 20


class DocumentError(Exception):
    """A problem at one place in a document, raised before the file's path is attached.

    ``where`` is None for a problem with the text as a whole (invalid JSON, a duplicate key).
    """

    def __init__(self, where: str | None, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(problem if where is None else f"{where or 'the top level'}: {problem}")


# --- locations ----------------------------------------------------------------------------------


def key(where: str, name: str) -> str:
    """The location of key ``name`` of the object at ``where``: ``calibration.steps``."""
    return f"{where}.{name}" if where else name


def entry(where: str, name: str) -> str:
    """The location of a user-named entry, quoted because the name may hold dots:
    ``parameters["fc1.weight"]``."""
    return f"{where}[{json.dumps(name)}]"


def _item(where: str, index: int) -> str:
    return f"{where}[{index}]"


# --- reading ------------------------------------------------------------------------------------


def load_file(path: Path, parse: Callable[[object], T], error: ErrorFactory) -> T:
    """Read, decode and ``parse`` the file at ``path``; any problem is ``error(path, ...)``.

    A missing file raises ``FileNotFoundError`` unchanged: callers treat "never recorded"
    differently from "recorded but broken".
    """
    try:
        return parse(decode(read_text(path)))
    except DocumentError as problem:
        raise error(str(path), str(problem)) from None


def load_text(text: str, parse: Callable[[object], T], *, source: str, error: ErrorFactory) -> T:
    """Decode and ``parse`` ``text`` that came from ``source`` (a file name, or ``rank 0``)."""
    try:
        return parse(decode(text))
    except DocumentError as problem:
        raise error(source, str(problem)) from None


def read_text(path: Path) -> str:
    """The file's UTF-8 text; ``FileNotFoundError`` passes, other failures are problems.

    Only a regular file (or a link to one) is read: opening a named pipe blocks until a writer
    comes, which would hang a test run on a hostile or botched checkout.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise DocumentError(None, f"not a regular file ({_file_kind(mode)})")
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as error:
        raise DocumentError(None, f"cannot read the file: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DocumentError(None, f"not UTF-8 text: {error.reason}") from None


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a file"


def decode(text: str) -> object:
    """``json.loads``, refusing duplicate keys, with the line and column of a syntax error."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise DocumentError(
            None, f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except RecursionError:
        raise DocumentError(None, "JSON nested too deeply to be read") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate keys, which a botched merge of two recordings leaves behind and which
    ``json`` would otherwise resolve silently in favour of the last one."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise DocumentError(None, f"duplicate key {name!r} in a JSON object")
        result[name] = value
    return result


@dataclass(frozen=True)
class Schema:
    """The tag and layout version a file declares, checked before anything else so that a
    future layout reads as "upgrade", not as damage.

    ``kind`` completes "not ..." when the tag is wrong; ``too_old`` completes "N was written by
    an older pytest-convergence ..." and should say how to get a current file; ``version`` None:
    the file carries no ``schema_version``; ``oldest``: the earliest version still read (a
    later layout that only added optional fields), by default ``version`` alone.
    """

    tag: str
    version: int | None
    kind: str
    too_old: str = "that this version no longer reads"
    oldest: int | None = None

    def header(self) -> dict[str, object]:
        """The first keys of a file of this schema, in the order they are written."""
        if self.version is None:
            return {"schema": self.tag}
        return {"schema": self.tag, "schema_version": self.version}

    def body(self, document: object) -> dict[str, object]:
        """The top level of ``document`` without its header, once the header is checked."""
        top = mapping(document, TOP)
        found = top.get("schema")
        if found != self.tag:
            raise DocumentError(
                "schema", f"expected {self.tag!r}, found {found!r}: not {self.kind}"
            )
        if self.version is not None:
            self._check_version(top)
        header = self.header()
        return {name: value for name, value in top.items() if name not in header}

    def reader(self, parse: Parser[T]) -> Callable[[object], T]:
        """A parser of a whole document: the header checked, the rest read by ``parse``."""

        def read(document: object) -> T:
            return parse(self.body(document), TOP)

        return read

    def _check_version(self, top: dict[str, object]) -> None:
        assert self.version is not None
        if "schema_version" not in top:
            raise DocumentError(TOP, "missing key 'schema_version'")
        found = positive(top["schema_version"], "schema_version")
        if found > self.version:
            raise DocumentError(
                "schema_version",
                f"{found} was written by a newer pytest-convergence; upgrade "
                f"(this version reads schema_version {self.version})",
            )
        if found < (self.oldest if self.oldest is not None else self.version):
            raise DocumentError(
                "schema_version",
                f"{found} was written by an older pytest-convergence {self.too_old}",
            )


# --- objects ------------------------------------------------------------------------------------


def mapping(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise DocumentError(where, f"expected a JSON object, found {_kind(value)}")
    return value


def check_keys(
    found: Collection[str], where: str, expected: Collection[str], optional: Collection[str] = ()
) -> None:
    """Every missing and every unexpected key in one message: a hand-edited file is fixed in
    one round, not one key per run."""
    missing = [name for name in expected if name not in found and name not in optional]
    unexpected = [name for name in found if name not in expected]
    problems = []
    if missing:
        problems.append("missing key " + ", ".join(repr(name) for name in missing))
    if unexpected:
        problems.append("unexpected key " + ", ".join(repr(name) for name in unexpected))
    if problems:
        raise DocumentError(where, "; ".join(problems))


def fields(
    value: object,
    where: str,
    parsers: Mapping[str, Parser[Any]],
    *,
    optional: Collection[str] = (),
) -> dict[str, Any]:
    """The object at ``where`` parsed key by key; ``optional`` keys may be absent (and are then
    absent from the result, so a dataclass default applies)."""
    found = mapping(value, where)
    check_keys(found, where, parsers, optional)
    return {
        name: parse(found[name], key(where, name))
        for name, parse in parsers.items()
        if name in found
    }


def record(
    kind: Callable[..., T], parsers: Mapping[str, Parser[Any]], *, optional: Collection[str] = ()
) -> Parser[T]:
    """A parser that builds ``kind(**fields)`` from an object with exactly these keys."""

    def parse(value: object, where: str) -> T:
        return kind(**fields(value, where, parsers, optional=optional))

    return parse


def array_of(parse: Parser[T]) -> Parser[tuple[T, ...]]:
    """A parser of a JSON array whose items ``parse`` reads, each at its index."""

    def parse_array(value: object, where: str) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise DocumentError(where, f"expected an array, found {_kind(value)}")
        return tuple(parse(item, _item(where, index)) for index, item in enumerate(value))

    return parse_array


def dict_of(parse: Parser[T]) -> Parser[dict[str, T]]:
    """A parser of an object with user-chosen keys (parameter names) and ``parse``'s values."""

    def parse_dict(value: object, where: str) -> dict[str, T]:
        return {
            name: parse(item, entry(where, name)) for name, item in mapping(value, where).items()
        }

    return parse_dict


def optional(parse: Parser[T]) -> Parser[T | None]:
    """``parse``, or None for a JSON null."""

    def parse_optional(value: object, where: str) -> T | None:
        return None if value is None else parse(value, where)

    return parse_optional


def _kind(value: object) -> str:
    """What was found instead, as a reader of the file would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, (int, float, str)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- values -------------------------------------------------------------------------------------


def string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DocumentError(where, f"expected a string, found {_kind(value)}")
    return value


def non_empty_string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DocumentError(where, f"expected a non-empty string, found {_kind(value)}")
    return value


def boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise DocumentError(where, f"expected true or false, found {_kind(value)}")
    return value


def timestamp(value: object, where: str) -> str:
    """An ISO-8601 date and time, kept as written."""
    text = string(value, where)
    try:
        # Python 3.10's fromisoformat does not know the "Z" suffix that other tools write.
        datetime.fromisoformat(text.removesuffix("Z") + ("+00:00" if text.endswith("Z") else ""))
    except ValueError:
        raise DocumentError(where, f"{text!r} is not an ISO-8601 timestamp") from None
    return text


def integer(value: object, where: str) -> int:
    # bool is an int in Python, never in a file: true is no count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DocumentError(where, f"expected an integer, found {_kind(value)}")
    return value


def count(value: object, where: str) -> int:
    number = integer(value, where)
    if number < 0:
        raise DocumentError(where, f"cannot be negative, found {number}")
    return number


def positive(value: object, where: str) -> int:
    number = integer(value, where)
    if number < 1:
        raise DocumentError(where, f"must be at least 1, found {number}")
    return number


def finite(value: object, where: str) -> float:
    """A finite number, as a float: a limit of NaN would pass or fail every check silently."""
    if isinstance(value, str) and value.lower() in (*_NON_FINITE_TEXT, "infinity", "-infinity"):
        raise DocumentError(where, f"{value} is not allowed: values must be finite")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DocumentError(where, f"expected a number, found {_kind(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise DocumentError(where, "number too large for a float") from None
    if not math.isfinite(number):
        shown = "NaN" if math.isnan(number) else repr(number)
        raise DocumentError(where, f"{shown} is not allowed: values must be finite")
    return number


def interval(value: object, where: str) -> tuple[float, float]:
    """``[low, high]`` of finite numbers, low not above high."""
    if not isinstance(value, list):
        raise DocumentError(where, f"expected [low, high], found {_kind(value)}")
    if len(value) != 2:
        raise DocumentError(where, f"expected [low, high], found {len(value)} values")
    low, high = finite(value[0], _item(where, 0)), finite(value[1], _item(where, 1))
    if low > high:
        raise DocumentError(where, f"low {low!r} is above high {high!r}")
    return low, high


def text_float(value: object, where: str) -> float:
    """A number that may be Inf or NaN, stored as text by :func:`encode_non_finite`.

    A number is returned as written (an integer stays one), so a document read and written
    again is the same text.
    """
    if isinstance(value, str) and value in _NON_FINITE_TEXT:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DocumentError(where, f"expected a number, found {_kind(value)}")
    return value


# --- writing ------------------------------------------------------------------------------------


def encode_non_finite(value: Any) -> Any:
    """``value`` with every Inf and NaN float replaced by its text (and tuples by lists):
    measurements of a diverged run are kept, in a file every JSON reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {name: encode_non_finite(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_non_finite(item) for item in value]
    return value


def dumps_text_floats(document: dict[str, Any]) -> str:
    """The text of a measurement file: one value per line, Inf and NaN as text (read back by
    :func:`text_float`)."""
    return json.dumps(encode_non_finite(document), indent=1)


def write_text_file(path: Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` so that no reader ever sees half of it.

    A temp file in the same folder is written, fsynced, given the old file's mode (0644 for a
    new one) and moved into place; then the folder is fsynced, so a crash cannot bring back the
    old file. Without ``overwrite`` the move is a hard link, which fails rather than replaces
    when another process created the file in the meantime.
    """
    path = Path(path)
    _check_target(path, overwrite=overwrite)
    mode = _mode_for(path)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        _move_into_place(temporary, path, overwrite=overwrite)
    finally:
        # Gone after a replace; after a hard link (or a failure) this removes the temp name.
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    _sync_folder(path.parent)
    return path


def _check_target(path: Path, *, overwrite: bool) -> None:
    """Refuse, naming ``path``, what would otherwise fail halfway with the temp file's name."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file name")
    if not overwrite and path.exists():
        raise _exists(path)


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists; pass --force (overwrite=True) to replace it")


def _mode_for(path: Path) -> int:
    """Keep an existing file's permissions; a re-record should not change who can read it."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return _NEW_FILE_MODE


def _move_into_place(temporary: str, path: Path, *, overwrite: bool) -> None:
    if overwrite:
        _replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError:
        # Filesystems without hard links: the existence check above is the best we can do.
        _replace(temporary, path)


def _replace(source: str, target: Path) -> None:
    if sys.platform == "win32":
        # Windows refuses to replace a file that another process holds open (a reader of the
        # old file): retry briefly rather than fail a recording over a transient conflict.
        for attempt in range(_WINDOWS_REPLACE_ATTEMPTS):
            try:
                os.replace(source, target)
                return
            except PermissionError:
                if attempt == _WINDOWS_REPLACE_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)
    else:
        os.replace(source, target)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable, so a crash cannot bring back the old file."""
    # Skipped on Windows: folders cannot be opened for fsync there; NTFS journals the rename.
    if sys.platform != "win32":
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Serialize every read-decide-write of one file across processes (pytest-xdist workers).

    The lock lives on a sibling ``<name>.lock`` file rather than on the file itself, because the
    file is replaced (a new inode) on every write; the lock file is created once and left in
    place, since deleting it would let a waiting process lock an unlinked file. Not reentrant:
    a second lock of the same path in one process waits forever.
    """
    if sys.platform == "win32":
        # fcntl.flock is POSIX-only. msvcrt.locking could serialize writers on Windows; without
        # it, this fallback relies on the atomic replace alone: readers still never see a torn
        # file and concurrent writers never corrupt one (the last replace wins), but a writer
        # may decide on a file another writer is replacing.
        yield
    else:
        lock_path = path.with_name(path.name + ".lock")
        with open(lock_path, "a") as handle:  # "a": create if missing, never truncate
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
