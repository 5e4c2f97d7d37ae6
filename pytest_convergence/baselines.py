"""Baselines: one reviewed JSON file per workload, and one per known-good candidate.

A region is only as trustworthy as the run that recorded it, so every file carries its provenance
and a run under another torch, dtype, device or thread count is told so instead of being judged
silently against limits that may not hold there; a file that no longer describes its workload's
model (stale) is refused. Files live inside the baselines folder and are meant to be read in
code review: fixed key order, one value per line, floats written with enough digits to
round-trip exactly. Several test processes (pytest-xdist workers) may record the same baseline
at once, so every write is atomic and the writes to one file are serialized.

Length: one file format from name to re-record summary (names and confinement, loading,
staleness, saving, compatibility, change summaries). Each part reads or writes the same
schema declaration and provenance fields; split, the parts would share those private
declarations across modules.

Importing this module imports torch (through :mod:`pytest_convergence.regions`).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_convergence import jsonfile
from pytest_convergence.config import MISMATCH_POLICIES, RECORD_COMMAND
from pytest_convergence.errors import BaselineError
from pytest_convergence.power import power_document, read_power
from pytest_convergence.precision import DEFAULT_POLICY
from pytest_convergence.regions import (
    MIN_BIAS_SPREAD,
    MIN_NOISE_LOG_SPREAD,
    Calibration,
    ParameterRegion,
    Region,
)

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
    "check_current",
    "check_recordable",
    "confined",
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
# 5: per-parameter noise_log_spread and noise_z_limit: update noise combined over steps.
# 6: the power report (optional; a version-5 file reads as a baseline without one).
# Older files are refused with the command that re-records them: they would judge differently.
SCHEMA_VERSION = 6
OLDEST_READ_VERSION = 5
RECORD_HINT = f"{RECORD_COMMAND} <the tests that use it>"
# The ini line that lets baselines live outside the baselines folder.
OUTSIDE_OPT_IN = "convergence_allow_external_baselines = true"
# A re-record summary is read in a terminal and a pull request: the biggest changes, not all.
MAX_CHANGE_LINES = 10
# Relative changes below this are float noise between two recordings, not worth a line.
_NEGLIGIBLE_CHANGE = 5e-4
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
_TORCH_MINOR = re.compile(r"^\s*(\d+)\.(\d+)")


class BaselineMismatchWarning(UserWarning):
    """A baseline was recorded under another torch version, dtype, device or thread count: its
    limits may be too tight or too loose here, but a stale baseline is more often fine than
    not."""


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


def confined(folder: Path, path: Path, *, argument: str | None = None) -> Path:
    """``path``, once it is known to lie inside the baselines ``folder`` with ``..`` and symbolic
    links resolved; ``ValueError`` otherwise, naming the ``baseline=`` ``argument`` if given.

    A test's ``baseline=`` (or a link committed into the folder) must not make a check read, or
    a recording write, a file elsewhere on the machine: as ONNX external data is confined to
    its model's folder. Links between files inside the folder are fine.
    """
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(path)
    try:
        inside = os.path.commonpath([real_folder, real]) == real_folder
    except ValueError:  # another drive
        inside = False
    if inside:
        return path
    named = f"baseline={argument!r}" if argument is not None else str(path)
    raise ValueError(
        f"{named} resolves to {real}, outside the baselines folder {folder}: name a file inside "
        f"it, or set '{OUTSIDE_OPT_IN}' in the pytest ini file to read and record baselines "
        "anywhere"
    )


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
    region, provenance = jsonfile.load_file(path, _parse_document, BaselineError)
    return Baseline(path=path, region=region, provenance=provenance)


def _parse_document(document: object) -> tuple[Region, Provenance]:
    top = jsonfile.fields(_SCHEMA.body(document), jsonfile.TOP, _TOP_FIELDS, optional=("power",))
    calibration: Calibration = top["calibration"]
    for name, parameter in top["parameters"].items():
        _check_steps(parameter, jsonfile.entry("parameters", name), calibration.steps)
    region = Region(
        calibration=calibration,
        parameters=top["parameters"],
        global_logm_delta=top["global_logm_delta"],
        global_logm_gap_limit=top["global_logm_gap_limit"],
        power=top.get("power"),
    )
    return region, top["provenance"]


def _parameters(value: object, where: str) -> dict[str, ParameterRegion]:
    return {
        name: ParameterRegion(
            name=name, **jsonfile.fields(entry, jsonfile.entry(where, name), _PARAMETER_FIELDS)
        )
        for name, entry in jsonfile.mapping(value, where).items()
    }


def _check_steps(parameter: ParameterRegion, where: str, steps: int) -> None:
    """Per-step limits are looked up by step index: a short list would judge later steps
    against the wrong step's limit."""
    per_step = ("bias_center", "radial_center", "error_scale", "noise_scale", "noise_limit")
    for key in (*per_step, "rounding_scale"):
        found = len(getattr(parameter, key))
        if found != steps:
            raise jsonfile.DocumentError(
                jsonfile.key(where, key),
                f"{found} per-step values, but calibration.steps is {steps}: "
                "per-step lists must all have one value per step",
            )


