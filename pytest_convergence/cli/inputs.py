"""What the commands read: snapshot paths (files, folders, globs) in step order, measured
snapshots, and the ``--baseline`` region."""

from __future__ import annotations

import glob
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_convergence._formats import SUPPORTED_SUFFIXES
from pytest_convergence.cli.errors import errors_naming
from pytest_convergence.errors import CliError
from pytest_convergence.paper_regions import (
    PAPER_REGIONS,
    LogmDeltaRegion,
    load_region,
    paper_region,
)

if TYPE_CHECKING:
    from pytest_convergence.snapshots.measure import SnapshotLogm

__all__ = [
    "PAPER_PREFIX",
    "expand_inputs",
    "load_region_spec",
    "measure_input",
    "order_by_step",
    "step_from_name",
]


_FIRST_INTEGER = re.compile(r"\d+")
_DIGITS = re.compile(r"(\d+)")
_GLOB_CHARACTERS = frozenset("*?[")
PAPER_PREFIX = "paper:"


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files, folders (their snapshot files) and glob patterns, in the order given.

    Shells expand unquoted globs; quoted ones (and Windows shells) reach us unexpanded, and a
    pattern matching nothing is an error rather than an empty run.
    """
    paths: list[Path] = []
    for pattern in patterns:
        paths.extend(_expand_one(pattern))
    return list(dict.fromkeys(paths))


def _expand_one(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and _is_snapshot_name(p)]
        if not found:
            suffixes = ", ".join(SUPPORTED_SUFFIXES)
            raise CliError(f"{path}: no snapshot files ({suffixes}) in this folder")
        return sorted(found, key=_natural_key)
    if _GLOB_CHARACTERS.intersection(pattern) and not path.exists():
        matches = [Path(p) for p in glob.glob(pattern) if Path(p).is_file()]
        found = [p for p in matches if _is_snapshot_name(p)]
        if not found:
            raise CliError(f"{pattern}: no snapshot files match this pattern")
        return sorted(found, key=_natural_key)
    return [path]


def _is_snapshot_name(path: Path) -> bool:
    """Supported suffix, and not a hidden temp file left by an interrupted write."""
    return path.suffix.lower() in SUPPORTED_SUFFIXES and not path.name.startswith(".")


def _natural_key(path: Path) -> tuple[object, ...]:
    """step2 before step10, as a person reads them."""
    parts = _DIGITS.split(str(path))
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in parts)


def step_from_name(path: Path) -> int | None:
    """The first integer in the file name (without its suffix): ``step12.pt`` -> 12."""
    match = _FIRST_INTEGER.search(path.name.removesuffix(path.suffix))
    return int(match.group()) if match else None


def order_by_step(paths: Sequence[Path], stored: Sequence[int | None]) -> list[tuple[Path, int]]:
    """Order snapshots by step: the stored one, else the first integer in the file name.

    Mixing the two, a missing step or two snapshots at the same step would make the order a
    guess, and a wrong order flips the sign of a delta: each is an error saying what to fix.
    """
    with_step = [p for p, s in zip(paths, stored, strict=True) if s is not None]
    without = [p for p, s in zip(paths, stored, strict=True) if s is None]
    if with_step and without:
        raise CliError(
            f"ambiguous order: {with_step[0]} stores its step but {without[0]} does not; store "
            "a step in every snapshot (save_snapshot(..., step=N)) or in none"
        )
    steps: list[tuple[Path, int]] = []
    origin = "stored step" if with_step else "first number in the file name"
    for path, step in zip(paths, stored, strict=True):
        number = step if step is not None else step_from_name(path)
        if number is None:
            raise CliError(
                f"{path}: no stored step and no number in the file name; save snapshots with "
                "save_snapshot(..., step=N) or name them like step12.pt"
            )
        steps.append((path, number))
    steps.sort(key=lambda item: item[1])
    for (first, step), (second, other) in itertools.pairwise(steps):
        if step == other:
            raise CliError(
                f"ambiguous order: {first} and {second} both have step {step} ({origin}); "
                "store distinct steps in the snapshots or rename the files"
            )
    return steps


def measure_input(path: Path, *, with_stats: bool = False) -> SnapshotLogm:
    """Measure a snapshot one tensor at a time; any error becomes one line naming the file."""
    from pytest_convergence.snapshots.measure import measure_snapshot

    with errors_naming(path):
        return measure_snapshot(path, with_stats=with_stats)


def load_region_spec(spec: str) -> tuple[LogmDeltaRegion, str]:
    """A region file, or ``paper:<model>`` for a region of the paper's Table 1."""
    if spec.startswith(PAPER_PREFIX):
        key = spec.removeprefix(PAPER_PREFIX)
        if key not in PAPER_REGIONS:
            raise CliError(
                f"--baseline {spec}: the paper publishes regions for "
                + ", ".join(PAPER_PREFIX + name for name in PAPER_REGIONS)
            )
        return paper_region(key), spec
    with errors_naming(spec):
        return load_region(spec), spec
