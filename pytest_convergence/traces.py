"""Traces: what a co-simulation measured, per step and per parameter, serializable to JSON.

A trace keeps statistics, never weights, so memory stays bounded however many steps run, and the
JSON written into a report folder is enough to re-plot and re-judge a run offline.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, TypeAlias

__all__ = [
    "CoSimulation",
    "ParameterColumns",
    "ParameterComparison",
    "ParameterStep",
    "StepComparison",
    "StepTrace",
    "Trace",
]

TRACE_SCHEMA = "pytest-convergence/trace"
TRACE_SCHEMA_VERSION = 1


@dataclass(slots=True)
class ParameterStep:
    """One parameter of one implementation after one step.

    Not frozen, unlike the comparison records: a trace builds one per parameter per step, and a
    frozen dataclass's constructor costs five times as much, a measurable share of a small
    model's training step (benchmarks/tracing_overhead.py). Treat it as read-only all the same.
    """

    name: str
    count: int
    zeros: int
    logm: float | None
    weight_norm: float
    update_norm: float
    grad_norm: float | None


# A step's per-parameter statistics, one sequence per field of ParameterStep (in its order,
# with squared weight norms where ParameterStep has norms), as a snapshot returns them.
ParameterColumns: TypeAlias = tuple[
    Sequence[str],
    Sequence[int],
    Sequence[int],
    Sequence[float | None],
    Sequence[float],
    Sequence[float] | None,
    Sequence[float | None] | None,
]


class StepTrace:
    """One implementation after ``step`` steps (step 0: the initial weights). Read-only by
    convention, not frozen, for the reason given at :class:`ParameterStep`.

    A trace taken while training (:func:`pytest_convergence.tracing.step_trace`) keeps each
    step's statistics as the columns the snapshot returned and builds the per-parameter
    records when they are first read: building them inside the step cost a small model's
    training step about 2% more (benchmarks/tracing_overhead.py), and a passing check never
    reads them.
    """

    __slots__ = ("_columns", "_records", "global_logm", "loss", "step")

    def __init__(
        self,
        step: int,
        loss: float | None,
        global_logm: float | None,
        parameters: Sequence[ParameterStep] = (),
    ) -> None:
        self.step = step
        self.loss = loss
        self.global_logm = global_logm
        self._records: tuple[ParameterStep, ...] | None = tuple(parameters)
        self._columns: ParameterColumns | None = None

    @classmethod
    def from_columns(
        cls, step: int, loss: float | None, global_logm: float | None, columns: ParameterColumns
    ) -> StepTrace:
        """A step whose records are built from ``columns`` when first read. Update norms of
        None read as 0 (a step with no previous snapshot), gradient norms of None as None."""
        trace = cls(step, loss, global_logm)
        trace._records, trace._columns = None, columns
        return trace

    @property
    def parameters(self) -> tuple[ParameterStep, ...]:
        if self._records is None:
            assert self._columns is not None
            names, counts, zeros, logms, squares, updates, gradients = self._columns
            self._records = tuple(
                map(
                    ParameterStep,
                    names,
                    counts,
                    zeros,
                    logms,
                    map(math.sqrt, squares),
                    updates if updates is not None else itertools.repeat(0.0),
                    gradients if gradients is not None else itertools.repeat(None),
                )
            )
            self._columns = None
        return self._records

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": self.loss,
            "global_logm": self.global_logm,
            "parameters": [asdict(record) for record in self.parameters],
        }

    def _key(self) -> tuple[int, float | None, float | None, tuple[ParameterStep, ...]]:
        return (self.step, self.loss, self.global_logm, self.parameters)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepTrace):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        return (
            f"{type(self).__qualname__}(step={self.step!r}, loss={self.loss!r}, "
            f"global_logm={self.global_logm!r}, parameters={self.parameters!r})"
        )


@dataclass
class Trace:
    """One implementation's run: the reference's, or a free-running candidate's."""

    label: str
    steps: list[StepTrace] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "steps": [step.to_dict() for step in self.steps]}

    def global_logm_deltas(self) -> list[float]:
        """Per-iteration change of global LoGM: the quantity of the paper's region."""
        values = [s.global_logm for s in self.steps]
        return [b - a for a, b in itertools.pairwise(values) if a is not None and b is not None]

    def losses(self) -> list[float]:
        return [s.loss for s in self.steps if s.loss is not None]


