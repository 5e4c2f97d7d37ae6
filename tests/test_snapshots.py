"""Snapshots must read what every framework writes, and refuse what is unsafe or damaged."""

from __future__ import annotations

import gc
import io
import os
import pickle
import sys
import warnings
import weakref
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from pytest_convergence.errors import SnapshotFormatError, UnsafeExternalDataError
from pytest_convergence.snapshots import Snapshot, load_snapshot, save_snapshot

# (suffix, external_data): every way save_snapshot can write a file.
FORMATS = [
    pytest.param(".pt", False, id="pt"),
    pytest.param(".pth", False, id="pth"),
    pytest.param(".safetensors", False, id="safetensors"),
    pytest.param(".npz", False, id="npz"),
    pytest.param(".onnx", False, id="onnx"),
    pytest.param(".onnx", True, id="onnx-external"),
]
SUFFIXES = [".pt", ".safetensors", ".npz", ".onnx"]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def sample_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "encoder.weight": torch.randn(3, 4, generator=generator, dtype=torch.float32),
        "encoder.bias": torch.randn(4, generator=generator, dtype=torch.float16),
        "attention.scale": torch.randn(2, 2, generator=generator).to(torch.bfloat16),
        "head.weight": torch.randn(5, generator=generator, dtype=torch.float64),
        "head.temperature": torch.tensor(0.5, dtype=torch.float32),
        "empty": torch.empty(0, 3),
    }


def assert_same_tensor(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit, so NaN, infinities and -0.0 count too."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    bits = BITS[expected.element_size()]
    assert torch.equal(actual.reshape(-1).view(bits), expected.reshape(-1).view(bits))


def assert_same_weights(snapshot: Mapping[str, torch.Tensor], expected: dict[str, Any]) -> None:
    assert list(snapshot) == list(expected)
    for name, tensor in expected.items():
        assert_same_tensor(snapshot[name], tensor)


def write_onnx(path: Path, initializers: list[TensorProto]) -> None:
    graph = helper.make_graph([], "weights", [], [], initializer=initializers)
    path.write_bytes(helper.make_model(graph).SerializeToString())


def external_tensor(location: str, *, offset: int = 0, dims: tuple[int, ...] = (2,)) -> TensorProto:
    proto = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=dims)
    proto.data_location = TensorProto.EXTERNAL
    proto.external_data.add(key="location", value=location)
    proto.external_data.add(key="offset", value=str(offset))
    return proto


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "external"), FORMATS)
def test_every_format_round_trips_names_order_dtypes_values_step_and_metadata(
    tmp_path: Path, suffix: str, external: bool
) -> None:
    weights = sample_weights()
    path = tmp_path / f"model{suffix}"

    written = save_snapshot(
        {**weights, "steps_seen": torch.tensor(7)},
        path,
        step=1200,
        metadata={"run": "baseline", "optimizer": "adamw"},
        external_data=external,
    )
    snapshot = load_snapshot(path)

    assert written == path
    assert_same_weights(snapshot, weights)
    assert {tensor.dtype for tensor in weights.values()} >= set(FLOAT_DTYPES)
    assert snapshot.step == 1200
    assert snapshot.metadata == {"run": "baseline", "optimizer": "adamw"}
    assert snapshot.skipped == ("steps_seen",)
    assert snapshot.source == str(path)


@pytest.mark.parametrize(("suffix", "external"), FORMATS)
def test_a_snapshot_without_step_or_metadata_round_trips_as_such(
    tmp_path: Path, suffix: str, external: bool
) -> None:
    path = tmp_path / f"model{suffix}"
    save_snapshot({"w": torch.ones(2)}, path, external_data=external)

    snapshot = load_snapshot(path)

    assert snapshot.step is None
    assert snapshot.metadata == {}


@pytest.mark.parametrize(("suffix", "external"), FORMATS)
def test_every_bfloat16_and_float8_bit_pattern_round_trips_exactly(
    tmp_path: Path, suffix: str, external: bool
) -> None:
    # NaN payloads included: .npz widens these types, and a value cast back would lose them.
    patterns = {"bfloat16": torch.arange(-(2**15), 2**15).to(torch.int16).view(torch.bfloat16)}
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"):
        patterns[name] = torch.arange(256).to(torch.uint8).view(getattr(torch, name))

    save_snapshot(patterns, tmp_path / f"bits{suffix}", external_data=external)

    assert_same_weights(load_snapshot(tmp_path / f"bits{suffix}"), patterns)


