"""LoGM-delta regions: the paper's method, offline, for weights written by any framework.

Shen et al. (2018) observed that the global LoGM of healthy training moves within a narrow range
from one iteration (or epoch) to the next, and published that range for three ImageNet models.
A region file is the simple form of the idea: one interval of global LoGM deltas at one
granularity, with where it came from. It is deliberately a different schema from the
co-simulation baselines (``pytest-convergence/baseline``), whose per-parameter statistics judge a
candidate against a reference run in lockstep; loading one as the other fails with a message that
says which file is which.

Nothing here imports torch, so the CLI validates region files and prints its help quickly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytest_convergence._version import __version__

__all__ = [
    "BASELINE_SCHEMA",
    "GRANULARITIES",
    "PAPER_CITATION",
    "PAPER_REGIONS",
    "REGION_SCHEMA",
    "REGION_SCHEMA_VERSION",
    "DeltaRecord",
    "LogmDeltaRegion",
    "PaperRegion",
    "RegionFileError",
    "RegionProvenance",
    "SnapshotRecord",
    "StepLogm",
    "consecutive_deltas",
    "dumps_region",
    "epoch_boundaries",
    "load_region",
    "measured_region",
    "paper_region",
    "region_bounds",
    "save_region",
    "write_text_file",
]

REGION_SCHEMA = "pytest-convergence/logm-delta-region"
REGION_SCHEMA_VERSION = 1
BASELINE_SCHEMA = "pytest-convergence/baseline"
GRANULARITIES = ("iteration", "epoch")
SOURCES = ("paper", "measured")
PAPER_CITATION = (
    "Shen et al. (2018), An empirical study of weights in deep convolutional neural networks "
    "and its application to training convergence, Table 1"
)
# A new file is shared, committed data: readable by everyone, like the co-simulation baselines.
_NEW_FILE_MODE = 0o644


@dataclass(frozen=True)
class PaperRegion:
    """One row of the paper's Table 1: a model's per-epoch divergence region."""

    model: str
    low: float
    high: float


# Shen et al. (2018), Table 1: full-size ImageNet, trained with Intel Caffe, per epoch.
PAPER_REGIONS: dict[str, PaperRegion] = {
    "googlenet-v1": PaperRegion("GoogLeNet-V1", -0.09817, 0.09665),
    "vgg16": PaperRegion("VGG-16", -0.13456, 0.01279),
    "resnet50": PaperRegion("ResNet-50", -0.03719, 0.03691),
}


class RegionFileError(ValueError):
    """A region file cannot be used: unreadable, malformed, or a file of another kind.

    The message starts with the file's path, because the fix is an edit or a re-run of
    ``pytest-convergence region`` for that one file.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[RegionFileError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class RegionProvenance:
    """Where a region's numbers came from, for a reviewer deciding whether they apply."""

    source: str  # "paper" or "measured"
    description: str
    created: str  # ISO-8601, UTC
    plugin_version: str
    paper: str | None = None
    dataset: str | None = None
    framework: str | None = None
    iterations_per_epoch: int | None = None
    epoch_every: int | None = None


@dataclass(frozen=True)
class SnapshotRecord:
    """One input of a measured region: enough to tell later whether the same files were used."""

    path: str
    step: int
    global_logm: float
    sha256: str | None = None


@dataclass(frozen=True)
class DeltaRecord:
    """The change of global LoGM from one snapshot to a later one."""

    from_step: int
    to_step: int
    delta: float


@dataclass(frozen=True)
class LogmDeltaRegion:
    """An interval of reasonable global LoGM deltas at one granularity.

    ``low`` and ``high`` already include the margin; ``deltas`` are the measured values the
    interval was taken from (empty for the paper's published regions).
    """

    model: str | None
    granularity: str
    low: float
    high: float
    margin: float
    provenance: RegionProvenance
    snapshots: tuple[SnapshotRecord, ...] = ()
    deltas: tuple[DeltaRecord, ...] = ()
    path: Path | None = field(default=None, compare=False)

    def contains(self, delta: float) -> bool:
        return self.low <= delta <= self.high

    def excess(self, delta: float) -> float:
        """How far outside the region ``delta`` lies (0 inside), in LoGM units."""
        if delta > self.high:
            return delta - self.high
        if delta < self.low:
            return self.low - delta
        return 0.0

    def describe(self) -> str:
        """One line: the interval, its granularity, and its origin."""
        origin = self.provenance.description
        model = f"{self.model}; " if self.model else ""
        return f"[{self.low:+.5g}, {self.high:+.5g}] per {self.granularity} ({model}{origin})"


@dataclass(frozen=True)
class StepLogm:
    """A snapshot's global LoGM at its training step."""

    step: int
    logm: float
    path: str


# --- the paper's regions ----------------------------------------------------------------------


def paper_region(key: str, *, created: datetime | None = None) -> LogmDeltaRegion:
    """The paper's published region for ``key`` (``googlenet-v1``, ``vgg16``, ``resnet50``)."""
    if key not in PAPER_REGIONS:
        known = ", ".join(PAPER_REGIONS)
        raise ValueError(f"no published region for {key!r}; the paper gives: {known}")
    row = PAPER_REGIONS[key]
    provenance = RegionProvenance(
        source="paper",
        description="Shen et al. 2018, Table 1; ImageNet, Intel Caffe",
        created=_timestamp_now(created),
        plugin_version=__version__,
        paper=PAPER_CITATION,
        dataset="ImageNet (full size)",
        framework="Intel Caffe",
    )
    return LogmDeltaRegion(
        model=row.model,
        granularity="epoch",
        low=row.low,
        high=row.high,
        margin=0.0,
        provenance=provenance,
    )


def _timestamp_now(moment: datetime | None = None) -> str:
    return (
        (moment or datetime.now(timezone.utc))
        .astimezone(timezone.utc)
        .isoformat(timespec="seconds")
    )


# --- measuring a region -----------------------------------------------------------------------


def consecutive_deltas(points: Sequence[StepLogm]) -> list[DeltaRecord]:
    """Deltas between neighbours of ``points`` (already ordered by step)."""
    return [
        DeltaRecord(before.step, after.step, after.logm - before.logm)
        for before, after in itertools.pairwise(points)
    ]


def epoch_boundaries(
    points: Sequence[StepLogm],
    *,
    iterations_per_epoch: int | None = None,
    epoch_every: int | None = None,
) -> list[StepLogm]:
    """The snapshots that end an epoch, as the paper's per-epoch Table 1 compares them.

    ``iterations_per_epoch`` selects steps that are multiples of it (0, N, 2N, ...) and requires
    every boundary in between, so that no delta silently spans two epochs; ``epoch_every`` takes
    every N-th snapshot in order, for runs whose files carry no meaningful step.
    """
    if (iterations_per_epoch is None) == (epoch_every is None):
        raise ValueError("give exactly one of iterations_per_epoch and epoch_every")
    if epoch_every is not None:
        _require_positive(epoch_every, "--epoch-every")
        chosen = list(points[::epoch_every])
        what = f"snapshots 0, {epoch_every}, {2 * epoch_every}, ... in step order"
    else:
        assert iterations_per_epoch is not None
        _require_positive(iterations_per_epoch, "--iterations-per-epoch")
        chosen = [p for p in points if p.step % iterations_per_epoch == 0]
        _require_consecutive_epochs(chosen, iterations_per_epoch)
        what = f"steps that are multiples of {iterations_per_epoch}"
    if len(chosen) < 2:
        steps = ", ".join(str(p.step) for p in points)
        raise ValueError(
            f"per-epoch deltas need at least two epoch boundaries ({what}); steps given: {steps}"
        )
    return chosen


def _require_positive(value: int, option: str) -> None:
    if value < 1:
        raise ValueError(f"{option} must be a positive integer, not {value}")


def _require_consecutive_epochs(chosen: Sequence[StepLogm], per_epoch: int) -> None:
    for before, after in itertools.pairwise(chosen):
        if after.step - before.step != per_epoch:
            missing = ", ".join(
                str(s) for s in range(before.step + per_epoch, after.step, per_epoch)
            )
            raise ValueError(
                f"no snapshot at epoch boundary step {missing} (between {before.path} and "
                f"{after.path}); a per-epoch delta must not span two epochs"
            )


def region_bounds(deltas: Sequence[float], margin: float = 0.0) -> tuple[float, float]:
    """min..max of ``deltas``, each end widened by ``margin`` times the largest magnitude.

    The margin is relative so that one value reads the same for a small model whose LoGM moves
    by 1e-5 per step and for a large one moving by 1e-2.
    """
    if not deltas:
        raise ValueError("a region needs at least one delta (two snapshots)")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"--margin must be a finite number >= 0, not {margin}")
    low, high = min(deltas), max(deltas)
    pad = margin * max(abs(low), abs(high))
    return low - pad, high + pad


