"""pytest-convergence: catch convergence bugs in training code with LoGM co-simulation.

The public names below are imported lazily so that loading the pytest plugin (which imports
this package) never imports torch: ``pytest --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pytest_convergence._version import __version__

if TYPE_CHECKING:
    from pytest_convergence.assertions import ConvergenceError, assert_within_region
    from pytest_convergence.candidates import Candidate, register_candidate
    from pytest_convergence.cosim import cosimulate, train
    from pytest_convergence.errors import (
        FileFormatError,
        InsufficientPowerWarning,
        NonFiniteWeightError,
        SnapshotFormatError,
        UnsafeExternalDataError,
    )
    from pytest_convergence.fault_ladder import measure_power
    from pytest_convergence.metrics import (
        LogmSum,
        ParameterLogm,
        ParameterStats,
        logm,
        parameter_logms,
        parameter_stats,
    )
    from pytest_convergence.power import PowerReport
    from pytest_convergence.regions import Region, Verdict, calibrate, judge
    from pytest_convergence.snapshots import Snapshot, load_snapshot, save_snapshot
    from pytest_convergence.workloads import Workload, get_workload, register_workload

__all__ = [
    "Candidate",
    "ConvergenceError",
    "FileFormatError",
    "InsufficientPowerWarning",
    "LogmSum",
    "NonFiniteWeightError",
    "ParameterLogm",
    "ParameterStats",
    "PowerReport",
    "Region",
    "Snapshot",
    "SnapshotFormatError",
    "UnsafeExternalDataError",
    "Verdict",
    "Workload",
    "__version__",
    "assert_within_region",
    "calibrate",
    "cosimulate",
    "get_workload",
    "judge",
    "load_snapshot",
    "logm",
    "measure_power",
    "parameter_logms",
    "parameter_stats",
    "register_candidate",
    "register_workload",
    "save_snapshot",
    "train",
]

_HOME_MODULE = {
    "ConvergenceError": "assertions",
    "assert_within_region": "assertions",
    "Candidate": "candidates",
    "register_candidate": "candidates",
    "cosimulate": "cosim",
    "train": "cosim",
    "Region": "regions",
    "Verdict": "regions",
    "calibrate": "regions",
    "judge": "regions",
    "Workload": "workloads",
    "get_workload": "workloads",
    "register_workload": "workloads",
    "LogmSum": "metrics",
    "ParameterLogm": "metrics",
    "ParameterStats": "metrics",
    "logm": "metrics",
    "parameter_logms": "metrics",
    "parameter_stats": "metrics",
    "Snapshot": "snapshots",
    "load_snapshot": "snapshots",
    "save_snapshot": "snapshots",
    "FileFormatError": "errors",
    "InsufficientPowerWarning": "errors",
    "PowerReport": "power",
    "measure_power": "fault_ladder",
    "NonFiniteWeightError": "errors",
    "SnapshotFormatError": "errors",
    "UnsafeExternalDataError": "errors",
}


def __getattr__(name: str) -> Any:
    module = _HOME_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_convergence' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pytest_convergence.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
