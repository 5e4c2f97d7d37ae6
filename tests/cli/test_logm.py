"""pytest-convergence logm: global and per-parameter figures of snapshot files."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import pytest_convergence as pc
from pytest_convergence import snapshots
from pytest_convergence.cli import EXIT_OK
from tests.cli.helpers import SUFFIXES, global_logm, run_cli, sample_weights, snapshot_at


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_logm_prints_global_and_per_parameter_figures_for_every_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    path = pc.save_snapshot(sample_weights(), tmp_path / f"model{suffix}", step=3)

    code, out, err = run_cli(capsys, "logm", path)

    assert code == EXIT_OK
    assert err == ""
    assert f"(step 3): global LoGM {global_logm(path):.6f} over 50 weights (2 zeros)" in out
    for line, name in zip(out.splitlines()[2:], sample_weights(), strict=True):
        assert line.split()[0] == name
    assert "[6, 5]  float32" in out
    assert "float16" in out


def test_logm_json_parses_and_agrees_with_the_library(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = pc.save_snapshot({**sample_weights(), "steps": torch.tensor(4)}, tmp_path / "m.pt")

    code, out, _ = run_cli(capsys, "logm", path, "--json")

    assert code == EXIT_OK
    (result,) = json.loads(out)["snapshots"]
    assert result["global_logm"] == pytest.approx(global_logm(path), abs=1e-12)
    assert result["count"] == 50
    assert result["zeros"] == 2
    assert result["skipped"] == ["steps"]
    expected = pc.parameter_stats(pc.load_snapshot(path))
    for row, stats in zip(result["parameters"], expected, strict=True):
        assert row["name"] == stats.name
        assert row["logm"] == pytest.approx(stats.logm, abs=1e-12)
        assert row["l2_norm"] == pytest.approx(stats.l2_norm)
        assert row["std"] == pytest.approx(stats.std)
        assert (row["count"], row["zeros"]) == (stats.count, stats.zeros)
    assert result["parameters"][0]["shape"] == [6, 5]


def test_logm_lists_tensors_that_are_not_floating_point_as_skipped_without_calling_them_integers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mixed.npz"
    np.savez(path, w=np.ones(2, dtype=np.float32), steps=np.array(3), names=np.array(["a", "b"]))

    code, out, _ = run_cli(capsys, "logm", path)

    assert code == EXIT_OK
    assert out.splitlines()[-1] == "  not floating point, skipped: steps, names"


def test_logm_prints_control_characters_in_names_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A downloaded file's names must not add lines to a report or recolour a terminal.
    names = {"w\nFAKE: all clear": torch.ones(2), "\x1b[2Jred": torch.ones(2)}
    path = pc.save_snapshot({**names, "n\rote": torch.tensor(3)}, tmp_path / "n.safetensors")

    code, out, _ = run_cli(capsys, "logm", path)

    assert code == EXIT_OK
    assert "\x1b" not in out
    assert "\r" not in out
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["w\\nFAKE:", "\\x1b[2Jred"]
    assert lines[4] == "  not floating point, skipped: n\\rote"
    assert len(lines) == 5


def test_logm_of_several_files_reports_each_in_the_order_given(
    healthy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [snapshot_at(healthy_run, 5), snapshot_at(healthy_run, 2)]

    code, out, err = run_cli(capsys, "logm", *files, "--json")

    assert code == EXIT_OK
    assert err == ""  # no progress bar: stderr is not a terminal
    assert [r["step"] for r in json.loads(out)["snapshots"]] == [5, 2]


def test_logm_holds_at_most_one_tensor_of_a_snapshot_at_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = {f"layer{i}.weight": torch.randn(64, 64) for i in range(6)}
    path = pc.save_snapshot(weights, tmp_path / "big.safetensors")
    alive: list[weakref.ref[torch.Tensor]] = []
    most_alive = 0
    original = snapshots.Snapshot.__getitem__

    def tracking(self: snapshots.Snapshot, name: str) -> torch.Tensor:
        nonlocal most_alive
        tensor = original(self, name)
        alive.append(weakref.ref(tensor))
        most_alive = max(most_alive, sum(ref() is not None for ref in alive))
        return tensor

    monkeypatch.setattr(snapshots.Snapshot, "__getitem__", tracking)

    code, _, _ = run_cli(capsys, "logm", path)

    assert code == EXIT_OK
    assert len(alive) == 6
    assert most_alive == 1