def measured_region(
    points: Sequence[StepLogm],
    *,
    iterations_per_epoch: int | None = None,
    epoch_every: int | None = None,
    margin: float = 0.0,
    model: str | None = None,
    sha256: Sequence[str | None] | None = None,
    created: datetime | None = None,
) -> LogmDeltaRegion:
    """The region a healthy run's snapshots span, with the provenance a reviewer needs.

    ``points`` are the snapshots' global LoGMs, ordered by step. Without an epoch option the
    region is per iteration (neighbouring snapshots); with ``iterations_per_epoch`` or
    ``epoch_every`` it is per epoch, from :func:`epoch_boundaries`. ``sha256`` gives each
    snapshot file's digest, in the order of ``points``, to record beside it. Raises
    ``ValueError`` for too few points or epoch boundaries, and for a negative margin.
    """
    per_epoch = iterations_per_epoch is not None or epoch_every is not None
    if per_epoch:
        boundaries = epoch_boundaries(
            points, iterations_per_epoch=iterations_per_epoch, epoch_every=epoch_every
        )
        deltas = consecutive_deltas(boundaries)
    else:
        deltas = consecutive_deltas(points)
    low, high = region_bounds([d.delta for d in deltas], margin)
    provenance = RegionProvenance(
        source="measured",
        description=(
            f"measured from {len(points)} snapshots, steps {points[0].step}..{points[-1].step}"
        ),
        created=_timestamp_now(created),
        plugin_version=__version__,
        iterations_per_epoch=iterations_per_epoch,
        epoch_every=epoch_every,
    )
    digests = [None] * len(points) if sha256 is None else sha256
    snapshots = tuple(
        SnapshotRecord(p.path, p.step, p.logm, digest)
        for p, digest in zip(points, digests, strict=True)
    )
    return LogmDeltaRegion(
        model=model,
        granularity="epoch" if per_epoch else "iteration",
        low=low,
        high=high,
        margin=margin,
        provenance=provenance,
        snapshots=snapshots,
        deltas=tuple(deltas),
    )