names = st.from_regex(r"[a-z][a-z0-9_]{0,5}(\.[a-z0-9_]{1,5}){0,2}", fullmatch=True)
specials = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 0.0])


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 10.0 ** draw(
        st.integers(-3, 3)
    )
    if values.numel() and draw(st.booleans()):
        values.view(-1)[0] = draw(specials)
    return values.to(draw(st.sampled_from(FLOAT_DTYPES)))


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    return Snapshot(
        draw(st.dictionaries(names, tensors(), max_size=5)),
        step=draw(st.none() | st.integers(-(2**63), 2**63 - 1)),
        metadata=draw(
            st.dictionaries(
                st.text(max_size=8).filter(lambda key: not key.startswith("pytest_convergence.")),
                st.text(max_size=8),
                max_size=3,
            )
        ),
    )


@pytest.mark.parametrize(("suffix", "external"), FORMATS)
@settings(max_examples=25, deadline=None)
@given(snapshot=snapshots())
def test_random_snapshots_survive_a_round_trip_bit_for_bit(
    tmp_path_factory: pytest.TempPathFactory, suffix: str, external: bool, snapshot: Snapshot
) -> None:
    path = tmp_path_factory.mktemp("round_trip") / f"weights{suffix}"

    save_snapshot(snapshot, path, external_data=external)
    loaded = load_snapshot(path)

    assert_same_weights(loaded, dict(snapshot))
    assert loaded.step == snapshot.step
    assert loaded.metadata == snapshot.metadata


# --- files other tools wrote ------------------------------------------------------------------


def batchnorm_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(8, 3))  # moves the running statistics and num_batches_tracked
    return model


def test_it_loads_a_state_dict_saved_by_plain_torch_save(tmp_path: Path) -> None:
    state = batchnorm_model().state_dict()
    torch.save(state, tmp_path / "model.pt")

    snapshot = load_snapshot(tmp_path / "model.pt")

    assert_same_weights(snapshot, {k: v for k, v in state.items() if v.is_floating_point()})
    assert snapshot.skipped == ("1.num_batches_tracked",)
    assert snapshot.step is None


def test_it_loads_a_state_dict_wrapped_lightning_style(tmp_path: Path) -> None:
    state = batchnorm_model().state_dict()
    torch.save({"epoch": 3, "global_step": 90, "state_dict": state}, tmp_path / "last.ckpt.pth")

    snapshot = load_snapshot(tmp_path / "last.ckpt.pth")

    assert list(snapshot) == [name for name, value in state.items() if value.is_floating_point()]
    assert snapshot.skipped == ("1.num_batches_tracked",)


def test_it_flattens_nested_dicts_of_tensors_into_dotted_names(tmp_path: Path) -> None:
    nested = {"encoder": {"w": torch.ones(2)}, "decoder": {"block": {"b": torch.zeros(3)}}}
    torch.save(nested, tmp_path / "nested.pt")

    snapshot = load_snapshot(tmp_path / "nested.pt")

    assert_same_weights(snapshot, {"encoder.w": torch.ones(2), "decoder.block.b": torch.zeros(3)})


def test_it_loads_a_legacy_non_zip_torch_checkpoint(tmp_path: Path) -> None:
    weights = sample_weights()
    torch.save(weights, tmp_path / "old.pt", _use_new_zipfile_serialization=False)

    assert_same_weights(load_snapshot(tmp_path / "old.pt"), weights)


def test_it_loads_safetensors_written_without_its_metadata(tmp_path: Path) -> None:
    safetensors.torch.save_file(
        {"b": torch.ones(2), "a": torch.zeros(1), "ids": torch.arange(3)},
        str(tmp_path / "hub.safetensors"),
        metadata={"format": "pt"},
    )

    snapshot = load_snapshot(tmp_path / "hub.safetensors")

    assert sorted(snapshot) == ["a", "b"]
    assert snapshot.skipped == ("ids",)
    assert snapshot.metadata == {"format": "pt"}


