"""The ``pytest-convergence`` command: LoGM, the paper's regions and reports, offline.

Not all training code can run inside pytest: a kernel may live in C++ or JAX, a run may take
days on a cluster. Weights on disk are the common ground, so these commands read snapshot files
in any supported format, and the JSON traces that ``pytest --convergence`` leaves in report
folders.

Exit status: 0 when all is well (or the delta is inside the region), 1 when a delta is outside
the region, 2 for a usage or input error. Input errors are one line on stderr naming the file,
never a traceback: the next step is to fix an argument or a file, not to debug this tool.

torch is imported only by the commands that read weights, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from pytest_convergence._formats import SUPPORTED_SUFFIXES
from pytest_convergence._version import __version__
from pytest_convergence.errors import CliError, NonFiniteWeightError
from pytest_convergence.paper_regions import (
    BASELINE_SCHEMA,
    PAPER_REGIONS,
    REGION_SCHEMA,
    LogmDeltaRegion,
    StepLogm,
    consecutive_deltas,
    load_region,
    measured_region,
    paper_region,
    save_region,
    write_text_file,
)

if TYPE_CHECKING:
    import torch

    from pytest_convergence.html_report import ReportBand
    from pytest_convergence.snapshots import Snapshot
    from pytest_convergence.snapshots.measure import ParameterRow, SnapshotLogm

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_OUTSIDE",
    "CliError",
    "ParameterDiff",
    "ParameterRow",
    "ProgressBar",
    "SnapshotLogm",
    "build_parser",
    "expand_inputs",
    "main",
    "order_by_step",
    "step_from_name",
]

PROG = "pytest-convergence"
EXIT_OK = 0
EXIT_OUTSIDE = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# A table is read in a terminal or a CI log: the rows that matter most, then a count of the rest.
CHECK_ROWS = 15
DIFF_ROWS = 20
REGION_ROWS = 40
# Differences listed when two snapshots do not have the same parameters.
MISMATCH_EXAMPLES = 5
_FIRST_INTEGER = re.compile(r"\d+")
_DIGITS = re.compile(r"(\d+)")
_GLOB_CHARACTERS = frozenset("*?[")
_PAPER_PREFIX = "paper:"


class _DivergedError(CliError):
    """A snapshot holds NaN or Inf weights: an input error for most commands, but for
    ``check`` the very divergence a region exists to catch."""


def __getattr__(name: str) -> Any:
    """``ParameterRow`` and ``SnapshotLogm`` moved to :mod:`pytest_convergence.snapshots.measure`;
    they are still importable from here, and loaded on first use so ``--help`` stays free of
    torch."""
    if name in ("ParameterRow", "SnapshotLogm"):
        from pytest_convergence.snapshots import measure as measuring

        return getattr(measuring, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- progress ---------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on a terminal, and nothing at all anywhere else.

    CI logs and pipes must not fill with carriage returns, so the bar draws only when its stream
    is a terminal, and erases itself when done so that results print on a clean line.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = total > 1 and _is_terminal(self.stream)
        self.done = 0
        self._drawn = False

    def show(self, item: str) -> None:
        """Draw the bar with ``item`` as the one being worked on now."""
        if not self.enabled:
            return
        columns = shutil.get_terminal_size((80, 24)).columns
        width = 20
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {item}"
        self.stream.write("\r" + line[: max(columns - 1, 10)].ljust(max(columns - 1, 10)))
        self.stream.flush()
        self._drawn = True

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self._drawn:
            columns = shutil.get_terminal_size((80, 24)).columns
            self.stream.write("\r" + " " * max(columns - 1, 10) + "\r")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --- inputs -----------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _about(path: Path | str) -> Iterator[None]:
    """Make sure an input error names the file it came from."""
    try:
        yield
    except CliError:
        raise
    except NonFiniteWeightError as error:
        raise _DivergedError(f"{path}: {error}") from None
    except (ValueError, TypeError, OSError) as error:
        message = _one_line(error)
        raise CliError(message if str(path) in message else f"{path}: {message}") from None


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split())
    return text or type(error).__name__


# --- measuring snapshots ---------------------------------------------------------------------


def measure(path: Path, *, with_stats: bool = False) -> SnapshotLogm:
    """Stream a snapshot, naming the file in any error."""
    from pytest_convergence.snapshots.measure import measure_snapshot

    with _about(path):
        return measure_snapshot(path, with_stats=with_stats)


def _global_logm(measured: SnapshotLogm) -> float:
    if measured.global_logm is None:
        raise CliError(
            f"{measured.path}: LoGM is undefined, no nonzero weights "
            f"({measured.count} weights, {measured.zeros} zeros)"
        )
    return measured.global_logm


def _structure_differences(first: SnapshotLogm, second: SnapshotLogm) -> list[str]:
    """Parameter names and shapes that differ, the first few of each kind."""
    shapes_a = {row.name: row.shape for row in first.parameters}
    shapes_b = {row.name: row.shape for row in second.parameters}
    return _name_differences(list(shapes_a), list(shapes_b)) + [
        f"{name!r} has shape {list(shapes_a[name])} vs {list(shapes_b[name])}"
        for name in shapes_a
        if name in shapes_b and shapes_a[name] != shapes_b[name]
    ]


def _name_differences(names_a: Sequence[str], names_b: Sequence[str]) -> list[str]:
    set_a, set_b = set(names_a), set(names_b)
    only_a = [name for name in names_a if name not in set_b]
    only_b = [name for name in names_b if name not in set_a]
    return [f"{name!r} only in the first" for name in only_a] + [
        f"{name!r} only in the second" for name in only_b
    ]


def _mismatch_error(first: str, second: str, differences: Sequence[str]) -> CliError:
    shown = "; ".join(differences[:MISMATCH_EXAMPLES])
    more = len(differences) - MISMATCH_EXAMPLES
    tail = f"; and {more} more" if more > 0 else ""
    return CliError(
        f"{first} and {second} do not hold the same parameters "
        f"({len(differences)} difference{'s' if len(differences) > 1 else ''}): {shown}{tail}"
    )


# --- formatting -------------------------------------------------------------------------------


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: frozenset[int] = frozenset({0})
) -> list[str]:
    """Names left-aligned (the ``left`` columns), numbers right-aligned, widths from content."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if column in left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return ("  " + "  ".join(padded)).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _logm_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _sci(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.3e}" if signed else f"{value:.3e}"


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _step_text(step: int | None) -> str:
    return "step ?" if step is None else f"step {step}"


