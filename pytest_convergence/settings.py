"""Run settings and marker arguments, validated without pytest or torch.

The plugin reads command-line and ini values into :class:`ConvergenceSettings`; keeping the
validation here lets the CLI and notebooks share it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENABLE_HINT",
    "MARKER_ARGUMENTS",
    "MISMATCH_POLICIES",
    "REPORT_MODES",
    "ConvergenceSettings",
    "parse_device",
    "resolve_threads",
    "validate_marker_arguments",
]

ENABLE_HINT = "run with --convergence, or set 'convergence_enabled = true' in the pytest ini file"

# The marker's keyword arguments and what each means; anything else is a usage error.
MARKER_ARGUMENTS: Mapping[str, str] = {
    "workload": "name of a registered workload (model, data, loss, optimizer)",
    "candidate": "name of the candidate implementation under test",
    "steps": "number of training steps to co-simulate (positive int)",
    "seed": "seed for initial weights and synthetic batches (int)",
    "baseline": "baseline file name, relative to the baselines folder",
    "device": "device to run on, e.g. 'cpu' or 'cuda'",
    "dtype": "floating dtype of the weights, e.g. 'float32'",
}

MISMATCH_POLICIES = ("warn", "fail")
REPORT_MODES = ("failures", "always")

_DEVICE_PATTERN = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


@dataclass(frozen=True)
class ConvergenceSettings:
    """What a run needs to know: whether convergence tests run, and how to reproduce them."""

    enabled: bool
    seed: int
    device: str
    baselines_dir: Path
    record: bool = False
    report_dir: Path | None = None
    always_report: bool = False
    mismatch_policy: str = "warn"
    threads: int | None = None


def parse_device(text: str) -> str:
    """Normalize a device string, refusing names torch would reject only much later."""
    device = text.strip().lower()
    if not _DEVICE_PATTERN.match(device):
        raise ValueError(
            f"--convergence-device={text!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    return device


def resolve_threads(text: str, *, cpu_count: int, workers: int | None) -> int | None:
    """Torch threads per process: ``auto`` leaves torch's default alone, except under
    pytest-xdist, where every worker would otherwise start one thread per core and the
    oversubscribed OpenMP pools slow each step down many times over."""
    value = text.strip().lower()
    if value == "auto":
        return max(1, cpu_count // workers) if workers else None
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"convergence threads {text!r}: use 'auto' or a positive int") from None
    if threads < 1:
        raise ValueError(f"convergence threads {text!r}: use 'auto' or a positive int")
    return threads


def validate_marker_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``@pytest.mark.convergence(...)`` arguments; ``ValueError`` names the culprit."""
    if args:
        raise ValueError(
            f"@pytest.mark.convergence takes keyword arguments only, got positional {args!r}; "
            f"known arguments: {', '.join(MARKER_ARGUMENTS)}"
        )
    unknown = sorted(set(kwargs) - set(MARKER_ARGUMENTS))
    if unknown:
        raise ValueError(
            f"@pytest.mark.convergence got unknown argument(s) {', '.join(unknown)}; "
            f"known arguments: {', '.join(MARKER_ARGUMENTS)}"
        )
    steps = kwargs.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"@pytest.mark.convergence(steps={steps!r}): steps must be a positive int")
    seed = kwargs.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"@pytest.mark.convergence(seed={seed!r}): seed must be an int")
    for name in ("workload", "candidate", "baseline", "dtype"):
        value = kwargs.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"@pytest.mark.convergence({name}={value!r}): {name} must be a str")
    if "device" in kwargs:
        parse_device(str(kwargs["device"]))
    return dict(kwargs)