def test_it_loads_an_npz_written_by_numpy(tmp_path: Path) -> None:
    np.savez(tmp_path / "jax.npz", kernel=np.eye(2, dtype=np.float32), count=np.int64(4))

    snapshot = load_snapshot(tmp_path / "jax.npz")

    assert_same_weights(snapshot, {"kernel": torch.eye(2)})
    assert snapshot.skipped == ("count",)


def test_npz_snapshots_stay_readable_by_plain_numpy(tmp_path: Path) -> None:
    bf16 = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    save_snapshot({"w": bf16}, tmp_path / "w.npz")

    with np.load(tmp_path / "w.npz", allow_pickle=False) as archive:
        assert archive["w"].dtype == np.float32
        assert archive["w"].tolist() == [1.5, -2.0]


def test_it_loads_onnx_external_data_written_by_onnx_itself_lazily(tmp_path: Path) -> None:
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    initializers = [
        numpy_helper.from_array(weight, "w"),
        helper.make_tensor("h", TensorProto.FLOAT16, [2], np.array([1.5, -2], dtype=np.float16)),
        helper.make_tensor("b", TensorProto.BFLOAT16, [2], [0.25, -3.0]),
        helper.make_tensor("bias", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
    ]
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "exported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=initializers,
    )
    onnx.save_model(
        helper.make_model(graph),
        str(tmp_path / "exported.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="exported.bin",
        size_threshold=0,
    )

    snapshot = load_snapshot(tmp_path / "exported.onnx")
    # Changing the data file after loading shows the tensor is read when indexed, not before.
    with open(tmp_path / "exported.bin", "r+b") as data:
        data.write(np.full(6, 9.0, dtype=np.float32).tobytes())

    assert_same_tensor(snapshot["w"], torch.full((2, 3), 9.0))
    assert_same_tensor(snapshot["h"], torch.tensor([1.5, -2.0], dtype=torch.float16))
    assert_same_tensor(snapshot["b"], torch.tensor([0.25, -3.0], dtype=torch.bfloat16))
    assert_same_tensor(snapshot["bias"], torch.tensor([1.0, 2.0, 3.0]))
    assert snapshot.skipped == ("axes",)


def test_external_data_lost_after_loading_is_reported_with_file_and_tensor(
    tmp_path: Path,
) -> None:
    save_snapshot({"layer.w": torch.ones(4)}, tmp_path / "m.onnx", external_data=True)
    snapshot = load_snapshot(tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()

    with pytest.raises(SnapshotFormatError, match=r"m\.onnx.*'layer\.w'.*supported formats"):
        snapshot["layer.w"]


# --- ONNX external data safety ----------------------------------------------------------------


@pytest.fixture
def outside_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(np.array([4.0, 2.0], dtype=np.float32).tobytes())
    (tmp_path / "model").mkdir()
    return secret


def test_it_refuses_onnx_external_data_at_an_absolute_location(
    tmp_path: Path, outside_secret: Path
) -> None:
    model = tmp_path / "model" / "m.onnx"
    write_onnx(model, [external_tensor(str(outside_secret))])

    with pytest.raises(UnsafeExternalDataError) as refused:
        load_snapshot(model)

    assert "m.onnx" in str(refused.value)
    assert "'w'" in str(refused.value)
    assert str(outside_secret) in str(refused.value)


def test_it_refuses_onnx_external_data_that_climbs_out_with_dot_dot(
    tmp_path: Path, outside_secret: Path
) -> None:
    model = tmp_path / "model" / "m.onnx"
    write_onnx(model, [external_tensor("../outside/secret.bin")])

    with pytest.raises(UnsafeExternalDataError, match=r"m\.onnx.*'w'.*\.\./outside/secret\.bin"):
        load_snapshot(model)


def test_it_refuses_onnx_external_data_outside_the_model_folder_via_a_symlink(
    tmp_path: Path, outside_secret: Path
) -> None:
    model = tmp_path / "model" / "m.onnx"
    (tmp_path / "model" / "weights.bin").symlink_to(outside_secret)
    write_onnx(model, [external_tensor("weights.bin")])

    with pytest.raises(UnsafeExternalDataError, match=r"m\.onnx.*'w'.*weights\.bin"):
        load_snapshot(model)


def test_it_follows_a_symlink_that_stays_inside_the_model_folder(
    tmp_path: Path, outside_secret: Path
) -> None:
    folder = tmp_path / "model"
    (folder / "real.bin").write_bytes(outside_secret.read_bytes())
    (folder / "alias.bin").symlink_to(folder / "real.bin")
    write_onnx(folder / "m.onnx", [external_tensor("alias.bin")])

    assert_same_tensor(load_snapshot(folder / "m.onnx")["w"], torch.tensor([4.0, 2.0]))


def test_it_reports_a_missing_external_data_file(tmp_path: Path) -> None:
    write_onnx(tmp_path / "m.onnx", [external_tensor("nowhere.bin")])

    with pytest.raises(SnapshotFormatError, match=r"m\.onnx.*'w'.*nowhere\.bin.*does not exist"):
        load_snapshot(tmp_path / "m.onnx")


def test_it_says_external_data_that_is_not_a_regular_file_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_onnx(tmp_path / "m.onnx", [external_tensor("data")])

    with pytest.raises(SnapshotFormatError, match=r"m\.onnx.*'w'.*'data' is not a regular file"):
        load_snapshot(tmp_path / "m.onnx")


def test_it_reports_external_data_beyond_the_end_of_its_file(tmp_path: Path) -> None:
    (tmp_path / "short.bin").write_bytes(bytes(12))
    write_onnx(tmp_path / "m.onnx", [external_tensor("short.bin", offset=8)])

    with pytest.raises(SnapshotFormatError, match=r"m\.onnx.*'w'.*beyond the end"):
        load_snapshot(tmp_path / "m.onnx")


# --- damaged and unsupported files ------------------------------------------------------------


def assert_names_file_and_formats(error: pytest.ExceptionInfo[Exception], path: Path) -> None:
    assert path.name in str(error.value)
    assert "supported formats" in str(error.value)


def load_everything(path: Path) -> None:
    """Errors in lazily read tensors may surface only when the tensors are read."""
    load_snapshot(path).materialize()


def test_it_rejects_an_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")

    with pytest.raises(SnapshotFormatError) as error:
        load_snapshot(tmp_path / "weights.h5")

    assert_names_file_and_formats(error, tmp_path / "weights.h5")
    assert "'.h5'" in str(error.value)


def test_it_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotFormatError) as error:
        load_snapshot(tmp_path / "absent.safetensors")

    assert_names_file_and_formats(error, tmp_path / "absent.safetensors")


def test_it_says_a_pt_file_that_is_neither_zip_nor_pickle_is_not_a_checkpoint(
    tmp_path: Path,
) -> None:
    # torch's own message for a text file is "KeyError: 101" (the memo key of 'e').
    (tmp_path / "notes.pt").write_text("hello, world\n")

    with pytest.raises(SnapshotFormatError, match=r"notes\.pt: not a PyTorch checkpoint"):
        load_snapshot(tmp_path / "notes.pt")


def test_a_cut_pt_file_is_reported_as_a_damaged_zip_not_as_another_kind_of_file(
    tmp_path: Path,
) -> None:
    path = save_snapshot(sample_weights(), tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[:-1])

    with pytest.raises(SnapshotFormatError, match=r"cut\.pt: cannot be read: .*zip archive"):
        load_snapshot(path)


@pytest.mark.parametrize("target", ["absent.pt", "loop.pt"], ids=["dangling", "loop"])
def test_it_says_a_symlink_that_leads_nowhere_is_one(tmp_path: Path, target: str) -> None:
    (tmp_path / "loop.pt").symlink_to(tmp_path / target)

    with pytest.raises(SnapshotFormatError, match=r"loop\.pt: a symbolic link that leads nowhere"):
        load_snapshot(tmp_path / "loop.pt")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_it_rejects_an_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.touch()

    with pytest.raises(SnapshotFormatError) as error:
        load_everything(path)

    assert_names_file_and_formats(error, path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_it_rejects_a_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    save_snapshot(sample_weights(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(SnapshotFormatError) as error:
        load_everything(path)

    assert_names_file_and_formats(error, path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_it_rejects_garbage(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))

    with pytest.raises(SnapshotFormatError) as error:
        load_everything(path)

    assert_names_file_and_formats(error, path)


def test_it_rejects_onnx_names_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    save_snapshot({"name_marker": torch.ones(1)}, path)
    path.write_bytes(path.read_bytes().replace(b"name_marker", b"name_mark\xff\xfe"))

    with pytest.raises(SnapshotFormatError, match=r"m\.onnx.*UTF-8"):
        load_snapshot(path)


UNPICKLED: list[str] = []


def _record_unpickling() -> None:
    UNPICKLED.append("ran")


class PayloadThatRunsCode:
    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _record_unpickling, ()


def test_it_refuses_a_pt_file_whose_pickle_weights_only_rejects(tmp_path: Path) -> None:
    path = tmp_path / "trojan.pt"
    torch.save({"w": torch.ones(2), "extra": PayloadThatRunsCode()}, path)

    with pytest.raises(SnapshotFormatError) as error:
        load_snapshot(path)

    assert_names_file_and_formats(error, path)
    assert "weights_only" in str(error.value)
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)
    assert UNPICKLED == []


def test_refusing_a_pt_pickle_issues_no_warning_of_torchs_and_gives_the_reason(
    tmp_path: Path,
) -> None:
    # pickle.dump writes protocol 4, about which torch's weights-only unpickler warns before it
    # refuses the file; the refusal is the whole story.
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))

    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")
        with pytest.raises(SnapshotFormatError) as error:
            load_snapshot(path)

    assert [str(warning.message) for warning in issued] == []
    assert "weights_only" in str(error.value)
    assert "WeightsUnpickler error: Unsupported operand" in str(error.value)


def test_a_legacy_pickle_naming_a_blocked_module_is_refused_with_the_global_named(
    tmp_path: Path,
) -> None:
    # What exploit write-ups hand-write: protocol 2, GLOBAL posix.system, REDUCE.
    command = f"touch {tmp_path / 'ran'}".encode()
    path = tmp_path / "exploit.pt"
    path.write_bytes(
        b"\x80\x02cposix\nsystem\nq\x00X" + len(command).to_bytes(4, "little") + command
        + b"q\x01\x85q\x02Rq\x03."
    )  # fmt: skip

    with pytest.raises(SnapshotFormatError) as error:
        load_snapshot(path)

    assert "refuses its pickled Python objects" in str(error.value)
    assert "GLOBAL posix.system" in str(error.value)
    assert not (tmp_path / "ran").exists()


def test_torchs_warnings_about_how_it_loads_a_file_are_not_passed_on(tmp_path: Path) -> None:
    # Rebuilding a quantized tensor warns that TypedStorage is deprecated, inside torch: nothing
    # the file's reader can act on (and under -W error it made the file unreadable).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    torch.save({"w": torch.ones(2), "q": quantized}, tmp_path / "q.pt")

    with warnings.catch_warnings(record=True) as issued:
        warnings.simplefilter("always")
        snapshot = load_snapshot(tmp_path / "q.pt")

    assert [str(warning.message) for warning in issued] == []
    assert (list(snapshot), snapshot.skipped) == (["w"], ("q",))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.eye(3).to_sparse(), r"tensor 'w' is sparse \(torch.sparse_coo\)"),
        (
            torch.ones(1).expand(1 << 20),
            r"tensor 'w' addresses 1,048,576 elements in 4 bytes of storage",
        ),
    ],
    ids=["sparse", "stride-0 view"],
)
def test_it_refuses_pt_tensors_that_are_not_dense_arrays_of_their_own(
    tmp_path: Path, tensor: torch.Tensor, message: str
) -> None:
    # A stride-0 view of 2**40 elements is 4 bytes on disk and 4 TiB to measure.
    torch.save({"w": tensor}, tmp_path / "odd.pt")

    with pytest.raises(SnapshotFormatError, match=rf"odd\.pt: {message}"):
        load_snapshot(tmp_path / "odd.pt")


