"""The strict JSON file layer: one test per fragment of its messages, and the atomic writer."""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_convergence import jsonfile
from pytest_convergence.errors import (
    BaselineError,
    FileFormatError,
    RegionFileError,
    SnapshotFormatError,
    TraceFormatError,
)

SCHEMA = jsonfile.Schema(
    "example/file", 3, "an example file", too_old="whose layout is gone; re-record it: make"
)


@dataclass(frozen=True)
class Point:
    name: str
    step: int
    values: tuple[float, ...]


POINT = jsonfile.record(
    Point,
    {
        "name": jsonfile.string,
        "step": jsonfile.positive,
        "values": jsonfile.array_of(jsonfile.finite),
    },
)
DOCUMENT_FIELDS: dict[str, jsonfile.Parser[Any]] = {
    "created": jsonfile.timestamp,
    "points": jsonfile.dict_of(POINT),
}


def parse(document: object) -> dict[str, Any]:
    return jsonfile.fields(SCHEMA.body(document), jsonfile.TOP, DOCUMENT_FIELDS)


def valid() -> dict[str, Any]:
    return {
        "schema": "example/file",
        "schema_version": 3,
        "created": "2026-11-23T17:43:36+00:00",
        "points": {"fc1.weight": {"name": "a", "step": 1, "values": [0.5, 1.5, 2.5, 3.5]}},
    }


def problem(document: object) -> str:
    """The message a document's first problem reads as, without a file's path."""
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(jsonfile.DocumentError) as caught:
        parse(jsonfile.decode(text))
    return str(caught.value)


# --- decoding -----------------------------------------------------------------------------------


def test_a_valid_document_is_parsed_into_its_records() -> None:
    parsed = parse(valid())
    assert parsed["points"] == {"fc1.weight": Point("a", 1, (0.5, 1.5, 2.5, 3.5))}


def test_a_duplicate_key_is_refused_naming_the_key() -> None:
    assert problem('{"schema": "a", "schema": "b"}') == "duplicate key 'schema' in a JSON object"


def test_invalid_json_is_refused_with_its_line_and_column() -> None:
    assert problem('{"schema": "example/file",\n') == (
        "invalid JSON at line 2, column 1: Expecting property name enclosed in double quotes"
    )


def test_json_nested_too_deeply_is_a_problem_not_a_recursion_error() -> None:
    assert problem("[" * 100_000 + "]" * 100_000) == "JSON nested too deeply to be read"


def test_a_document_that_is_not_an_object_is_refused_at_the_top_level() -> None:
    assert problem([1, 2]) == "the top level: expected a JSON object, found an array"


# --- schema and version -------------------------------------------------------------------------


def test_a_wrong_schema_names_the_expected_and_the_found_tag() -> None:
    assert problem({**valid(), "schema": "other/file"}) == (
        "schema: expected 'example/file', found 'other/file': not an example file"
    )


def test_a_newer_schema_version_asks_for_an_upgrade() -> None:
    assert problem({**valid(), "schema_version": 4}) == (
        "schema_version: 4 was written by a newer pytest-convergence; upgrade "
        "(this version reads schema_version 3)"
    )


def test_an_older_schema_version_gives_the_callers_hint() -> None:
    assert problem({**valid(), "schema_version": 2}) == (
        "schema_version: 2 was written by an older pytest-convergence whose layout is gone; "
        "re-record it: make"
    )


def test_a_missing_schema_version_is_named() -> None:
    document = valid()
    del document["schema_version"]
    assert problem(document) == "the top level: missing key 'schema_version'"


def test_a_schema_without_a_version_writes_and_expects_none() -> None:
    unversioned = jsonfile.Schema("example/plain", None, "a plain file")
    assert unversioned.header() == {"schema": "example/plain"}
    assert unversioned.body({"schema": "example/plain", "x": 1}) == {"x": 1}


# --- keys ---------------------------------------------------------------------------------------


def test_every_missing_key_is_listed_in_one_message() -> None:
    document = valid()
    del document["points"]["fc1.weight"]["name"], document["points"]["fc1.weight"]["values"]
    assert problem(document) == "points[\"fc1.weight\"]: missing key 'name', 'values'"


def test_every_unexpected_key_is_listed_in_one_message() -> None:
    assert problem({**valid(), "extra": 1, "more": 2}) == (
        "the top level: unexpected key 'extra', 'more'"
    )


def test_missing_and_unexpected_keys_are_listed_together() -> None:
    document = valid()
    del document["created"]
    document["extra"] = 1
    assert problem(document) == "the top level: missing key 'created'; unexpected key 'extra'"


