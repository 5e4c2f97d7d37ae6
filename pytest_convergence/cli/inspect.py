"""``pytest-convergence inspect``: what a co-simulation baseline was calibrated on, and what it
can catch (its power report)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_convergence.cli.arguments import Subcommands, rows_option
from pytest_convergence.cli.errors import errors_naming
from pytest_convergence.cli.exit_status import EXIT_OK
from pytest_convergence.cli.output import capped, emit, print_json, table
from pytest_convergence.power import PowerReport, power_document, power_lines, suggest_steps

if TYPE_CHECKING:
    from pytest_convergence.baselines import Baseline

__all__ = ["INSPECT_ROWS", "add_parser", "run"]

# Layers shown in the per-layer table unless --rows says otherwise.
INSPECT_ROWS = 40


def add_parser(commands: Subcommands) -> None:
    """Register ``inspect``, its options and its handler."""
    inspect = commands.add_parser(
        "inspect",
        help="what a co-simulation baseline was calibrated on and what it can catch",
        description="A co-simulation baseline's provenance and calibration, and its power "
        "report: for each fault class of the ladder injected when it was recorded, the "
        "smallest size caught per layer and the step it is caught at.",
    )
    inspect.add_argument("baseline", metavar="BASELINE.json", help="a co-simulation baseline")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    rows_option(inspect, INSPECT_ROWS)
    inspect.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``inspect``; returns the exit status."""
    from pytest_convergence.baselines import load_baseline

    path = Path(args.baseline)
    with errors_naming(path):
        baseline = load_baseline(path)
    if args.json:
        print_json(_payload(baseline))
    else:
        emit("\n".join(_lines(baseline, args.rows)))
    return EXIT_OK


def _lines(baseline: Baseline, rows: int) -> list[str]:
    provenance = baseline.provenance
    calibration = baseline.region.calibration
    threads = f"{provenance.threads} thread{'' if provenance.threads == 1 else 's'}"
    lines = [
        f"{baseline.path}: workload {provenance.workload!r}, "
        f"{len(baseline.region.parameters)} parameters, {calibration.steps} steps",
        f"  calibrated on: {calibration.description} "
        f"(seeds {', '.join(map(str, calibration.seeds))})",
        f"  recorded {provenance.created} with torch {provenance.torch_version}, "
        f"{provenance.dtype} on {provenance.device}, {threads}, "
        f"pytest-convergence {provenance.plugin_version}",
    ]
    power = baseline.region.power
    if power is None:
        lines.append(
            "no power report: recorded before power reports existed, with "
            "convergence_power = false, or by a DDP check; re-record it to measure one"
        )
        return lines
    return lines + power_lines(power) + _layer_table(power, rows)


def _layer_table(report: PowerReport, rows: int) -> list[str]:
    """Per layer, each layer fault's smallest size caught and its step (``-``: blind)."""
    layer_faults = report.layer_faults
    if not layer_faults:
        return []
    table_rows = []
    for target in report.targets:
        cells = [target]
        for power in layer_faults:
            catch = power.caught.get(target)
            cells.append("-" if catch is None else f"{catch.size:g} (step {catch.step})")
        table_rows.append(cells)
    shown, more = capped(table_rows, rows, "parameters")
    lines = [
        "smallest size caught per layer at twice a limit (the step it is first so; -: at no size):"
    ]
    lines += table(["parameter", *(power.fault for power in layer_faults)], shown)
    return lines + ([more] if more else [])


def _payload(baseline: Baseline) -> dict[str, object]:
    power = baseline.region.power
    suggestion = suggest_steps(power) if power is not None else None
    return {
        "baseline": str(baseline.path),
        "provenance": baseline.provenance,
        "calibration": baseline.region.calibration,
        "power": power_document(power) if power is not None else None,
        "suggested_steps": suggestion.steps if suggestion is not None else None,
    }