def _capped(rows: list[list[str]], limit: int, noun: str) -> tuple[list[list[str]], str | None]:
    """At most ``limit`` rows (0: all), and a line counting what was left out."""
    if limit <= 0 or len(rows) <= limit:
        return rows, None
    hidden = len(rows) - limit
    return rows[:limit], f"  ... {hidden} more {noun} (--rows 0 shows all)"


def _emit(text: str) -> None:
    """Print to stdout, and stop quietly once its reader has gone (``| head``)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _print_json(payload: object) -> None:
    _emit(json.dumps(_json_ready(payload), indent=1, allow_nan=False))


def _json_ready(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists, and Inf/NaN (which JSON lacks) to strings."""
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return _json_ready(asdict(value))
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --- logm -------------------------------------------------------------------------------------


def _cmd_logm(args: argparse.Namespace) -> int:
    paths = expand_inputs(args.paths)
    results = []
    with ProgressBar(len(paths), "logm") as progress:
        for path in paths:
            progress.show(path.name)
            results.append(measure(path, with_stats=True))
            progress.advance()
    if args.json:
        _print_json({"snapshots": results})
        return EXIT_OK
    for index, result in enumerate(results):
        if index:
            _emit("")
        _emit("\n".join(_logm_lines(result, args.rows)))
    return EXIT_OK


