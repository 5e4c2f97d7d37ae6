"""pytest-convergence diff: two implementations' snapshots, parameter by parameter."""

from __future__ import annotations

import json
import warnings
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


def exported_elsewhere(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as another framework stores them: renamed, Dense kernels (in, out), the tied
    head stored once, equal layer norms stored once."""
    return {
        "params/embed": weights["embed.weight"],
        "params/ln/scale": weights["ln1.weight"],
        "params/fc1/kernel": weights["fc1.weight"].T.contiguous(),
        "params/fc1/bias": weights["fc1.bias"],
        "params/fc2/kernel": weights["fc2.weight"].T.contiguous(),
    }


def model_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(10, 8, generator=generator)
    return {
        "embed.weight": embedding,
        "fc1.weight": torch.randn(16, 8, generator=generator),
        "fc1.bias": torch.randn(16, generator=generator),
        "ln1.weight": torch.ones(16),
        "ln2.weight": torch.ones(16),
        "fc2.weight": torch.randn(16, 8, generator=generator),
        "head.weight": embedding.clone(),
    }


def test_diff_pairs_renamed_transposed_and_deduplicated_tensors_and_says_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = model_weights()
    theirs = exported_elsewhere(weights)
    theirs["params/fc2/kernel"] = theirs["params/fc2/kernel"] * 1.01  # another implementation
    a = pc.save_snapshot(weights, tmp_path / "ours.pt")
    b = pc.save_snapshot(theirs, tmp_path / "theirs.npz")

    code, out, err = run_cli(capsys, "diff", a, b)
    json_code, json_out, _ = run_cli(capsys, "diff", a, b, "--json")

    assert (code, json_code, err) == (EXIT_OK, EXIT_OK, "")
    assert out.splitlines()[2:10] == [
        "Names differ: 5 pairs (0 by name, 4 by values, 1 by dimensions), 2 duplicates "
        "counted once",
        "  A 'embed.weight' = B 'params/embed': equal values",
        "  A 'fc1.weight' = B 'params/fc1/kernel': equal values, transposed",
        "  A 'fc1.bias' = B 'params/fc1/bias': equal values",
        "  A 'ln1.weight' = B 'params/ln/scale': equal values",
        "  A 'fc2.weight' = B 'params/fc2/kernel': the only tensors left with these "
        "dimensions, transposed",
        "  A 'ln2.weight': equal to A 'ln1.weight', counted once",
        "  A 'head.weight': equal to A 'embed.weight', counted once",
    ]
    assert "Global LoGM over the 5 pairs:" in out
    assert "Largest relative L2 error: 'fc2.weight' 1.000e-02" in out
    result = json.loads(json_out)
    rows = {row["name"]: row for row in result["parameters"]}
    assert rows["fc1.weight"] | {"logm_a": 0, "logm_b": 0, "zeros_a": 0, "zeros_b": 0} == {
        "name": "fc1.weight", "name_b": "params/fc1/kernel", "paired_by": "values",
        "axes": [1, 0], "shape": [16, 8], "dtype_a": "float32", "dtype_b": "float32",
        "logm_a": 0, "logm_b": 0, "logm_abs_diff": 0.0, "relative_l2_error": 0.0,
        "max_abs_diff": 0.0, "zeros_a": 0, "zeros_b": 0,
    }  # fmt: skip
    assert rows["fc2.weight"]["relative_l2_error"] == pytest.approx(0.01, rel=1e-5)
    assert result["duplicates"] == [
        {"side": "A", "name": "ln2.weight", "equal_to": "ln1.weight", "axes": None},
        {"side": "A", "name": "head.weight", "equal_to": "embed.weight", "axes": None},
    ]
    assert result["unpaired"] == []
    over_pairs = pc.logm({name: weights[name] for name in rows})
    assert result["a"]["global_logm"] == pytest.approx(over_pairs, abs=1e-12)


def test_diff_of_tensors_that_cannot_be_paired_says_which_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = model_weights()
    theirs = exported_elsewhere(weights)
    theirs["params/fc1/kernel"] = theirs["params/fc1/kernel"] * 1.01
    theirs["params/fc2/kernel"] = theirs["params/fc2/kernel"] * 1.01
    theirs["val_3"] = torch.tensor(0.5)
    a = pc.save_snapshot({**weights, "bn.weight": torch.ones(4)}, tmp_path / "ours.pt")
    b = pc.save_snapshot(theirs, tmp_path / "theirs.npz")

    code, out, err = run_cli(capsys, "diff", a, b)

    assert code == EXIT_ERROR
    assert out == ""
    assert_one_line_error(
        err, "ours.pt and", "theirs.npz: 3 tensors of A and 3 of B cannot be paired:",
        "A's 'fc1.weight', 'fc2.weight' and B's 'params/fc1/kernel', 'params/fc2/kernel' all "
        "have dimensions 8 x 16 in some axis order, and none of A's has values equal to one "
        "of B's, so which is which cannot be told",
        "A's 'bn.weight': no tensor of B is left with dimensions 4 in any axis order",
        "B's 'val_3': no tensor of A is left that is a scalar",
        "pass --allow-unpaired to compare the 3 pairs without them",
    )  # fmt: skip


def test_diff_allow_unpaired_compares_the_pairs_and_lists_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = model_weights()
    a = pc.save_snapshot({**weights, "bn.weight": torch.ones(4)}, tmp_path / "ours.pt")
    b = pc.save_snapshot(
        {**exported_elsewhere(weights), "val_3": torch.tensor(0.5)}, tmp_path / "theirs.npz"
    )

    code, out, _ = run_cli(capsys, "diff", a, b, "--allow-unpaired")
    json_code, json_out, _ = run_cli(capsys, "diff", a, b, "--allow-unpaired", "--json")

    assert (code, json_code) == (EXIT_OK, EXIT_OK)
    assert "2 duplicates counted once, 1 tensor of A and 1 of B not paired" in out
    assert "  not paired: A's 'bn.weight': no tensor of B is left" in out
    assert "  not paired: B's 'val_3': no tensor of A is left" in out
    assert [u["names_a"] + u["names_b"] for u in json.loads(json_out)["unpaired"]] == [
        ["bn.weight"],
        ["val_3"],
    ]


def test_diff_of_snapshots_with_nothing_in_common_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = pc.save_snapshot({"w": torch.ones(3)}, tmp_path / "a.pt")
    b = pc.save_snapshot({"v": torch.ones(2, 2)}, tmp_path / "b.pt")

    code, _, err = run_cli(capsys, "diff", a, b, "--allow-unpaired")

    assert code == EXIT_ERROR
    assert_one_line_error(
        err, f"no tensor of {a} pairs with one of {b} by name, values or dimensions"
    )


def test_diff_of_mismatched_shapes_names_the_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = sample_weights()
    a = pc.save_snapshot(weights, tmp_path / "a.onnx")
    b = pc.save_snapshot({**weights, "conv.weight": torch.ones(5, 6)}, tmp_path / "b.pt")

    code, _, err = run_cli(capsys, "diff", a, b)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "'conv.weight' has shape [6, 5] vs [5, 6]")


class TiedModel(torch.nn.Module):
    """What exporters rename, transpose and de-duplicate: Linear weights (MatMul operands), a
    head tied to the embedding, two layer norms equal at initialization, a graph constant."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm1 = torch.nn.LayerNorm(16)
        self.norm2 = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.norm2(self.norm1(self.fc1(self.embed(tokens)))) * 0.5
        return self.head(self.fc2(hidden))  # type: ignore[no-any-return]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_diff_of_a_state_dict_and_its_onnx_export_pairs_every_weight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dynamo: bool
) -> None:
    if dynamo:
        pytest.importorskip("onnxscript", reason="torch's default ONNX exporter needs onnxscript")
    torch.manual_seed(0)
    model = TiedModel().eval()
    state = pc.save_snapshot(model.state_dict(), tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        torch.onnx.export(model, (torch.randint(0, 10, (2, 5)),), tmp_path / "model.onnx",
                          dynamo=dynamo)  # fmt: skip
    capsys.readouterr()  # the exporter's progress lines

    code, out, err = run_cli(capsys, "diff", state, tmp_path / "model.onnx", "--allow-unpaired",
                             "--json")  # fmt: skip

    assert code == EXIT_OK, err
    result = json.loads(out)
    accounted = [row["name"] for row in result["parameters"]] + [
        duplicate["name"] for duplicate in result["duplicates"] if duplicate["side"] == "A"
    ]
    assert sorted(accounted) == sorted(model.state_dict())
    assert {row["relative_l2_error"] for row in result["parameters"]} == {0.0}
    assert all(group["names_a"] == [] for group in result["unpaired"])  # B's graph constants
    assert result["a"]["global_logm"] == result["b"]["global_logm"]
