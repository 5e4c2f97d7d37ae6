"""Flake-vs-bug triage: a failing check co-simulated again at further seeds.

The first question a failure's reader asks is whether it is the candidate's or its seed's. A
co-simulation is deterministic for a seed, so the only "flake" a check has is a seed at which a
legitimate candidate happens to land outside the region. :func:`triage` runs the same candidate
at the next seeds (seed + 1 to seed + n) against the same region and counts the failures. It
only informs: the check fails whatever the triage finds, and the triage writes nothing (no
baseline, no report folder). Plain Python, no pytest; its text is
:mod:`pytest_convergence.report`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pytest_convergence.errors import describe_error
from pytest_convergence.regions import judge

if TYPE_CHECKING:
    from pytest_convergence.regions import Region
    from pytest_convergence.traces import CoSimulation
    from pytest_convergence.workloads import Workload

__all__ = ["SeedOutcome", "Triage", "triage", "triage_seeds"]


@dataclass(frozen=True)
class SeedOutcome:
    """One further seed's verdict: whether it failed too and its worst ratio to a limit, or
    the error that stopped its co-simulation (then it is neither a failure nor a pass)."""

    seed: int
    failed: bool = False
    worst_ratio: float = math.nan
    error: str = ""


@dataclass(frozen=True)
class Triage:
    """The further seeds of a check that failed at ``seed``, and the seconds they took."""

    seed: int
    outcomes: tuple[SeedOutcome, ...]
    seconds: float

    @property
    def reproduced(self) -> int:
        """Further seeds at which the check fails too."""
        return sum(outcome.failed for outcome in self.outcomes)

    @property
    def judged(self) -> int:
        """Further seeds whose co-simulation ran to a verdict."""
        return sum(not outcome.error for outcome in self.outcomes)

    @property
    def fraction(self) -> str:
        """``k/n``: failing further seeds out of those tried (the failing seed not counted)."""
        return f"{self.reproduced}/{len(self.outcomes)}"

    @property
    def example_seed(self) -> int:
        """The seed worth re-running first: the first at which the failure reproduces (a
        second case to debug), else the first tried (a passing one to compare with)."""
        failing = [outcome.seed for outcome in self.outcomes if outcome.failed]
        return failing[0] if failing else self.outcomes[0].seed


def triage_seeds(seed: int, count: int) -> list[int]:
    """The ``count`` seeds after ``seed``: deterministic, so a rerun triages the same ones."""
    return [seed + offset for offset in range(1, count + 1)]


def triage(
    workload: Workload,
    region: Region,
    run: Callable[[Workload], CoSimulation],
    count: int,
) -> Triage:
    """Co-simulate with ``run`` at the ``count`` seeds after ``workload``'s and judge each
    against ``region``; ``count`` must be at least 1."""
    if count < 1:
        raise ValueError(f"triage needs at least 1 further seed, got {count}")
    start = time.perf_counter()
    outcomes = tuple(
        _outcome(workload.with_options(seed=seed), region, run)
        for seed in triage_seeds(workload.seed, count)
    )
    return Triage(workload.seed, outcomes, time.perf_counter() - start)


def _outcome(
    workload: Workload, region: Region, run: Callable[[Workload], CoSimulation]
) -> SeedOutcome:
    try:
        verdict = judge(run(workload), region)
    except Exception as error:
        # A seed that cannot run says nothing about the failure: shown, never counted.
        return SeedOutcome(workload.seed, error=describe_error(error))
    return SeedOutcome(workload.seed, failed=not verdict.passed, worst_ratio=verdict.worst_ratio)
