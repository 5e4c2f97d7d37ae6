"""Assertion helpers: a real divergence raises :class:`ConvergenceError`, an AssertionError.

Misuse (unknown workload, malformed baseline) raises ``ValueError`` elsewhere; keeping the two
apart lets pytest show a divergence as a test failure and a mistake as an error.
"""

from __future__ import annotations

from collections.abc import Callable

from pytest_convergence.regions import Region, Verdict, judge
from pytest_convergence.replay import ReplayFinding
from pytest_convergence.report import FailureContext, format_failure
from pytest_convergence.traces import CoSimulation

__all__ = ["ConvergenceError", "assert_within_region"]


class ConvergenceError(AssertionError):
    """The candidate left the divergence region; the message says where and by how much."""

    def __init__(self, message: str, *, run: CoSimulation, verdict: Verdict) -> None:
        super().__init__(message)
        self.run = run
        self.verdict = verdict


def assert_within_region(
    run: CoSimulation,
    region: Region,
    context: FailureContext,
    *,
    replay: Callable[[int], ReplayFinding] | None = None,
    on_failure: Callable[[Verdict], None] | None = None,
) -> Verdict:
    """Judge ``run`` against ``region``; raise :class:`ConvergenceError` when it left it.

    ``replay`` (given the first failing step) and ``on_failure`` (say, writing a report) run
    only on failure, so a passing check pays for neither.
    """
    __tracebackhide__ = True
    verdict = judge(run, region)
    if verdict.passed:
        return verdict
    first = verdict.first_violation
    assert first is not None
    finding = replay(first.step) if replay is not None else None
    if on_failure is not None:
        on_failure(verdict)
    message = format_failure(run, verdict, region, context, finding)
    raise ConvergenceError(message, run=run, verdict=verdict)
