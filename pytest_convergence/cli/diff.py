"""``pytest-convergence diff``: two implementations' snapshots of one architecture, parameter by
parameter.

Tensors pair by name; where the names differ (an ONNX export, another framework's names), they
pair by values and dimensions (:func:`pytest_convergence.snapshots.pair_tensors`), the output
says which paired how, and the global LoGMs are over the pairs, so that both count the same
weights once.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_convergence.cli.arguments import Subcommands, rows_option
from pytest_convergence.cli.errors import MISMATCH_EXAMPLES, errors_naming, mismatch_error
from pytest_convergence.cli.exit_status import EXIT_OK
from pytest_convergence.cli.output import (
    ProgressBar,
    capped,
    delta_or_none,
    emit,
    logm_text,
    print_json,
    printable,
    sci,
    shape_text,
    step_text,
    table,
)
from pytest_convergence.errors import CliError

if TYPE_CHECKING:
    import torch

    from pytest_convergence.snapshots import Snapshot, SnapshotPairing, TensorPair

__all__ = ["DIFF_ROWS", "ParameterDiff", "add_parser", "run"]


# A table is read in a terminal or a CI log: the rows that matter most, then a count of the rest.
DIFF_ROWS = 20


@dataclass(frozen=True)
class ParameterDiff:
    """One parameter of two implementations' snapshots of the same architecture.

    ``name`` and ``shape`` are A's; ``name_b`` is B's name for it, ``paired_by`` how the two
    were paired (``"name"``, ``"values"``, ``"dimensions"``) and ``axes`` the permutation that
    puts A's tensor in B's layout (None: the same layout), as
    :class:`~pytest_convergence.snapshots.TensorPair` has them.
    """

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
    name_b: str = ""
    paired_by: str = "name"
    axes: tuple[int, ...] | None = None


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
    diff.add_argument(
        "--allow-unpaired",
        action="store_true",
        help="where names differ and some tensors cannot be paired (an exporter's graph "
        "constants, a folded batch norm), compare the pairs and list the rest instead of "
        "failing",
    )
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
    pairing = _pairing(args, first, second)
    diffs = _diff_tensors(first, second, pairing.pairs, path_a, path_b)
    global_a, global_b = _composed_logm(diffs, "a"), _composed_logm(diffs, "b")
    if args.json:
        print_json(
            {
                "a": {"path": args.a, "step": first.step, "global_logm": global_a},
                "b": {"path": args.b, "step": second.step, "global_logm": global_b},
                "parameters": diffs,
                "duplicates": pairing.duplicates,
                "unpaired": pairing.unpaired,
            }
        )
        return EXIT_OK
    emit("\n".join(_diff_lines(args, first, second, pairing, diffs)))
    return EXIT_OK


def _pairing(args: argparse.Namespace, first: Snapshot, second: Snapshot) -> SnapshotPairing:
    """Which tensor of A is which of B's; an error unless every tensor is accounted for (or
    ``--allow-unpaired`` says to go on with the pairs)."""
    from pytest_convergence.snapshots import pair_tensors

    pairing = pair_tensors(first, second)
    if not pairing.pairs:
        raise CliError(
            f"no tensor of {args.a} pairs with one of {args.b} by name, values or dimensions: "
            "they are snapshots of different models"
        )
    if not pairing.unpaired or args.allow_unpaired:
        return pairing
    conflicts = [u.reason for u in pairing.unpaired if u.names_a == u.names_b]
    if len(conflicts) == len(pairing.unpaired):
        # A name both hold, with another shape: the architectures differ.
        raise mismatch_error(args.a, args.b, conflicts)
    reasons = [u.reason for u in pairing.unpaired]
    more = len(reasons) - MISMATCH_EXAMPLES
    raise CliError(
        f"{args.a} and {args.b}: {_unpaired_count(pairing)} cannot be paired: "
        + "; ".join(reasons[:MISMATCH_EXAMPLES])
        + (f"; and {more} more" if more > 0 else "")
        + f"; pass --allow-unpaired to compare the {len(pairing.pairs)} pairs without them, "
        "or save one snapshot with the other's names"
    )


def _unpaired_count(pairing: SnapshotPairing) -> str:
    """``2 tensors of A and 1 of B``, leaving out a side with none."""
    count_a = sum(len(u.names_a) for u in pairing.unpaired)
    count_b = sum(len(u.names_b) for u in pairing.unpaired)
    noun = "tensor" if (count_a or count_b) == 1 else "tensors"
    if count_a and count_b:
        return f"{count_a} {noun} of A and {count_b} of B"
    return f"{count_a or count_b} {noun} of {'A' if count_a else 'B'}"


def _diff_tensors(
    first: Snapshot,
    second: Snapshot,
    pairs: Sequence[TensorPair],
    path_a: Path,
    path_b: Path,
) -> list[ParameterDiff]:
    """Stream both snapshots in step: at most one tensor of each is held at a time."""
    diffs: list[ParameterDiff] = []
    shape_errors: list[str] = []
    with ProgressBar(len(pairs), "diff") as progress:
        for pair in pairs:
            progress.show(pair.name_a)
            with errors_naming(path_a):
                tensor_a = first[pair.name_a]
            with errors_naming(path_b):
                tensor_b = second[pair.name_b]
            shape_a = tuple(tensor_a.shape)
            if pair.axes is not None:
                tensor_a = tensor_a.permute(pair.axes)
            if tensor_a.shape != tensor_b.shape:
                shape_errors.append(
                    f"{pair.name_a!r} has shape {list(shape_a)} vs {list(tensor_b.shape)}"
                )
            elif not shape_errors:
                diffs.append(
                    _diff_pair(pair, shape_a, tensor_a, tensor_b, path_a=path_a, path_b=path_b)
                )
            del tensor_a, tensor_b
            progress.advance()
    if shape_errors:
        raise mismatch_error(str(path_a), str(path_b), shape_errors)
    return diffs


def _diff_pair(
    pair: TensorPair,
    shape_a: tuple[int, ...],
    tensor_a: torch.Tensor,
    tensor_b: torch.Tensor,
    *,
    path_a: Path,
    path_b: Path,
) -> ParameterDiff:
    """``tensor_a`` is already in B's layout; the row gives A's own shape."""
    from pytest_convergence.metrics import difference_norms
    from pytest_convergence.snapshots.measure import measure_tensor

    with errors_naming(path_a):
        row_a = measure_tensor(pair.name_a, tensor_a)
    with errors_naming(path_b):
        row_b = measure_tensor(pair.name_b, tensor_b)
    norms = difference_norms(tensor_a, tensor_b)
    return ParameterDiff(
        name=pair.name_a,
        shape=shape_a,
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
        name_b=pair.name_b,
        paired_by=pair.paired_by,
        axes=pair.axes,
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
    args: argparse.Namespace,
    first: Snapshot,
    second: Snapshot,
    pairing: SnapshotPairing,
    diffs: list[ParameterDiff],
) -> list[str]:
    global_a, global_b = _composed_logm(diffs, "a"), _composed_logm(diffs, "b")
    gap = delta_or_none(global_a, global_b)
    over = "" if pairing.by_name else f" over the {len(diffs)} pairs"
    lines = [
        f"A: {printable(args.a)} ({step_text(first.step)})",
        f"B: {printable(args.b)} ({step_text(second.step)})",
        *([] if pairing.by_name else _pairing_lines(pairing, args.rows)),
        f"Global LoGM{over}: A {logm_text(global_a)}, B {logm_text(global_b)}, "
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


def _pairing_lines(pairing: SnapshotPairing, limit: int) -> list[str]:
    """How the tensors were paired where names differ: a count, then each pair not by name,
    each duplicate and each group left unpaired."""
    pairs = pairing.pairs
    counts = {how: sum(p.paired_by == how for p in pairs) for how in _PAIRED_BY}
    summary = (
        f"Names differ: {len(pairs)} pairs ({counts['name']} by name, {counts['values']} by "
        f"values, {counts['dimensions']} by dimensions)"
    )
    if pairing.duplicates:
        summary += f", {len(pairing.duplicates)} duplicates counted once"
    if pairing.unpaired:
        summary += f", {_unpaired_count(pairing)} not paired"
    how = {"values": "equal values", "dimensions": "the only tensors left with these dimensions"}
    details = [
        f"  A {p.name_a!r} = B {p.name_b!r}: {how[p.paired_by]}{_layout_text(p.axes)}"
        for p in pairs
        if p.paired_by != "name"
    ]
    details += [
        f"  {d.side} {d.name!r}: equal to {d.side} {d.equal_to!r}{_layout_text(d.axes)}, "
        "counted once"
        for d in pairing.duplicates
    ]
    details += [f"  not paired: {u.reason}" for u in pairing.unpaired]
    if 0 < limit < len(details):
        hidden = len(details) - limit
        details = [*details[:limit], f"  ... {hidden} more (--rows 0 shows all)"]
    return [summary, *details]


_PAIRED_BY = ("name", "values", "dimensions")


def _layout_text(axes: tuple[int, ...] | None) -> str:
    if axes is None:
        return ""
    return ", transposed" if axes == (1, 0) else f", axes permuted {axes}"
