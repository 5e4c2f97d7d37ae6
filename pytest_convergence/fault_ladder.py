"""The fault ladder: known bugs of known sizes, injected into a workload to measure what its
region catches (the report is :mod:`pytest_convergence.power`).

Every fault is a candidate of the reference implementation, so the ladder needs nothing of the
user but the workload and the region just calibrated. Layer faults change gradients between
backward and the optimizer step; model faults change the optimizer's hyper-parameters. All of
them run as sides of one co-simulation, which shares the reference's steps (and, since none
changes the forward pass, the reference's gradients).

Layer faults are injected into every parameter at once, and each parameter's outcome is read
from its own checks: the candidate is re-synced to the reference before every step, so a fault
in one parameter's gradient changes no other parameter's update under an optimizer that treats
parameters apart (SGD, Adam and their kin). Where something couples them (a global gradient-norm
clip, a step function of the user's own), the reading is an estimate; ``benchmarks/
power_verification.py`` checks every claim by injecting it into its one parameter alone.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from pytest_convergence.candidates import Candidate, GradientTransform
from pytest_convergence.cosim import cosimulate_many
from pytest_convergence.power import (
    CATCH_MARGIN,
    FAULT_SIZES,
    FAULTS,
    MODEL,
    RATIO_CAP,
    Catch,
    FaultPower,
    PowerReport,
    fault_named,
)
from pytest_convergence.regions import Region, check_rows, ratio
from pytest_convergence.traces import CoSimulation
from pytest_convergence.training_step import NamedParameters
from pytest_convergence.workloads import OptimizerFactory, Workload

__all__ = ["SIDE_MEMORY_BUDGET", "fault_candidate", "measure_power", "skipped_faults"]

# Bytes of side copies (model and optimizer state) one co-simulation of the ladder may hold;
# a side holds about this many copies of the weights (weights, gradients, momentum or Adam's
# two moments). The zoo's models fit all 42 sides in one run.
SIDE_MEMORY_BUDGET = 1 << 30
SIDE_COPIES = 4
# Changes one optimizer parameter group in place, by the fault's size.
_GroupChange = Callable[[dict[str, object], float], None]


def fault_candidate(
    fault: str,
    size: float,
    workload: Workload,
    parameters: Collection[str] | None = None,
    *,
    precision: str | None = None,
) -> Candidate:
    """The reference with ``fault`` of ``size``: a layer fault in the gradients of
    ``parameters`` (every parameter when None), a model fault in the workload's optimizer;
    trained under the ``precision`` policy when it is not the workload's own (the ladder of
    a region calibrated for bf16 autocast faults a bf16 candidate, as its checks have)."""
    found = fault_named(fault)
    if not 0 < size <= 1:
        raise ValueError(f"fault {fault!r}: size {size} must be in (0, 1]")
    where = "" if parameters is None else f" on {', '.join(sorted(parameters))}"
    policy = precision if precision != workload.precision else None
    name = f"fault:{found.name}-{size:g}{where.replace(' ', '')}"
    description = f"{found.effect} (size {size:g}){where}"
    if found.scope == "layer":
        return Candidate(
            name=name,
            gradient_transform=_LAYER_FAULTS[found.name](size, parameters),
            description=description,
            precision=policy,
        )
    return Candidate(
        name=name,
        optimizer_factory=_changed_optimizer(
            workload.optimizer_factory, _MODEL_FAULTS[found.name], size
        ),
        # The gradients are the reference's: saying so lets the co-simulation reuse them
        # instead of running a forward and backward pass the fault does not change.
        gradient_transform=_unchanged_gradients,
        description=description,
        precision=policy,
    )


def skipped_faults(workload: Workload) -> dict[str, str]:
    """The model faults the workload's optimizer has nothing to inject into, with why."""
    optimizer = workload.optimizer_factory(NamedParameters(workload.build_model()))
    groups = optimizer.param_groups
    skipped = {}
    if not any(_momentum(group) for group in groups) and not any("betas" in g for g in groups):
        skipped["momentum"] = f"{type(optimizer).__name__} has no momentum or betas"
    if not any(_positive(group.get("weight_decay")) for group in groups):
        skipped["weight-decay"] = (
            f"no parameter group of {type(optimizer).__name__} has weight decay"
        )
    if not any("lr" in group for group in groups):
        skipped["learning-rate"] = f"{type(optimizer).__name__} has no learning rate"
    return skipped