@dataclass(frozen=True)
class ParameterComparison:
    """Candidate against reference for one parameter after one re-synced step.

    ``bias`` is the projection of the candidate's update error onto the reference's update,
    relative to it: the candidate moved (1 + bias) times as far along the reference's direction.
    ``noise`` is the rest of the error, relative to the reference update's norm.
    ``radial`` is the error's component along the reference's weights, relative to the update's
    norm: how far the candidate's weights grew (or shrank) along themselves. Rounding leaves it
    near zero; weight decay, clipping, masks and scale bugs move it, even when they are small
    next to the update. It is the magnitude change LoGM measures, without LoGM's 1/w weighting,
    which lets the smallest weights dominate.
    """

    name: str
    count: int
    reference_logm: float | None
    candidate_logm: float | None
    reference_zeros: int
    candidate_zeros: int
    reference_update_norm: float
    error_norm: float
    bias: float | None
    noise: float
    non_finite: bool = False
    radial: float | None = None

    @property
    def logm_gap(self) -> float | None:
        if self.reference_logm is None or self.candidate_logm is None:
            return None
        return self.candidate_logm - self.reference_logm

    @property
    def relative_error(self) -> float:
        """Whole update error over the reference update's norm: bounds |bias| from above."""
        if self.reference_update_norm > 0:
            return self.error_norm / self.reference_update_norm
        return math.inf if self.error_norm > 0 else 0.0

    @property
    def zero_change(self) -> int:
        return self.candidate_zeros - self.reference_zeros


@dataclass(frozen=True)
class StepComparison:
    """All parameters after one re-synced step ``step`` (1-based), with losses and global LoGM."""

    step: int
    reference_loss: float
    candidate_loss: float
    reference_global_logm: float | None
    candidate_global_logm: float | None
    previous_global_logm: float | None
    parameters: tuple[ParameterComparison, ...]

    @property
    def non_finite(self) -> bool:
        return any(p.non_finite for p in self.parameters)


@dataclass
class CoSimulation:
    """A reference and one candidate stepped in lockstep from identical state."""

    workload: str
    candidate: str
    seed: int
    steps: int
    dtype: str
    device: str
    reference: Trace
    comparisons: list[StepComparison] = field(default_factory=list)
    # Parameter name -> class of the module that owns it, for reports ("Conv2d").
    module_types: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        fields = {item.name: getattr(self, item.name) for item in dataclass_fields(self)}
        fields["reference"] = self.reference.to_dict()  # its steps are not dataclasses
        fields["comparisons"] = [asdict(comparison) for comparison in self.comparisons]
        fields["module_types"] = dict(self.module_types)
        return dump_with_schema(TRACE_SCHEMA, fields, schema_version=TRACE_SCHEMA_VERSION)

    def write(self, path: Path) -> Path:
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> CoSimulation:
        try:
            data = load_with_schema(TRACE_SCHEMA, text)
            data.pop("schema_version", None)
            reference = Trace(
                label=data["reference"]["label"],
                steps=[_step_trace(s) for s in data["reference"]["steps"]],
            )
            comparisons = [_step_comparison(c) for c in data.pop("comparisons")]
            data["reference"] = reference
            return cls(**data, comparisons=comparisons)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: malformed co-simulation trace ({error})") from None


def _step_trace(data: dict[str, Any]) -> StepTrace:
    parameters = tuple(ParameterStep(**p) for p in data.pop("parameters"))
    return StepTrace(**data, parameters=parameters)


def _step_comparison(data: dict[str, Any]) -> StepComparison:
    parameters = tuple(ParameterComparison(**p) for p in data.pop("parameters"))
    return StepComparison(**data, parameters=parameters)


def dump_with_schema(schema: str, fields: dict[str, Any], **header: Any) -> str:
    """A JSON document of ``fields`` under a ``schema`` tag (and ``header`` entries), with Inf
    and NaN stored as text."""
    return json.dumps(_finite_or_text({"schema": schema, **header, **fields}), indent=1)


def load_with_schema(schema: str, text: str) -> dict[str, Any]:
    """The fields of a :func:`dump_with_schema` document, Inf and NaN restored; ValueError
    when it is tagged with another schema (the caller names the file)."""
    data = _text_to_float(json.loads(text))
    if data.pop("schema", None) != schema:
        raise ValueError(f"not a {schema} file")
    return data  # type: ignore[no-any-return]


def _finite_or_text(value: Any) -> Any:
    """JSON has no Inf or NaN: store them as strings and restore them on load."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {key: _finite_or_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_text(item) for item in value]
    return value


def _text_to_float(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {key: _text_to_float(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_text_to_float(item) for item in value]
    return value
