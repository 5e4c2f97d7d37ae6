"""The ``pytest-convergence`` command: LoGM, the paper's regions and reports, offline.

Not all training code can run inside pytest: a kernel may live in C++ or JAX, a run may take
days on a cluster. Weights on disk are the common ground, so these commands read snapshot files
in any supported format, and the JSON traces that ``pytest --convergence`` leaves in report
folders.

Exit status: 0 when all is well (or the delta is inside the region), 1 when a delta is outside
the region, 2 for a usage or input error. Input errors are one line on stderr naming the file,
never a traceback: the next step is to fix an argument or a file, not to debug this tool.

One module per subcommand (``logm``, ``region``, ``check``, ``diff``, ``report``,
``inspect``), each owning
its sub-parser and its handler; ``inputs``, ``output``, ``errors``, ``arguments`` and
``exit_status`` hold what they share. The measuring lives in the library
(:mod:`pytest_convergence.snapshots.measure`, :mod:`pytest_convergence.metrics`,
:mod:`pytest_convergence.paper_regions`): the commands parse, call and print.

torch is imported only by the commands that read weights or baselines, so ``--help`` answers
at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pytest_convergence._version import __version__
from pytest_convergence.cli import check, diff, inspect, logm, region, report
from pytest_convergence.cli.diff import ParameterDiff
from pytest_convergence.cli.errors import one_line
from pytest_convergence.cli.exit_status import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTSIDE
from pytest_convergence.cli.inputs import expand_inputs, order_by_step, step_from_name
from pytest_convergence.cli.output import PROG, ProgressBar, printable
from pytest_convergence.errors import CliError

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    """``ParameterRow`` and ``SnapshotLogm`` live in :mod:`pytest_convergence.snapshots.measure`;
    they are still importable from here, loaded on first use so that ``--help`` stays free of
    torch."""
    if name in ("ParameterRow", "SnapshotLogm"):
        from pytest_convergence.snapshots import measure as measuring

        return getattr(measuring, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    for subcommand in (logm, region, check, diff, report, inspect):
        subcommand.add_parser(commands)
    return parser


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
        return _fail(args.command, one_line(error))
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(command: str, message: str) -> int:
    text = printable(" ".join(message.split()))
    print(f"{PROG} {command}: error: {text}", file=sys.stderr)
    return EXIT_ERROR
