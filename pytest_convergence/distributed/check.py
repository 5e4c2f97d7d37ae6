"""``check_distributed``: a DDP hook judged like any candidate, with the fixture's baselines,
options, summary and report folders (the same :class:`~pytest_convergence.checks.CheckRequest`
as ``convergence.check``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_convergence.checks import Runner
from pytest_convergence.distributed.cosimulation import (
    calibrate_distributed,
    cosimulate_distributed,
)
from pytest_convergence.distributed.hooks import DistributedHook
from pytest_convergence.regions import Region, calibrate
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload

if TYPE_CHECKING:
    from pytest_convergence.checks import BoundCheck, CheckResult

__all__ = ["check_distributed"]


def check_distributed(
    convergence: BoundCheck,
    hook: DistributedHook,
    *,
    workload: str | Workload | None = None,
    steps: int | None = None,
    seed: int | None = None,
    known_good: DistributedHook | None = None,
    own_region: bool = False,
    world_size: int = 2,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    start_method: str | None = None,
    tolerance: float | None = None,
) -> CheckResult:
    """``convergence.check`` for a DDP hook: co-simulate it on ``world_size`` processes and
    judge it with the fixture's baselines, options, summary and report folders.

    Without ``known_good``, the region is the workload's single-process default region,
    ``<workload>.json``, the very file ``convergence.check`` uses (and records, under
    ``--convergence-record``): DDP's all-reduce over W ranks is an exact mean exchange over W
    workers up to summation order, and the statistics are relative to each step's update.
    ``known_good`` (or ``own_region=True``): a region calibrated from real DDP runs of that
    hook, ``<workload>--<hook name>.json``. A failure is triaged like a check's, each further
    seed another run on ``world_size`` processes.
    """
    __tracebackhide__ = True
    region_hook = hook if own_region else known_good
    request = convergence.request(
        hook.name,
        workload=workload,
        steps=steps,
        seed=seed,
        known_good=region_hook.name if region_hook else None,
    )
    resolved = request.workload

    def calibrate_region() -> Region:
        if region_hook is None:
            return calibrate(resolved, tolerance=tolerance)
        return calibrate_distributed(
            resolved,
            region_hook,
            world_size=world_size,
            backend=backend,
            timeout_s=timeout_s,
            start_method=start_method,
        )

    def run(workload: Workload) -> CoSimulation:
        return cosimulate_distributed(
            workload,
            hook,
            world_size=world_size,
            backend=backend,
            timeout_s=timeout_s,
            start_method=start_method,
        )

    return convergence.run(request, Runner(run=run, calibrate_region=calibrate_region))
