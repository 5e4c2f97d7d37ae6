"""One convergence check, end to end: baseline, co-simulation, verdict, report.

Plain Python, no pytest: the plugin's ``convergence`` fixture, a notebook or a script call
:meth:`ConvergenceChecker.check` the same way. Every way of producing a co-simulation (one
process, DDP) goes through the same :class:`CheckRequest` and :meth:`ConvergenceChecker.run`,
whose failure path reads top to bottom: judge, replay the first failing step, write the report
folder, triage at further seeds (:mod:`pytest_convergence.triage`), format the message, raise.

Length: that one sequence and the fixture's binding of it to a test (:class:`BoundCheck`), which
shares its request and result types; the steps it calls live in their own modules, and split
further, the sequence would no longer read top to bottom in one place.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

import torch

from pytest_convergence._version import __version__
from pytest_convergence.baselines import (
    Baseline,
    Provenance,
    baseline_path,
    check_compatibility,
    check_current,
    check_recordable,
    confined,
    load_baseline,
    record_baseline,
)
from pytest_convergence.candidates import Candidate, get_candidate
from pytest_convergence.config import RECORD_COMMAND, RUN_COMMAND, ConvergenceConfig
from pytest_convergence.cosim import cosimulate
from pytest_convergence.engine import compile_ahead
from pytest_convergence.errors import (
    ConvergenceError,
    InsufficientPowerWarning,
    MissingBaselineError,
    describe_error,
)
from pytest_convergence.fault_ladder import measure_power
from pytest_convergence.power import PowerReport, power_lines, required_power_gaps
from pytest_convergence.precision import DEFAULT_POLICY, get_policy
from pytest_convergence.regions import Region, Verdict, calibrate, judge
from pytest_convergence.replay import ReplayFinding, replay_step
from pytest_convergence.report import SUMMARY_PREFIX, FailureContext, format_failure, triage_figures
from pytest_convergence.report_folder import write_report
from pytest_convergence.traces import CoSimulation
from pytest_convergence.triage import Triage, triage
from pytest_convergence.workloads import Workload, get_workload

_T = TypeVar("_T")

__all__ = [
    "BoundCheck",
    "CheckRequest",
    "CheckResult",
    "ConvergenceChecker",
    "MissingBaselineError",
    "Runner",
    "describe_error",
]


@dataclass(frozen=True)
class CheckRequest:
    """What one check judges: a candidate on a workload with its overrides, against the
    baseline at ``baseline`` (``known_good``: the candidate its region is calibrated against,
    for provenance); ``label`` names the test in commands and report folders."""

    workload: Workload
    candidate: str
    baseline: Path
    known_good: str | None = None
    label: str | None = None
    # The precision policy the region is calibrated for, and whether it admits another random
    # stream (both name the baseline file).
    precision: str = DEFAULT_POLICY
    random_stream: bool = False
    # The seed was given to the check or its marker: --convergence-seed cannot change it.
    fixed_seed: bool = False


@dataclass(frozen=True)
class Runner:
    """How a request's co-simulation is produced: ``run`` it on a workload (the request's, or
    the request's at a further seed when a failure is triaged), ``calibrate_region`` when
    recording, ``replay`` its first failing step, and the ``report_candidate`` that the report
    folder's diagnostics re-run (None where it cannot run in this process: a DDP hook)."""

    run: Callable[[Workload], CoSimulation]
    calibrate_region: Callable[[], Region]
    replay: Callable[[int], ReplayFinding] | None = None
    report_candidate: Candidate | None = None
    # Compiles what ``run`` would compile (a torch.compile candidate), apart from the check;
    # its seconds, or None when nothing compiles.
    warm_up: Callable[[], float | None] | None = None
    # The fault ladder against a region just calibrated (None: no power report, a DDP hook).
    measure_power: Callable[[Region], PowerReport] | None = None

    @classmethod
    def in_process(
        cls,
        request: CheckRequest,
        candidate: Candidate,
        *,
        known_good: Candidate | None = None,
        tolerance: float | None = None,
    ) -> Runner:
        """``candidate`` co-simulated in this process; the region the reference's under
        perturbation at the request's precision policy (or ``tolerance``), or ``known_good``'s.

        Every run builds its models afresh from the workload; the candidate object is reused,
        as calibration over seeds and the replay reuse it, so state a candidate keeps in its
        closures (an error-feedback residual) carries over from one run to the next."""
        workload = request.workload
        return cls(
            run=lambda workload: cosimulate(workload, candidate),
            calibrate_region=lambda: calibrate(
                workload,
                candidate=known_good,
                tolerance=tolerance,
                precision=request.precision,
                random_stream=request.random_stream,
            ),
            replay=lambda step: replay_step(workload, candidate, step),
            report_candidate=candidate,
            warm_up=(lambda: compile_ahead(workload, candidate))
            if candidate.model_transform is not None
            else None,
            measure_power=lambda region: measure_power(workload, region),
        )


