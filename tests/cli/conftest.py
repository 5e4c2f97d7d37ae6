"""Fixtures of the CLI tests: a small healthy run, one snapshot per step, and its region."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytest_convergence as pc
from pytest_convergence.cli import EXIT_OK, main
from tests.cli.helpers import STEPS


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained a few steps, one snapshot per step (stored steps 0..6)."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for step in range(STEPS):
        pc.save_snapshot(model, folder / f"step{step}.safetensors", step=step)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return folder


@pytest.fixture(scope="module")
def measured_region(healthy_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("region") / "region.json"
    assert main(["region", str(healthy_run), "--out", str(out)]) == EXIT_OK
    return out
