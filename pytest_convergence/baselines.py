"""Baselines: one reviewed JSON file per workload, and one per known-good candidate.

A region is only as trustworthy as the run that recorded it, so every file carries its provenance
and a run under another torch, dtype or device is told so instead of being judged silently
against limits that may not hold there. Files are meant to be read in code review: fixed key
order, one value per line, floats written with enough digits to round-trip exactly. Several test
processes (pytest-xdist workers) may record the same baseline at once, so every write is atomic
and the writes to one file are serialized.

Importing this module imports torch (through :mod:`pytest_convergence.regions`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_convergence.errors import BaselineError
from pytest_convergence.regions import Calibration, ParameterRegion, Region

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from pytest_convergence.environment import EnvironmentInfo

__all__ = [
    "MISMATCH_POLICIES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Baseline",
    "BaselineError",
    "BaselineMismatchWarning",
    "Provenance",
    "baseline_path",
    "check_compatibility",
    "describe_changes",
    "load_baseline",
    "mismatches",
    "record_baseline",
    "save_baseline",
]

SCHEMA = "pytest-convergence/baseline"
# 2: per-parameter radial-shift region (radial_center, radial_spread).
# 3: per-parameter z limits (bias_z_limit, radial_z_limit) from Student's t at the calibration's
#    degrees of freedom.
# 4: per-step rounding_scale, the floor under a parameter's error scale, spreads and noise limit.
# Older files are refused with the command that re-records them: they would judge differently.
SCHEMA_VERSION = 4
MISMATCH_POLICIES = ("warn", "fail")
RECORD_HINT = "pytest --convergence --convergence-record <the tests that use it>"
# A re-record summary is read in a terminal and a pull request: the biggest changes, not all.
MAX_CHANGE_LINES = 10
# Relative changes below this are float noise between two recordings, not worth a line.
_NEGLIGIBLE_CHANGE = 5e-4
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
_TORCH_MINOR = re.compile(r"^\s*(\d+)\.(\d+)")
# mkstemp creates files readable by their owner only; a baseline is shared, committed data.
_NEW_FILE_MODE = 0o644
_WINDOWS_REPLACE_ATTEMPTS = 20


class BaselineMismatchWarning(UserWarning):
    """A baseline was recorded under another torch version, dtype or device: its limits may be
    too tight or too loose here, but a stale baseline is more often fine than not."""


@dataclass(frozen=True)
class Provenance:
    """Where a baseline's numbers came from, so a reviewer and a later run can tell whether they
    still apply. Seeds, steps and run counts live in ``region.calibration``."""

    workload: str
    candidate: str | None
    dtype: str
    device: str
    torch_version: str
    plugin_version: str
    threads: int
    created: str  # ISO-8601, UTC

    @classmethod
    def from_environment(
        cls,
        environment: EnvironmentInfo,
        *,
        workload: str,
        candidate: str | None,
        dtype: str,
        created: datetime | None = None,
    ) -> Provenance:
        """Provenance of a recording made now (or at ``created``) in ``environment``."""
        moment = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
        return cls(
            workload=workload,
            candidate=candidate,
            dtype=dtype,
            device=environment.device,
            torch_version=environment.torch_version,
            plugin_version=environment.plugin_version,
            threads=environment.threads,
            created=moment.isoformat(timespec="seconds"),
        )


@dataclass(frozen=True)
class Baseline:
    """A loaded baseline; ``path`` is kept so every later message can name the file."""

    path: Path
    region: Region
    provenance: Provenance


# --- file names ---------------------------------------------------------------------------------


def baseline_path(folder: Path, workload: str, candidate: str | None = None) -> Path:
    """The file for ``workload`` (or for its known-good ``candidate``) inside ``folder``.

    Names are reduced to characters that are safe on every file system and in a shell, so a
    workload called ``"vit/tiny"`` cannot write outside the folder.
    """
    stem = _safe_name(workload, "workload")
    if candidate is not None:
        stem += "--" + _safe_name(candidate, "candidate")
    return Path(folder) / f"{stem}.json"


def _safe_name(name: str, role: str) -> str:
    if not name:
        raise ValueError(f"the {role} name of a baseline must not be empty")
    return _UNSAFE_NAME_CHARACTERS.sub("_", name)


# --- loading ------------------------------------------------------------------------------------


def load_baseline(path: Path) -> Baseline:
    """Read and fully validate a baseline; a damaged file is a :class:`BaselineError`.

    A missing file raises ``FileNotFoundError`` unchanged: callers treat "never recorded"
    differently from "recorded but broken".
    """
    path = Path(path)
    try:
        region, provenance = _parse_document(_decode_json(_read_text(path)))
    except _InvalidError as error:
        raise BaselineError(path, str(error)) from None
    return Baseline(path=path, region=region, provenance=provenance)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as error:
        raise _InvalidError("", f"cannot read the file: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise _InvalidError("", f"not UTF-8 text: {error.reason}") from None


def _decode_json(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise _InvalidError(
            "", f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except RecursionError:
        raise _InvalidError("", "JSON nested too deeply to be a baseline") from None


class _InvalidError(Exception):
    """A problem at one place in a document, raised before the file's path is attached."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate keys, which a botched merge of two recordings leaves behind and which
    ``json`` would otherwise resolve silently in favour of the last one."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _InvalidError("", f"duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


