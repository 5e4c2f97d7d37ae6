"""What the commands read: folders, globs, and snapshots ordered by step."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_convergence.cli import EXIT_ERROR, CliError, order_by_step, step_from_name
from tests.cli.helpers import assert_one_line_error, run_cli


def test_a_folder_without_snapshots_and_a_glob_matching_nothing_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("no weights here")

    folder = run_cli(capsys, "region", tmp_path)
    pattern = run_cli(capsys, "logm", f"{tmp_path}/*.pt")

    assert folder[0] == pattern[0] == EXIT_ERROR
    assert_one_line_error(folder[2], str(tmp_path), "no snapshot files")
    assert_one_line_error(pattern[2], "*.pt: no snapshot files match")


def test_step_from_name_takes_the_first_integer() -> None:
    assert step_from_name(Path("run/step12.pt")) == 12
    assert step_from_name(Path("epoch_3-iter_40.npz")) == 3
    assert step_from_name(Path("final.onnx")) is None


def test_order_by_step_refuses_mixing_stored_steps_with_file_names() -> None:
    with pytest.raises(CliError, match=r"a\.pt stores its step but b3\.pt does not"):
        order_by_step([Path("a.pt"), Path("b3.pt")], [1, None])
    with pytest.raises(CliError, match=r"final\.pt: no stored step and no number"):
        order_by_step([Path("step1.pt"), Path("final.pt")], [None, None])
    assert order_by_step([Path("x.pt"), Path("y.pt")], [5, 2]) == [
        (Path("y.pt"), 2),
        (Path("x.pt"), 5),
    ]
