"""Compare two detection-benchmark runs outcome by outcome: every verdict, every method's
detection step, every worst check and value, to the last bit; only timings may differ.

A restructure of the engine or the judge must leave them identical:

    python benchmarks/detection/run.py --json /tmp/main.json
    python benchmarks/detection/compare.py benchmarks/detection/results.json /tmp/main.json

Exit status 0 when every outcome is identical, 1 otherwise (the differences are listed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Wall and CPU times of a run: the only fields allowed to differ.
TIMING_FIELDS = frozenset({"seconds"})
SHOWN = 20


def key(outcome: dict[str, Any]) -> tuple[object, ...]:
    return (outcome["workload"], outcome["seed"], outcome["label"], outcome["region"])


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Fields of one outcome that differ, timings left out."""
    names = (set(expected) | set(actual)) - TIMING_FIELDS
    return [
        f"{name}: {expected.get(name)!r} -> {actual.get(name)!r}"
        for name in sorted(names)
        if expected.get(name) != actual.get(name)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expected", type=Path, help="the recorded results (results*.json)")
    parser.add_argument("actual", type=Path, help="a new run's --json output")
    args = parser.parse_args(argv)
    expected = {key(o): o for o in json.loads(args.expected.read_text())["outcomes"]}
    actual = {key(o): o for o in json.loads(args.actual.read_text())["outcomes"]}
    problems = [f"missing from the new run: {k}" for k in expected if k not in actual]
    problems += [f"not in the recorded run: {k}" for k in actual if k not in expected]
    for outcome_key in expected.keys() & actual.keys():
        problems += [
            f"{outcome_key}: {difference}"
            for difference in differences(expected[outcome_key], actual[outcome_key])
        ]
    for problem in problems[:SHOWN]:
        print(problem)
    if len(problems) > SHOWN:
        print(f"... and {len(problems) - SHOWN} more")
    same = len(expected.keys() & actual.keys())
    print(f"{len(expected)} recorded outcomes, {len(actual)} new, {len(problems)} differences")
    return 1 if problems or same == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
