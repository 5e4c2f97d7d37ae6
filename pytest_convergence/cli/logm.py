"""``pytest-convergence logm``: global and per-parameter LoGM of snapshot files."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pytest_convergence.cli.arguments import Subcommands, rows_option
from pytest_convergence.cli.exit_status import EXIT_OK
from pytest_convergence.cli.inputs import expand_inputs, measure_input
from pytest_convergence.cli.output import (
    ProgressBar,
    capped,
    emit,
    logm_text,
    print_json,
    printable,
    sci,
    shape_text,
    step_text,
    table,
)

if TYPE_CHECKING:
    from pytest_convergence.snapshots.measure import SnapshotLogm

__all__ = ["add_parser", "run"]


def add_parser(commands: Subcommands) -> None:
    """Register ``logm``, its options and its handler."""
    logm = commands.add_parser(
        "logm",
        help="global and per-parameter LoGM of snapshots",
        description="Global and per-parameter LoGM, weight and zero counts, L2 norm and "
        "standard deviation of snapshots (.pt, .pth, .safetensors, .npz, .onnx), read one "
        "tensor at a time.",
    )
    logm.add_argument("paths", nargs="+", metavar="PATH", help="snapshot files, folders or globs")
    logm.add_argument("--json", action="store_true", help="print JSON instead of tables")
    rows_option(logm, 0)
    logm.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``logm``; returns the exit status."""
    paths = expand_inputs(args.paths)
    results = []
    with ProgressBar(len(paths), "logm") as progress:
        for path in paths:
            progress.show(path.name)
            results.append(measure_input(path, with_stats=True))
            progress.advance()
    if args.json:
        print_json({"snapshots": results})
        return EXIT_OK
    for index, result in enumerate(results):
        if index:
            emit("")
        emit("\n".join(_logm_lines(result, args.rows)))
    return EXIT_OK


def _logm_lines(result: SnapshotLogm, limit: int) -> list[str]:
    global_text = (
        "undefined (no nonzero weights)"
        if result.global_logm is None
        else f"{result.global_logm:.6f}"
    )
    lines = [
        f"{printable(result.path)} ({step_text(result.step)}): global LoGM {global_text} over "
        f"{result.count:,} weights ({result.zeros:,} zeros) in {len(result.parameters)} tensors"
    ]
    rows = [
        [
            row.name,
            shape_text(row.shape),
            row.dtype,
            logm_text(row.logm),
            f"{row.count:,}",
            f"{row.zeros:,}",
            sci(row.l2_norm),
            sci(row.std),
        ]
        for row in result.parameters
    ]
    shown, more = capped(rows, limit, "parameters")
    headers = ["parameter", "shape", "dtype", "LoGM", "count", "zeros", "L2 norm", "std"]
    lines += table(headers, shown)
    if more:
        lines.append(more)
    if result.skipped:
        skipped = ", ".join(printable(name) for name in result.skipped)
        lines.append(f"  not floating point, skipped: {skipped}")
    return lines
