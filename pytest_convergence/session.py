"""What a convergence session does around its checks: set the process up and say how to
reproduce it. The plugin's hooks call these in a line or two; the summary of the checks is
:mod:`pytest_convergence.report`'s, which the xdist controller reads without torch.

Importing this module imports torch.
"""

from __future__ import annotations

import torch

from pytest_convergence import zoo
from pytest_convergence.config import ConvergenceConfig
from pytest_convergence.environment import current_environment
from pytest_convergence.workloads import add_workload_source

__all__ = ["cuda_missing", "header_lines", "start"]


def start(config: ConvergenceConfig) -> None:
    """Before the first check: the zoo's workloads become available, torch gets its thread
    count, and a CUDA device that is not there is refused (``ValueError``)."""
    add_workload_source(zoo.SOURCE)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = config.device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--convergence-device={device} but torch.cuda.is_available() is False "
            f"(torch {torch.__version__})"
        )


def header_lines(config: ConvergenceConfig) -> list[str]:
    """The report header: what reproduces this run."""
    environment = current_environment(config.device or "cpu", config.seed or 0)
    lines = [f"convergence: {environment.header()}, baselines {config.baselines_dir}"]
    if config.record:
        lines.append(f"convergence: recording baselines into {config.baselines_dir}")
    return lines


def cuda_missing(device: str) -> str | None:
    """Why a check on ``device`` cannot run here (a skip reason), or None."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"needs CUDA (device={device!r}); torch.cuda.is_available() is False"
    return None
