"""What a baseline can see: the power report recorded beside its region.

A region that passes every legitimate run is only half a test; the other half is which bugs it
fails. At record time :mod:`pytest_convergence.fault_ladder` injects a standard ladder of
faults into the workload itself (each fault class at the sizes of :data:`FAULT_SIZES`) and
keeps, per fault class and layer, the smallest size the region catches and the step it is
caught at. This module is that report: its types, its file format (read and written by
:mod:`pytest_convergence.baselines`), the lines printed when recording and by
``pytest-convergence inspect``, the number of steps it suggests, and the gaps between it and
the power a user requires (``convergence_required_power``).

Nothing here imports torch, so the CLI and the configuration read it at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_convergence import jsonfile

__all__ = [
    "CATCH_MARGIN",
    "FAULTS",
    "FAULT_SIZES",
    "MODEL",
    "RATIO_CAP",
    "Catch",
    "Fault",
    "FaultPower",
    "PowerReport",
    "StepsSuggestion",
    "fault_named",
    "parse_requirement",
    "power_document",
    "power_lines",
    "read_power",
    "required_power_gaps",
    "suggest_steps",
]

# Each fault class at these sizes, a relative error in the unit of its class: 0.1 is "a 10%
# gradient error on this layer", 1.0 the gross form of each bug (the gradient lost, a wholly
# stale gradient, an orthogonal update, the learning rate doubled, momentum or beta1 gone,
# weight decay applied twice).
FAULT_SIZES: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# A size counts as caught when its worst ratio to a limit is at least this: measured on the
# zoo (benchmarks/power_verification.py), the same fault's ratio varies from seed to seed by up
# to 1.8x, so a catch just over its limit on the ladder's trajectory is lost on another one in
# about one case in ten, and a catch at twice its limit carries over.
CATCH_MARGIN = 2.0
# The target of a fault that changes the whole optimizer, not one layer.
MODEL = "(whole model)"
# A catch's ratio as stored: non-finite weights are infinitely over, which JSON cannot write.
RATIO_CAP = 1e9
# A summary names the least-covered layers of a fault class, then counts the rest.
_LAYERS_SHOWN = 3


@dataclass(frozen=True)
class Fault:
    """A fault class: ``scope`` "layer" (injected into one parameter's gradient) or "model"
    (into the optimizer); ``effect`` says what a size means, for reports."""

    name: str
    scope: str
    effect: str


FAULTS: tuple[Fault, ...] = (
    Fault("gradient-scale", "layer", "the gradient multiplied by (1 - size)"),
    Fault("dropped-slice", "layer", "the last size-fraction of the gradient's elements zeroed"),
    Fault("stale-gradient", "layer", "size x the previous step's gradient mixed in"),
    Fault("direction-only", "layer", "the gradient turned by asin(size), its norm kept"),
    Fault("learning-rate", "model", "every group's learning rate multiplied by (1 + size)"),
    Fault("momentum", "model", "momentum (or Adam's beta1) multiplied by (1 - size)"),
    Fault("weight-decay", "model", "every group's weight decay multiplied by (1 + size)"),
)
_FAULTS_BY_NAME = {fault.name: fault for fault in FAULTS}


@dataclass(frozen=True)
class Catch:
    """A fault caught on one target: from ``size`` up every ladder size fails the check by at
    least :data:`CATCH_MARGIN` times a limit; at ``size`` it first does so at ``step``, and its
    worst ratio to a limit is ``ratio`` (at most :data:`RATIO_CAP`)."""

    size: float
    step: int
    ratio: float


@dataclass(frozen=True)
class FaultPower:
    """One fault class's outcome: per target (a parameter, or :data:`MODEL`) its catch, or
    None where no ladder size is caught; ``skipped`` says why the class was not injected (an
    optimizer without momentum has no momentum to get wrong)."""

    fault: str
    sizes: tuple[float, ...]
    caught: dict[str, Catch | None] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def blind(self) -> list[str]:
        """Targets that no size of the ladder is caught on."""
        return [target for target, catch in self.caught.items() if catch is None]


@dataclass(frozen=True)
class PowerReport:
    """The ladder's outcome on one workload: injected at ``seed`` over ``steps`` steps."""

    seed: int
    steps: int
    faults: tuple[FaultPower, ...]

    def fault(self, name: str) -> FaultPower | None:
        return next((power for power in self.faults if power.fault == name), None)

    @property
    def layer_faults(self) -> list[FaultPower]:
        """The injected faults whose targets are layers (not the whole optimizer)."""
        return [p for p in self.faults if p.skipped is None and MODEL not in p.caught]

    @property
    def targets(self) -> list[str]:
        """Every parameter the layer faults were injected into, in model order."""
        layer_faults = self.layer_faults
        return list(layer_faults[0].caught) if layer_faults else []


def fault_named(name: str, where: str = "fault") -> Fault:
    """The fault class ``name``; ``ValueError`` lists the known ones."""
    found = _FAULTS_BY_NAME.get(name)
    if found is None:
        known = ", ".join(_FAULTS_BY_NAME)
        raise ValueError(f"{where}: unknown fault class {name!r}; known: {known}")
    return found


# --- what it says ---------------------------------------------------------------------------


def power_lines(report: PowerReport) -> list[str]:
    """A short summary: one line per fault class (the sizes caught over its layers, the
    steps they are caught at, the layers it is blind on), then the steps suggestion."""
    lines = [f"power (faults injected at seed {report.seed}, {report.steps} steps):"]
    width = max(len(fault.name) for fault in FAULTS)
    for power in report.faults:
        lines.append(f"  {power.fault:<{width}}  {_fault_summary(power)}")
    lines.append(f"  {suggest_steps(report).text}")
    return lines


def _fault_summary(power: FaultPower) -> str:
    if power.skipped is not None:
        return f"not injected: {power.skipped}"
    caught = [catch for catch in power.caught.values() if catch is not None]
    if MODEL in power.caught:
        catch = power.caught[MODEL]
        if catch is None:
            return f"blind: not caught at twice a limit up to {_size(max(power.sizes))}"
        size = _from(catch.size, power.sizes)
        return f"caught from {size} at step {catch.step} ({catch.ratio:.3g}x its limit)"
    total = len(power.caught)
    parts = []
    if caught:
        sizes = sorted(catch.size for catch in caught)
        low = _from(sizes[0], power.sizes)
        spread = low if sizes[0] == sizes[-1] else f"{low} to {_size(sizes[-1])}"
        median = _from(sizes[len(sizes) // 2], power.sizes)
        parts.append(
            f"caught on {len(caught)} of {total} layers from {spread} (median {median}), "
            f"by step {max(catch.step for catch in caught)}"
        )
    if power.blind:
        parts.append(f"blind on {_listed(power.blind)} up to {_size(max(power.sizes))}")
    return "; ".join(parts)


def _listed(names: Sequence[str]) -> str:
    """The first few names, then how many more: a summary line stays one line."""
    shown = ", ".join(names[:_LAYERS_SHOWN])
    hidden = len(names) - _LAYERS_SHOWN
    return shown + (f" and {hidden} more" if hidden > 0 else "")


def _from(size: float, sizes: Sequence[float]) -> str:
    """A smallest size caught; at the ladder's bottom it may be smaller still."""
    return f"<={_size(size)}" if size == min(sizes) else _size(size)


def _size(size: float) -> str:
    return f"{size:.0%}" if size >= 0.1 else f"{size:.1%}"


@dataclass(frozen=True)
class StepsSuggestion:
    """How many steps the workload needs to keep the power it has: ``steps`` None when the
    recorded count is right; ``text`` says why."""

    steps: int | None
    text: str


def suggest_steps(report: PowerReport) -> StepsSuggestion:
    """Fewer steps where every catch comes early; a word on more where a class is blind.

    Evidence accumulates over steps, judged step by step against limits that do not depend
    on the step count, so a check of k steps catches exactly what this one caught by step k:
    the last step any catch needs is the count that keeps the whole report. Where that is the
    last step, more steps would catch smaller faults; how much smaller only a recording at
    more steps can say.
    """
    catches = [
        catch for power in report.faults for catch in power.caught.values() if catch is not None
    ]
    blind = [power.fault for power in report.faults if power.blind]
    more = (
        f"; {', '.join(blind)} blind on some target at every size: more steps accumulate "
        "more evidence (re-record with steps= raised to see)"
        if blind
        else ""
    )
    if not catches:
        return StepsSuggestion(None, f"steps: {report.steps}, nothing caught{more}")
    needed = max(catch.step for catch in catches)
    if needed < report.steps:
        return StepsSuggestion(
            needed,
            f"steps: every catch above is made by step {needed}: steps={needed} keeps this "
            f"power at {needed / report.steps:.0%} of the check's time{more}",
        )
    return StepsSuggestion(
        None,
        f"steps: all {report.steps} used (the last catches come at step {needed}; more steps "
        f"would catch smaller faults){more}",
    )


# --- what a user requires -----------------------------------------------------------------------


def parse_requirement(text: str, where: str) -> tuple[str, float]:
    """``"gradient-scale 0.1"``: the fault class must be caught at that size or smaller on
    every target; ``ValueError`` at ``where`` otherwise."""
    parts = text.split()
    if len(parts) != 2:
        raise ValueError(
            f"{where}: {text!r} is not 'FAULT SIZE' (e.g. 'gradient-scale 0.1'); fault classes: "
            f"{', '.join(_FAULTS_BY_NAME)}"
        )
    fault = fault_named(parts[0], where).name
    try:
        size = float(parts[1])
    except ValueError:
        raise ValueError(f"{where}: size {parts[1]!r} of {fault} is not a number") from None
    if not 0 < size <= 1 or not math.isfinite(size):
        raise ValueError(f"{where}: size {parts[1]} of {fault} must be in (0, 1]")
    return fault, size


def required_power_gaps(
    report: PowerReport | None, required: Iterable[tuple[str, float]]
) -> list[str]:
    """Where ``report`` falls short of ``required`` (fault class, largest size allowed): one
    line per fault class, naming the targets and the size each is caught from."""
    required = list(required)
    if not required:
        return []
    if report is None:
        return ["the baseline has no power report (recorded before it existed, or by a DDP check)"]
    gaps = []
    for fault, size in required:
        power = report.fault(fault)
        if power is None or power.skipped is not None:
            reason = power.skipped if power is not None else "not in the report"
            gaps.append(f"{fault} not injected ({reason})")
            continue
        short = [
            f"{target} ({'blind' if catch is None else f'from {_size(catch.size)}'})"
            for target, catch in power.caught.items()
            if catch is None or catch.size > size
        ]
        if short:
            gaps.append(f"{fault} required at {_size(size)}, caught later on {_listed(short)}")
    return gaps


# --- the file format ----------------------------------------------------------------------------


def power_document(report: PowerReport) -> dict[str, object]:
    """The report as written in a baseline file, fault classes in ladder order."""
    faults: dict[str, object] = {}
    for power in report.faults:
        entry: dict[str, object] = {"sizes": list(power.sizes)}
        if power.skipped is not None:
            entry["skipped"] = power.skipped
        else:
            entry["caught"] = {
                target: None if catch is None else _catch_fields(catch)
                for target, catch in power.caught.items()
            }
        faults[power.fault] = entry
    return {"seed": report.seed, "steps": report.steps, "faults": faults}


def _catch_fields(catch: Catch) -> dict[str, object]:
    return {"size": catch.size, "step": catch.step, "ratio": catch.ratio}


def read_power(value: object, where: str) -> PowerReport:
    """A baseline's ``power`` object, every field checked with its place in the document."""
    top = jsonfile.fields(value, where, _REPORT_FIELDS)
    return PowerReport(seed=top["seed"], steps=top["steps"], faults=top["faults"])


def _faults(value: object, where: str) -> tuple[FaultPower, ...]:
    found = jsonfile.mapping(value, where)
    faults = []
    for name, entry in found.items():
        place = jsonfile.entry(where, name)
        try:
            fault_named(name, place)
        except ValueError as error:
            raise jsonfile.DocumentError(None, str(error)) from None
        parsed = jsonfile.fields(entry, place, _FAULT_FIELDS, optional=("caught", "skipped"))
        if ("caught" in parsed) == ("skipped" in parsed):
            raise jsonfile.DocumentError(place, "needs exactly one of 'caught' and 'skipped'")
        faults.append(FaultPower(fault=name, **parsed))
    return tuple(faults)


def _sizes(value: object, where: str) -> tuple[float, ...]:
    sizes = jsonfile.array_of(jsonfile.finite)(value, where)
    if not sizes or any(not 0 < size <= 1 for size in sizes) or list(sizes) != sorted(set(sizes)):
        raise jsonfile.DocumentError(where, "expected increasing sizes in (0, 1]")
    return sizes


def _catch(value: object, where: str) -> Catch | None:
    if value is None:
        return None
    catch = _CATCH(value, where)
    if not 0 < catch.size <= 1:
        raise jsonfile.DocumentError(jsonfile.key(where, "size"), "expected a size in (0, 1]")
    return catch


def _ratio(value: object, where: str) -> float:
    ratio = jsonfile.finite(value, where)
    if ratio < CATCH_MARGIN:
        raise jsonfile.DocumentError(
            where, f"a catch is at least {CATCH_MARGIN:g}x its limit, found ratio {ratio}"
        )
    return ratio


_CATCH = jsonfile.record(
    Catch, {"size": jsonfile.finite, "step": jsonfile.positive, "ratio": _ratio}
)
_FAULT_FIELDS: Mapping[str, jsonfile.Parser[Any]] = {
    "sizes": _sizes,
    "caught": jsonfile.dict_of(_catch),
    "skipped": jsonfile.non_empty_string,
}
_REPORT_FIELDS: Mapping[str, jsonfile.Parser[Any]] = {
    "seed": jsonfile.integer,
    "steps": jsonfile.positive,
    "faults": _faults,
}
