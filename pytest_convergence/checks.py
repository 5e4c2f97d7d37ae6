"""One convergence check, end to end: baseline, co-simulation, verdict, report.

Plain Python, no pytest: the plugin's ``convergence`` fixture, a notebook or a script call
:meth:`ConvergenceChecker.check` the same way.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pytest_convergence._version import __version__
from pytest_convergence.assertions import ConvergenceError, assert_within_region
from pytest_convergence.baselines import (
    Baseline,
    Provenance,
    baseline_path,
    check_compatibility,
    load_baseline,
    record_baseline,
)
from pytest_convergence.candidates import Candidate, get_candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.regions import DEFAULT_TOLERANCE, Region, Verdict, calibrate
from pytest_convergence.replay import ReplayFinding, replay_step
from pytest_convergence.report import FailureContext, write_report
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload, get_workload

__all__ = [
    "BoundCheck",
    "CheckOptions",
    "CheckResult",
    "ConvergenceChecker",
    "MissingBaselineError",
]


class MissingBaselineError(AssertionError):
    """No baseline recorded for this check: a test failure that says how to create one."""


@dataclass(frozen=True)
class CheckOptions:
    """Session-wide settings a check needs; the plugin fills it from options and ini."""

    baselines_dir: Path
    seed: int | None = None
    device: str | None = None
    record: bool = False
    report_dir: Path | None = None
    always_report: bool = False
    mismatch_policy: str = "warn"
    reproduce: str = "pytest --convergence"
    rerecord: str = "pytest --convergence --convergence-record"


@dataclass
class CheckResult:
    """What the terminal summary and JUnit XML show for one check."""

    workload: str
    candidate: str
    steps: int
    verdict: str  # "passed", "failed", "recorded+passed", ...
    worst_ratio: float
    baseline: str
    first_violation: str = ""
    recorded: bool = False


@dataclass
class ConvergenceChecker:
    """Runs checks and caches calibrated regions for the session (one calibration per
    workload and known-good candidate, however many tests share it)."""

    options: CheckOptions
    results: list[CheckResult] = field(default_factory=list)
    # Re-recorded baselines and what changed, for the terminal summary.
    changes: dict[Path, list[str]] = field(default_factory=dict)
    _recorded: dict[Path, Baseline] = field(default_factory=dict)

    def check(
        self,
        candidate: Candidate,
        workload: str | Workload,
        *,
        steps: int | None = None,
        seed: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
        baseline: str | None = None,
        known_good: Candidate | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        label: str | None = None,
    ) -> CheckResult:
        """Co-simulate ``candidate`` on ``workload`` and judge it against its baseline.

        ``known_good``: judge against the region of that known-good (lossy) implementation,
        ``<workload>--<known_good>.json``, calibrated against it when recording; pass the
        candidate itself to hold later versions of it to today's behaviour. ``tolerance``: the
        relative precision a reference-perturbation region accepts, used when recording.
        """
        __tracebackhide__ = True
        resolved = self.resolve(workload, steps=steps, seed=seed, dtype=dtype, device=device)
        if baseline is not None:
            path = self.options.baselines_dir / baseline
        else:
            path = self.baseline_for(resolved, known_good.name if known_good else None)
        return self.judge_run(
            resolved,
            candidate.name,
            path,
            run=lambda: cosimulate(resolved, candidate),
            calibrate_region=lambda: calibrate(resolved, candidate=known_good, tolerance=tolerance),
            replay=lambda step: replay_step(resolved, candidate, step),
            known_good=known_good.name if known_good else None,
            label=label,
            report_candidate=candidate,
        )

    def judge_run(
        self,
        workload: Workload,
        candidate: str,
        path: Path,
        *,
        run: Callable[[], CoSimulation],
        calibrate_region: Callable[[], Region],
        replay: Callable[[int], ReplayFinding] | None = None,
        known_good: str | None = None,
        label: str | None = None,
        report_candidate: Candidate | None = None,
    ) -> CheckResult:
        """The part of a check shared by every way of producing a co-simulation (one process,
        DDP): load or record the baseline at ``path`` (``known_good``: the candidate its region
        is calibrated against, for provenance), run, judge, report, keep the result.

        ``report_candidate``: the candidate, re-run on ``workload`` for the report folder's
        loss-landscape and norm plots; None where it cannot run in this process (a DDP hook),
        and the folder has the trace and LoGM plot only."""
        __tracebackhide__ = True
        if self.options.record:
            stored = self._record(workload, path, known_good, calibrate_region)
        else:
            stored = self._load(workload, path, label)
        simulation = run()
        result = CheckResult(
            workload=workload.name,
            candidate=candidate,
            steps=workload.steps,
            verdict="passed",
            worst_ratio=0.0,
            baseline=str(path),
            recorded=self.options.record,
        )
        self.results.append(result)
        # assert_within_region writes the report before it formats the message, which lists
        # the files written.
        written: list[Path] = []
        context = self._context(path, stored, label, written)

        def on_failure(failed: Verdict) -> None:
            written.extend(
                self._write_report(
                    simulation,
                    stored.region,
                    failed,
                    label,
                    workload=workload,
                    candidate=report_candidate,
                )
            )

        try:
            verdict = assert_within_region(
                simulation, stored.region, context, replay=replay, on_failure=on_failure
            )
        except ConvergenceError as error:
            result.verdict = "failed"
            result.worst_ratio = error.verdict.worst_ratio
            first = error.verdict.first_violation
            if first is not None:
                result.first_violation = f"step {first.step} {first.parameter}: {first.check}"
            raise
        result.worst_ratio = verdict.worst_ratio
        if self.options.always_report:
            self._write_report(
                simulation,
                stored.region,
                verdict,
                label,
                workload=workload,
                candidate=report_candidate,
            )
        return result

    def resolve(
        self,
        workload: str | Workload,
        *,
        steps: int | None,
        seed: int | None,
        dtype: str | None,
        device: str | None,
    ) -> Workload:
        """The workload with this check's overrides and the session's seed and device."""
        base = get_workload(workload) if isinstance(workload, str) else workload
        torch_dtype = _parse_dtype(dtype) if dtype is not None else None
        return base.with_options(
            steps=steps,
            seed=seed if seed is not None else self.options.seed,
            dtype=torch_dtype,
            device=device if device is not None else self.options.device,
        )

    def baseline_for(self, workload: Workload, known_good: str | None = None) -> Path:
        """``<workload>[-<device type>][--<known good>].json`` in the baselines folder."""
        # Regions are per device type: GPU kernels (TF32, cuDNN algorithms) are another regime.
        device_type = torch.device(workload.device).type
        name = workload.name if device_type == "cpu" else f"{workload.name}-{device_type}"
        return baseline_path(self.options.baselines_dir, name, known_good)

    def _load(self, workload: Workload, path: Path, label: str | None) -> Baseline:
        __tracebackhide__ = True
        if path in self._recorded:
            return self._recorded[path]
        if not path.exists():
            raise MissingBaselineError(
                f"no baseline for workload {workload.name!r}: {path} does not exist.\n"
                f"Create it:  {self._rerecord(label)}  (then review and commit {path.name})"
            )
        stored = load_baseline(path)
        check_compatibility(
            stored,
            torch_version=torch.__version__,
            dtype=_dtype_name(workload.dtype),
            device=workload.device,
            policy=self.options.mismatch_policy,
        )
        if stored.region.calibration.steps < workload.steps:
            raise ValueError(
                f"{path}: calibrated for {stored.region.calibration.steps} steps, this check runs "
                f"{workload.steps}; re-record it: {self._rerecord(label)}"
            )
        return stored

    def _record(
        self,
        workload: Workload,
        path: Path,
        known_good: str | None,
        calibrate_region: Callable[[], Region],
    ) -> Baseline:
        """Calibrate and write once per baseline file per process, however many tests share it."""
        if path in self._recorded:
            return self._recorded[path]
        region = calibrate_region()
        provenance = Provenance(
            workload=workload.name,
            candidate=known_good,
            dtype=_dtype_name(workload.dtype),
            device=workload.device,
            torch_version=torch.__version__,
            plugin_version=__version__,
            threads=torch.get_num_threads(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        existed = path.exists()
        changes = record_baseline(path, region, provenance)
        stored = Baseline(path=path, region=region, provenance=provenance)
        self._recorded[path] = stored
        if existed:
            self.changes[path] = changes
        return stored

    def _context(
        self, path: Path, stored: Baseline, label: str | None, report_files: list[Path]
    ) -> FailureContext:
        calibration = stored.region.calibration
        provenance = stored.provenance
        runs = len(calibration.seeds) * calibration.draws
        summary = (
            f"{runs} runs (seeds {', '.join(map(str, calibration.seeds))}), "
            f"{calibration.steps} steps, torch {provenance.torch_version}, {provenance.dtype} on "
            f"{provenance.device}, {provenance.threads} thread{_plural(provenance.threads)}, "
            f"pytest-convergence {provenance.plugin_version}"
        )
        return FailureContext(
            baseline_path=path,
            provenance=summary,
            reproduce=self._reproduce(label),
            rerecord=self._rerecord(label),
            report_dir=self._report_folder(label),
            report_files=report_files,
        )

    def _reproduce(self, label: str | None) -> str:
        return f"{self.options.reproduce} {label}" if label else self.options.reproduce

    def _rerecord(self, label: str | None) -> str:
        return f"{self.options.rerecord} {label}" if label else self.options.rerecord

    def _report_folder(self, label: str | None) -> Path | None:
        if self.options.report_dir is None:
            return None
        name = _safe_name(label or "check")
        return self.options.report_dir / name

    def _write_report(
        self,
        run: CoSimulation,
        region: Region,
        verdict: Verdict,
        label: str | None,
        *,
        workload: Workload,
        candidate: Candidate | None,
    ) -> list[Path]:
        """The report folder's files, if reports are on; diagnostics need the ``candidate``."""
        folder = self._report_folder(label)
        if folder is None:
            return []
        return write_report(
            run,
            region,
            verdict,
            folder,
            workload=workload if candidate is not None else None,
            candidate=candidate,
        )