def test_it_reads_a_state_dict_nested_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    state: dict[str, Any] = {"w": torch.ones(2)}
    for _ in range(3 * sys.getrecursionlimit()):
        state = {"n": state}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10 * limit)  # torch.save recurses; torch.load does not
    try:
        torch.save(state, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)

    (name,) = load_snapshot(tmp_path / "deep.pt")

    assert name == "n." * (3 * limit) + "w"


def test_it_refuses_a_pt_file_whose_storage_record_was_cut_short(tmp_path: Path) -> None:
    # Memory-mapped, torch reads the bytes that follow a short record (the zip's next member)
    # as the tensor's values.
    torch.save({"b": torch.ones(2), "w": torch.ones(64)}, tmp_path / "whole.pt")
    with zipfile.ZipFile(tmp_path / "whole.pt") as whole:
        members = [(info, whole.read(info)) for info in whole.infolist()]
    with zipfile.ZipFile(tmp_path / "cut.pt", "w") as cut:
        for info, data in members:
            cut.writestr(info, data[:128] if info.filename.endswith("/data/1") else data)

    with pytest.raises(SnapshotFormatError, match=r"cut\.pt: tensor 'w' needs 256 bytes; the file's"
                       r" record '.*data/1' holds 128"):  # fmt: skip
        load_snapshot(tmp_path / "cut.pt")