_Parser = Callable[[object, str], Any]


def _parse_document(document: object) -> tuple[Region, Provenance]:
    top = _mapping(document, "the top level")
    _check_schema(top)
    _check_keys(top, "the top level", _TOP_KEYS)
    provenance = Provenance(**_parse_fields(top["provenance"], "provenance", _PROVENANCE_FIELDS))
    calibration = Calibration(
        **_parse_fields(top["calibration"], "calibration", _CALIBRATION_FIELDS)
    )
    parameters = _parameters(top["parameters"], calibration.steps)
    region = Region(
        calibration=calibration,
        parameters=parameters,
        global_logm_delta=_interval(top["global_logm_delta"], "global_logm_delta"),
        global_logm_gap_limit=_limit(top["global_logm_gap_limit"], "global_logm_gap_limit"),
    )
    return region, provenance


def _check_schema(top: dict[str, object]) -> None:
    """Checked before anything else, so a future layout reads as "upgrade", not as damage."""
    schema = top.get("schema")
    if schema != SCHEMA:
        raise _InvalidError(
            "schema", f"expected {SCHEMA!r}, found {schema!r}: not a pytest-convergence baseline"
        )
    if "schema_version" not in top:
        raise _InvalidError("the top level", "missing key 'schema_version'")
    version = _positive(top["schema_version"], "schema_version")
    if version > SCHEMA_VERSION:
        raise _InvalidError(
            "schema_version",
            f"{version} was written by a newer pytest-convergence; upgrade "
            f"(this version reads schema_version {SCHEMA_VERSION})",
        )
    if version < SCHEMA_VERSION:
        raise _InvalidError(
            "schema_version",
            f"{version} was written by an older pytest-convergence whose regions lack checks "
            f"this version makes (schema_version {SCHEMA_VERSION}); re-record it: {RECORD_HINT}",
        )


def _parse_fields(value: object, where: str, parsers: dict[str, _Parser]) -> dict[str, Any]:
    mapping = _mapping(value, where)
    _check_keys(mapping, where, tuple(parsers))
    return {key: parse(mapping[key], f"{where}.{key}") for key, parse in parsers.items()}


def _parameters(value: object, steps: int) -> dict[str, ParameterRegion]:
    parameters: dict[str, ParameterRegion] = {}
    for name, entry in _mapping(value, "parameters").items():
        where = f"parameters[{json.dumps(name)}]"
        parameter = ParameterRegion(name=name, **_parse_fields(entry, where, _PARAMETER_FIELDS))
        _check_steps(parameter, where, steps)
        parameters[name] = parameter
    return parameters


def _check_steps(parameter: ParameterRegion, where: str, steps: int) -> None:
    """Per-step limits are looked up by step index: a short list would judge later steps
    against the wrong step's limit."""
    per_step = ("bias_center", "radial_center", "error_scale", "noise_scale", "noise_limit")
    for key in (*per_step, "rounding_scale"):
        found = len(getattr(parameter, key))
        if found != steps:
            raise _InvalidError(
                f"{where}.{key}",
                f"{found} per-step values, but calibration.steps is {steps}: "
                "per-step lists must all have one value per step",
            )


