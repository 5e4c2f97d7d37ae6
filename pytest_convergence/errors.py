"""Exceptions: misuse is a ``ValueError``/``TypeError``; a real divergence is an ``AssertionError``.

Keeping both families here lets callers (the CLI, the plugin) map each to an exit code or a
usage error without importing torch. Every file that cannot be used is a :class:`FileFormatError`
naming the file first, whatever its kind.
"""

from __future__ import annotations


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
