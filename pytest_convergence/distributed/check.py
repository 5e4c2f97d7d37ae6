"""``check_distributed``: a DDP hook judged like any candidate, with the fixture's baselines,
options, summary and report folders."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from pytest_convergence.distributed.cosimulation import (
    calibrate_distributed,
    cosimulate_distributed,
)
from pytest_convergence.distributed.hooks import DistributedHook
from pytest_convergence.regions import DEFAULT_TOLERANCE, Region, calibrate
from pytest_convergence.workloads import Workload

if TYPE_CHECKING:
    from pytest_convergence.checks import BoundCheck, CheckResult

__all__ = ["check_distributed"]

_T = TypeVar("_T")


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
    tolerance: float = DEFAULT_TOLERANCE,
) -> CheckResult:
    """``convergence.check`` for a DDP hook: co-simulate it on ``world_size`` processes and
    judge it with the fixture's baselines, options, summary and report folders.

    Without ``known_good``, the region is the workload's single-process default region,
    ``<workload>.json``, the very file ``convergence.check`` uses (and records, under
    ``--convergence-record``): DDP's all-reduce over W ranks is an exact mean exchange over W
    workers up to summation order, and the statistics are relative to each step's update.
    ``known_good`` (or ``own_region=True``): a region calibrated from real DDP runs of that
    hook, ``<workload>--<hook name>.json``.
    """
    __tracebackhide__ = True
    checker = convergence.checker
    defaults = convergence.defaults
    chosen = workload if workload is not None else defaults.get("workload")
    if not isinstance(chosen, str | Workload):
        raise ValueError(
            "check_distributed() needs a workload: pass workload=..., or set "
            "@pytest.mark.convergence(workload=...)"
        )
    resolved = checker.resolve(
        chosen,
        steps=steps if steps is not None else _marker(defaults, "steps", int),
        seed=seed if seed is not None else _marker(defaults, "seed", int),
        dtype=_marker(defaults, "dtype", str),
        device=_marker(defaults, "device", str),
    )
    region_hook = hook if own_region else known_good

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

    checks_before = len(checker.results)
    try:
        return checker.judge_run(
            resolved,
            hook.name,
            checker.baseline_for(resolved, region_hook.name if region_hook else None),
            run=lambda: cosimulate_distributed(
                resolved,
                hook,
                world_size=world_size,
                backend=backend,
                timeout_s=timeout_s,
                start_method=start_method,
            ),
            calibrate_region=calibrate_region,
            known_good=region_hook.name if region_hook else None,
            label=convergence.label,
        )
    finally:
        if len(checker.results) > checks_before:
            convergence.record(checker.results[-1])


def _marker(defaults: dict[str, object], key: str, kind: type[_T]) -> _T | None:
    """A marker argument of the expected type, or None (the checker's default applies)."""
    value = defaults.get(key)
    return value if isinstance(value, kind) else None