def _limit(value: object, where: str) -> float:
    number = jsonfile.finite(value, where)
    if number < 0:
        raise jsonfile.DocumentError(
            where, f"a limit or spread cannot be negative, found {number!r}"
        )
    return number


def _spread(value: object, where: str) -> float:
    """A spread divides every score: calibration floors it, and a hand-edited zero would crash
    the judge (or a tiny one turn rounding into a verdict)."""
    number = _limit(value, where)
    if number < MIN_BIAS_SPREAD:
        raise jsonfile.DocumentError(
            where,
            f"{number!r} is below the calibration floor {MIN_BIAS_SPREAD:g} of every spread; "
            f"re-record it: {RECORD_HINT}",
        )
    return number


def _noise_log_spread(value: object, where: str) -> float:
    number = _limit(value, where)
    if number < MIN_NOISE_LOG_SPREAD:
        raise jsonfile.DocumentError(
            where,
            f"{number!r} is below the calibration floor {MIN_NOISE_LOG_SPREAD:g} of the noise's "
            f"log spread; re-record it: {RECORD_HINT}",
        )
    return number


def _z_limit(value: object, where: str) -> float:
    number = _limit(value, where)
    if number == 0:
        raise jsonfile.DocumentError(where, "must be positive: a z limit of 0 fails every check")
    return number


_limits = jsonfile.array_of(_limit)
_reals = jsonfile.array_of(jsonfile.finite)
_optional_string = jsonfile.optional(jsonfile.string)
_optional_limit = jsonfile.optional(_limit)

# Calibration fields written only when they are not their default (a region of the fp32 policy
# without a random stream): every baseline recorded before they existed reads as it was written.
_DEFAULTED_CALIBRATION = ("random_stream", "precision")

_SCHEMA = jsonfile.Schema(
    SCHEMA,
    SCHEMA_VERSION,
    "a pytest-convergence baseline",
    too_old="whose regions lack checks this version makes "
    f"(schema_version {OLDEST_READ_VERSION} and later); re-record it: {RECORD_HINT}",
    oldest=OLDEST_READ_VERSION,
)
_PROVENANCE = jsonfile.record(
    Provenance,
    {
        "workload": jsonfile.string,
        "candidate": _optional_string,
        "dtype": jsonfile.string,
        "device": jsonfile.string,
        "torch_version": jsonfile.string,
        "plugin_version": jsonfile.string,
        "threads": jsonfile.positive,
        "created": jsonfile.timestamp,
    },
)
_CALIBRATION = jsonfile.record(
    Calibration,
    {
        "kind": jsonfile.string,
        "description": jsonfile.string,
        "tolerance": _optional_limit,
        "gradient_tolerance": _optional_limit,
        "draws": jsonfile.positive,
        "candidate": _optional_string,
        "seeds": jsonfile.array_of(jsonfile.integer),
        "steps": jsonfile.positive,
        "random_stream": jsonfile.boolean,
        "precision": jsonfile.non_empty_string,
    },
    optional=_DEFAULTED_CALIBRATION,
)
_PARAMETER_FIELDS: dict[str, jsonfile.Parser[Any]] = {
    "count": jsonfile.count,
    "bias_center": _reals,
    "bias_spread": _spread,
    "bias_z_limit": _z_limit,
    "radial_center": _reals,
    "radial_spread": _spread,
    "radial_z_limit": _z_limit,
    "error_scale": _limits,
    "noise_scale": _limits,
    "noise_limit": _limits,
    "noise_log_spread": _noise_log_spread,
    "noise_z_limit": _z_limit,
    "zero_change_limit": jsonfile.count,
    "logm_gap_limit": _limit,
    "rounding_scale": _limits,
}
# In the order of the file, after the schema header.
_TOP_FIELDS: dict[str, jsonfile.Parser[Any]] = {
    "provenance": _PROVENANCE,
    "calibration": _CALIBRATION,
    "global_logm_delta": jsonfile.interval,
    "global_logm_gap_limit": _limit,
    "parameters": _parameters,
    "power": read_power,
}


# --- staleness ----------------------------------------------------------------------------------

# A stale baseline's message names the first few parameters of each kind, then counts the rest.
_NAMES_SHOWN = 5


