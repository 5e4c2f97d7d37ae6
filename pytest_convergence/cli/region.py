"""``pytest-convergence region``: the paper's divergence region, measured from a healthy run's
snapshots."""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

from pytest_convergence.cli.arguments import Subcommands, margin_factor, positive, rows_option
from pytest_convergence.cli.errors import defined_global_logm, errors_naming
from pytest_convergence.cli.exit_status import EXIT_OK
from pytest_convergence.cli.inputs import expand_inputs, measure_input, order_by_step
from pytest_convergence.cli.output import (
    ProgressBar,
    capped,
    check_writable,
    emit,
    print_json,
    sci,
    table,
)
from pytest_convergence.errors import CliError
from pytest_convergence.paper_regions import (
    LogmDeltaRegion,
    StepLogm,
    consecutive_deltas,
    measured_region,
    save_region,
)

__all__ = ["REGION_ROWS", "add_parser", "run"]

# A table is read in a terminal or a CI log: the rows that matter most, then a count of the rest.
REGION_ROWS = 40


def add_parser(commands: Subcommands) -> None:
    """Register ``region``, its options and its handler."""
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
        type=positive,
        metavar="N",
        help="per-epoch region: epochs end at steps 0, N, 2N, ...",
    )
    epochs.add_argument(
        "--epoch-every",
        type=positive,
        metavar="N",
        help="per-epoch region: every N-th snapshot in step order ends an epoch",
    )
    region.add_argument(
        "--margin",
        type=margin_factor,
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
    rows_option(region, REGION_ROWS)
    region.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``region``; returns the exit status."""
    out = Path(args.out) if args.out else None
    if out is not None:
        check_writable(out, force=args.force)
    if not (math.isfinite(args.margin) and args.margin >= 0):
        raise CliError(f"--margin must be a finite number >= 0, not {args.margin}")
    ordered = order_by_step(*_stored_steps(expand_inputs(args.snapshots)))
    if len(ordered) < 2:
        raise CliError(f"{ordered[0][0]}: a region needs at least two consecutive snapshots")
    points, hashes = _measure_run(ordered, sha256=args.sha256)
    region = _build_region(args, points, hashes)
    if args.json:
        print_json(_region_payload(region, points, out))
    else:
        emit("\n".join(_region_lines(region, points, args.rows)))
    if out is not None:
        save_region(out, region, overwrite=args.force)
        if not args.json:
            emit(f"Wrote {out}")
    return EXIT_OK


def _stored_steps(paths: list[Path]) -> tuple[list[Path], list[int | None]]:
    """Open each file lazily (headers only) for its stored step."""
    from pytest_convergence.snapshots import load_snapshot

    steps: list[int | None] = []
    for path in paths:
        with errors_naming(path):
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
            measured = measure_input(path)
            points.append(StepLogm(step, defined_global_logm(measured), str(path)))
            hashes.append(_file_sha256(path) if sha256 else None)
            progress.advance()
    return points, hashes


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with errors_naming(path), open(path, "rb") as handle:
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
        [str(p.step), f"{p.logm:.6f}", sci(delta_at.get(p.step), signed=True), p.path]
        for p in points
    ]
    shown, more = capped(rows, limit, "snapshots")
    lines = table(["step", "global LoGM", "delta", "file"], shown, left=frozenset({0, 3}))
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
