"""The terminal summary table: one row per convergence check, worst first."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["summary_lines"]


def summary_lines(rows: Sequence[dict[str, object]]) -> list[str]:
    """Workload, candidate, steps, worst ratio to limit and verdict for every check."""
    header = (
        f"{'verdict':<9} {'worst/limit':>11}  {'workload':<18} {'candidate':<26} {'steps':>5}  test"
    )
    lines = [header]
    for row in sorted(rows, key=lambda r: -_ratio(r)):
        lines.append(
            f"{row.get('verdict', '?')!s:<9} {_ratio(row):>11.3g}  "
            f"{row.get('workload', '')!s:<18.18} {row.get('candidate', '')!s:<26.26} "
            f"{row.get('steps', '')!s:>5}  {row.get('nodeid', '')}"
        )
        first = row.get("first_violation")
        if first:
            lines.append(f"{'':<23}first violation: {first}")
    return lines


def _ratio(row: dict[str, object]) -> float:
    value = row.get("worst_ratio", 0.0)
    return float(value) if isinstance(value, int | float) else 0.0
