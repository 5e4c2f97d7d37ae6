"""Exceptions: misuse is a ``ValueError``/``TypeError``; a real divergence is an ``AssertionError``.

Keeping both families here lets callers (the CLI, the plugin) map each to an exit code or a
usage error without importing torch. Every file that cannot be used is a :class:`FileFormatError`
naming the file first, whatever its kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pytest_convergence.opcheck import Comparison
    from pytest_convergence.regions import Verdict
    from pytest_convergence.traces import CoSimulation


class NonFiniteWeightError(ValueError):
    """A weight is NaN or infinite: LoGM (and training) are meaningless from here on."""

    def __init__(
        self, parameter: str, *, nan_count: int, inf_count: int, step: int | None = None
    ) -> None:
        self.parameter = parameter
        self.nan_count = nan_count
        self.inf_count = inf_count
        self.step = step
        where = f"parameter {parameter!r}" + ("" if step is None else f" at step {step}")
        super().__init__(
            f"{where} holds non-finite weights ({nan_count} NaN, {inf_count} Inf): "
            "LoGM is undefined; the training step that produced them diverged"
        )


class FileFormatError(ValueError):
    """A file cannot be used: unreadable, malformed, or a file of another kind.

    The message starts with the file's path, because the fix is always an edit, a re-record or a
    re-run for that one file; ``reason`` is the rest, for callers that quote it elsewhere.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[type[FileFormatError], tuple[str, str]]:
        # Keeps the exception picklable across processes despite the two-argument constructor.
        return (type(self), (self.path, self.reason))


class BaselineError(FileFormatError):
    """A baseline file cannot be trusted: unreadable, malformed, or recorded elsewhere."""


class RegionFileError(FileFormatError):
    """A LoGM-delta region file cannot be used: unreadable, malformed, or a file of another kind
    (the fix is an edit or a re-run of ``pytest-convergence region``)."""


class TraceFormatError(FileFormatError):
    """A co-simulation trace, loss-landscape slice or norm-evolution JSON cannot be read back."""


class SnapshotFormatError(FileFormatError):
    """A snapshot file is unreadable, of an unknown format, or unsafe to read."""

    def _message(self) -> str:
        from pytest_convergence._formats import SUPPORTED_FORMATS_TEXT

        return f"{self.path}: {self.reason} (supported formats: {SUPPORTED_FORMATS_TEXT})"


class UnsafeExternalDataError(SnapshotFormatError):
    """ONNX external data points outside the model's folder: refuse to read it."""


class DistributedRunError(RuntimeError):
    """A distributed co-simulation could not complete: a worker raised, died, or hung, or the
    requested backend cannot run here. Not a verdict on the candidate: the run never finished.

    ``rank`` is the rank that failed first (None when the run timed out as a whole or never
    started); ``exitcode`` its exit code; ``worker_error`` the traceback it sent back.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        exitcode: int | None = None,
        worker_error: str = "",
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.worker_error = worker_error

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: rebuild through a helper, so the error survives pickling
        # (pytest-xdist and multiprocessing pickle exceptions).
        return (
            _rebuild_distributed_error,
            (str(self), self.rank, self.exitcode, self.worker_error),
        )


def _rebuild_distributed_error(
    message: str, rank: int | None, exitcode: int | None, worker_error: str
) -> DistributedRunError:
    return DistributedRunError(message, rank=rank, exitcode=exitcode, worker_error=worker_error)


class DistributedWorkerWarning(UserWarning):
    """A warning raised inside a worker process, re-issued in the caller's process.

    Workers are separate interpreters: their warnings would otherwise vanish into captured
    stderr, out of reach of the caller's warning filters (``filterwarnings = error`` included).
    The text names the ranks, the original category and where it was raised; filter this
    category with a message pattern to accept a specific one.
    """


class InsufficientPowerWarning(UserWarning):
    """A baseline's power report says it cannot catch a fault of a size the configuration
    requires (``convergence_required_power``): a passing check is weaker evidence than asked."""


class CompileFallbackError(RuntimeError):
    """``torch.compile`` would have run the model eagerly (its recompile limit was reached):
    the check would not test the compiled code, so it stops instead of passing."""


class ConvergenceError(AssertionError):
    """The candidate left the divergence region; the message says where and by how much.

    ``run`` is the co-simulation and ``verdict`` its judgement, for callers that act on them
    (a summary row, a notebook that plots the trace).
    """

    def __init__(self, message: str, *, run: CoSimulation, verdict: Verdict) -> None:
        super().__init__(message)
        self.run = run
        self.verdict = verdict


class MissingBaselineError(AssertionError):
    """No baseline recorded for this check: a test failure that says how to create one."""


class OpMismatchError(AssertionError):
    """The candidate op's outputs or gradients differ from the reference op's beyond the limit
    derived from the reference's own error. ``comparisons`` holds every quantity's figures."""

    def __init__(self, message: str, comparisons: Sequence[Comparison] = ()) -> None:
        super().__init__(message)
        self.comparisons = tuple(comparisons)


class CliError(Exception):
    """An input or usage problem of the ``pytest-convergence`` command: one line on stderr and
    exit status 2, because the fix is an argument or a file, never a traceback to debug."""


def describe_error(error: BaseException) -> str:
    """An exception in one line, for a summary row: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
