"""Shared by the CLI tests: running the command in-process, and the files it reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pytest_convergence as pc
from pytest_convergence.cli import main
from pytest_convergence.paper_regions import PAPER_REGIONS

STEPS = 7
REPOSITORY = Path(__file__).resolve().parents[2]
PAPER_FILES = {key: REPOSITORY / "baselines" / f"paper-{key}.json" for key in PAPER_REGIONS}
SUFFIXES = [".pt", ".safetensors", ".npz", ".onnx"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot_at(run: Path, step: int) -> Path:
    return run / f"step{step}.safetensors"


def global_logm(path: Path) -> float:
    return pc.logm(pc.load_snapshot(path))


def sample_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 5, generator=generator)
    weight[0, :2] = 0.0
    return {
        "conv.weight": weight,
        "conv.bias": torch.randn(5, generator=generator).to(torch.float16),
        "head.weight": torch.randn(3, 5, generator=generator, dtype=torch.float64),
    }


def assert_one_line_error(err: str, *needles: str) -> None:
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert err.startswith("pytest-convergence ")
    for needle in needles:
        assert needle in err
