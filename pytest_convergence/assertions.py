"""Assertion helpers: a real divergence raises :class:`ConvergenceError`, an AssertionError.

Misuse (unknown workload, malformed baseline) raises ``ValueError`` elsewhere; keeping the two
apart lets pytest show a divergence as a test failure and a mistake as an error.
"""

from __future__ import annotations

from collections.abc import Callable

from pytest_convergence.errors import ConvergenceError
from pytest_convergence.regions import Region, Verdict, judge
from pytest_convergence.replay import ReplayFinding
from pytest_convergence.report import FailureContext, format_failure
from pytest_convergence.traces import CoSimulation

__all__ = ["ConvergenceError", "assert_within_region"]


def assert_within_region(
    run: CoSimulation,
    region: Region,
    context: FailureContext,
    *,
    replay: Callable[[int], ReplayFinding] | None = None,
) -> Verdict:
    """Judge ``run`` against ``region``; raise :class:`ConvergenceError` when it left it.

    ``replay`` (given the first failing step) runs only on failure, so a passing check pays
    nothing for it. (A check in a test also writes a report folder before the message:
    :meth:`pytest_convergence.checks.ConvergenceChecker.run`.)
    """
    __tracebackhide__ = True
    verdict = judge(run, region)
    first = verdict.first_violation
    if first is None:
        return verdict
    finding = replay(first.step) if replay is not None else None
    message = format_failure(run, verdict, region, context, finding)
    raise ConvergenceError(message, run=run, verdict=verdict)
