"""Argument types and options that several subcommands share."""

from __future__ import annotations

import argparse
import math
from typing import TypeAlias

__all__ = ["Subcommands", "margin_factor", "non_negative", "positive", "rows_option"]

# argparse names no public type for what add_subparsers returns.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def rows_option(parser: argparse.ArgumentParser, default: int) -> None:
    """``--rows N``: how many table rows to show, the rest counted in one line."""
    shown = "all" if default == 0 else str(default)
    parser.add_argument(
        "--rows",
        type=non_negative,
        default=default,
        metavar="N",
        help=f"table rows to show, 0 for all (default: {shown})",
    )


def non_negative(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {text!r}")
    return value


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None


def margin_factor(text: str) -> float:
    """An argparse type: a finite number >= 0 (NaN and inf would make a region meaningless)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, not {text!r}")
    return value