def test_an_optional_key_may_be_absent_and_is_left_to_the_default() -> None:
    parsers = {"a": jsonfile.integer, "b": jsonfile.integer}
    assert jsonfile.fields({"a": 1}, "x", parsers, optional=("b",)) == {"a": 1}


# --- values -------------------------------------------------------------------------------------


def test_a_wrong_type_names_its_place_in_the_document() -> None:
    document = valid()
    document["points"]["fc1.weight"]["values"][3] = "x"
    assert problem(document) == (
        "points[\"fc1.weight\"].values[3]: expected a number, found str 'x'"
    )


@pytest.mark.parametrize(
    ("value", "found"),
    [(True, "the boolean true"), (1.5, "float 1.5"), (None, "null"), ({}, "an object")],
)
def test_a_wrong_type_for_an_integer_says_what_was_found(value: object, found: str) -> None:
    document = valid()
    document["points"]["fc1.weight"]["step"] = value
    assert problem(document) == f'points["fc1.weight"].step: expected an integer, found {found}'


def test_an_integer_below_its_minimum_is_refused() -> None:
    document = valid()
    document["points"]["fc1.weight"]["step"] = 0
    assert problem(document) == 'points["fc1.weight"].step: must be at least 1, found 0'


@pytest.mark.parametrize(
    ("text", "shown"),
    [("NaN", "NaN"), ("Infinity", "inf"), ("-Infinity", "-inf"), ('"nan"', "nan")],
)
def test_a_non_finite_number_is_refused(text: str, shown: str) -> None:
    document = json.dumps(valid()).replace("2.5", text)
    assert problem(document) == (
        f'points["fc1.weight"].values[2]: {shown} is not allowed: values must be finite'
    )


def test_a_number_too_large_for_a_float_is_refused() -> None:
    document = json.dumps(valid()).replace("2.5", "1" + "0" * 400)
    assert problem(document) == 'points["fc1.weight"].values[2]: number too large for a float'


def test_a_timestamp_that_is_not_iso_8601_is_refused() -> None:
    assert problem({**valid(), "created": "yesterday"}) == (
        "created: 'yesterday' is not an ISO-8601 timestamp"
    )


def test_a_utc_timestamp_written_with_z_is_accepted_as_written() -> None:
    assert parse({**valid(), "created": "2026-11-23T17:43:36Z"})["created"] == (
        "2026-11-23T17:43:36Z"
    )


def test_an_interval_with_low_above_high_is_refused() -> None:
    with pytest.raises(jsonfile.DocumentError, match=r"^region: low 0\.1 is above high -0\.1$"):
        jsonfile.interval([0.1, -0.1], "region")


# --- Inf and NaN as text ------------------------------------------------------------------------


FLOATS = st.floats(allow_nan=True, allow_infinity=True)
READ_BACK = jsonfile.dict_of(jsonfile.array_of(jsonfile.text_float))


@given(st.dictionaries(st.text(max_size=5), st.lists(FLOATS, max_size=6), max_size=4))
def test_infinities_and_nans_survive_the_text_encoding(curves: dict[str, list[float]]) -> None:
    text = jsonfile.dumps_text_floats(dict(curves))

    def refuse(constant: str) -> object:
        raise AssertionError(f"{constant} is not JSON")

    read = READ_BACK(json.loads(text, parse_constant=refuse), "curves")
    # repr tells NaN from NaN and -0.0 from 0.0, where == cannot.
    assert repr(read) == repr({name: tuple(values) for name, values in curves.items()})


def test_a_number_read_as_text_float_stays_as_written() -> None:
    assert repr(jsonfile.text_float(2, "x")) == "2"
    assert math.isinf(jsonfile.text_float("-inf", "x"))


def test_text_that_is_no_float_is_refused_as_a_number() -> None:
    with pytest.raises(jsonfile.DocumentError, match=r"^x: expected a number, found str 'Inf'$"):
        jsonfile.text_float("Inf", "x")


# --- errors naming the file ---------------------------------------------------------------------


def test_a_problem_in_a_file_is_the_formats_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({**valid(), "created": "yesterday"}), encoding="utf-8")
    with pytest.raises(BaselineError) as caught:
        jsonfile.load_file(path, parse, BaselineError)
    assert str(caught.value) == f"{path}: created: 'yesterday' is not an ISO-8601 timestamp"
    assert caught.value.path == str(path)
    assert caught.value.reason == "created: 'yesterday' is not an ISO-8601 timestamp"