def test_it_refuses_an_npz_file_with_two_arrays_of_one_name(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(tmp_path / "twice.npz", "w") as archive:
            for value in (1.0, 2.0):
                buffer = io.BytesIO()
                np.save(buffer, np.full(3, value, dtype=np.float32))
                archive.writestr("w.npy", buffer.getvalue())

    with pytest.raises(SnapshotFormatError, match=r"twice\.npz: two tensors are both named 'w'"):
        load_snapshot(tmp_path / "twice.npz")


def test_it_refuses_a_pt_file_that_is_not_a_dict(tmp_path: Path) -> None:
    torch.save(torch.ones(3), tmp_path / "bare.pt")

    with pytest.raises(SnapshotFormatError, match=r"bare\.pt.*Tensor, not a state dict"):
        load_snapshot(tmp_path / "bare.pt")


def test_a_lazily_read_tensor_that_went_bad_is_reported_with_file_and_tensor(
    tmp_path: Path,
) -> None:
    save_snapshot({"w": torch.ones(2), "v": torch.ones(2)}, tmp_path / "m.npz")
    snapshot = load_snapshot(tmp_path / "m.npz")
    save_snapshot({"v": torch.ones(2)}, tmp_path / "m.npz", overwrite=True)

    with pytest.raises(SnapshotFormatError, match=r"m\.npz.*tensor 'w'"):
        snapshot["w"]


def test_complex_weights_are_refused_on_load_and_on_save(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.pt")

    with pytest.raises(SnapshotFormatError, match=r"c\.pt.*'w'.*complex"):
        load_snapshot(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="complex"):
        save_snapshot({"w": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")


@pytest.mark.parametrize(
    "state",
    [
        {"w": torch.empty(3, device="meta")},
        {"state_dict": {"block": {"w": torch.empty(2, 2, device="meta")}}},
    ],
    ids=["flat", "nested"],
)
def test_it_refuses_a_pt_file_of_meta_tensors_on_load(
    tmp_path: Path, state: dict[str, Any]
) -> None:
    # Meta tensors have a shape and no values: measuring one fails deep inside torch.
    torch.save(state, tmp_path / "meta.pt")

    with pytest.raises(SnapshotFormatError, match=r"meta\.pt: tensor '(block\.)?w'.*meta device"):
        load_snapshot(tmp_path / "meta.pt")


@pytest.mark.parametrize(
    "array",
    [
        np.array([object()], dtype=object),
        np.array([(1.0, None)], dtype=[("value", "f4"), ("note", "O")]),
    ],
    ids=["object", "record-with-an-object-field"],
)
def test_it_refuses_an_npz_array_of_python_objects(tmp_path: Path, array: Any) -> None:
    # Only pickle can read such an array; skipping it would pass the file off as weights.
    np.savez(tmp_path / "objects.npz", w=np.ones(2, dtype=np.float32), extra=array)

    with pytest.raises(SnapshotFormatError, match=r"objects\.npz: tensor 'extra'.*pickle"):
        load_snapshot(tmp_path / "objects.npz")


# --- saving -----------------------------------------------------------------------------------


def test_save_refuses_to_overwrite_unless_told_to(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_snapshot({"w": torch.zeros(2)}, path)

    with pytest.raises(FileExistsError, match=r"w\.safetensors.*overwrite=True"):
        save_snapshot({"w": torch.ones(2)}, path)
    save_snapshot({"w": torch.ones(2)}, path, overwrite=True)

    assert_same_tensor(load_snapshot(path)["w"], torch.ones(2))


def test_save_refuses_to_overwrite_onnx_external_data_unless_told_to(tmp_path: Path) -> None:
    (tmp_path / "m.onnx.data").write_bytes(b"someone else's")

    with pytest.raises(FileExistsError, match=r"m\.onnx\.data"):
        save_snapshot({"w": torch.ones(2)}, tmp_path / "m.onnx", external_data=True)
    save_snapshot({"w": torch.ones(2)}, tmp_path / "m.onnx", external_data=True, overwrite=True)

    assert_same_tensor(load_snapshot(tmp_path / "m.onnx")["w"], torch.ones(2))


def test_save_needs_an_existing_parent_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        save_snapshot({"w": torch.ones(2)}, tmp_path / "missing" / "w.pt")


def test_save_rejects_an_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(SnapshotFormatError, match=r"w\.h5.*supported formats"):
        save_snapshot({"w": torch.ones(2)}, tmp_path / "w.h5")


@pytest.mark.parametrize(("suffix", "external"), FORMATS)
def test_save_leaves_only_the_snapshot_files_behind(
    tmp_path: Path, suffix: str, external: bool
) -> None:
    save_snapshot(sample_weights(), tmp_path / f"m{suffix}", external_data=external)

    expected = {f"m{suffix}", f"m{suffix}.data"} if external else {f"m{suffix}"}
    assert set(os.listdir(tmp_path)) == expected


@pytest.mark.parametrize(("suffix", "external"), FORMATS)
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_save_gives_every_format_the_mode_the_umask_allows(
    tmp_path: Path, suffix: str, external: bool, umask: int
) -> None:
    # As open() would: a snapshot others may read unless the umask says otherwise.
    previous = os.umask(umask)
    try:
        save_snapshot(sample_weights(), tmp_path / f"m{suffix}", external_data=external)
    finally:
        os.umask(previous)

    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in os.listdir(tmp_path)}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_a_failed_save_leaves_neither_a_half_file_nor_a_temp_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_snapshot(
            {"w": torch.ones(2), "__pytest_convergence__": torch.ones(1)}, tmp_path / "m.npz"
        )

    assert os.listdir(tmp_path) == []


def test_save_takes_a_snapshots_step_and_metadata_unless_overridden(tmp_path: Path) -> None:
    snapshot = Snapshot({"w": torch.ones(2)}, step=5, metadata={"run": "a"})

    save_snapshot(snapshot, tmp_path / "kept.pt")
    save_snapshot(snapshot, tmp_path / "new.pt", step=6, metadata={"run": "b"})

    assert (
        load_snapshot(tmp_path / "kept.pt").step,
        load_snapshot(tmp_path / "kept.pt").metadata,
    ) == (
        5,
        {"run": "a"},
    )
    assert load_snapshot(tmp_path / "new.pt").step == 6
    assert load_snapshot(tmp_path / "new.pt").metadata == {"run": "b"}


def test_load_step_overrides_the_stored_step(tmp_path: Path) -> None:
    save_snapshot({"w": torch.ones(2)}, tmp_path / "w.onnx", step=3)

    assert load_snapshot(tmp_path / "w.onnx", step=40).step == 40


def test_save_rejects_reserved_or_non_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_snapshot(
            {"w": torch.ones(1)}, tmp_path / "w.pt", metadata={"pytest_convergence.x": "1"}
        )
    with pytest.raises(TypeError, match="str"):
        save_snapshot({"w": torch.ones(1)}, tmp_path / "w.pt", metadata={"lr": 0.1})  # type: ignore[dict-item]


def test_save_writes_a_modules_parameters(tmp_path: Path) -> None:
    model = batchnorm_model()

    save_snapshot(model, tmp_path / "m.safetensors")

    assert_same_weights(
        load_snapshot(tmp_path / "m.safetensors"),
        {name: p.detach() for name, p in model.named_parameters()},
    )


def test_save_handles_tied_weights_and_views(tmp_path: Path) -> None:
    shared = torch.randn(4, 3)
    weights = {"embed": shared, "unembed": shared, "row": shared[1], "col": shared[:, 0]}

    save_snapshot(weights, tmp_path / "tied.safetensors")
    save_snapshot(weights, tmp_path / "tied.pt")

    for name in ("tied.safetensors", "tied.pt"):
        assert_same_weights(load_snapshot(tmp_path / name), weights)


def test_save_refuses_a_non_onnx_file_with_external_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="onnx"):
        save_snapshot({"w": torch.ones(1)}, tmp_path / "w.pt", external_data=True)


# --- the Snapshot mapping ---------------------------------------------------------------------


def test_from_module_clones_so_training_later_does_not_change_the_snapshot() -> None:
    model = batchnorm_model()
    snapshot = Snapshot.from_module(model, step=10, metadata={"phase": "warmup"})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)

    assert_same_weights(snapshot, before)
    assert snapshot.step == 10
    assert snapshot.metadata == {"phase": "warmup"}
    assert all(not snapshot[name].requires_grad for name in snapshot)


def test_from_module_adds_floating_buffers_only_when_asked() -> None:
    model = batchnorm_model()

    assert "1.running_mean" not in Snapshot.from_module(model)
    with_buffers = Snapshot.from_module(model, include_buffers=True)

    assert "1.running_mean" in with_buffers
    assert with_buffers.skipped == ("1.num_batches_tracked",)


def test_iterating_a_safetensors_snapshot_does_not_keep_tensors_alive(tmp_path: Path) -> None:
    save_snapshot(sample_weights(), tmp_path / "m.safetensors")
    snapshot = load_snapshot(tmp_path / "m.safetensors")

    assert not any(isinstance(value, torch.Tensor) for value in snapshot._values.values())
    for name in snapshot:
        tensor = snapshot[name]
        alive = weakref.ref(tensor)
        del tensor
        gc.collect()
        assert alive() is None
    assert snapshot["empty"] is not snapshot["empty"]


def test_materialize_loads_every_tensor_once(tmp_path: Path) -> None:
    save_snapshot(sample_weights(), tmp_path / "m.npz", step=2)

    eager = load_snapshot(tmp_path / "m.npz").materialize()

    assert all(isinstance(value, torch.Tensor) for value in eager._values.values())
    assert eager["empty"] is eager["empty"]
    assert eager.step == 2
    assert_same_weights(eager, sample_weights())


def test_membership_is_answered_without_loading(tmp_path: Path) -> None:
    save_snapshot({"w": torch.ones(1)}, tmp_path / "m.npz")
    snapshot = load_snapshot(tmp_path / "m.npz")
    (tmp_path / "m.npz").unlink()

    assert "w" in snapshot
    assert "v" not in snapshot


def test_a_snapshot_built_from_a_state_dict_skips_integer_tensors() -> None:
    snapshot = Snapshot(batchnorm_model().state_dict())

    assert "1.num_batches_tracked" not in snapshot
    assert snapshot.skipped == ("1.num_batches_tracked",)


def test_repr_is_short(tmp_path: Path) -> None:
    save_snapshot(sample_weights(), tmp_path / "m.pt", step=9)

    text = repr(load_snapshot(tmp_path / "m.pt"))

    assert text == f"Snapshot(source={str(tmp_path / 'm.pt')!r}, step=9, tensors=6)"