def measure_power(
    workload: Workload, region: Region, sizes: Sequence[float] = FAULT_SIZES
) -> PowerReport:
    """Inject every fault class at every size into ``workload`` and judge each against
    ``region``: the smallest size caught per fault class and target, and its step. The
    faulted sides train under the precision policy the region is calibrated for."""
    sizes = tuple(sorted(sizes))
    precision = region.calibration.precision
    skipped = skipped_faults(workload)
    injected = [fault for fault in FAULTS if fault.name not in skipped]
    candidates = [
        fault_candidate(fault.name, size, workload, precision=precision)
        for fault in injected
        for size in sizes
    ]
    weights = sum(parameter.count for parameter in region.parameters.values())
    runs = iter(_cosimulated(workload, candidates, weights))
    by_fault = {fault.name: [_outcomes(next(runs), region) for _ in sizes] for fault in injected}
    targets = list(region.parameters)
    faults = []
    for fault in FAULTS:
        if fault.name in skipped:
            faults.append(FaultPower(fault.name, sizes, skipped=skipped[fault.name]))
            continue
        outcomes = by_fault[fault.name]
        if fault.scope == "model":
            caught = {MODEL: _smallest(sizes, [_whole_model(outcome) for outcome in outcomes])}
        else:
            caught = {
                target: _smallest(sizes, [outcome.get(target) for outcome in outcomes])
                for target in targets
            }
        faults.append(FaultPower(fault.name, sizes, caught))
    return PowerReport(seed=workload.seed, steps=workload.steps, faults=tuple(faults))


