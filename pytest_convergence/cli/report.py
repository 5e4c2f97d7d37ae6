"""``pytest-convergence report``: a self-contained HTML page of a co-simulation trace."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_convergence.cli.arguments import Subcommands
from pytest_convergence.cli.errors import errors_naming
from pytest_convergence.cli.exit_status import EXIT_OK
from pytest_convergence.cli.inputs import PAPER_PREFIX, load_region_spec
from pytest_convergence.cli.output import PROG, check_writable, emit
from pytest_convergence.errors import CliError
from pytest_convergence.paper_regions import BASELINE_SCHEMA, REGION_SCHEMA, write_text_file

if TYPE_CHECKING:
    from pytest_convergence.html_report import ReportBand
    from pytest_convergence.ratio_map import RatioMap
    from pytest_convergence.regions import Region
    from pytest_convergence.traces import CoSimulation

__all__ = ["add_parser", "run"]


def add_parser(commands: Subcommands) -> None:
    """Register ``report``, its options and its handler."""
    report = commands.add_parser(
        "report",
        help="self-contained HTML page of a co-simulation trace",
        description="A self-contained HTML page (no network) of a trace.json written by "
        "pytest --convergence: against a co-simulation baseline, the verdict and a map of each "
        "parameter's worst ratio to its limit per step; LoGM trajectories, the region band, "
        "the comparison table.",
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
    report.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``report``; returns the exit status."""
    from pytest_convergence.html_report import render_report
    from pytest_convergence.traces import CoSimulation

    trace = Path(args.trace)
    out = Path(args.out) if args.out else trace.with_name("report.html")
    check_writable(out, force=args.force)
    with errors_naming(trace):
        cosimulation = CoSimulation.from_json(trace.read_text(encoding="utf-8"), source=str(trace))
    band, region = _report_region(args.baseline, cosimulation.workload, cosimulation.candidate)
    ratios = _ratios(cosimulation, region, args.baseline)
    power = region.power if region is not None else None
    page = render_report(cosimulation, band=band, ratios=ratios, power=power, source=str(trace))
    with errors_naming(out):
        write_text_file(out, page, overwrite=args.force)
    drawn = f" with the region of {band.source}" if band is not None else " (no region band)"
    emit(f"Wrote {out}{drawn}")
    return EXIT_OK


def _report_region(
    spec: str | None, workload: str, candidate: str
) -> tuple[ReportBand | None, Region | None]:
    """The region to draw: the one named, else the workload's baseline in ./baselines if any;
    the per-parameter region too where it is a co-simulation baseline.

    A named region that cannot be read is an error; a guessed one that cannot be read only
    costs the band, with a warning, because the page is still worth having.
    """
    if spec is not None:
        return _band_from(spec)
    guess = _default_baseline(workload, candidate)
    if guess is None:
        return None, None
    try:
        return _band_from(guess)
    except CliError as error:
        print(f"{PROG} report: warning: no region band: {error}", file=sys.stderr)
        return None, None


def _ratios(run: CoSimulation, region: Region | None, spec: str | None) -> RatioMap | None:
    """The verdict and its map; a named baseline of another model is an error, a guessed one
    only costs the map, with a warning, as it costs the band."""
    if region is None:
        return None
    from pytest_convergence.ratio_map import ratio_map

    try:
        return ratio_map(run, region)
    except ValueError as error:
        if spec is not None:
            raise CliError(f"{spec}: {error}") from None
        print(f"{PROG} report: warning: no verdict and no map: {error}", file=sys.stderr)
        return None


def _band_from(spec: str) -> tuple[ReportBand, Region | None]:
    from pytest_convergence.html_report import ReportBand

    if spec.startswith(PAPER_PREFIX) or _schema_of(spec) == REGION_SCHEMA:
        delta_region, name = load_region_spec(spec)
        band = ReportBand(
            delta_region.low,
            delta_region.high,
            f"LoGM-delta region per {delta_region.granularity}",
            name,
        )
        return band, None
    from pytest_convergence.baselines import load_baseline

    with errors_naming(spec):
        baseline = load_baseline(Path(spec))
    low, high = baseline.region.global_logm_delta
    band = ReportBand(low, high, "per-iteration LoGM-delta region of the baseline", spec)
    return band, baseline.region


def _default_baseline(workload: str, candidate: str) -> str | None:
    folder = Path("baselines")
    for name in (f"{workload}--{candidate}.json", f"{workload}.json"):
        if "/" not in name and "\\" not in name and (folder / name).is_file():
            return str(folder / name)
    return None


def _schema_of(spec: str) -> object:
    with errors_naming(spec):
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
