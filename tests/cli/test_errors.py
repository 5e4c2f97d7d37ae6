"""Damaged and unsafe input: one line on stderr naming the file, exit 2, never a traceback."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import pytest_convergence as pc
from pytest_convergence.cli import EXIT_ERROR
from tests.cli.helpers import SUFFIXES, assert_one_line_error, run_cli, sample_weights


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_truncated_snapshot_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    path = pc.save_snapshot(sample_weights(), tmp_path / f"damaged{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    code, _, err = run_cli(capsys, "logm", path)

    assert code == EXIT_ERROR
    assert_one_line_error(err, str(path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("weights.h5", b"\x89HDF", "unknown suffix '.h5'"),
        ("empty.pt", b"", "the file is empty"),
        ("garbage.safetensors", b"not a safetensors file at all", "cannot be read"),
    ],
)
def test_unknown_empty_and_corrupt_files_exit_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    code, _, err = run_cli(capsys, "logm", path)

    assert code == EXIT_ERROR
    assert_one_line_error(err, name, message)


def test_a_missing_snapshot_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt")

    assert code == EXIT_ERROR
    assert_one_line_error(err, "a.pt: no such file")


def test_onnx_external_data_outside_the_model_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "secret.bin").write_bytes(np.array([4.0, 2.0], dtype=np.float32).tobytes())
    (tmp_path / "model").mkdir()
    proto = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=(2,))
    proto.data_location = TensorProto.EXTERNAL
    proto.external_data.add(key="location", value="../secret.bin")
    graph = helper.make_graph([], "weights", [], [], initializer=[proto])
    model = tmp_path / "model" / "m.onnx"
    model.write_bytes(helper.make_model(graph).SerializeToString())

    code, out, err = run_cli(capsys, "logm", model)

    assert code == EXIT_ERROR
    assert out == ""
    assert_one_line_error(err, "m.onnx", "'../secret.bin'", "inside the model's folder")


@pytest.mark.parametrize(
    "command",
    [
        ["logm", "{meta}"],
        ["diff", "{meta}", "{good}"],
        ["check", "{good}", "{meta}", "--baseline", "paper:resnet50"],
    ],
    ids=["logm", "diff", "check"],
)
def test_a_meta_device_pt_file_exits_2_naming_the_file_and_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    meta, good = tmp_path / "meta.pt", tmp_path / "good.pt"
    torch.save({"w": torch.empty(3, device="meta")}, meta)
    torch.save({"w": torch.ones(3)}, good)

    code, out, err = run_cli(capsys, *(arg.format(meta=meta, good=good) for arg in command))

    assert code == EXIT_ERROR
    assert out == ""
    assert_one_line_error(err, "meta.pt", "tensor 'w'", "meta device")


def test_an_npz_file_with_an_object_array_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, w=np.ones(2, dtype=np.float32), extra=np.array([object()], dtype=object))

    code, out, err = run_cli(capsys, "logm", path)

    assert code == EXIT_ERROR
    assert out == ""
    assert_one_line_error(err, "objects.npz", "tensor 'extra'", "pickle")


def test_a_refused_pt_pickle_prints_only_our_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))

    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")  # what a user's interpreter would print
        code, out, err = run_cli(capsys, "logm", path)

    assert code == EXIT_ERROR
    assert out == ""
    assert [str(warning.message) for warning in issued] == []
    assert_one_line_error(err, "plain.pt", "pickled with protocol 4")