def _cosimulated(
    workload: Workload, candidates: Sequence[Candidate], weights: int
) -> list[CoSimulation]:
    """The candidates' co-simulations, as many sides to one reference run as fit
    :data:`SIDE_MEMORY_BUDGET`: each side holds a copy of the model (``weights`` weights) and
    its optimizer state, and 42 copies of a user's large model would not fit where one check
    does."""
    footprint = SIDE_COPIES * weights * (torch.finfo(workload.dtype).bits // 8)
    per_run = max(1, SIDE_MEMORY_BUDGET // max(footprint, 1))
    runs: list[CoSimulation] = []
    for first in range(0, len(candidates), per_run):
        runs += cosimulate_many(workload, candidates[first : first + per_run])
    return runs


@dataclass(frozen=True)
class _Outcome:
    """One target's verdict in one run: the first step its ratio to a limit reached the
    margin, and its worst ratio."""

    step: int
    ratio: float


def _outcomes(run: CoSimulation, region: Region) -> dict[str, _Outcome]:
    """Each parameter caught with the margin in ``run``: the step it first reached
    :data:`~pytest_convergence.power.CATCH_MARGIN` (a check of that many steps catches it so),
    and its worst ratio."""
    first: dict[str, int] = {}
    worst: dict[str, float] = {}
    for step, parameter, _, value, limit in check_rows(run, region):
        row_ratio = ratio(value, limit)
        if row_ratio >= CATCH_MARGIN:
            first.setdefault(parameter, step)
            worst[parameter] = max(worst.get(parameter, 0.0), row_ratio)
    return {name: _Outcome(step, min(worst[name], RATIO_CAP)) for name, step in first.items()}


def _whole_model(outcomes: dict[str, _Outcome]) -> _Outcome | None:
    if not outcomes:
        return None
    return _Outcome(
        min(outcome.step for outcome in outcomes.values()),
        max(outcome.ratio for outcome in outcomes.values()),
    )


def _smallest(sizes: Sequence[float], outcomes: Sequence[_Outcome | None]) -> Catch | None:
    """The smallest size from which every larger size is caught with the margin too: a size
    caught below one that is missed is luck, not power, and so is a catch just over its
    limit (:data:`~pytest_convergence.power.CATCH_MARGIN`)."""
    catch = None
    for size, outcome in reversed(list(zip(sizes, outcomes, strict=True))):
        if outcome is None:
            break
        catch = Catch(size, outcome.step, outcome.ratio)
    return catch


# --- layer faults: gradient transforms ---------------------------------------------------------


def _targeted(
    change: Callable[[str, torch.Tensor, int], None], parameters: Collection[str] | None
) -> GradientTransform:
    def transform(named_gradients: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        for name, gradient in named_gradients:
            if parameters is None or name in parameters:
                change(name, gradient, step)

    return transform


def _scaled(size: float, parameters: Collection[str] | None) -> GradientTransform:
    def scale(name: str, gradient: torch.Tensor, step: int) -> None:
        gradient.mul_(1 - size)

    return _targeted(scale, parameters)


def _dropped_slice(size: float, parameters: Collection[str] | None) -> GradientTransform:
    def drop(name: str, gradient: torch.Tensor, step: int) -> None:
        flat = gradient.view(-1) if gradient.is_contiguous() else gradient.flatten()
        count = min(flat.numel(), math.ceil(size * flat.numel()))
        flat[flat.numel() - count :].zero_()
        if flat.data_ptr() != gradient.data_ptr():
            gradient.copy_(flat.view_as(gradient))

    return _targeted(drop, parameters)


def _stale(size: float, parameters: Collection[str] | None) -> GradientTransform:
    previous: dict[str, torch.Tensor] = {}

    def mix(name: str, gradient: torch.Tensor, step: int) -> None:
        fresh = gradient.detach().clone()
        if name in previous:
            gradient.mul_(1 - size).add_(previous[name], alpha=size)
        previous[name] = fresh

    return _targeted(mix, parameters)


def _turned(size: float, parameters: Collection[str] | None) -> GradientTransform:
    def turn(name: str, gradient: torch.Tensor, step: int) -> None:
        norm = gradient.norm()
        if not torch.isfinite(norm) or float(norm) == 0.0:
            return
        seed = zlib.crc32(name.encode()) * 1_000_003 + step
        generator = torch.Generator().manual_seed(seed % 2**63)
        noise = torch.randn(gradient.shape, generator=generator, dtype=torch.float64)
        direction = gradient.detach().to(torch.float64, copy=True).cpu() / float(norm)
        noise -= direction * (noise * direction).sum()
        noise /= noise.norm()
        turned = direction * math.sqrt(1 - size * size) + noise * size
        gradient.copy_((turned * float(norm)).to(gradient.device, gradient.dtype))

    return _targeted(turn, parameters)


_LAYER_FAULTS: dict[str, Callable[[float, Collection[str] | None], GradientTransform]] = {
    "gradient-scale": _scaled,
    "dropped-slice": _dropped_slice,
    "stale-gradient": _stale,
    "direction-only": _turned,
}


def _unchanged_gradients(named_gradients: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
    return None


# --- model faults: optimizer hyper-parameters --------------------------------------------------


def _changed_optimizer(
    factory: OptimizerFactory, change: _GroupChange, size: float
) -> OptimizerFactory:
    def build(parameters: NamedParameters) -> torch.optim.Optimizer:
        optimizer = factory(parameters)
        for group in optimizer.param_groups:
            change(group, size)
        return optimizer

    return build


def _learning_rate(group: dict[str, object], size: float) -> None:
    if "lr" in group:
        group["lr"] = group["lr"] * (1 + size)  # type: ignore[operator]


def _less_momentum(group: dict[str, object], size: float) -> None:
    if _momentum(group):
        group["momentum"] = group["momentum"] * (1 - size)  # type: ignore[operator]
        if not _positive(group["momentum"]):
            # Nesterov needs momentum: the gross form of the bug is momentum gone altogether.
            group["nesterov"] = False
    elif "betas" in group:
        betas: tuple[float, float] = group["betas"]  # type: ignore[assignment]
        group["betas"] = (betas[0] * (1 - size), betas[1])


def _more_decay(group: dict[str, object], size: float) -> None:
    if _positive(group.get("weight_decay")):
        group["weight_decay"] = group["weight_decay"] * (1 + size)  # type: ignore[operator]


_MODEL_FAULTS: dict[str, _GroupChange] = {
    "learning-rate": _learning_rate,
    "momentum": _less_momentum,
    "weight-decay": _more_decay,
}


def _momentum(group: dict[str, object]) -> bool:
    return _positive(group.get("momentum"))


def _positive(value: object) -> bool:
    try:
        return float(value) > 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
