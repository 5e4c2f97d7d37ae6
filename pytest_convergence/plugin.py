"""pytest wiring: options, ini values, the marker, skipping and the report header.

Every hook hands off to plain modules in a few lines. Nothing here imports torch at import time,
so ``pytest --help`` stays fast in projects that have the plugin installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_convergence._version import __version__
from pytest_convergence.settings import (
    ENABLE_HINT,
    MARKER_ARGUMENTS,
    MISMATCH_POLICIES,
    REPORT_MODES,
    ConvergenceSettings,
    parse_device,
    resolve_threads,
    validate_marker_arguments,
)

if TYPE_CHECKING:
    from pytest_convergence.checks import BoundCheck, ConvergenceChecker

MARKER = "convergence"
# pytest_convergence.zoo.SOURCE, without importing the zoo (and torch) here.
ZOO_SOURCE = "pytest_convergence.zoo:register"
SUMMARY_PREFIX = "convergence_"
settings_key = pytest.StashKey[ConvergenceSettings]()
checker_key = pytest.StashKey["ConvergenceChecker"]()
summary_key = pytest.StashKey[list[dict[str, object]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("convergence", "convergence checks (pytest-convergence)")
    group.addoption(
        "--convergence",
        action="store_true",
        default=None,
        help="run tests marked @pytest.mark.convergence (skipped otherwise).",
    )
    group.addoption(
        "--convergence-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed for initial weights and synthetic batches (default: ini convergence_seed, 0).",
    )
    group.addoption(
        "--convergence-device",
        default=None,
        metavar="DEVICE",
        help="device for convergence tests: cpu, cuda, cuda:N (default: ini value, cpu).",
    )
    group.addoption(
        "--convergence-baselines",
        default=None,
        metavar="DIR",
        help="folder of divergence-region baselines (default: ini convergence_baselines).",
    )
    group.addoption(
        "--convergence-threads",
        default=None,
        metavar="N",
        help="torch threads per process: N or auto (default: ini convergence_threads, auto: "
        "torch's default, or cores / workers under pytest-xdist).",
    )
    group.addoption(
        "--convergence-record",
        action="store_true",
        default=False,
        help="calibrate and (re)write the baselines of the selected convergence tests.",
    )
    group.addoption(
        "--convergence-report",
        choices=REPORT_MODES,
        default="failures",
        help="write a report folder (JSON trace, LoGM, loss-landscape and norm plots) for "
        "failures (default) or always.",
    )
    group.addoption(
        "--convergence-report-dir",
        default=None,
        metavar="DIR",
        help="where report folders go (default: ini convergence_report_dir).",
    )
    parser.addini(
        "convergence_enabled",
        type="bool",
        default=False,
        help="run convergence tests without --convergence.",
    )
    parser.addini("convergence_seed", default="0", help="default seed for convergence tests.")
    parser.addini("convergence_device", default="cpu", help="default device for convergence tests.")
    parser.addini(
        "convergence_baselines",
        default="baselines",
        help="baselines folder, relative to the rootdir (default: baselines).",
    )
    parser.addini("convergence_threads", default="auto", help="torch threads per process.")
    parser.addini(
        "convergence_report_dir",
        default="convergence-report",
        help="report folders, relative to the rootdir (default: convergence-report).",
    )
    parser.addini(
        "convergence_baseline_mismatch",
        default="warn",
        help="baseline recorded under another torch version, dtype or device: warn or fail.",
    )


def pytest_configure(config: pytest.Config) -> None:
    arguments = ", ".join(f"{name}=..." for name in MARKER_ARGUMENTS)
    config.addinivalue_line(
        "markers",
        f"{MARKER}({arguments}): a convergence check, run only with --convergence.",
    )
    config.stash[settings_key] = _read_settings(config)
    config.pluginmanager.register(ConvergenceSummary(config), "convergence-summary")


def _read_settings(config: pytest.Config) -> ConvergenceSettings:
    enabled = config.getoption("convergence")
    seed = config.getoption("convergence_seed")
    if seed is None:
        seed = _ini_int(config, "convergence_seed")
    device = config.getoption("convergence_device") or str(config.getini("convergence_device"))
    baselines = config.getoption("convergence_baselines") or str(
        config.getini("convergence_baselines")
    )
    try:
        device = parse_device(device)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    policy = str(config.getini("convergence_baseline_mismatch")).strip()
    if policy not in MISMATCH_POLICIES:
        raise pytest.UsageError(
            f"ini option convergence_baseline_mismatch = {policy!r}: use one of "
            f"{', '.join(MISMATCH_POLICIES)}"
        )
    report_dir = _report_dir(config)
    threads_text = config.getoption("convergence_threads") or str(
        config.getini("convergence_threads")
    )
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    try:
        threads = resolve_threads(
            threads_text,
            cpu_count=len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1),
            workers=int(workers) if workers else None,
        )
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    return ConvergenceSettings(
        enabled=bool(enabled if enabled is not None else config.getini("convergence_enabled")),
        seed=seed,
        device=device,
        baselines_dir=Path(config.rootpath, baselines).resolve(),
        record=bool(config.getoption("convergence_record")),
        report_dir=report_dir,
        always_report=config.getoption("convergence_report") == "always",
        mismatch_policy=policy,
        threads=threads,
    )


def _report_dir(config: pytest.Config) -> Path | None:
    """Report folders are written on failure, except in CI (``CI`` set) unless asked for."""
    explicit = config.getoption("convergence_report_dir")
    asked = explicit is not None or config.getoption("convergence_report") == "always"
    if os.environ.get("CI") and not asked:
        return None
    folder = explicit or str(config.getini("convergence_report_dir"))
    return Path(config.rootpath, folder).resolve()


def _ini_int(config: pytest.Config, name: str) -> int:
    text = str(config.getini(name))
    try:
        return int(text)
    except ValueError:
        raise pytest.UsageError(f"ini option {name} = {text!r} is not an integer") from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash[settings_key]
    if not settings.enabled:
        return [f"convergence: pytest-convergence {__version__}, disabled ({ENABLE_HINT})"]
    from pytest_convergence.environment import current_environment

    environment = current_environment(settings.device, settings.seed)
    lines = [f"convergence: {environment.header()}, baselines {settings.baselines_dir}"]
    if settings.record:
        lines.append(f"convergence: recording baselines into {settings.baselines_dir}")
    return lines


def pytest_sessionstart(session: pytest.Session) -> None:
    settings = session.config.stash[settings_key]
    if settings.enabled:
        from pytest_convergence.workloads import add_workload_source

        add_workload_source(ZOO_SOURCE)
    if settings.enabled and settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    if settings.enabled and settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"--convergence-device={settings.device} but torch.cuda.is_available() is False "
                f"(torch {torch.__version__})"
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    settings = config.stash[settings_key]
    skip = pytest.mark.skip(reason=f"convergence test: {ENABLE_HINT}")
    for item in items:
        for marker in item.iter_markers(MARKER):
            try:
                validate_marker_arguments(marker.args, marker.kwargs)
            except ValueError as error:
                raise pytest.UsageError(f"{item.nodeid}: {error}") from None
        if not settings.enabled and item.get_closest_marker(MARKER) is not None:
            item.add_marker(skip)


@pytest.fixture
def convergence(request: pytest.FixtureRequest) -> BoundCheck:
    """Co-simulate a candidate against the reference and judge it against its baseline.

    ``convergence.check(candidate)``; the test's marker arguments are the defaults.
    """
    from pytest_convergence.checks import BoundCheck

    marker = request.node.get_closest_marker(MARKER)
    defaults = dict(marker.kwargs) if marker is not None else {}
    device = str(defaults.get("device") or request.config.stash[settings_key].device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"needs CUDA (device={device!r}); torch.cuda.is_available() is False")
    return BoundCheck(
        checker=_checker(request.config),
        defaults=defaults,
        label=request.node.nodeid,
        record_property=lambda name, value: request.node.user_properties.append((name, value)),
    )


def _checker(config: pytest.Config) -> ConvergenceChecker:
    """One checker per process, so calibrations are shared by the tests that need them."""
    if checker_key not in config.stash:
        from pytest_convergence.checks import CheckOptions, ConvergenceChecker

        settings = config.stash[settings_key]
        options = CheckOptions(
            baselines_dir=settings.baselines_dir,
            seed=settings.seed,
            device=settings.device,
            record=settings.record,
            report_dir=settings.report_dir,
            always_report=settings.always_report,
            mismatch_policy=settings.mismatch_policy,
            reproduce="pytest --convergence",
            rerecord="pytest --convergence --convergence-record",
        )
        config.stash[checker_key] = ConvergenceChecker(options)
    return config.stash[checker_key]


class ConvergenceSummary:
    """Collects every check's figures from test reports (on the xdist controller too, where
    reports arrive from workers) and prints the summary table."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.rows: list[dict[str, object]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        row: dict[str, object] = {
            key.removeprefix(SUMMARY_PREFIX): value
            for key, value in report.user_properties
            if key.startswith(SUMMARY_PREFIX)
        }
        if row:
            row["nodeid"] = report.nodeid
            self.rows.append(row)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        from pytest_convergence.summary import summary_lines

        checker = self.config.stash.get(checker_key, None)
        changes = checker.changes if checker is not None else {}
        if not self.rows and not changes:
            return
        terminalreporter.section("convergence")
        for line in summary_lines(self.rows):
            terminalreporter.write_line(line)
        for path, lines in changes.items():
            terminalreporter.write_line(f"re-recorded {path}:")
            for line in lines:
                terminalreporter.write_line(f"  {line}")
