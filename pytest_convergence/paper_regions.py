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

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytest_convergence import jsonfile
from pytest_convergence._version import __version__
from pytest_convergence.errors import RegionFileError
from pytest_convergence.jsonfile import write_text_file

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


def load_region(path: str | os.PathLike[str]) -> LogmDeltaRegion:
    """Read and validate a region file; every problem is a :class:`RegionFileError`."""
    source = Path(path)
    try:
        region = jsonfile.load_file(source, _parse_region, RegionFileError)
    except FileNotFoundError:
        raise RegionFileError(source, "no such file") from None
    return replace(region, path=source)


def _parse_region(document: object) -> LogmDeltaRegion:
    if isinstance(document, dict) and document.get("schema") == BASELINE_SCHEMA:
        raise jsonfile.DocumentError(
            None,
            f"this is a co-simulation baseline ({BASELINE_SCHEMA}), used by pytest --convergence; "
            f"'pytest-convergence check' needs a LoGM-delta region file ({REGION_SCHEMA}), "
            "written by 'pytest-convergence region' or shipped as baselines/paper-*.json",
        )
    top = jsonfile.fields(_SCHEMA.body(document), jsonfile.TOP, _TOP_FIELDS)
    low, high = top.pop("region")
    if top["margin"] < 0:
        raise jsonfile.DocumentError("margin", f"{top['margin']} is negative")
    return LogmDeltaRegion(**top, low=low, high=high)


def _one_of(choices: tuple[str, ...]) -> jsonfile.Parser[str]:
    def parse(value: object, where: str) -> str:
        text = jsonfile.non_empty_string(value, where)
        if text not in choices:
            raise jsonfile.DocumentError(where, f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _sha256(value: object, where: str) -> str:
    text = jsonfile.non_empty_string(value, where)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise jsonfile.DocumentError(where, "expected 64 lowercase hex digits")
    return text


_optional_string = jsonfile.optional(jsonfile.non_empty_string)
_optional_positive = jsonfile.optional(jsonfile.positive)

_SCHEMA = jsonfile.Schema(REGION_SCHEMA, REGION_SCHEMA_VERSION, "a LoGM-delta region file")
_PROVENANCE_FIELDS: dict[str, jsonfile.Parser[Any]] = {
    "source": _one_of(SOURCES),
    "description": jsonfile.non_empty_string,
    "created": jsonfile.timestamp,
    "plugin_version": jsonfile.non_empty_string,
    "paper": _optional_string,
    "dataset": _optional_string,
    "framework": _optional_string,
    "iterations_per_epoch": _optional_positive,
    "epoch_every": _optional_positive,
}
_SNAPSHOT_FIELDS: dict[str, jsonfile.Parser[Any]] = {
    "path": jsonfile.non_empty_string,
    "step": jsonfile.integer,
    "global_logm": jsonfile.finite,
    "sha256": jsonfile.optional(_sha256),
}
_DELTA_FIELDS: dict[str, jsonfile.Parser[Any]] = {
    "from_step": jsonfile.integer,
    "to_step": jsonfile.integer,
    "delta": jsonfile.finite,
}
assert tuple(_PROVENANCE_FIELDS) == tuple(f.name for f in fields(RegionProvenance))
assert tuple(_SNAPSHOT_FIELDS) == tuple(f.name for f in fields(SnapshotRecord))
assert tuple(_DELTA_FIELDS) == tuple(f.name for f in fields(DeltaRecord))
# In the order of the file, after the schema header.
_TOP_FIELDS: dict[str, jsonfile.Parser[Any]] = {
    "model": _optional_string,
    "granularity": _one_of(GRANULARITIES),
    "region": jsonfile.interval,
    "margin": jsonfile.finite,
    "provenance": jsonfile.record(RegionProvenance, _PROVENANCE_FIELDS),
    "snapshots": jsonfile.array_of(jsonfile.record(SnapshotRecord, _SNAPSHOT_FIELDS)),
    "deltas": jsonfile.array_of(jsonfile.record(DeltaRecord, _DELTA_FIELDS)),
}


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
