"""Exceptions: misuse is a ``ValueError``/``TypeError``; a real divergence is an ``AssertionError``.

Keeping both families here lets callers (the CLI, the plugin) map each to an exit code or a
usage error without importing torch.
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


class SnapshotFormatError(ValueError):
    """A snapshot file is unreadable, of an unknown format, or unsafe to read."""

    def __init__(self, path: object, reason: str) -> None:
        from pytest_convergence._formats import SUPPORTED_FORMATS_TEXT

        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason} (supported formats: {SUPPORTED_FORMATS_TEXT})")


class UnsafeExternalDataError(SnapshotFormatError):
    """ONNX external data points outside the model's folder: refuse to read it."""


class CliError(Exception):
    """An input or usage problem of the ``pytest-convergence`` command: one line on stderr and
    exit status 2, because the fix is an argument or a file, never a traceback to debug."""
