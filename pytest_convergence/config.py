"""A run's configuration, read once from command-line options and ini values, then frozen.

One object, :class:`ConvergenceConfig`, is what the plugin stores in ``config.stash`` and what
every check reads: nothing is copied field by field across the plugin boundary. Validation
lives here, without pytest or torch, so the plugin's hooks stay a few lines and a notebook or
a script builds the same object directly (``ConvergenceConfig(baselines_dir=Path("baselines"))``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_convergence.power import parse_requirement

__all__ = [
    "DEFAULT_TRIAGE_SEEDS",
    "ENABLE_HINT",
    "MARKER_ARGUMENTS",
    "MISMATCH_POLICIES",
    "RECORD_COMMAND",
    "REPORT_MODES",
    "RUN_COMMAND",
    "ConvergenceConfig",
    "parse_device",
    "resolve_threads",
    "validate_marker_arguments",
]

ENABLE_HINT = "run with --convergence, or set 'convergence_enabled = true' in the pytest ini file"
# How a check is run again, and how its baseline is re-recorded: every message that says so
# (a failure, a missing or stale baseline) appends the test's node id.
RUN_COMMAND = "pytest --convergence"
RECORD_COMMAND = "pytest --convergence --convergence-record"

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

# A baseline recorded under another torch version, dtype or device: warn, or fail the check.
MISMATCH_POLICIES = ("warn", "fail")
REPORT_MODES = ("failures", "always")
# Further seeds a failing check is re-run at outside CI (ini convergence_triage = auto): two
# tell a persistent failure from an unlucky seed at three times the cost of the failure alone.
DEFAULT_TRIAGE_SEEDS = 2

_DEVICE_PATTERN = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
_DEVICES = "use 'cpu', 'cuda', 'cuda:N' or 'mps'"


@dataclass(frozen=True)
class ConvergenceConfig:
    """What checks need to know: where baselines live, whether to record them, where reports
    go, and what reproduces a run. ``seed`` and ``device`` of None leave each workload's own."""

    baselines_dir: Path
    enabled: bool = False
    seed: int | None = None
    device: str | None = None
    record: bool = False
    report_dir: Path | None = None
    always_report: bool = False
    mismatch_policy: str = "warn"
    threads: int | None = None
    # Read and record baseline= paths outside baselines_dir (refused by default).
    allow_external_baselines: bool = False
    # Further seeds a failing check is re-run at to tell a bug from an unlucky seed (0: none).
    triage: int = 0
    # Measure the power report (pytest_convergence.power) when recording a baseline.
    power: bool = True
    # (fault class, size): warn when a baseline cannot catch that fault at that size.
    required_power: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.triage < 0:
            raise ValueError(f"convergence triage {self.triage}: use 0 (off) or a positive int")
        if self.mismatch_policy not in MISMATCH_POLICIES:
            raise ValueError(
                f"baseline mismatch policy {self.mismatch_policy!r}: use one of "
                f"{', '.join(MISMATCH_POLICIES)}"
            )

    @classmethod
    def from_pytest(
        cls,
        options: Mapping[str, Any],
        ini: Mapping[str, Any],
        *,
        rootdir: Path,
        environ: Mapping[str, str],
        cpu_count: int,
    ) -> ConvergenceConfig:
        """The configuration from pytest's command-line ``options`` and ``ini`` values (by
        their dest names), the command line winning; ``ValueError`` names the bad value."""
        enabled = options["convergence"]
        seed = options["convergence_seed"]
        record = bool(options["convergence_record"])
        if record and environ.get("CI") and not options.get("convergence_record_in_ci"):
            raise ValueError(
                "--convergence-record in CI (CI is set): baselines are recorded locally, "
                "reviewed and committed, never written by a CI job, or a regression would "
                "re-record its own baseline; to record here anyway, pass "
                "--convergence-record-in-ci"
            )
        report_dir = _report_dir(options, ini, rootdir, environ)
        threads_text = options["convergence_threads"] or str(ini["convergence_threads"])
        workers = environ.get("PYTEST_XDIST_WORKER_COUNT")
        baselines = options["convergence_baselines"] or str(ini["convergence_baselines"])
        return cls(
            enabled=bool(enabled if enabled is not None else ini["convergence_enabled"]),
            seed=seed if seed is not None else _ini_int(ini, "convergence_seed"),
            device=parse_device(options["convergence_device"] or str(ini["convergence_device"])),
            baselines_dir=Path(rootdir, baselines).resolve(),
            record=record,
            report_dir=report_dir,
            always_report=options["convergence_report"] == "always",
            mismatch_policy=_mismatch_policy(ini),
            threads=resolve_threads(
                threads_text, cpu_count=cpu_count, workers=int(workers) if workers else None
            ),
            allow_external_baselines=bool(ini["convergence_allow_external_baselines"]),
            triage=_triage(options, ini, environ),
            power=bool(ini["convergence_power"]),
            required_power=tuple(
                parse_requirement(line, "ini option convergence_required_power")
                for line in ini["convergence_required_power"]
            ),
        )


