"""``pytest-convergence diff``: two implementations' snapshots of one architecture, parameter by
parameter."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_convergence.cli.arguments import Subcommands, rows_option
from pytest_convergence.cli.errors import errors_naming, mismatch_error, name_differences
from pytest_convergence.cli.exit_status import EXIT_OK
from pytest_convergence.cli.output import (
    ProgressBar,
    capped,
    delta_or_none,
    emit,
    logm_text,
    print_json,
    sci,
    shape_text,
    step_text,
    table,
)

if TYPE_CHECKING:
    import torch

    from pytest_convergence.snapshots import Snapshot

__all__ = ["DIFF_ROWS", "ParameterDiff", "add_parser", "run"]


# A table is read in a terminal or a CI log: the rows that matter most, then a count of the rest.
DIFF_ROWS = 20


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


def add_parser(commands: Subcommands) -> None:
    """Register ``diff``, its options and its handler."""
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
    rows_option(diff, DIFF_ROWS)
    diff.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diff``; returns the exit status."""
    from pytest_convergence.snapshots import load_snapshot

    path_a, path_b = Path(args.a), Path(args.b)
    with errors_naming(path_a):
        first = load_snapshot(path_a)
    with errors_naming(path_b):
        second = load_snapshot(path_b)
    differences = name_differences(list(first), list(second))
    if differences:
        raise mismatch_error(args.a, args.b, differences)
    diffs = _diff_tensors(first, second, path_a, path_b)
    global_a, global_b = _composed_logm(diffs, "a"), _composed_logm(diffs, "b")
    if args.json:
        print_json(
            {
                "a": {"path": args.a, "step": first.step, "global_logm": global_a},
                "b": {"path": args.b, "step": second.step, "global_logm": global_b},
                "parameters": diffs,
            }
        )
        return EXIT_OK
    emit("\n".join(_diff_lines(args, first, second, diffs)))
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
            with errors_naming(path_a):
                tensor_a = first[name]
            with errors_naming(path_b):
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
        raise mismatch_error(str(path_a), str(path_b), shape_errors)
    return diffs


def _diff_pair(
    name: str, tensor_a: torch.Tensor, tensor_b: torch.Tensor, path_a: Path, path_b: Path
) -> ParameterDiff:
    from pytest_convergence.metrics import difference_norms
    from pytest_convergence.snapshots.measure import measure_tensor

    with errors_naming(path_a):
        row_a = measure_tensor(name, tensor_a)
    with errors_naming(path_b):
        row_b = measure_tensor(name, tensor_b)
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
    gap = delta_or_none(global_a, global_b)
    lines = [
        f"A: {args.a} ({step_text(first.step)})",
        f"B: {args.b} ({step_text(second.step)})",
        f"Global LoGM: A {logm_text(global_a)}, B {logm_text(global_b)}, "
        f"|diff| {sci(None if gap is None else abs(gap))}",
    ]
    ordered = sorted(diffs, key=lambda d: _sort_value(d.relative_l2_error), reverse=True)
    if ordered:
        worst = ordered[0]
        lines.append(
            f"Largest relative L2 error: {worst.name!r} {sci(worst.relative_l2_error)} "
            f"(max |diff| {sci(worst.max_abs_diff)})"
        )
    rows = [
        [
            d.name,
            shape_text(d.shape),
            logm_text(d.logm_a),
            logm_text(d.logm_b),
            sci(d.logm_abs_diff),
            sci(d.relative_l2_error),
            sci(d.max_abs_diff),
            str(d.zeros_a),
            str(d.zeros_b),
        ]
        for d in ordered
    ]
    shown, more = capped(rows, args.rows, "parameters")
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
    lines += table(headers, shown)
    if more:
        lines.append(more)
    return lines


def _sort_value(value: float) -> float:
    return math.inf if math.isnan(value) else value