def _logm_lines(result: SnapshotLogm, limit: int) -> list[str]:
    global_text = (
        "undefined (no nonzero weights)"
        if result.global_logm is None
        else f"{result.global_logm:.6f}"
    )
    lines = [
        f"{result.path} ({_step_text(result.step)}): global LoGM {global_text} over "
        f"{result.count:,} weights ({result.zeros:,} zeros) in {len(result.parameters)} tensors"
    ]
    rows = [
        [
            row.name,
            _shape_text(row.shape),
            row.dtype,
            _logm_text(row.logm),
            f"{row.count:,}",
            f"{row.zeros:,}",
            _sci(row.l2_norm),
            _sci(row.std),
        ]
        for row in result.parameters
    ]
    shown, more = _capped(rows, limit, "parameters")
    headers = ["parameter", "shape", "dtype", "LoGM", "count", "zeros", "L2 norm", "std"]
    lines += _table(headers, shown)
    if more:
        lines.append(more)
    if result.skipped:
        lines.append(f"  not weights (integer or bool, skipped): {', '.join(result.skipped)}")
    return lines


# --- region -----------------------------------------------------------------------------------


def _cmd_region(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_writable(out, force=args.force)
    if not (math.isfinite(args.margin) and args.margin >= 0):
        raise CliError(f"--margin must be a finite number >= 0, not {args.margin}")
    ordered = order_by_step(*_stored_steps(expand_inputs(args.snapshots)))
    if len(ordered) < 2:
        raise CliError(f"{ordered[0][0]}: a region needs at least two consecutive snapshots")
    points, hashes = _measure_run(ordered, sha256=args.sha256)
    region = _build_region(args, points, hashes)
    if args.json:
        _print_json(_region_payload(region, points, out))
    else:
        _emit("\n".join(_region_lines(region, points, args.rows)))
    if out is not None:
        save_region(out, region, overwrite=args.force)
        if not args.json:
            _emit(f"Wrote {out}")
    return EXIT_OK


def _check_writable(out: Path, *, force: bool) -> None:
    """Fail before the work, not after it, when the result could not be written."""
    if out.is_dir():
        raise CliError(f"{out} is a folder; give a file name")
    if out.exists() and not force:
        raise CliError(f"{out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise CliError(f"{out}: folder {out.parent} does not exist")


def _stored_steps(paths: list[Path]) -> tuple[list[Path], list[int | None]]:
    """Open each file lazily (headers only) for its stored step."""
    from pytest_convergence.snapshots import load_snapshot

    steps: list[int | None] = []
    for path in paths:
        with _about(path):
            steps.append(load_snapshot(path).step)
    return paths, steps


def _measure_run(
    ordered: list[tuple[Path, int]], *, sha256: bool
) -> tuple[list[StepLogm], list[str | None]]:
    points: list[StepLogm] = []
    hashes: list[str | None] = []
    with ProgressBar(len(ordered), "region") as progress:
        for path, step in ordered:
            progress.show(path.name)
            measured = measure(path)
            points.append(StepLogm(step, _global_logm(measured), str(path)))
            hashes.append(_file_sha256(path) if sha256 else None)
            progress.advance()
    return points, hashes


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _about(path), open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_region(
    args: argparse.Namespace, points: list[StepLogm], hashes: list[str | None]
) -> LogmDeltaRegion:
    try:
        return measured_region(
            points,
            iterations_per_epoch=args.iterations_per_epoch,
            epoch_every=args.epoch_every,
            margin=args.margin,
            model=args.model,
            sha256=hashes,
        )
    except ValueError as error:
        raise CliError(str(error)) from None


def _region_lines(region: LogmDeltaRegion, points: list[StepLogm], limit: int) -> list[str]:
    iteration = consecutive_deltas(points)
    delta_at = {d.to_step: d.delta for d in iteration}
    rows = [
        [str(p.step), f"{p.logm:.6f}", _sci(delta_at.get(p.step), signed=True), p.path]
        for p in points
    ]
    shown, more = _capped(rows, limit, "snapshots")
    lines = _table(["step", "global LoGM", "delta", "file"], shown, left=frozenset({0, 3}))
    if more:
        lines.append(more)
    values = [d.delta for d in iteration]
    gaps = sorted({d.to_step - d.from_step for d in iteration})
    apart = ", ".join(str(g) for g in gaps)
    lines.append(
        f"Per-iteration deltas ({len(values)}, snapshots {apart} step(s) apart): "
        f"min {min(values):+.3e}, max {max(values):+.3e}"
    )
    if region.granularity == "epoch":
        epoch_values = [d.delta for d in region.deltas]
        bounds = ", ".join(str(d.to_step) for d in region.deltas)
        lines.append(
            f"Per-epoch deltas ({len(epoch_values)}, epochs ending at steps {bounds}): "
            f"min {min(epoch_values):+.3e}, max {max(epoch_values):+.3e}"
        )
    margin = f", margin {region.margin:g}" if region.margin else ""
    lines.append(
        f"Region per {region.granularity}{margin}: [{region.low:+.6e}, {region.high:+.6e}]"
    )
    return lines


def _region_payload(
    region: LogmDeltaRegion, points: list[StepLogm], out: Path | None
) -> dict[str, object]:
    return {
        "region": [region.low, region.high],
        "granularity": region.granularity,
        "margin": region.margin,
        "iteration_deltas": consecutive_deltas(points),
        "deltas": region.deltas,
        "snapshots": region.snapshots,
        "out": None if out is None else str(out),
    }


# --- check ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CheckResult:
    first: SnapshotLogm
    second: SnapshotLogm
    delta: float
    region: LogmDeltaRegion
    region_file: str
    swapped: bool


def _cmd_check(args: argparse.Namespace) -> int:
    region, region_file = _load_region_spec(args.baseline)
    try:
        first, second = measure(Path(args.a)), measure(Path(args.b))
    except _DivergedError as error:
        return _diverged(args, str(error), region, region_file)
    differences = _structure_differences(first, second)
    if differences:
        raise _mismatch_error(args.a, args.b, differences)
    swapped = first.step is not None and second.step is not None and first.step > second.step
    if swapped:
        first, second = second, first
    delta = _global_logm(second) - _global_logm(first)
    result = _CheckResult(first, second, delta, region, region_file, swapped)
    inside = region.contains(delta)
    if args.json:
        _print_json(_check_payload(result, inside))
    else:
        _emit("\n".join(_check_lines(result, inside, args.rows)))
    return EXIT_OK if inside else EXIT_OUTSIDE


def _load_region_spec(spec: str) -> tuple[LogmDeltaRegion, str]:
    """A region file, or ``paper:<model>`` for a region of the paper's Table 1."""
    if spec.startswith(_PAPER_PREFIX):
        key = spec.removeprefix(_PAPER_PREFIX)
        if key not in PAPER_REGIONS:
            raise CliError(
                f"--baseline {spec}: the paper publishes regions for "
                + ", ".join(_PAPER_PREFIX + name for name in PAPER_REGIONS)
            )
        return paper_region(key), spec
    with _about(spec):
        return load_region(spec), spec


def _diverged(
    args: argparse.Namespace, message: str, region: LogmDeltaRegion, region_file: str
) -> int:
    """NaN or Inf weights are the divergence the region exists to catch: outside, exit 1."""
    if args.json:
        _print_json(
            {
                "inside": False,
                "reason": "non-finite weights",
                "message": message,
                "region": _region_summary(region, region_file),
            }
        )
    else:
        _emit(f"Region: {region.describe()} from {region_file}")
        _emit(f"Verdict: OUTSIDE the region: training diverged; {message}")
    return EXIT_OUTSIDE


def _check_lines(result: _CheckResult, inside: bool, limit: int) -> list[str]:
    first, second, region = result.first, result.second, result.region
    lines = [
        f"Snapshots: {first.path} ({_step_text(first.step)}) -> "
        f"{second.path} ({_step_text(second.step)})"
        + (" (ordered by their stored steps)" if result.swapped else ""),
        f"Global LoGM: {_global_logm(first):.6f} -> {_global_logm(second):.6f}",
        f"LoGM delta: {result.delta:+.6e}",
        f"Region: {region.describe()} from {result.region_file}",
        f"Verdict: {_verdict_text(result, inside)}",
    ]
    note = _granularity_note(result)
    if note:
        lines.append(note)
    lines += _parameter_delta_table(first, second, limit)
    return lines


def _verdict_text(result: _CheckResult, inside: bool) -> str:
    if inside:
        return "inside the region"
    region, delta = result.region, result.delta
    side, bound = ("above", region.high) if delta > region.high else ("below", region.low)
    return (
        f"OUTSIDE the region: {result.delta:+.6e} is {region.excess(delta):.3e} {side} "
        f"its bound {bound:+.5g}"
    )


def _granularity_note(result: _CheckResult) -> str | None:
    """A per-epoch region judging two iterations is loose; say so rather than let a pass
    look stronger than it is."""
    if result.region.granularity != "epoch":
        return None
    return (
        "Note: the region is per epoch; one iteration usually moves LoGM far less than an "
        "epoch, so for consecutive iterations it is a loose bound"
    )


def _parameter_delta_table(first: SnapshotLogm, second: SnapshotLogm, limit: int) -> list[str]:
    entries = [(a, b, _delta(a.logm, b.logm)) for a, b in _aligned(first, second)]
    entries.sort(key=lambda entry: -1.0 if entry[2] is None else abs(entry[2]), reverse=True)
    rows = [
        [
            a.name,
            _logm_text(a.logm),
            _logm_text(b.logm),
            _sci(d, signed=True),
            str(a.zeros),
            str(b.zeros),
        ]
        for a, b, d in entries
    ]
    shown, more = _capped(rows, limit, "parameters")
    lines = [f"Per-parameter LoGM, largest |delta| first ({len(shown)} of {len(rows)}):"]
    lines += _table(["parameter", "LoGM A", "LoGM B", "delta", "zeros A", "zeros B"], shown)
    if more:
        lines.append(more)
    return lines


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _check_payload(result: _CheckResult, inside: bool) -> dict[str, object]:
    first, second = result.first, result.second
    parameters = [
        {
            "name": a.name,
            "logm_a": a.logm,
            "logm_b": b.logm,
            "delta": _delta(a.logm, b.logm),
            "zeros_a": a.zeros,
            "zeros_b": b.zeros,
        }
        for a, b in _aligned(first, second)
    ]
    return {
        "inside": inside,
        "delta": result.delta,
        "excess": result.region.excess(result.delta),
        "region": _region_summary(result.region, result.region_file),
        "a": {"path": first.path, "step": first.step, "global_logm": first.global_logm},
        "b": {"path": second.path, "step": second.step, "global_logm": second.global_logm},
        "parameters": parameters,
    }


def _region_summary(region: LogmDeltaRegion, region_file: str) -> dict[str, object]:
    return {
        "file": region_file,
        "low": region.low,
        "high": region.high,
        "granularity": region.granularity,
        "model": region.model,
        "description": region.provenance.description,
    }


def _aligned(first: SnapshotLogm, second: SnapshotLogm) -> list[tuple[ParameterRow, ParameterRow]]:
    """Rows of both snapshots paired by name, in the first's order (the names are known to
    match; their order may differ between formats)."""
    by_name = {row.name: row for row in second.parameters}
    return [(row, by_name[row.name]) for row in first.parameters]


# --- diff -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterDiff:
    """One parameter of two implementations' snapshots of the same architecture."""

    name: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    logm_a: float | None
    logm_b: float | None
    logm_abs_diff: float | None
    relative_l2_error: float
    max_abs_diff: float
    zeros_a: int
    zeros_b: int


def _cmd_diff(args: argparse.Namespace) -> int:
    from pytest_convergence.snapshots import load_snapshot

    path_a, path_b = Path(args.a), Path(args.b)
    with _about(path_a):
        first = load_snapshot(path_a)
    with _about(path_b):
        second = load_snapshot(path_b)
    differences = _name_differences(list(first), list(second))
    if differences:
        raise _mismatch_error(args.a, args.b, differences)
    diffs = _diff_tensors(first, second, path_a, path_b)
    global_a, global_b = _composed_logm(diffs, "a"), _composed_logm(diffs, "b")
    if args.json:
        _print_json(
            {
                "a": {"path": args.a, "step": first.step, "global_logm": global_a},
                "b": {"path": args.b, "step": second.step, "global_logm": global_b},
                "parameters": diffs,
            }
        )
        return EXIT_OK
    _emit("\n".join(_diff_lines(args, first, second, diffs)))
    return EXIT_OK


def _diff_tensors(
    first: Snapshot, second: Snapshot, path_a: Path, path_b: Path
) -> list[ParameterDiff]:
    """Stream both snapshots in step: at most one tensor of each is held at a time."""
    diffs: list[ParameterDiff] = []
    shape_errors: list[str] = []
    with ProgressBar(len(first), "diff") as progress:
        for name in first:
            progress.show(name)
            with _about(path_a):
                tensor_a = first[name]
            with _about(path_b):
                tensor_b = second[name]
            if tensor_a.shape != tensor_b.shape:
                shape_errors.append(
                    f"{name!r} has shape {list(tensor_a.shape)} vs {list(tensor_b.shape)}"
                )
            elif not shape_errors:
                diffs.append(_diff_pair(name, tensor_a, tensor_b, path_a, path_b))
            del tensor_a, tensor_b
            progress.advance()
    if shape_errors:
        raise _mismatch_error(str(path_a), str(path_b), shape_errors)
    return diffs


def _diff_pair(
    name: str, tensor_a: torch.Tensor, tensor_b: torch.Tensor, path_a: Path, path_b: Path
) -> ParameterDiff:
    from pytest_convergence.snapshots.measure import measure_tensor

    with _about(path_a):
        row_a = measure_tensor(name, tensor_a)
    with _about(path_b):
        row_b = measure_tensor(name, tensor_b)
    from pytest_convergence.metrics import difference_norms

    norms = difference_norms(tensor_a, tensor_b)
    return ParameterDiff(
        name=name,
        shape=row_a.shape,
        dtype_a=row_a.dtype,
        dtype_b=row_b.dtype,
        logm_a=row_a.logm,
        logm_b=row_b.logm,
        logm_abs_diff=None
        if row_a.logm is None or row_b.logm is None
        else abs(row_b.logm - row_a.logm),
        relative_l2_error=norms.relative_l2_error,
        max_abs_diff=norms.max_abs_diff,
        zeros_a=row_a.zeros,
        zeros_b=row_b.zeros,
    )


def _composed_logm(diffs: Sequence[ParameterDiff], side: str) -> float | None:
    from pytest_convergence.metrics import ParameterLogm, compose_logm_sum

    parts = [
        ParameterLogm(
            d.name, getattr(d, f"logm_{side}"), math.prod(d.shape), getattr(d, f"zeros_{side}")
        )
        for d in diffs
    ]
    return compose_logm_sum(parts).logm


def _diff_lines(
    args: argparse.Namespace, first: Snapshot, second: Snapshot, diffs: list[ParameterDiff]
) -> list[str]:
    global_a, global_b = _composed_logm(diffs, "a"), _composed_logm(diffs, "b")
    gap = _delta(global_a, global_b)
    lines = [
        f"A: {args.a} ({_step_text(first.step)})",
        f"B: {args.b} ({_step_text(second.step)})",
        f"Global LoGM: A {_logm_text(global_a)}, B {_logm_text(global_b)}, "
        f"|diff| {_sci(None if gap is None else abs(gap))}",
    ]
    ordered = sorted(diffs, key=lambda d: _sort_value(d.relative_l2_error), reverse=True)
    if ordered:
        worst = ordered[0]
        lines.append(
            f"Largest relative L2 error: {worst.name!r} {_sci(worst.relative_l2_error)} "
            f"(max |diff| {_sci(worst.max_abs_diff)})"
        )
    rows = [
        [
            d.name,
            _shape_text(d.shape),
            _logm_text(d.logm_a),
            _logm_text(d.logm_b),
            _sci(d.logm_abs_diff),
            _sci(d.relative_l2_error),
            _sci(d.max_abs_diff),
            str(d.zeros_a),
            str(d.zeros_b),
        ]
        for d in ordered
    ]
    shown, more = _capped(rows, args.rows, "parameters")
    headers = [
        "parameter",
        "shape",
        "LoGM A",
        "LoGM B",
        "|diff|",
        "rel L2 err",
        "max |diff|",
        "zeros A",
        "zeros B",
    ]
    lines += _table(headers, shown)
    if more:
        lines.append(more)
    return lines


def _sort_value(value: float) -> float:
    return math.inf if math.isnan(value) else value


# --- report -----------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    from pytest_convergence.html_report import render_report
    from pytest_convergence.traces import CoSimulation

    trace = Path(args.trace)
    out = Path(args.out) if args.out else trace.with_name("report.html")
    _check_writable(out, force=args.force)
    with _about(trace):
        run = CoSimulation.from_json(trace.read_text(encoding="utf-8"), source=str(trace))
    band = _report_band(args.baseline, run.workload, run.candidate)
    page = render_report(run, band=band, source=str(trace))
    with _about(out):
        write_text_file(out, page, overwrite=args.force)
    region = f" with the region of {band.source}" if band is not None else " (no region band)"
    _emit(f"Wrote {out}{region}")
    return EXIT_OK


def _report_band(spec: str | None, workload: str, candidate: str) -> ReportBand | None:
    """The region to draw: the one named, else the workload's baseline in ./baselines if any.

    A named region that cannot be read is an error; a guessed one that cannot be read only
    costs the band, with a warning, because the page is still worth having.
    """
    if spec is not None:
        return _band_from(spec)
    guess = _default_baseline(workload, candidate)
    if guess is None:
        return None
    try:
        return _band_from(guess)
    except CliError as error:
        print(f"{PROG} report: warning: no region band: {error}", file=sys.stderr)
        return None


def _band_from(spec: str) -> ReportBand:
    from pytest_convergence.html_report import ReportBand

    if spec.startswith(_PAPER_PREFIX) or _schema_of(spec) == REGION_SCHEMA:
        region, name = _load_region_spec(spec)
        return ReportBand(
            region.low, region.high, f"LoGM-delta region per {region.granularity}", name
        )
    from pytest_convergence.baselines import load_baseline

    with _about(spec):
        baseline = load_baseline(Path(spec))
    low, high = baseline.region.global_logm_delta
    return ReportBand(low, high, "per-iteration LoGM-delta region of the baseline", spec)


def _default_baseline(workload: str, candidate: str) -> str | None:
    folder = Path("baselines")
    for name in (f"{workload}--{candidate}.json", f"{workload}.json"):
        if "/" not in name and "\\" not in name and (folder / name).is_file():
            return str(folder / name)
    return None


def _schema_of(spec: str) -> object:
    with _about(spec):
        text = Path(spec).read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except ValueError:
        raise CliError(f"{spec}: not a JSON region or baseline file") from None
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema not in (REGION_SCHEMA, BASELINE_SCHEMA):
        raise CliError(
            f"{spec}: schema {schema!r} is neither a LoGM-delta region ({REGION_SCHEMA}) nor a "
            f"co-simulation baseline ({BASELINE_SCHEMA})"
        )
    return schema


# --- the parser -------------------------------------------------------------------------------


def _rows_option(parser: argparse.ArgumentParser, default: int) -> None:
    shown = "all" if default == 0 else str(default)
    parser.add_argument(
        "--rows",
        type=_non_negative,
        default=default,
        metavar="N",
        help=f"table rows to show, 0 for all (default: {shown})",
    )


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {text!r}")
    return value


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoGM of weight snapshots from any framework, the paper's divergence "
        "regions, and HTML reports of pytest --convergence traces.",
        epilog="Exit status: 0 ok or inside the region, 1 outside the region, 2 usage or input "
        "error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_logm(commands)
    _add_region(commands)
    _add_check(commands)
    _add_diff(commands)
    _add_report(commands)
    return parser


def _add_logm(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    logm = commands.add_parser(
        "logm",
        help="global and per-parameter LoGM of snapshots",
        description="Global and per-parameter LoGM, weight and zero counts, L2 norm and "
        "standard deviation of snapshots (.pt, .pth, .safetensors, .npz, .onnx), read one "
        "tensor at a time.",
    )
    logm.add_argument("paths", nargs="+", metavar="PATH", help="snapshot files, folders or globs")
    logm.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _rows_option(logm, 0)
    logm.set_defaults(handler=_cmd_logm)


def _add_region(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    region = commands.add_parser(
        "region",
        help="measure a divergence region from a healthy run's snapshots",
        description="The paper's divergence region: min..max of the global LoGM deltas between "
        "consecutive snapshots of a healthy run (per iteration), or between epoch boundaries "
        "(per epoch, as in the paper's Table 1). Snapshots are ordered by their stored step, "
        "else by the first number in the file name.",
    )
    region.add_argument(
        "snapshots", nargs="+", metavar="SNAPSHOT", help="snapshot files, folders or globs"
    )
    epochs = region.add_mutually_exclusive_group()
    epochs.add_argument(
        "--iterations-per-epoch",
        type=_positive,
        metavar="N",
        help="per-epoch region: epochs end at steps 0, N, 2N, ...",
    )
    epochs.add_argument(
        "--epoch-every",
        type=_positive,
        metavar="N",
        help="per-epoch region: every N-th snapshot in step order ends an epoch",
    )
    region.add_argument(
        "--margin",
        type=_margin,
        default=0.0,
        metavar="F",
        help="widen each end by F times the largest |delta| (default: 0)",
    )
    region.add_argument("--model", help="model name to record in the region file")
    region.add_argument("--out", metavar="FILE", help="write the region file here")
    region.add_argument("--force", action="store_true", help="replace an existing --out file")
    region.add_argument(
        "--sha256", action="store_true", help="record each input's SHA-256 in the region file"
    )
    region.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _rows_option(region, REGION_ROWS)
    region.set_defaults(handler=_cmd_region)


def _add_check(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check",
        help="is the LoGM delta between two snapshots inside a region?",
        description="The paper's case study: the global LoGM delta between two consecutive "
        "snapshots, judged against a region file. Exit 0 inside, 1 outside.",
    )
    check.add_argument("a", metavar="SNAPSHOT_A", help="the earlier snapshot")
    check.add_argument("b", metavar="SNAPSHOT_B", help="the later snapshot")
    check.add_argument(
        "--baseline",
        required=True,
        metavar="FILE",
        help="region file (from 'region', or baselines/paper-*.json), or paper:MODEL with MODEL "
        "one of " + ", ".join(PAPER_REGIONS),
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _rows_option(check, CHECK_ROWS)
    check.set_defaults(handler=_cmd_check)


def _add_diff(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    diff = commands.add_parser(
        "diff",
        help="per-parameter comparison of two implementations' snapshots",
        description="Co-simulation diff: two snapshots of the same architecture from two "
        "implementations, parameter by parameter (LoGM of each, |diff|, relative L2 error, "
        "max abs diff, zero counts).",
    )
    diff.add_argument("a", metavar="A", help="snapshot of the reference implementation")
    diff.add_argument("b", metavar="B", help="snapshot of the other implementation")
    diff.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _rows_option(diff, DIFF_ROWS)
    diff.set_defaults(handler=_cmd_diff)


def _add_report(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser(
        "report",
        help="self-contained HTML page of a co-simulation trace",
        description="A self-contained HTML page (no network) of a trace.json written by "
        "pytest --convergence: LoGM trajectories, the region band, the comparison table.",
    )
    report.add_argument("trace", metavar="TRACE.json", help="trace from a report folder")
    report.add_argument(
        "--out", metavar="FILE", help="the HTML file (default: report.html beside the trace)"
    )
    report.add_argument(
        "--baseline",
        metavar="FILE",
        help="region to draw: a co-simulation baseline, a region file or paper:MODEL "
        "(default: baselines/<workload>.json when it exists)",
    )
    report.add_argument("--force", action="store_true", help="replace an existing --out file")
    report.set_defaults(handler=_cmd_report)


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status instead of exiting, for in-process callers."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CliError as error:
        return _fail(args.command, str(error))
    except (ValueError, OSError) as error:
        # Every input problem the commands anticipate arrives as a CliError; this is the net
        # for the rest, still one line and still status 2.
        return _fail(args.command, _one_line(error))
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(command: str, message: str) -> int:
    text = " ".join(message.split())
    print(f"{PROG} {command}: error: {text}", file=sys.stderr)
    return EXIT_ERROR
