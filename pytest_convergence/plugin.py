"""pytest wiring: options, ini values, the marker, skipping and the report header.

Every hook hands off to plain modules in a few lines. Nothing here imports torch at import time,
so ``pytest --help`` stays fast in projects that have the plugin installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_convergence._version import __version__
from pytest_convergence.settings import (
    ENABLE_HINT,
    MARKER_ARGUMENTS,
    ConvergenceSettings,
    parse_device,
    validate_marker_arguments,
)

MARKER = "convergence"
settings_key = pytest.StashKey[ConvergenceSettings]()


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


def pytest_configure(config: pytest.Config) -> None:
    arguments = ", ".join(f"{name}=..." for name in MARKER_ARGUMENTS)
    config.addinivalue_line(
        "markers",
        f"{MARKER}({arguments}): a convergence check, run only with --convergence.",
    )
    config.stash[settings_key] = _read_settings(config)


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
    return ConvergenceSettings(
        enabled=bool(enabled if enabled is not None else config.getini("convergence_enabled")),
        seed=seed,
        device=device,
        baselines_dir=Path(config.rootpath, baselines).resolve(),
    )


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
    return [f"convergence: {environment.header()}, baselines {settings.baselines_dir}"]


def pytest_sessionstart(session: pytest.Session) -> None:
    settings = session.config.stash[settings_key]
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
