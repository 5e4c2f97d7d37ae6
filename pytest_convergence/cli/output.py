"""What the command prints: the progress bar, tables, numbers, JSON, and a stdout that
survives its reader leaving (``| head``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from pytest_convergence.errors import CliError

__all__ = [
    "PROG",
    "ProgressBar",
    "capped",
    "check_writable",
    "delta_or_none",
    "emit",
    "logm_text",
    "print_json",
    "printable",
    "sci",
    "shape_text",
    "step_text",
    "table",
]

# Every line the command prints about itself starts with its name, as argparse's own do.
PROG = "pytest-convergence"


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
        """Count one item as done."""
        self.done += 1

    def close(self) -> None:
        """Erase the bar, so that what follows prints on a clean line."""
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


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: frozenset[int] = frozenset({0})
) -> list[str]:
    """Names left-aligned (the ``left`` columns), numbers right-aligned, widths from content."""
    rows = [[printable(cell) for cell in row] for row in rows]
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


def printable(text: object) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): a name read from a
    downloaded file must not add lines to a report or send escape sequences to a terminal."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in str(text))


def logm_text(value: float | None) -> str:
    """A LoGM with six decimals, or ``-`` where it is undefined."""
    return "-" if value is None else f"{value:.6f}"


def sci(value: float | None, signed: bool = False) -> str:
    """Scientific notation with four digits; ``-`` for a missing value, ``inf``/``nan`` as such."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.3e}" if signed else f"{value:.3e}"


def shape_text(shape: Sequence[int]) -> str:
    """``[32, 16]``, as PyTorch prints a shape, without ``torch.Size``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def step_text(step: int | None) -> str:
    """``step 3``, or ``step ?`` for a snapshot that stores none."""
    return "step ?" if step is None else f"step {step}"


def capped(rows: list[list[str]], limit: int, noun: str) -> tuple[list[list[str]], str | None]:
    """At most ``limit`` rows (0: all), and a line counting what was left out."""
    if limit <= 0 or len(rows) <= limit:
        return rows, None
    hidden = len(rows) - limit
    return rows[:limit], f"  ... {hidden} more {noun} (--rows 0 shows all)"


def emit(text: str) -> None:
    """Print to stdout, and stop quietly once its reader has gone (``| head``)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def print_json(payload: object) -> None:
    """The payload as indented JSON, dataclasses included, on stdout."""
    emit(json.dumps(_json_ready(payload), indent=1, allow_nan=False))


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


def delta_or_none(before: float | None, after: float | None) -> float | None:
    """``after - before``, or None when either LoGM is undefined (no nonzero weights)."""
    return None if before is None or after is None else after - before


def check_writable(out: Path, *, force: bool) -> None:
    """Fail before the work, not after it, when the result could not be written."""
    if out.is_dir():
        raise CliError(f"{out} is a folder; give a file name")
    if out.exists() and not force:
        raise CliError(f"{out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise CliError(f"{out}: folder {out.parent} does not exist")