# --- reading ----------------------------------------------------------------------------------


class _Invalid(Exception):
    """A problem at one place in a document, raised before the file's path is attached."""


def load_region(path: str | os.PathLike[str]) -> LogmDeltaRegion:
    """Read and validate a region file; every problem is a :class:`RegionFileError`."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegionFileError(source, "no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RegionFileError(source, f"cannot be read: {error}") from None
    try:
        region = _parse_region(_decode(text))
    except _Invalid as error:
        raise RegionFileError(source, str(error)) from None
    return replace(region, path=source)


def _decode(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise _Invalid(
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except RecursionError:
        raise _Invalid("JSON nested too deeply to be a region file") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Invalid(f"duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


_TOP_KEYS = (
    "schema",
    "schema_version",
    "model",
    "granularity",
    "region",
    "margin",
    "provenance",
    "snapshots",
    "deltas",
)


def _parse_region(document: object) -> LogmDeltaRegion:
    top = _mapping(document, "the document")
    _check_schema(top)
    _check_keys(top, "the document", _TOP_KEYS)
    low, high = _interval(top["region"], "region")
    granularity = _string(top["granularity"], "granularity")
    if granularity not in GRANULARITIES:
        raise _Invalid(f"granularity: {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    margin = _real(top["margin"], "margin")
    if margin < 0:
        raise _Invalid(f"margin: {margin} is negative")
    return LogmDeltaRegion(
        model=_optional_string(top["model"], "model"),
        granularity=granularity,
        low=low,
        high=high,
        margin=margin,
        provenance=_provenance(top["provenance"]),
        snapshots=tuple(_records(top["snapshots"], "snapshots", SnapshotRecord, _SNAPSHOT_FIELDS)),
        deltas=tuple(_records(top["deltas"], "deltas", DeltaRecord, _DELTA_FIELDS)),
    )


def _check_schema(top: dict[str, object]) -> None:
    schema = top.get("schema")
    if schema == BASELINE_SCHEMA:
        raise _Invalid(
            f"this is a co-simulation baseline ({BASELINE_SCHEMA}), used by pytest --convergence; "
            f"'pytest-convergence check' needs a LoGM-delta region file ({REGION_SCHEMA}), "
            "written by 'pytest-convergence region' or shipped as baselines/paper-*.json"
        )
    if schema != REGION_SCHEMA:
        raise _Invalid(f"schema: expected {REGION_SCHEMA!r}, found {schema!r}")
    version = top.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _Invalid(f"schema_version: expected a positive integer, found {version!r}")
    if version > REGION_SCHEMA_VERSION:
        raise _Invalid(
            f"schema_version {version} was written by a newer pytest-convergence "
            f"(this one reads {REGION_SCHEMA_VERSION}); upgrade"
        )


_Parser = Callable[[object, str], Any]


def _provenance(value: object) -> RegionProvenance:
    parsed = _fields(value, "provenance", _PROVENANCE_FIELDS)
    if parsed["source"] not in SOURCES:
        raise _Invalid(f"provenance.source: {parsed['source']!r} is not one of {SOURCES}")
    return RegionProvenance(**parsed)


def _records(
    value: object, where: str, kind: Callable[..., Any], parsers: dict[str, _Parser]
) -> list[Any]:
    if not isinstance(value, list):
        raise _Invalid(f"{where}: expected a list, found {_kind(value)}")
    return [kind(**_fields(item, f"{where}[{i}]", parsers)) for i, item in enumerate(value)]


def _fields(value: object, where: str, parsers: dict[str, _Parser]) -> dict[str, Any]:
    mapping = _mapping(value, where)
    _check_keys(mapping, where, tuple(parsers))
    return {key: parse(mapping[key], f"{where}.{key}") for key, parse in parsers.items()}


def _mapping(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Invalid(f"{where}: expected a JSON object, found {_kind(value)}")
    return value


def _check_keys(mapping: dict[str, object], where: str, expected: tuple[str, ...]) -> None:
    unknown = [key for key in mapping if key not in expected]
    missing = [key for key in expected if key not in mapping]
    if unknown:
        raise _Invalid(f"{where}: unknown key {unknown[0]!r}")
    if missing:
        raise _Invalid(f"{where}: missing key {missing[0]!r}")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return "a list" if isinstance(value, list) else "an object"


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"{where}: expected a non-empty string, found {_kind(value)}")
    return value


def _optional_string(value: object, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _integer(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(f"{where}: expected an integer, found {_kind(value)}")
    return value


def _optional_positive(value: object, where: str) -> int | None:
    if value is None:
        return None
    number = _integer(value, where)
    if number < 1:
        raise _Invalid(f"{where}: expected a positive integer, found {number}")
    return number


def _real(value: object, where: str) -> float:
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity"):
        raise _Invalid(f"{where}: {value} is not allowed")
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Invalid(f"{where}: expected a number, found {_kind(value)}")
    if not math.isfinite(value):
        raise _Invalid(f"{where}: {value} is not allowed")
    return float(value)


def _interval(value: object, where: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise _Invalid(f"{where}: expected [low, high], found {_kind(value)}")
    low, high = _real(value[0], f"{where}[0]"), _real(value[1], f"{where}[1]")
    if low > high:
        raise _Invalid(f"{where}: low {low} is above high {high}")
    return low, high


def _sha256(value: object, where: str) -> str | None:
    if value is None:
        return None
    text = _string(value, where)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise _Invalid(f"{where}: expected 64 lowercase hex digits")
    return text


def _timestamp(value: object, where: str) -> str:
    text = _string(value, where)
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise _Invalid(f"{where}: {text!r} is not an ISO-8601 date and time") from None
    return text


_PROVENANCE_FIELDS: dict[str, _Parser] = {
    "source": _string,
    "description": _string,
    "created": _timestamp,
    "plugin_version": _string,
    "paper": _optional_string,
    "dataset": _optional_string,
    "framework": _optional_string,
    "iterations_per_epoch": _optional_positive,
    "epoch_every": _optional_positive,
}
_SNAPSHOT_FIELDS: dict[str, _Parser] = {
    "path": _string,
    "step": _integer,
    "global_logm": _real,
    "sha256": _sha256,
}
_DELTA_FIELDS: dict[str, _Parser] = {
    "from_step": _integer,
    "to_step": _integer,
    "delta": _real,
}
assert tuple(_PROVENANCE_FIELDS) == tuple(f.name for f in fields(RegionProvenance))
assert tuple(_SNAPSHOT_FIELDS) == tuple(f.name for f in fields(SnapshotRecord))
assert tuple(_DELTA_FIELDS) == tuple(f.name for f in fields(DeltaRecord))


# --- writing ----------------------------------------------------------------------------------


def dumps_region(region: LogmDeltaRegion) -> str:
    """The file's text: fixed key order, one record per line, floats that round-trip exactly."""
    lines = [
        "{",
        f' "schema": {json.dumps(REGION_SCHEMA)},',
        f' "schema_version": {REGION_SCHEMA_VERSION},',
        f' "model": {json.dumps(region.model)},',
        f' "granularity": {json.dumps(region.granularity)},',
        f' "region": {json.dumps([region.low, region.high])},',
        f' "margin": {json.dumps(region.margin)},',
        f' "provenance": {json.dumps(asdict(region.provenance), indent=1)},'.replace("\n", "\n "),
        f' "snapshots": {_record_list(region.snapshots)},',
        f' "deltas": {_record_list(region.deltas)}',
        "}",
    ]
    return "\n".join(lines) + "\n"


def _record_list(records: Sequence[SnapshotRecord | DeltaRecord]) -> str:
    if not records:
        return "[]"
    rows = ",\n".join(f"  {json.dumps(asdict(record))}" for record in records)
    return f"[\n{rows}\n ]"


def save_region(
    path: str | os.PathLike[str], region: LogmDeltaRegion, *, overwrite: bool = False
) -> Path:
    """Write a region file atomically; an existing file is kept unless ``overwrite``."""
    return write_text_file(Path(path), dumps_region(region), overwrite=overwrite)


def write_text_file(path: Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` through a temp file in the same folder, then move it into place.

    Readers see the old file or the new one, never half of one. Without ``overwrite`` the move
    is a hard link, which fails rather than replaces when another process created the file in
    the meantime.
    """
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --force (overwrite=True) to replace it")
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _NEW_FILE_MODE)
        _move_into_place(temporary, path, overwrite=overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return path


def _move_into_place(temporary: str, path: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; pass --force (overwrite=True) to replace it"
        ) from None
    except OSError:
        # Filesystems without hard links: the existence check above is the best we can do.
        os.replace(temporary, path)