def _mapping(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _InvalidError(where, f"expected a JSON object, found {_kind(value)}")
    return value


def _check_keys(mapping: dict[str, object], where: str, expected: tuple[str, ...]) -> None:
    missing = [key for key in expected if key not in mapping]
    if missing:
        raise _InvalidError(where, "missing key " + ", ".join(repr(key) for key in missing))
    unexpected = [key for key in mapping if key not in expected]
    if unexpected:
        raise _InvalidError(where, "unexpected key " + ", ".join(repr(key) for key in unexpected))


def _kind(value: object) -> str:
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


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _InvalidError(where, f"expected a string, found {_kind(value)}")
    return value


def _optional_string(value: object, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _timestamp(value: object, where: str) -> str:
    text = _string(value, where)
    try:
        # Python 3.10's fromisoformat does not know the "Z" suffix that other tools write.
        datetime.fromisoformat(text.removesuffix("Z") + ("+00:00" if text.endswith("Z") else ""))
    except ValueError:
        raise _InvalidError(where, f"{text!r} is not an ISO-8601 timestamp") from None
    return text


def _integer(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidError(where, f"expected an integer, found {_kind(value)}")
    return value


def _count(value: object, where: str) -> int:
    number = _integer(value, where)
    if number < 0:
        raise _InvalidError(where, f"cannot be negative, found {number}")
    return number


def _positive(value: object, where: str) -> int:
    number = _integer(value, where)
    if number < 1:
        raise _InvalidError(where, f"must be at least 1, found {number}")
    return number


def _real(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _InvalidError(where, f"expected a number, found {_kind(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise _InvalidError(where, "number too large for a float") from None
    if not math.isfinite(number):
        shown = "NaN" if math.isnan(number) else repr(number)
        raise _InvalidError(where, f"{shown} is not allowed: baseline values must be finite")
    return number


def _limit(value: object, where: str) -> float:
    number = _real(value, where)
    if number < 0:
        raise _InvalidError(where, f"a limit or spread cannot be negative, found {number!r}")
    return number


def _optional_limit(value: object, where: str) -> float | None:
    return None if value is None else _limit(value, where)


def _array(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise _InvalidError(where, f"expected an array, found {_kind(value)}")
    return value


def _limits(value: object, where: str) -> tuple[float, ...]:
    return tuple(_limit(item, f"{where}[{i}]") for i, item in enumerate(_array(value, where)))


def _reals(value: object, where: str) -> tuple[float, ...]:
    return tuple(_real(item, f"{where}[{i}]") for i, item in enumerate(_array(value, where)))


def _seeds(value: object, where: str) -> tuple[int, ...]:
    return tuple(_integer(item, f"{where}[{i}]") for i, item in enumerate(_array(value, where)))


def _interval(value: object, where: str) -> tuple[float, float]:
    items = _array(value, where)
    if len(items) != 2:
        raise _InvalidError(where, f"expected [low, high], found {len(items)} values")
    low, high = _real(items[0], f"{where}[0]"), _real(items[1], f"{where}[1]")
    if low > high:
        raise _InvalidError(where, f"low {low!r} is above high {high!r}")
    return low, high


_TOP_KEYS = (
    "schema",
    "schema_version",
    "provenance",
    "calibration",
    "global_logm_delta",
    "global_logm_gap_limit",
    "parameters",
)
_PROVENANCE_FIELDS: dict[str, _Parser] = {
    "workload": _string,
    "candidate": _optional_string,
    "dtype": _string,
    "device": _string,
    "torch_version": _string,
    "plugin_version": _string,
    "threads": _positive,
    "created": _timestamp,
}
_CALIBRATION_FIELDS: dict[str, _Parser] = {
    "kind": _string,
    "description": _string,
    "tolerance": _optional_limit,
    "gradient_tolerance": _optional_limit,
    "draws": _positive,
    "candidate": _optional_string,
    "seeds": _seeds,
    "steps": _positive,
}
_PARAMETER_FIELDS: dict[str, _Parser] = {
    "count": _count,
    "bias_center": _reals,
    "bias_spread": _limit,
    "bias_z_limit": _limit,
    "radial_center": _reals,
    "radial_spread": _limit,
    "radial_z_limit": _limit,
    "error_scale": _limits,
    "noise_scale": _limits,
    "noise_limit": _limits,
    "zero_change_limit": _count,
    "logm_gap_limit": _limit,
    "rounding_scale": _limits,
}


# --- saving -------------------------------------------------------------------------------------


def save_baseline(path: Path, region: Region, provenance: Provenance) -> Path:
    """Write a baseline so that no reader, and no other writer, ever sees half of it.

    The region is validated exactly as :func:`load_baseline` would, before anything touches the
    disk: a baseline that was saved can always be loaded.
    """
    path = Path(path)
    text = _serialize(path, region, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path):
        _write_atomically(path, text)
    return path


def record_baseline(path: Path, region: Region, provenance: Provenance) -> list[str]:
    """Save, and summarize the change against the file being replaced.

    Reading the old file and writing the new one happen under one lock, so two workers
    re-recording the same baseline each describe the change against what was really on disk.
    """
    path = Path(path)
    text = _serialize(path, region, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path):
        changes = _changes_against_file(path, region)
        _write_atomically(path, text)
    return changes


def _changes_against_file(path: Path, region: Region) -> list[str]:
    try:
        old = load_baseline(path)
    except FileNotFoundError:
        steps = region.calibration.steps
        return [f"new baseline: {len(region.parameters)} parameters, {steps} steps"]
    except BaselineError as error:
        return [f"replaces an unreadable baseline ({error.reason})"]
    return describe_changes(old.region, region) or ["no changes"]


def _serialize(path: Path, region: Region, provenance: Provenance) -> str:
    """The file's text; ``ValueError`` naming ``path`` if the region could not be loaded back."""
    document = _document(region, provenance)
    try:
        for name, parameter in region.parameters.items():
            if parameter.name != name:
                raise _InvalidError(
                    f"parameters[{json.dumps(name)}]", f"holds parameter {parameter.name!r}"
                )
        _parse_document(document)
    except _InvalidError as error:
        raise ValueError(f"{path}: refusing to write an invalid baseline: {error}") from None
    # json writes floats with repr(), the shortest text that reads back as the same float.
    return json.dumps(document, indent=1, allow_nan=False) + "\n"


def _document(region: Region, provenance: Provenance) -> dict[str, object]:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "provenance": _fields_of(provenance),
        "calibration": _fields_of(region.calibration),
        "global_logm_delta": list(region.global_logm_delta),
        "global_logm_gap_limit": region.global_logm_gap_limit,
        "parameters": {
            name: _fields_of(parameter, skip="name")
            for name, parameter in region.parameters.items()
        },
    }


def _fields_of(instance: Provenance | Calibration | ParameterRegion, skip: str = "") -> Any:
    return {
        field.name: _plain(getattr(instance, field.name))
        for field in fields(instance)
        if field.name != skip
    }


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialize every read-decide-write of one baseline across processes.

    The lock lives on a sibling ``<name>.lock`` file rather than on the baseline itself, because
    the baseline is replaced (a new inode) on every write; the lock file is created once and left
    in place, since deleting it would let a waiting process lock an unlinked file.
    """
    if sys.platform == "win32":
        # fcntl.flock is POSIX-only. msvcrt.locking could serialize writers on Windows; without
        # it, this fallback relies on the atomic os.replace alone: readers still never see a torn
        # file and concurrent writers never corrupt one (the last replace wins), but
        # record_baseline may summarize changes against a file another writer is replacing.
        yield
    else:
        lock_path = path.with_name(path.name + ".lock")
        with open(lock_path, "a") as handle:  # "a": create if missing, never truncate
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename over: the file is old or new, never half."""
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
        _replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(path.parent)


def _mode_for(path: Path) -> int:
    """Keep an existing file's permissions; a re-record should not change who can read it."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return _NEW_FILE_MODE


def _replace(source: str, target: Path) -> None:
    if sys.platform == "win32":
        # Windows refuses to replace a file that another process holds open (a reader inside
        # load_baseline): retry briefly rather than fail a recording over a transient conflict.
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


# --- compatibility ------------------------------------------------------------------------------


def mismatches(provenance: Provenance, *, torch_version: str, dtype: str, device: str) -> list[str]:
    """How this run differs from the one that recorded ``provenance``, in words.

    Only differences that move the numbers count: torch by major.minor (a patch release or a
    local build tag changes no kernel a region could notice) and device by type (``cuda:0`` and
    ``cuda:1`` run the same kernels).
    """
    found: list[str] = []
    if _torch_minor(provenance.torch_version) != _torch_minor(torch_version):
        found.append(f"torch {provenance.torch_version} (baseline) vs {torch_version} (this run)")
    if _dtype_name(provenance.dtype) != _dtype_name(dtype):
        found.append(f"dtype {provenance.dtype} (baseline) vs {dtype} (this run)")
    if _device_type(provenance.device) != _device_type(device):
        found.append(f"device {provenance.device} (baseline) vs {device} (this run)")
    return found


def _torch_minor(version: str) -> str:
    match = _TORCH_MINOR.match(version)
    return f"{match[1]}.{match[2]}" if match else version.strip()


def _dtype_name(dtype: str) -> str:
    return dtype.strip().removeprefix("torch.")


def _device_type(device: str) -> str:
    return device.strip().lower().split(":", 1)[0]


def check_compatibility(
    baseline: Baseline, *, torch_version: str, dtype: str, device: str, policy: str = "warn"
) -> None:
    """Tell the user when ``baseline`` was recorded under other conditions than this run.

    ``"warn"`` suits local runs, where a slightly stale baseline is usually still right;
    ``"fail"`` suits CI, where a verdict must come from a baseline recorded for that CI.
    """
    if policy not in MISMATCH_POLICIES:
        raise ValueError(
            f"unknown baseline mismatch policy {policy!r}; "
            f"choose one of {', '.join(MISMATCH_POLICIES)}"
        )
    found = mismatches(baseline.provenance, torch_version=torch_version, dtype=dtype, device=device)
    if not found:
        return
    reason = (
        f"recorded under a different environment: {'; '.join(found)}. Its limits may not hold "
        f"here; re-record it in this environment with: {RECORD_HINT}"
    )
    if policy == "fail":
        raise BaselineError(baseline.path, reason)
    warnings.warn(BaselineMismatchWarning(f"{baseline.path}: {reason}"), stacklevel=2)


# --- re-record summaries ------------------------------------------------------------------------


def describe_changes(old: Region, new: Region) -> list[str]:
    """What a re-record changed, biggest first, for a reviewer deciding whether to accept it.

    Empty when nothing changed beyond float noise; at most :data:`MAX_CHANGE_LINES` lines.
    """
    lines = _structure_changes(old, new)
    ranked = sorted(_parameter_changes(old, new), key=lambda change: -change[0])
    lines.extend(text for _, text in ranked)
    if len(lines) > MAX_CHANGE_LINES:
        hidden = len(lines) - (MAX_CHANGE_LINES - 1)
        lines = [*lines[: MAX_CHANGE_LINES - 1], f"... and {hidden} more changes"]
    return lines


def _structure_changes(old: Region, new: Region) -> list[str]:
    lines: list[str] = []
    added = [name for name in new.parameters if name not in old.parameters]
    removed = [name for name in old.parameters if name not in new.parameters]
    if added:
        lines.append(f"parameters added: {', '.join(added)}")
    if removed:
        lines.append(f"parameters removed: {', '.join(removed)}")
    if old.calibration.steps != new.calibration.steps:
        lines.append(f"steps: {old.calibration.steps} -> {new.calibration.steps}")
    if old.global_logm_delta != new.global_logm_delta:
        lines.append(
            f"global LoGM delta: {_interval_text(old.global_logm_delta)} -> "
            f"{_interval_text(new.global_logm_delta)}"
        )
    return lines


def _interval_text(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:.4g}, {interval[1]:.4g}]"


def _parameter_changes(old: Region, new: Region) -> Iterator[tuple[float, str]]:
    """One (size, line) per parameter whose noise limit, bias spread or z limit moved noticeably."""
    for name, after in new.parameters.items():
        before = old.parameters.get(name)
        if before is None:
            continue
        parts: list[tuple[float, str]] = []
        noise = _largest_step_change(before.noise_limit, after.noise_limit)
        if noise is not None:
            size, text, step = noise
            parts.append((size, f"noise limit {text} (step {step})"))
        spread = _relative_change(before.bias_spread, after.bias_spread)
        if spread is not None:
            parts.append((spread[0], f"bias spread {spread[1]}"))
        z_limit = _relative_change(before.bias_z_limit, after.bias_z_limit)
        if z_limit is not None:
            parts.append((z_limit[0], f"bias z limit {z_limit[1]}"))
        if parts:
            yield max(size for size, _ in parts), f"{name}: " + ", ".join(t for _, t in parts)


def _largest_step_change(
    before: tuple[float, ...], after: tuple[float, ...]
) -> tuple[float, str, int] | None:
    largest: tuple[float, str, int] | None = None
    # Not strict: a re-record may change the step count, which is reported on its own line.
    for step, (old, new) in enumerate(zip(before, after, strict=False), start=1):
        change = _relative_change(old, new)
        if change is not None and (largest is None or change[0] > largest[0]):
            largest = (change[0], change[1], step)
    return largest


def _relative_change(old: float, new: float) -> tuple[float, str] | None:
    """(size for ranking, text), or None when the change is float noise."""
    if old == new:
        return None
    if old == 0:
        return math.inf, f"0 -> {new:.3g}"
    relative = (new - old) / abs(old)
    if abs(relative) < _NEGLIGIBLE_CHANGE:
        return None
    return abs(relative), f"{relative:+.1%}"
