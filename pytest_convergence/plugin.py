"""pytest wiring: options, ini values, the marker, skipping and the report header.

Every hook hands off to plain modules in a few lines. Nothing here imports torch at import time,
so ``pytest --help`` stays fast in projects that have the plugin installed.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import pytest

from pytest_convergence import openmp
from pytest_convergence._version import __version__
from pytest_convergence.config import (
    ENABLE_HINT,
    MARKER_ARGUMENTS,
    REPORT_MODES,
    ConvergenceConfig,
    validate_marker_arguments,
)

if TYPE_CHECKING:
    from pytest_convergence.checks import BoundCheck, ConvergenceChecker

# Now, at import: pytest imports its plugins before the conftest files that import torch, and
# OpenMP reads its wait policy when torch loads it.
WAIT_POLICY = openmp.prefer_passive(os.environ, torch_imported="torch" in sys.modules)
MARKER = "convergence"
# pytest_convergence.zoo.SOURCE, without importing the zoo (and torch) here.
ZOO_SOURCE = "pytest_convergence.zoo:register"
config_key = pytest.StashKey[ConvergenceConfig]()
checker_key = pytest.StashKey["ConvergenceChecker"]()
marker_error_key = pytest.StashKey[str]()
_OPTION_NAMES = (
    "convergence",
    "convergence_seed",
    "convergence_device",
    "convergence_baselines",
    "convergence_threads",
    "convergence_record",
    "convergence_record_in_ci",
    "convergence_report",
    "convergence_report_dir",
    "convergence_triage",
)
_INI_NAMES = (
    "convergence_enabled",
    "convergence_seed",
    "convergence_device",
    "convergence_baselines",
    "convergence_threads",
    "convergence_report_dir",
    "convergence_baseline_mismatch",
    "convergence_allow_external_baselines",
    "convergence_triage",
    "convergence_power",
    "convergence_required_power",
)


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
        "--convergence-record-in-ci",
        action="store_true",
        default=False,
        help="let --convergence-record write baselines although CI is set (refused otherwise).",
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
    group.addoption(
        "--convergence-triage",
        type=int,
        default=None,
        metavar="N",
        help="re-run a failing check at the N seeds after its own and say on how many it "
        "fails too; 0: off (default: ini convergence_triage, auto: 2, or 0 when CI is set).",
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
        "convergence_allow_external_baselines",
        type="bool",
        default=False,
        help="let baseline= name files outside the baselines folder (refused by default).",
    )
    parser.addini(
        "convergence_triage",
        default="auto",
        help="further seeds a failing check is re-run at: N, 0 (off) or auto (2; 0 in CI).",
    )
    parser.addini(
        "convergence_power",
        type="bool",
        default=True,
        help="measure a power report (the fault ladder) with every baseline recorded.",
    )
    parser.addini(
        "convergence_required_power",
        type="linelist",
        default=[],
        help="'FAULT SIZE' lines: warn when a baseline cannot catch that fault at that size.",
    )
    parser.addini(
        "convergence_baseline_mismatch",
        default="warn",
        help="baseline recorded under another torch version, dtype or device: warn or fail.",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, read the run's configuration once, and add the summary."""
    arguments = ", ".join(f"{name}=..." for name in MARKER_ARGUMENTS)
    config.addinivalue_line(
        "markers",
        f"{MARKER}({arguments}): a convergence check, run only with --convergence.",
    )
    config.stash[config_key] = _read_config(config)
    config.pluginmanager.register(ConvergenceSummary(config), "convergence-summary")


def _read_config(config: pytest.Config) -> ConvergenceConfig:
    options = {name: config.getoption(name) for name in _OPTION_NAMES}
    ini = {name: config.getini(name) for name in _INI_NAMES}
    try:
        return ConvergenceConfig.from_pytest(
            options,
            ini,
            rootdir=config.rootpath,
            environ=os.environ,
            cpu_count=len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1),
        )
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say what reproduces the run (versions, device, threads, seed, baselines)."""
    settings = config.stash[config_key]
    if not settings.enabled:
        return [f"convergence: pytest-convergence {__version__}, disabled ({ENABLE_HINT})"]
    from pytest_convergence import session

    return [*session.header_lines(settings), f"convergence: {WAIT_POLICY.describe()}"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Set the process up for checks (zoo, threads, device) when convergence tests run."""
    settings = session.config.stash[config_key]
    if settings.enabled:
        from pytest_convergence import session as convergence_session

        try:
            convergence_session.start(settings)
        except ValueError as error:
            raise pytest.UsageError(str(error)) from None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep each test's bad marker arguments for its setup; skip convergence tests unless
    enabled. A typo errors its own test, naming it, and the rest of the session runs."""
    skip = pytest.mark.skip(reason=f"convergence test: {ENABLE_HINT}")
    enabled = config.stash[config_key].enabled
    for item in items:
        for marker in item.iter_markers(MARKER):
            try:
                validate_marker_arguments(marker.args, marker.kwargs)
            except ValueError as error:
                item.stash[marker_error_key] = str(error)
                break
        if marker_error_key in item.stash:
            continue  # erroring beats skipping: a typo must not hide behind the skip
        if not enabled and item.get_closest_marker(MARKER) is not None:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Error a test whose marker arguments are bad, before its fixtures run."""
    error = item.stash.get(marker_error_key, None)
    if error is not None:
        pytest.fail(f"{item.nodeid}: {error}", pytrace=False)


@pytest.fixture
def convergence(request: pytest.FixtureRequest) -> BoundCheck:
    """Co-simulate a candidate against the reference and judge it against its baseline.

    ``convergence.check(candidate)``; the test's marker arguments are the defaults.
    """
    from pytest_convergence import session
    from pytest_convergence.checks import BoundCheck

    marker = request.node.get_closest_marker(MARKER)
    defaults = dict(marker.kwargs) if marker is not None else {}
    missing = session.cuda_missing(
        str(defaults.get("device") or request.config.stash[config_key].device)
    )
    if missing is not None:
        pytest.skip(missing)
    return BoundCheck(
        checker=_checker(request.config),
        defaults=defaults,
        label=request.node.nodeid,
        record_property=lambda name, value: request.node.user_properties.append((name, value)),
    )


def _checker(config: pytest.Config) -> ConvergenceChecker:
    """One checker per process, so calibrations are shared by the tests that need them."""
    if checker_key not in config.stash:
        from pytest_convergence.checks import ConvergenceChecker

        config.stash[checker_key] = ConvergenceChecker(config.stash[config_key])
    return config.stash[checker_key]


class ConvergenceSummary:
    """Collects every check's figures from test reports (on the xdist controller too, where
    reports arrive from workers) and prints the summary table."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.rows: list[dict[str, object]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep the figures of a test's checks (they travel as user properties)."""
        if report.when != "call":
            return
        from pytest_convergence.report import summary_rows

        self.rows.extend(summary_rows(report.user_properties, report.nodeid))

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Print every check, worst first, and what recording changed in each baseline."""
        from pytest_convergence.report import recorded_baselines, summary_section

        if not self.rows:
            return
        terminalreporter.section("convergence")
        for line in summary_section(self.rows, recorded_baselines(self.rows)):
            terminalreporter.write_line(line)