def check_current(
    baseline: Baseline, *, workload: str, parameters: Mapping[str, int], rerecord: str
) -> None:
    """Refuse a baseline that no longer describes ``workload``, whose model has ``parameters``
    (name -> number of weights): recorded for another workload, or for a model whose parameters
    were since added, removed or resized. Its limits would judge the wrong tensors, or judge a
    widened layer by a narrower one's statistics; ``rerecord`` is the command that fixes it."""
    __tracebackhide__ = True
    problems: list[str] = []
    recorded_for = baseline.provenance.workload
    if recorded_for != workload:
        problems.append(f"recorded for workload {recorded_for!r}, not {workload!r}")
    stored = baseline.region.parameters
    resized = [
        f"parameter {name!r} has {count:,} weights in the model, {stored[name].count:,} in the "
        "baseline"
        for name, count in parameters.items()
        if name in stored and stored[name].count != count
    ]
    problems += resized[:_NAMES_SHOWN]
    if len(resized) > _NAMES_SHOWN:
        problems.append(f"{len(resized) - _NAMES_SHOWN} more parameters resized")
    added = [name for name in parameters if name not in stored]
    if added:
        problems.append(f"model parameters missing from the baseline: {_names(added)}")
    removed = [name for name in stored if name not in parameters]
    if removed:
        problems.append(f"baseline parameters the model no longer has: {_names(removed)}")
    if problems:
        raise BaselineError(
            baseline.path, f"stale baseline: {'; '.join(problems)}; re-record it: {rerecord}"
        )


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_NAMES_SHOWN])
    hidden = len(names) - _NAMES_SHOWN
    return shown + (f" and {hidden} more" if hidden > 0 else "")


# --- saving -------------------------------------------------------------------------------------


