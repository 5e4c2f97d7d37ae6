"""``pytest-convergence check``: is the LoGM delta from snapshot A to snapshot B inside a
region? Exit 0 inside, 1 outside."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_convergence.cli.arguments import Subcommands, rows_option
from pytest_convergence.cli.errors import (
    DivergedSnapshotError,
    defined_global_logm,
    mismatch_error,
    structure_differences,
)
from pytest_convergence.cli.exit_status import EXIT_OK, EXIT_OUTSIDE
from pytest_convergence.cli.inputs import load_region_spec, measure_input
from pytest_convergence.cli.output import (
    capped,
    delta_or_none,
    emit,
    logm_text,
    print_json,
    printable,
    sci,
    step_text,
    table,
)
from pytest_convergence.paper_regions import PAPER_REGIONS, LogmDeltaRegion

if TYPE_CHECKING:
    from pytest_convergence.snapshots.measure import ParameterRow, SnapshotLogm

__all__ = ["CHECK_ROWS", "add_parser", "run"]


# A table is read in a terminal or a CI log: the rows that matter most, then a count of the rest.
CHECK_ROWS = 15


def add_parser(commands: Subcommands) -> None:
    """Register ``check``, its options and its handler."""
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
    rows_option(check, CHECK_ROWS)
    check.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``check``; returns the exit status."""
    region, region_file = load_region_spec(args.baseline)
    try:
        first, second = measure_input(Path(args.a)), measure_input(Path(args.b))
    except DivergedSnapshotError as error:
        return _diverged(args, str(error), region, region_file)
    differences = structure_differences(first, second)
    if differences:
        raise mismatch_error(args.a, args.b, differences)
    swapped = first.step is not None and second.step is not None and first.step > second.step
    if swapped:
        first, second = second, first
    delta = defined_global_logm(second) - defined_global_logm(first)
    result = _CheckResult(first, second, delta, region, region_file, swapped)
    inside = region.contains(delta)
    if args.json:
        print_json(_check_payload(result, inside))
    else:
        emit("\n".join(_check_lines(result, inside, args.rows)))
    return EXIT_OK if inside else EXIT_OUTSIDE


@dataclass(frozen=True)
class _CheckResult:
    first: SnapshotLogm
    second: SnapshotLogm
    delta: float
    region: LogmDeltaRegion
    region_file: str
    swapped: bool


def _diverged(
    args: argparse.Namespace, message: str, region: LogmDeltaRegion, region_file: str
) -> int:
    """NaN or Inf weights are the divergence the region exists to catch: outside, exit 1."""
    if args.json:
        print_json(
            {
                "inside": False,
                "reason": "non-finite weights",
                "message": message,
                "region": _region_summary(region, region_file),
            }
        )
    else:
        emit(f"Region: {region.describe()} from {region_file}")
        emit(f"Verdict: OUTSIDE the region: training diverged; {message}")
    return EXIT_OUTSIDE


def _check_lines(result: _CheckResult, inside: bool, limit: int) -> list[str]:
    first, second, region = result.first, result.second, result.region
    lines = [
        f"Snapshots: {printable(first.path)} ({step_text(first.step)}) -> "
        f"{printable(second.path)} ({step_text(second.step)})"
        + (" (ordered by their stored steps)" if result.swapped else ""),
        f"Global LoGM: {defined_global_logm(first):.6f} -> {defined_global_logm(second):.6f}",
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
    entries = [(a, b, delta_or_none(a.logm, b.logm)) for a, b in _aligned(first, second)]
    entries.sort(key=lambda entry: -1.0 if entry[2] is None else abs(entry[2]), reverse=True)
    rows = [
        [
            a.name,
            logm_text(a.logm),
            logm_text(b.logm),
            sci(d, signed=True),
            str(a.zeros),
            str(b.zeros),
        ]
        for a, b, d in entries
    ]
    shown, more = capped(rows, limit, "parameters")
    lines = [f"Per-parameter LoGM, largest |delta| first ({len(shown)} of {len(rows)}):"]
    lines += table(["parameter", "LoGM A", "LoGM B", "delta", "zeros A", "zeros B"], shown)
    if more:
        lines.append(more)
    return lines


def _check_payload(result: _CheckResult, inside: bool) -> dict[str, object]:
    first, second = result.first, result.second
    parameters = [
        {
            "name": a.name,
            "logm_a": a.logm,
            "logm_b": b.logm,
            "delta": delta_or_none(a.logm, b.logm),
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