def _report_dir(
    options: Mapping[str, Any], ini: Mapping[str, Any], rootdir: Path, environ: Mapping[str, str]
) -> Path | None:
    """Report folders are written on failure, except in CI (``CI`` set) unless asked for."""
    explicit = options["convergence_report_dir"]
    asked = explicit is not None or options["convergence_report"] == "always"
    if environ.get("CI") and not asked:
        return None
    folder = explicit or str(ini["convergence_report_dir"])
    return Path(rootdir, folder).resolve()


def _triage(options: Mapping[str, Any], ini: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    """Further seeds for a failing check: the option, else the ini value; ``auto`` is
    :data:`DEFAULT_TRIAGE_SEEDS` outside CI and none in CI (``CI`` set), where a failing job
    would pay for every failing check three times and the seed is fixed run after run."""
    seeds = options.get("convergence_triage")
    if seeds is not None:
        if seeds < 0:
            raise ValueError(f"--convergence-triage {seeds}: use 0 (off) or a positive int")
        return int(seeds)
    text = str(ini["convergence_triage"]).strip().lower()
    if text == "auto":
        return 0 if environ.get("CI") else DEFAULT_TRIAGE_SEEDS
    if not text.isdigit():
        raise ValueError(
            f"ini option convergence_triage = {text!r}: use auto, 0 (off) or a positive int"
        )
    return int(text)


def _ini_int(ini: Mapping[str, Any], name: str) -> int:
    text = str(ini[name])
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"ini option {name} = {text!r} is not an integer") from None


def _mismatch_policy(ini: Mapping[str, Any]) -> str:
    policy = str(ini["convergence_baseline_mismatch"]).strip()
    if policy not in MISMATCH_POLICIES:
        raise ValueError(
            f"ini option convergence_baseline_mismatch = {policy!r}: use one of "
            f"{', '.join(MISMATCH_POLICIES)}"
        )
    return policy


def parse_device(text: str) -> str:
    """Normalize a device string, refusing names torch would reject only much later."""
    device = text.strip().lower()
    if not _DEVICE_PATTERN.match(device):
        raise ValueError(f"--convergence-device={text!r} is not a device: {_DEVICES}")
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
        guesses = [
            f"'{match[0]}'"
            for name in unknown
            if (match := difflib.get_close_matches(name, MARKER_ARGUMENTS, n=1))
        ]
        guess = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise ValueError(
            f"@pytest.mark.convergence got unknown argument(s) {', '.join(unknown)}{guess}; "
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
        device = kwargs["device"]
        if not isinstance(device, str) or not _DEVICE_PATTERN.match(device.strip().lower()):
            raise ValueError(
                f"@pytest.mark.convergence(device={device!r}): {device!r} is not a device: "
                f"{_DEVICES}"
            )
    return dict(kwargs)
