"""What a verdict depends on besides the code: versions, device, threads, seed.

Printed in the report header so a failing run can be reproduced, and stored as provenance next to
every recorded baseline. Importing this module imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pytest_convergence._version import __version__

__all__ = ["EnvironmentInfo", "current_environment"]


@dataclass(frozen=True)
class EnvironmentInfo:
    plugin_version: str
    torch_version: str
    device: str
    device_name: str
    threads: int
    seed: int

    def header(self) -> str:
        return (
            f"pytest-convergence {self.plugin_version}, torch {self.torch_version}, "
            f"device {self.device} ({self.device_name}), threads {self.threads}, "
            f"seed {self.seed}"
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def current_environment(device: str, seed: int) -> EnvironmentInfo:
    return EnvironmentInfo(
        plugin_version=__version__,
        torch_version=torch.__version__,
        device=device,
        device_name=_device_name(device),
        threads=torch.get_num_threads(),
        seed=seed,
    )


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    if device.startswith("cuda"):
        return "unavailable"
    return "cpu"