def save_baseline(path: Path, region: Region, provenance: Provenance) -> Path:
    """Write a baseline so that no reader, and no other writer, ever sees half of it.

    The region is validated exactly as :func:`load_baseline` would, before anything touches the
    disk: a baseline that was saved can always be loaded.
    """
    path = Path(path)
    text = _serialize(path, region, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    with jsonfile.exclusive_lock(path):
        jsonfile.write_text_file(path, text, overwrite=True)
    return path


def record_baseline(path: Path, region: Region, provenance: Provenance) -> list[str]:
    """Save, and summarize the change against the file being replaced.

    Reading the old file and writing the new one happen under one lock, so two workers
    re-recording the same baseline each describe the change against what was really on disk.
    A file whose region and provenance would stay the same (its ``created`` time aside) is left
    as it was, so "no changes" is true of the file; a read-only one is never replaced.
    """
    path = Path(path)
    text = _serialize(path, region, provenance)
    check_recordable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with jsonfile.exclusive_lock(path):
        old = _current(path)
        if isinstance(old, Baseline) and _unchanged(old, region, provenance):
            return ["no changes"]
        changes = _changes(old, region, provenance)
        if path.exists() and not path.stat().st_mode & stat.S_IWUSR:
            raise BaselineError(
                path,
                f"read-only: recording would change it, and will not replace a protected file; "
                f"make it writable (chmod u+w {path}) to re-record it",
            )
        jsonfile.write_text_file(path, text, overwrite=True)
    return changes


def check_recordable(path: Path) -> None:
    """Refuse, before anything is calibrated, a baseline path that no file can be written to."""
    if Path(path).is_dir():
        raise BaselineError(
            path, "is a folder, not a baseline file; remove it or name another file"
        )


def _current(path: Path) -> Baseline | BaselineError | None:
    """The baseline at ``path``, the error that makes it unreadable, or None if there is none."""
    try:
        return load_baseline(path)
    except FileNotFoundError:
        return None
    except BaselineError as error:
        return error


def _unchanged(old: Baseline, region: Region, provenance: Provenance) -> bool:
    return old.region == region and not _provenance_changes(old.provenance, provenance)


def _changes(
    old: Baseline | BaselineError | None, region: Region, provenance: Provenance
) -> list[str]:
    if old is None:
        steps = region.calibration.steps
        return [f"new baseline: {len(region.parameters)} parameters, {steps} steps"]
    if isinstance(old, BaselineError):
        return [f"replaces an unreadable baseline ({old.reason})"]
    lines = []
    moved = _provenance_changes(old.provenance, provenance)
    if moved:
        lines.append(f"provenance: {', '.join(moved)}")
    lines += describe_changes(old.region, region)
    if old.region.power != region.power:
        lines.append("power report " + ("added" if old.region.power is None else "re-measured"))
    if not lines:
        # The region differs (else the file would have been left alone), by float noise only.
        lines.append(f"region changed by less than {_NEGLIGIBLE_CHANGE:.2%} anywhere (float noise)")
    return lines


def _provenance_changes(old: Provenance, new: Provenance) -> list[str]:
    """What a recording changes besides its time: the run it comes from."""
    return [
        f"{field.name} {getattr(old, field.name)} -> {getattr(new, field.name)}"
        for field in fields(Provenance)
        if field.name != "created" and getattr(old, field.name) != getattr(new, field.name)
    ]


def _serialize(path: Path, region: Region, provenance: Provenance) -> str:
    """The file's text; ``ValueError`` naming ``path`` if the region could not be loaded back."""
    document = _document(region, provenance)
    try:
        for name, parameter in region.parameters.items():
            if parameter.name != name:
                raise jsonfile.DocumentError(
                    jsonfile.entry("parameters", name), f"holds parameter {parameter.name!r}"
                )
        _parse_document(document)
    except jsonfile.DocumentError as error:
        raise ValueError(f"{path}: refusing to write an invalid baseline: {error}") from None
    # json writes floats with repr(), the shortest text that reads back as the same float.
    return json.dumps(document, indent=1, allow_nan=False) + "\n"


def _document(region: Region, provenance: Provenance) -> dict[str, object]:
    return {
        **_SCHEMA.header(),
        "provenance": _fields_of(provenance),
        "calibration": _calibration_fields(region.calibration),
        "global_logm_delta": list(region.global_logm_delta),
        "global_logm_gap_limit": region.global_logm_gap_limit,
        "parameters": {
            name: _fields_of(parameter, skip="name")
            for name, parameter in region.parameters.items()
        },
    } | ({"power": power_document(region.power)} if region.power is not None else {})


def _calibration_fields(calibration: Calibration) -> dict[str, object]:
    written: dict[str, object] = _fields_of(calibration)
    if not calibration.random_stream:
        del written["random_stream"]
    if calibration.precision == DEFAULT_POLICY:
        del written["precision"]
    return written


def _fields_of(instance: Provenance | Calibration | ParameterRegion, skip: str = "") -> Any:
    return {
        field.name: _plain(getattr(instance, field.name))
        for field in fields(instance)
        if field.name != skip
    }


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


# --- compatibility ------------------------------------------------------------------------------


def mismatches(
    provenance: Provenance,
    *,
    torch_version: str,
    dtype: str,
    device: str,
    threads: int | None = None,
) -> list[str]:
    """How this run differs from the one that recorded ``provenance``, in words.

    Only differences that move the numbers count: torch by major.minor (a patch release or a
    local build tag changes no kernel a region could notice), device by type (``cuda:0`` and
    ``cuda:1`` run the same kernels) and, when given, the torch thread count (parallel kernels
    split their sums by thread, so their rounding, and a calibration's limits, move with it).
    """
    found: list[str] = []
    if _torch_minor(provenance.torch_version) != _torch_minor(torch_version):
        found.append(f"torch {provenance.torch_version} (baseline) vs {torch_version} (this run)")
    if _dtype_name(provenance.dtype) != _dtype_name(dtype):
        found.append(f"dtype {provenance.dtype} (baseline) vs {dtype} (this run)")
    if _device_type(provenance.device) != _device_type(device):
        found.append(f"device {provenance.device} (baseline) vs {device} (this run)")
    if threads is not None and provenance.threads != threads:
        found.append(f"threads {provenance.threads} (baseline) vs {threads} (this run)")
    return found


def _torch_minor(version: str) -> str:
    match = _TORCH_MINOR.match(version)
    return f"{match[1]}.{match[2]}" if match else version.strip()


def _dtype_name(dtype: str) -> str:
    return dtype.strip().removeprefix("torch.")


def _device_type(device: str) -> str:
    return device.strip().lower().split(":", 1)[0]


def check_compatibility(
    baseline: Baseline,
    *,
    torch_version: str,
    dtype: str,
    device: str,
    policy: str = "warn",
    threads: int | None = None,
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
    found = mismatches(
        baseline.provenance,
        torch_version=torch_version,
        dtype=dtype,
        device=device,
        threads=threads,
    )
    if not found:
        return
    reason = (
        f"recorded under a different environment: {'; '.join(found)}. Its limits may not hold "
        f"here; re-record it in this environment with: {RECORD_HINT}"
    )
    if threads is not None and baseline.provenance.threads != threads:
        reason += (
            f" (or check with --convergence-threads {baseline.provenance.threads}; pinning "
            "convergence_threads in the ini file keeps recording and checking alike)"
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
        before, after = _interval_texts(old.global_logm_delta, new.global_logm_delta)
        lines.append(f"global LoGM delta: {before} -> {after}")
    return lines


def _interval_texts(old: tuple[float, float], new: tuple[float, float]) -> tuple[str, str]:
    """Both intervals with 4 significant digits, or as many more as show how they differ."""
    for digits in range(4, 18):
        before, after = _interval_text(old, digits), _interval_text(new, digits)
        if before != after:
            break
    return before, after


def _interval_text(interval: tuple[float, float], digits: int) -> str:
    return f"[{interval[0]:.{digits}g}, {interval[1]:.{digits}g}]"


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
