"""The CLI's one-line input errors: each names the file it is about, and none is a traceback,
because the next step is to fix an argument or a file, not to debug this tool."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_convergence.errors import CliError, NonFiniteWeightError

if TYPE_CHECKING:
    from pytest_convergence.snapshots.measure import SnapshotLogm

__all__ = [
    "MISMATCH_EXAMPLES",
    "DivergedSnapshotError",
    "defined_global_logm",
    "errors_naming",
    "mismatch_error",
    "name_differences",
    "one_line",
    "structure_differences",
]


# Differences listed when two snapshots do not have the same parameters.
MISMATCH_EXAMPLES = 5


class DivergedSnapshotError(CliError):
    """A snapshot holds NaN or Inf weights: an input error for most commands, but for
    ``check`` the very divergence a region exists to catch."""


@contextlib.contextmanager
def errors_naming(path: Path | str) -> Iterator[None]:
    """Make sure an input error names the file it came from."""
    try:
        yield
    except CliError:
        raise
    except NonFiniteWeightError as error:
        raise DivergedSnapshotError(f"{path}: {error}") from None
    except (ValueError, TypeError, OSError) as error:
        message = one_line(error)
        raise CliError(message if str(path) in message else f"{path}: {message}") from None


def one_line(error: BaseException) -> str:
    """An exception's message on one line; an ``OSError`` as ``file: reason``."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split())
    return text or type(error).__name__


def defined_global_logm(measured: SnapshotLogm) -> float:
    """The global LoGM, or an input error when no weight is nonzero (nothing to compare)."""
    if measured.global_logm is None:
        raise CliError(
            f"{measured.path}: LoGM is undefined, no nonzero weights "
            f"({measured.count} weights, {measured.zeros} zeros)"
        )
    return measured.global_logm


def structure_differences(first: SnapshotLogm, second: SnapshotLogm) -> list[str]:
    """Parameter names and shapes that differ, the first few of each kind."""
    shapes_a = {row.name: row.shape for row in first.parameters}
    shapes_b = {row.name: row.shape for row in second.parameters}
    return name_differences(list(shapes_a), list(shapes_b)) + [
        f"{name!r} has shape {list(shapes_a[name])} vs {list(shapes_b[name])}"
        for name in shapes_a
        if name in shapes_b and shapes_a[name] != shapes_b[name]
    ]


def name_differences(names_a: Sequence[str], names_b: Sequence[str]) -> list[str]:
    """Names only in the first, then names only in the second, each in its own order."""
    set_a, set_b = set(names_a), set(names_b)
    only_a = [name for name in names_a if name not in set_b]
    only_b = [name for name in names_b if name not in set_a]
    return [f"{name!r} only in the first" for name in only_a] + [
        f"{name!r} only in the second" for name in only_b
    ]


def mismatch_error(first: str, second: str, differences: Sequence[str]) -> CliError:
    """One line: how many differences, the first few, and a count of the rest."""
    shown = "; ".join(differences[:MISMATCH_EXAMPLES])
    more = len(differences) - MISMATCH_EXAMPLES
    tail = f"; and {more} more" if more > 0 else ""
    return CliError(
        f"{first} and {second} do not hold the same parameters "
        f"({len(differences)} difference{'s' if len(differences) > 1 else ''}): {shown}{tail}"
    )