@dataclass
class CheckResult:
    """What the terminal summary and JUnit XML show for one check.

    ``verdict`` is ``"passed"`` or ``"failed"`` once judged; ``"error"`` when the check raised
    before reaching a verdict (a missing, stale or damaged baseline, a co-simulation that could
    not run), with ``error`` the exception's type and first line, and ``worst_ratio`` NaN
    (never judged) unless judging got that far.
    """

    workload: str
    candidate: str
    steps: int
    verdict: str
    worst_ratio: float
    baseline: str
    first_violation: str = ""
    recorded: bool = False
    # A torch.compile candidate's compilation, timed apart from the check.
    compile_seconds: float | None = None
    error: str = ""
    # A failure re-run at further seeds (None: passed, errored, recording, or triage off).
    triage: Triage | None = None
    # What recording changed in the baseline and what it can catch, for the check that
    # recorded it (empty for the others, and when not recording).
    baseline_changes: list[str] = field(default_factory=list)


@dataclass(repr=False)
class ConvergenceChecker:
    """Runs checks and caches calibrated regions for the session (one calibration per
    workload and known-good candidate, however many tests share it)."""

    config: ConvergenceConfig
    results: list[CheckResult] = field(default_factory=list)
    # Re-recorded baselines and what changed, for the terminal summary.
    changes: dict[Path, list[str]] = field(default_factory=dict)
    _recorded: dict[Path, Baseline] = field(default_factory=dict)

    def __repr__(self) -> str:
        # Short: it shows in tracebacks beside every test that uses the fixture.
        count = len(self.results)
        return f"<ConvergenceChecker of {self.config.baselines_dir}, {count} check{_plural(count)}>"

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
        tolerance: float | None = None,
        label: str | None = None,
    ) -> CheckResult:
        """Co-simulate ``candidate`` on ``workload`` and judge it against its baseline.

        ``known_good``: judge against the region of that known-good (lossy) implementation,
        ``<workload>--<known_good>.json``, calibrated against it when recording; pass the
        candidate itself to hold later versions of it to today's behaviour. ``tolerance``: the
        relative precision a reference-perturbation region accepts, used when recording (by
        default that of the precision policy the candidate trains under). A candidate with
        ``random_stream=True`` is judged against a region that admits another random stream.
        """
        __tracebackhide__ = True
        request = self.request(
            workload,
            candidate=candidate.name,
            steps=steps,
            seed=seed,
            dtype=dtype,
            device=device,
            baseline=baseline,
            known_good=known_good.name if known_good else None,
            label=label,
            precision=candidate.precision,
            random_stream=candidate.random_stream,
        )
        runner = Runner.in_process(request, candidate, known_good=known_good, tolerance=tolerance)
        return self.run(request, runner)

    def request(
        self,
        workload: str | Workload,
        *,
        candidate: str,
        steps: int | None = None,
        seed: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
        baseline: str | None = None,
        known_good: str | None = None,
        label: str | None = None,
        precision: str | None = None,
        random_stream: bool = False,
    ) -> CheckRequest:
        """The check of ``candidate`` on ``workload`` with this check's overrides and the
        session's seed and device; ``baseline``: a file name in the baselines folder, else
        the one :meth:`baseline_for` names (``<workload>[-<device type>][.<policy>]
        [.random-stream][--<known good>].json``). ``precision``: the policy the candidate
        trains under (default: the workload's). A path that leads out of the folder (``..``,
        an absolute path, a symbolic link) is a ``ValueError`` unless the configuration
        allows external baselines."""
        base = get_workload(workload) if isinstance(workload, str) else workload
        resolved = base.with_options(
            steps=steps,
            seed=seed if seed is not None else self.config.seed,
            dtype=_parse_dtype(dtype) if dtype is not None else None,
            device=device if device is not None else self.config.device,
        )
        policy = get_policy(precision or resolved.precision).name
        if baseline is not None:
            path = self.config.baselines_dir / baseline
        else:
            path = self.baseline_for(resolved, known_good, policy, random_stream=random_stream)
        if not self.config.allow_external_baselines:
            confined(self.config.baselines_dir, path, argument=baseline)
        fixed = seed is not None
        return CheckRequest(
            resolved, candidate, path, known_good, label, policy, random_stream, fixed
        )

    def run(self, request: CheckRequest, runner: Runner) -> CheckResult:
        """Load (or, when recording, calibrate and write) the request's baseline, run the
        co-simulation, judge it, keep the result; on failure replay the first failing step,
        write the report folder, and raise :class:`ConvergenceError` with the message.

        Without a ``runner.report_candidate`` the report folder has the trace and the LoGM
        plot only."""
        __tracebackhide__ = True
        workload = request.workload
        # Kept before anything can raise: a check that errors is reported as an error, never
        # as the pass a result filled in only on success would read as.
        result = CheckResult(
            workload=workload.name,
            candidate=request.candidate,
            steps=workload.steps,
            verdict="error",
            worst_ratio=math.nan,
            baseline=str(request.baseline),
            recorded=self.config.record,
        )
        self.results.append(result)
        try:
            return self._judge(request, runner, result)
        except ConvergenceError:
            raise
        except Exception as error:
            result.verdict = "error"
            result.error = describe_error(error)
            raise

    def _judge(self, request: CheckRequest, runner: Runner, result: CheckResult) -> CheckResult:
        """:meth:`run` once its result is kept: baseline, co-simulation, verdict, failure path."""
        __tracebackhide__ = True
        report_candidate = runner.report_candidate
        if self.config.record:
            stored, result.baseline_changes = self._record(request, runner)
        else:
            stored = self._load(request)
            self._warn_of_power_gaps(request, stored)
        compile_seconds = runner.warm_up() if runner.warm_up is not None else None
        simulation = runner.run(request.workload)
        result.compile_seconds = compile_seconds
        verdict = judge(simulation, stored.region)
        result.worst_ratio = verdict.worst_ratio
        first = verdict.first_violation
        if first is None:
            result.verdict = "passed"
            if self.config.always_report:
                self._write_report(request, simulation, stored.region, verdict, report_candidate)
            return result
        result.verdict = "failed"
        result.first_violation = f"step {first.step} {first.parameter}: {first.check}"
        finding = runner.replay(first.step) if runner.replay is not None else None
        written = self._write_report(request, simulation, stored.region, verdict, report_candidate)
        # Recording never triages: a failure against a region just calibrated is not a flake.
        if self.config.triage and not self.config.record:
            result.triage = triage(request.workload, stored.region, runner.run, self.config.triage)
        context = self._context(request, stored, written, result.triage)
        message = format_failure(
            simulation, verdict, stored.region, context, finding, triage=result.triage
        )
        raise ConvergenceError(message, run=simulation, verdict=verdict)

    def baseline_for(
        self,
        workload: Workload,
        known_good: str | None = None,
        precision: str = DEFAULT_POLICY,
        *,
        random_stream: bool = False,
    ) -> Path:
        """``<workload>[-<device type>][.<precision policy>][.random-stream][--<known good>]
        .json`` in the baselines folder (the fp32 policy is not named)."""
        # Regions are per device type: GPU kernels (TF32, cuDNN algorithms) are another regime.
        device_type = torch.device(workload.device).type
        name = workload.name if device_type == "cpu" else f"{workload.name}-{device_type}"
        if precision != DEFAULT_POLICY:
            name += f".{precision}"
        if random_stream:
            name += ".random-stream"
        return baseline_path(self.config.baselines_dir, name, known_good)

    def _load(self, request: CheckRequest) -> Baseline:
        __tracebackhide__ = True
        path, workload = request.baseline, request.workload
        if path in self._recorded:
            return self._recorded[path]
        if not path.exists():
            # Batches a function or loader gives are seen only when made: one the workload
            # cannot use is what to fix first, not a baseline that recording would fail on.
            workload.make_batches()
            raise MissingBaselineError(
                f"no baseline for workload {workload.name!r}: {path} does not exist.\n"
                f"Create it:  {_command(RECORD_COMMAND, request.label)}  "
                f"(then review and commit {path.name})"
            )
        stored = load_baseline(path)
        # Before co-simulating: a stale baseline is known from the model alone.
        check_current(
            stored,
            workload=workload.name,
            parameters=workload.parameter_counts(),
            rerecord=_command(RECORD_COMMAND, request.label),
        )
        check_compatibility(
            stored,
            torch_version=torch.__version__,
            dtype=_dtype_name(workload.dtype),
            device=workload.device,
            policy=self.config.mismatch_policy,
            threads=torch.get_num_threads(),
        )
        calibration = stored.region.calibration
        if (calibration.precision, calibration.random_stream) != (
            request.precision,
            request.random_stream,
        ):
            raise ValueError(
                f"{path}: calibrated for the {calibration.precision} precision policy"
                f"{' with another random stream' if calibration.random_stream else ''}, this "
                f"check needs {request.precision}"
                f"{' with another random stream' if request.random_stream else ''}; re-record "
                f"it: {_command(RECORD_COMMAND, request.label)}"
            )
        if stored.region.calibration.steps < workload.steps:
            raise ValueError(
                f"{path}: calibrated for {stored.region.calibration.steps} steps, this check runs "
                f"{workload.steps}; re-record it: {_command(RECORD_COMMAND, request.label)}"
            )
        return stored

    def _warn_of_power_gaps(self, request: CheckRequest, stored: Baseline) -> None:
        """Warn where the baseline cannot see a fault the configuration requires it to."""
        gaps = required_power_gaps(stored.region.power, self.config.required_power)
        if gaps:
            warnings.warn(
                InsufficientPowerWarning(
                    f"{stored.path}: this baseline may miss bugs the run requires it to catch "
                    f"(convergence_required_power): {'; '.join(gaps)}. More steps accumulate "
                    f"more evidence: raise steps= and re-record it "
                    f"({_command(RECORD_COMMAND, request.label)})"
                ),
                stacklevel=_stacklevel_outside_the_package(sys._getframe()),
            )

    def _record(self, request: CheckRequest, runner: Runner) -> tuple[Baseline, list[str]]:
        """Calibrate, measure the region's power and write, once per baseline file per
        process however many tests share it; with what recording changed and the power
        summary (empty for the tests after the first)."""
        path, workload = request.baseline, request.workload
        if path in self._recorded:
            return self._recorded[path], []
        check_recordable(path)
        region = runner.calibrate_region()
        if self.config.power and runner.measure_power is not None:
            region = dataclasses.replace(region, power=runner.measure_power(region))
        provenance = Provenance(
            workload=workload.name,
            candidate=request.known_good,
            dtype=_dtype_name(workload.dtype),
            device=workload.device,
            torch_version=torch.__version__,
            plugin_version=__version__,
            threads=torch.get_num_threads(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        changes = record_baseline(path, region, provenance)
        stored = Baseline(path=path, region=region, provenance=provenance)
        self._recorded[path] = stored
        self.changes[path] = changes + (power_lines(region.power) if region.power else [])
        return stored, self.changes[path]

    def _context(
        self,
        request: CheckRequest,
        stored: Baseline,
        report_files: list[Path],
        triaged: Triage | None = None,
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
            baseline_path=request.baseline,
            provenance=summary,
            reproduce=_command(RUN_COMMAND, request.label),
            rerecord=_command(RECORD_COMMAND, request.label),
            report_dir=self._report_folder(request.label),
            report_files=report_files,
            rerun_seed=_seed_command(request, triaged.example_seed) if triaged else "",
        )

    def _report_folder(self, label: str | None) -> Path | None:
        if self.config.report_dir is None:
            return None
        return self.config.report_dir / _safe_name(label or "check")

    def _write_report(
        self,
        request: CheckRequest,
        run: CoSimulation,
        region: Region,
        verdict: Verdict,
        candidate: Candidate | None,
    ) -> list[Path]:
        """The report folder's files, if reports are on; diagnostics need the ``candidate``."""
        folder = self._report_folder(request.label)
        if folder is None:
            return []
        return write_report(
            run,
            region,
            verdict,
            folder,
            workload=request.workload if candidate is not None else None,
            candidate=candidate,
        )


def _stacklevel_outside_the_package(frame: FrameType) -> int:
    """The ``stacklevel`` that makes a warning raised in ``frame`` point at the first caller
    outside this package: the user's test, not the checker's internals."""
    package = str(Path(__file__).resolve().parent)
    level = 1
    caller: FrameType | None = frame
    while caller is not None and str(Path(caller.f_code.co_filename).resolve()).startswith(package):
        caller = caller.f_back
        level += 1
    return level


def _command(command: str, label: str | None) -> str:
    return f"{command} {label}" if label else command


def _seed_command(request: CheckRequest, seed: int) -> str:
    """What re-runs the check at ``seed``: the seed option, unless the check fixes its seed."""
    if request.fixed_seed:
        return f"seed={seed} in the check or its marker (it fixes the seed)"
    return _command(f"{RUN_COMMAND} --convergence-seed {seed}", request.label)


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


@dataclass(repr=False)
class BoundCheck:
    """The ``convergence`` fixture: a checker bound to one test's marker arguments.

    Marker arguments are defaults; keyword arguments to :meth:`check` override them.
    """

    checker: ConvergenceChecker
    defaults: dict[str, object]
    label: str
    record_property: Callable[[str, object], None]

    def __repr__(self) -> str:
        # pytest prints a failing test's arguments: one line, not the checker's whole state.
        defaults = "".join(f", {name}={value!r}" for name, value in self.defaults.items())
        return f"<convergence fixture of {self.label}{defaults}>"

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
        tolerance: float | None = None,
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
        region_candidate = resolved_candidate if own_region else known_good
        request = self.request(
            resolved_candidate.name,
            workload=workload,
            steps=steps,
            seed=seed,
            dtype=dtype,
            baseline=baseline,
            known_good=region_candidate.name if region_candidate else None,
            precision=resolved_candidate.precision,
            random_stream=resolved_candidate.random_stream,
        )
        runner = Runner.in_process(
            request, resolved_candidate, known_good=region_candidate, tolerance=tolerance
        )
        return self.run(request, runner)

    def request(
        self,
        candidate: str,
        *,
        workload: str | Workload | None = None,
        steps: int | None = None,
        seed: int | None = None,
        dtype: str | None = None,
        baseline: str | None = None,
        known_good: str | None = None,
        precision: str | None = None,
        random_stream: bool = False,
    ) -> CheckRequest:
        """The checker's request for this test: the arguments given, else the marker's."""
        chosen = workload if workload is not None else self.defaults.get("workload")
        if not isinstance(chosen, str | Workload):
            raise ValueError(
                "convergence.check() needs a workload: pass workload=..., or set "
                "@pytest.mark.convergence(workload=...)"
            )
        return self.checker.request(
            chosen,
            candidate=candidate,
            steps=steps if steps is not None else self._marker("steps", int),
            seed=seed if seed is not None else self._marker("seed", int),
            dtype=dtype if dtype is not None else self._marker("dtype", str),
            device=self._marker("device", str),
            baseline=baseline if baseline is not None else self._marker("baseline", str),
            known_good=known_good,
            label=self.label,
            precision=precision,
            random_stream=random_stream,
        )

    def run(self, request: CheckRequest, runner: Runner) -> CheckResult:
        """:meth:`ConvergenceChecker.run`, the check's figures then attached to the test."""
        __tracebackhide__ = True
        checks_before = len(self.checker.results)
        try:
            return self.checker.run(request, runner)
        finally:
            if len(self.checker.results) > checks_before:
                self.record(self.checker.results[-1])

    def record(self, result: CheckResult) -> None:
        """Attach a check's figures to the test (JUnit XML, the terminal summary); each check
        starts with its workload, so the summary tells a test's checks apart. A check that was
        never judged has no worst ratio, and an errored one says why."""
        figures: list[tuple[str, object]] = [
            ("workload", result.workload),
            ("candidate", result.candidate),
            ("steps", result.steps),
            ("verdict", result.verdict),
        ]
        if not math.isnan(result.worst_ratio):
            figures.append(("worst_ratio", round(result.worst_ratio, 4)))
        figures += [("baseline", result.baseline), ("first_violation", result.first_violation)]
        if result.error:
            figures.append(("error", result.error))
        figures += triage_figures(result.triage) if result.triage is not None else []
        if result.baseline_changes:
            figures.append(("baseline_changes", "\n".join(result.baseline_changes)))
        for key, value in figures:
            self.record_property(f"{SUMMARY_PREFIX}{key}", value)
        if result.compile_seconds is not None:
            self.record_property(
                f"{SUMMARY_PREFIX}compile_seconds", round(result.compile_seconds, 2)
            )

    def _marker(self, key: str, kind: type[_T]) -> _T | None:
        """A marker argument of the expected type, or None (the checker's default applies)."""
        value = self.defaults.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None