def _plural(count: int) -> str:
    return "" if count == 1 else "s"


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating torch dtype (e.g. 'float32')")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _safe_name(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
    return cleaned.strip("_")[:150] or "check"


@dataclass
class BoundCheck:
    """The ``convergence`` fixture: a checker bound to one test's marker arguments.

    Marker arguments are defaults; keyword arguments to :meth:`check` override them.
    """

    checker: ConvergenceChecker
    defaults: dict[str, object]
    label: str
    record_property: Callable[[str, object], None]

    def check(
        self,
        candidate: Candidate | str | None = None,
        *,
        workload: str | Workload | None = None,
        steps: int | None = None,
        seed: int | None = None,
        dtype: str | None = None,
        baseline: str | None = None,
        known_good: Candidate | None = None,
        own_region: bool = False,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> CheckResult:
        """Check ``candidate``, or the marker's; marker arguments are the defaults.

        ``own_region=True`` is short for ``known_good=candidate``.
        """
        __tracebackhide__ = True
        chosen = candidate if candidate is not None else self.defaults.get("candidate")
        if chosen is None:
            raise ValueError(
                "convergence.check() needs a candidate: pass a Candidate, or name a registered "
                "one in @pytest.mark.convergence(candidate=...)"
            )
        resolved_candidate = get_candidate(chosen) if isinstance(chosen, str) else chosen
        if not isinstance(resolved_candidate, Candidate):
            raise TypeError(f"candidate must be a Candidate or a name, not {chosen!r}")
        chosen_workload = workload if workload is not None else self.defaults.get("workload")
        if not isinstance(chosen_workload, str | Workload):
            raise ValueError(
                "convergence.check() needs a workload: pass workload=..., or set "
                "@pytest.mark.convergence(workload=...)"
            )
        checks_before = len(self.checker.results)
        try:
            result = self.checker.check(
                resolved_candidate,
                chosen_workload,
                steps=steps if steps is not None else _int_or_none(self.defaults.get("steps")),
                seed=seed if seed is not None else _int_or_none(self.defaults.get("seed")),
                dtype=dtype if dtype is not None else _str_or_none(self.defaults.get("dtype")),
                device=_str_or_none(self.defaults.get("device")),
                baseline=baseline
                if baseline is not None
                else _str_or_none(self.defaults.get("baseline")),
                known_good=resolved_candidate if own_region else known_good,
                tolerance=tolerance,
                label=self.label,
            )
        finally:
            if len(self.checker.results) > checks_before:
                self.record(self.checker.results[-1])
        return result

    def record(self, result: CheckResult) -> None:
        """Attach a check's figures to the test (JUnit XML, the terminal summary)."""
        for key, value in (
            ("workload", result.workload),
            ("candidate", result.candidate),
            ("steps", result.steps),
            ("verdict", result.verdict),
            ("worst_ratio", round(result.worst_ratio, 4)),
            ("baseline", result.baseline),
            ("first_violation", result.first_violation),
        ):
            self.record_property(f"convergence_{key}", value)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
