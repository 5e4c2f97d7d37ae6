"""pytest-convergence diff: two implementations' snapshots, parameter by parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pytest_convergence as pc
from pytest_convergence.cli import EXIT_ERROR, EXIT_OK
from tests.cli.helpers import assert_one_line_error, run_cli, sample_weights


def test_diff_compares_two_implementations_parameter_by_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = sample_weights()
    other = {name: tensor.clone() for name, tensor in reference.items()}
    other["conv.weight"][1] += 1e-3
    a = pc.save_snapshot(reference, tmp_path / "reference.safetensors", step=3)
    b = pc.save_snapshot(other, tmp_path / "candidate.npz", step=3)

    code, out, _ = run_cli(capsys, "diff", a, b)
    json_code, json_out, _ = run_cli(capsys, "diff", a, b, "--json")

    assert code == json_code == EXIT_OK
    assert "Largest relative L2 error: 'conv.weight'" in out
    assert out.splitlines()[5].split()[0] == "conv.weight"  # worst first
    rows = {row["name"]: row for row in json.loads(json_out)["parameters"]}
    weight = reference["conv.weight"].double()
    expected = float((other["conv.weight"].double() - weight).norm() / weight.norm())
    assert rows["conv.weight"]["relative_l2_error"] == pytest.approx(expected, rel=1e-9)
    assert rows["conv.weight"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert rows["conv.weight"]["zeros_a"] == 2
    assert rows["conv.bias"]["relative_l2_error"] == 0.0
    assert rows["conv.bias"]["dtype_b"] == "float16"
    assert rows["conv.weight"]["logm_abs_diff"] > 0


def test_diff_of_mismatched_names_lists_the_first_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = pc.save_snapshot(sample_weights(), tmp_path / "a.pt")
    renamed = {f"model.{name}": tensor for name, tensor in sample_weights().items()}
    b = pc.save_snapshot(renamed, tmp_path / "b.pt")

    code, out, err = run_cli(capsys, "diff", a, b)

    assert code == EXIT_ERROR
    assert out == ""
    assert_one_line_error(
        err, "a.pt and", "b.pt do not hold the same parameters (6 differences)",
        "'conv.weight' only in the first", "; and 1 more",
    )  # fmt: skip


def test_diff_of_mismatched_shapes_names_the_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = sample_weights()
    a = pc.save_snapshot(weights, tmp_path / "a.onnx")
    b = pc.save_snapshot({**weights, "conv.weight": torch.ones(5, 6)}, tmp_path / "b.pt")

    code, _, err = run_cli(capsys, "diff", a, b)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "'conv.weight' has shape [6, 5] vs [5, 6]")
