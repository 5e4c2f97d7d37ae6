"""Traces: what a co-simulation measured, per step and per parameter, serializable to JSON.

A trace keeps statistics, never weights, so memory stays bounded however many steps run, and the
JSON written into a report folder is enough to re-plot and re-judge a run offline. That JSON, and
the landscape and norms JSON of :mod:`pytest_convergence.diagnostics`, are measurement files: the
fields of their classes, read back by :func:`from_constructor` (:class:`MeasurementFile`).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import itertools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, ClassVar, TypeAlias, TypeVar, cast

from pytest_convergence import jsonfile
from pytest_convergence.errors import TraceFormatError

__all__ = [
    "CoSimulation",
    "MeasurementFile",
    "MeasurementFormat",
    "ParameterColumns",
    "ParameterComparison",
    "ParameterStep",
    "StepComparison",
    "StepTrace",
    "Trace",
    "TraceFormatError",
    "from_constructor",
]

T = TypeVar("T")
_NONE = type(None)

TRACE_SCHEMA = "pytest-convergence/trace"
TRACE_SCHEMA_VERSION = 1


# --- measurement files ------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasurementFormat:
    """The file of a kind of measurement (a trace, a landscape slice, a norm evolution): a
    schema header, then the arguments of the class's constructor, one value per line, with the
    Inf and NaN of a diverged run kept as text. A damaged one is a ``TraceFormatError``
    reading "malformed {what} (...)".
    """

    schema: jsonfile.Schema
    what: str

    def dumps(self, fields: dict[str, Any]) -> str:
        return jsonfile.dumps_text_floats({**self.schema.header(), **fields})

    def loads(self, text: str, kind: type[T], *, source: str) -> T:
        parse = self.schema.reader(from_constructor(kind))
        return jsonfile.load_text(text, parse, source=source, error=self._error)

    def _error(self, source: str, problem: str) -> TraceFormatError:
        return TraceFormatError(source, f"malformed {self.what} ({problem})")


def from_constructor(kind: type[T]) -> jsonfile.Parser[T]:
    """A parser of an object holding the arguments of ``kind``'s constructor, each read by the
    parser of its annotated type; an argument with a default may be absent, so that a file
    written before it existed still reads.

    Measurement files mirror their classes field for field, so the classes are their schema:
    a field added to a class is read back without a second list to keep in step. Floats may be
    Inf or NaN (``jsonfile.text_float``); a type with no parser is a ``TypeError`` on first use.
    """
    parse: jsonfile.Parser[T] = _constructed(cast(object, kind))
    return parse


@functools.cache  # one parser per class, built on first use
def _constructed(kind: Any) -> jsonfile.Parser[Any]:
    parameters = inspect.signature(kind).parameters
    hints = typing.get_type_hints(kind.__init__)
    parsers = {name: _parser_for(hints[name]) for name in parameters}
    defaults = [name for name, item in parameters.items() if item.default is not item.empty]
    return jsonfile.record(kind, parsers, optional=defaults)


def _parser_for(hint: Any) -> jsonfile.Parser[Any]:
    simple: dict[object, jsonfile.Parser[Any]] = {
        str: jsonfile.string,
        bool: jsonfile.boolean,
        int: jsonfile.integer,
        float: jsonfile.text_float,
    }
    if hint in simple:
        return simple[hint]
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and len(arguments) == 2 and _NONE in arguments:
        return jsonfile.optional(_parser_for(next(a for a in arguments if a is not _NONE)))
    if origin in (tuple, collections.abc.Sequence) and arguments[1:] in ((), (Ellipsis,)):
        return jsonfile.array_of(_parser_for(arguments[0]))
    if origin is list:
        return _as_list(jsonfile.array_of(_parser_for(arguments[0])))
    if origin is dict and arguments[0] is str:
        return jsonfile.dict_of(_parser_for(arguments[1]))
    if isinstance(hint, type) and origin is None:
        return from_constructor(hint)
    raise TypeError(f"no JSON parser for the type {hint!r}")


def _as_list(parse: jsonfile.Parser[tuple[T, ...]]) -> jsonfile.Parser[list[T]]:
    def parse_list(value: object, where: str) -> list[T]:
        return list(parse(value, where))

    return parse_list


M = TypeVar("M", bound="MeasurementFile")


class MeasurementFile:
    """Base of a dataclass kept as a measurement file: ``to_json`` and ``from_json`` in the
    :class:`MeasurementFormat` the class declares as ``FILE_FORMAT``."""

    FILE_FORMAT: ClassVar[MeasurementFormat]

    def to_json(self) -> str:
        return self.FILE_FORMAT.dumps(asdict(cast(Any, self)))

    @classmethod
    def from_json(cls: type[M], text: str, *, source: str = "<string>") -> M:
        """Read back :meth:`to_json`'s text; a damaged one is a ``TraceFormatError`` naming
        ``source``."""
        return cls.FILE_FORMAT.loads(text, cls, source=source)


# --- records ----------------------------------------------------------------------------------


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

    A trace taken while training (:func:`pytest_convergence.step_statistics.step_trace`) keeps each
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


@dataclass(slots=True)
class ParameterComparison:
    """Candidate against reference for one parameter after one re-synced step. Read-only by
    convention, not frozen: one is built per parameter per step of every co-simulation, and a
    frozen dataclass's constructor costs several times as much.

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
    # Of a non-finite parameter: how many of its weights are NaN, and how many infinite.
    nan_count: int = 0
    inf_count: int = 0

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
class CoSimulation(MeasurementFile):
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

    FILE_FORMAT: ClassVar[MeasurementFormat] = MeasurementFormat(
        jsonfile.Schema(TRACE_SCHEMA, TRACE_SCHEMA_VERSION, "a co-simulation trace"),
        "co-simulation trace",
    )

    def to_json(self) -> str:
        fields = {item.name: getattr(self, item.name) for item in dataclass_fields(self)}
        fields["reference"] = self.reference.to_dict()  # its steps are not dataclasses
        fields["comparisons"] = [_comparison_fields(comparison) for comparison in self.comparisons]
        fields["module_types"] = dict(self.module_types)
        return self.FILE_FORMAT.dumps(fields)

    def write(self, path: Path) -> Path:
        """Write :meth:`to_json` atomically, replacing an older trace."""
        return jsonfile.write_text_file(path, self.to_json(), overwrite=True)


# Written only where a parameter has some: a healthy run's trace reads as it did before they were
# kept (its fingerprint, benchmarks/trace_fingerprints.py, unchanged), and reads back the same.
_NON_FINITE_COUNTS = ("nan_count", "inf_count")


def _comparison_fields(comparison: StepComparison) -> dict[str, Any]:
    fields = asdict(comparison)
    for parameter in fields["parameters"]:
        for name in _NON_FINITE_COUNTS:
            if parameter[name] == 0:
                del parameter[name]
    return fields