def test_a_missing_file_is_file_not_found_so_callers_can_tell_it_from_damage(
    tmp_path: Path,
) -> None:
    with pytest.raises(FileNotFoundError):
        jsonfile.load_file(tmp_path / "never.json", parse, BaselineError)


def test_a_file_that_is_not_utf8_is_a_problem_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RegionFileError, match=r"binary\.json: not UTF-8 text"):
        jsonfile.load_file(path, parse, RegionFileError)


@pytest.mark.parametrize(
    "kind", [FileFormatError, BaselineError, RegionFileError, TraceFormatError, SnapshotFormatError]
)
def test_every_file_format_error_survives_pickling_between_processes(
    kind: type[FileFormatError],
) -> None:
    error = kind("x.json", "broken")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.path, copy.reason) == (kind, str(error), "x.json", "broken")
    assert isinstance(copy, ValueError)


def test_a_snapshot_format_error_keeps_listing_the_supported_formats() -> None:
    assert str(SnapshotFormatError("w.h5", "unknown suffix '.h5'")).startswith(
        "w.h5: unknown suffix '.h5' (supported formats: PyTorch state dict"
    )


# --- the atomic writer --------------------------------------------------------------------------


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_is_readable_by_everyone_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        path = jsonfile.write_text_file(tmp_path / "new.json", "{}\n")
    finally:
        os.umask(previous)
    assert path.read_text(encoding="utf-8") == "{}\n"
    assert mode_of(path) == 0o644


def test_rewriting_a_file_keeps_its_mode(tmp_path: Path) -> None:
    path = jsonfile.write_text_file(tmp_path / "kept.json", "old\n")
    path.chmod(0o600)
    jsonfile.write_text_file(path, "new\n", overwrite=True)
    assert path.read_text(encoding="utf-8") == "new\n"
    assert mode_of(path) == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = jsonfile.write_text_file(tmp_path / "kept.json", "old\n")

    def disk_full(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        jsonfile.write_text_file(path, "new\n", overwrite=True)
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "old\n"
    assert temp_files(tmp_path) == []


def test_an_existing_file_is_kept_unless_overwriting_is_allowed(tmp_path: Path) -> None:
    path = jsonfile.write_text_file(tmp_path / "region.json", "old\n")
    with pytest.raises(FileExistsError, match=r"region\.json already exists; pass --force"):
        jsonfile.write_text_file(path, "new\n")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert temp_files(tmp_path) == []


def test_a_file_created_while_writing_is_not_replaced_without_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "raced.json"
    real_link = os.link

    def another_writer_first(source: str, target: Path) -> None:
        Path(target).write_text("theirs\n", encoding="utf-8")
        real_link(source, target)

    monkeypatch.setattr(os, "link", another_writer_first)
    with pytest.raises(FileExistsError, match=r"raced\.json already exists"):
        jsonfile.write_text_file(path, "ours\n")
    assert path.read_text(encoding="utf-8") == "theirs\n"
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_as_target_is_refused_naming_the_path(tmp_path: Path, overwrite: bool) -> None:
    folder = tmp_path / "report.json"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        jsonfile.write_text_file(folder, "{}\n", overwrite=overwrite)
    assert str(caught.value) == f"{folder} is a folder, not a file name"
    assert temp_files(tmp_path) == []


def test_a_missing_folder_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "x.json"
    with pytest.raises(FileNotFoundError, match=r"x\.json: folder .*nowhere does not exist"):
        jsonfile.write_text_file(path, "{}\n")


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX-only")
def test_the_lock_is_exclusive_and_lives_beside_the_file(tmp_path: Path) -> None:
    import fcntl

    path = tmp_path / "shared.json"
    with (
        jsonfile.exclusive_lock(path),
        open(tmp_path / "shared.json.lock") as other,
        pytest.raises(BlockingIOError),
    ):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "shared.json.lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on leaving


@pytest.mark.skipif(sys.platform == "win32", reason="named pipes and SIGALRM are POSIX")
def test_a_named_pipe_or_a_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    import signal

    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)

    def blocked(signum: int, frame: object) -> None:
        raise TimeoutError("read_text blocked on a named pipe")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(5)
    try:
        with pytest.raises(jsonfile.DocumentError, match=r"not a regular file \(a named pipe\)"):
            jsonfile.read_text(pipe)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(jsonfile.DocumentError, match=r"not a regular file \(a folder\)"):
        jsonfile.read_text(tmp_path)
