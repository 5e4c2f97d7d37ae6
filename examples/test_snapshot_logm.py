"""LoGM of weight snapshots, whatever framework wrote them.

The LoGM paper's first observation: in healthy training, LoGM moves very little from one
iteration to the next. This example trains a small CNN for a few steps, writes a snapshot per
step in every supported format (as another framework's training job would), and checks that
every format gives the same LoGM and that the per-iteration deltas stay small.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_convergence import load_snapshot, logm, parameter_logms, save_snapshot

FORMATS = [".pt", ".safetensors", ".npz", ".onnx"]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.mark.convergence
def test_every_format_gives_the_same_logm_and_deltas_stay_small(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs, targets = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    history = [logm(model)]
    for step in range(1, 5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        for suffix in FORMATS:
            save_snapshot(model, tmp_path / f"step{step}{suffix}", step=step)
        per_format = {s: logm(load_snapshot(tmp_path / f"step{step}{s}")) for s in FORMATS}
        assert set(per_format.values()) == {logm(model)}, per_format
        history.append(logm(model))
    deltas = [abs(b - a) for a, b in itertools.pairwise(history)]
    assert max(deltas) < 1e-2, f"per-iteration LoGM deltas {deltas}"
    assert [p.name for p in parameter_logms(load_snapshot(tmp_path / "step4.onnx"))] == [
        name for name, _ in model.named_parameters()
    ]
