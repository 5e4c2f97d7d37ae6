"""pytest-convergence region: the divergence region of a healthy run's snapshots."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import pytest

import pytest_convergence as pc
from pytest_convergence.cli import EXIT_ERROR, EXIT_OK, main
from pytest_convergence.paper_regions import REGION_SCHEMA, load_region
from tests.cli.helpers import STEPS, assert_one_line_error, global_logm, run_cli, snapshot_at


def test_region_from_a_healthy_run_is_min_to_max_of_consecutive_deltas_with_provenance(
    healthy_run: Path, measured_region: Path
) -> None:
    logms = [global_logm(snapshot_at(healthy_run, step)) for step in range(STEPS)]
    deltas = [after - before for before, after in itertools.pairwise(logms)]

    region = load_region(measured_region)

    assert region.granularity == "iteration"
    assert region.low == pytest.approx(min(deltas), abs=1e-12)
    assert region.high == pytest.approx(max(deltas), abs=1e-12)
    assert [d.delta for d in region.deltas] == pytest.approx(deltas, abs=1e-12)
    assert [s.step for s in region.snapshots] == list(range(STEPS))
    assert region.snapshots[0].path.endswith("step0.safetensors")
    assert region.provenance.source == "measured"
    assert region.provenance.plugin_version == pc.__version__
    assert "measured from 7 snapshots, steps 0..6" in region.provenance.description
    assert json.loads(measured_region.read_text())["schema"] == REGION_SCHEMA


def test_region_prints_each_step_and_the_region(
    healthy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "region", healthy_run)

    assert code == EXIT_OK
    assert out.splitlines()[0].split() == ["step", "global", "LoGM", "delta", "file"]
    assert "Per-iteration deltas (6, snapshots 1 step(s) apart)" in out
    assert "Region per iteration: [" in out


@pytest.mark.parametrize(
    ("option", "expected_steps"),
    [(("--iterations-per-epoch", "2"), [2, 4, 6]), (("--epoch-every", "3"), [3, 6])],
)
def test_region_per_epoch_takes_deltas_between_epoch_boundaries(
    healthy_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: tuple[str, str],
    expected_steps: list[int],
) -> None:
    out = tmp_path / "epoch.json"

    code, printed, _ = run_cli(capsys, "region", healthy_run, *option, "--out", out)

    assert code == EXIT_OK
    region = load_region(out)
    assert region.granularity == "epoch"
    assert [d.to_step for d in region.deltas] == expected_steps
    first = region.deltas[0]
    expected = global_logm(snapshot_at(healthy_run, first.to_step)) - global_logm(
        snapshot_at(healthy_run, first.from_step)
    )
    assert first.delta == pytest.approx(expected, abs=1e-12)
    assert "Per-epoch deltas" in printed


def test_region_per_epoch_refuses_a_missing_epoch_boundary(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for step in (0, 2, 6):
        shutil.copy(snapshot_at(healthy_run, step), tmp_path)

    code, _, err = run_cli(capsys, "region", tmp_path, "--iterations-per-epoch", "2")

    assert code == EXIT_ERROR
    assert_one_line_error(err, "no snapshot at epoch boundary step 4")


def test_region_margin_widens_both_ends_by_a_share_of_the_largest_delta(
    healthy_run: Path, measured_region: Path, tmp_path: Path
) -> None:
    plain = load_region(measured_region)
    out = tmp_path / "wide.json"

    assert main(["region", str(healthy_run), "--margin", "0.5", "--out", str(out)]) == EXIT_OK

    wide = load_region(out)
    pad = 0.5 * max(abs(plain.low), abs(plain.high))
    assert wide.low == pytest.approx(plain.low - pad)
    assert wide.high == pytest.approx(plain.high + pad)
    assert wide.margin == 0.5


def test_region_orders_by_the_number_in_the_file_name_when_no_step_is_stored(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for step in (0, 1, 2, 10):
        weights = pc.load_snapshot(snapshot_at(healthy_run, min(step, STEPS - 1)))
        pc.save_snapshot(dict(weights), tmp_path / f"ckpt-{step}.npz")
    names = ["ckpt-10.npz", "ckpt-2.npz", "ckpt-0.npz", "ckpt-1.npz"]

    code, out, _ = run_cli(capsys, "region", *(tmp_path / n for n in names), "--json")

    assert code == EXIT_OK
    assert [s["step"] for s in json.loads(out)["snapshots"]] == [0, 1, 2, 10]


def test_region_refuses_an_ambiguous_order(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = dict(pc.load_snapshot(snapshot_at(healthy_run, 0)))
    first = pc.save_snapshot(weights, tmp_path / "run3_a.pt")
    second = pc.save_snapshot(weights, tmp_path / "run3_b.pt")

    code, _, err = run_cli(capsys, "region", first, second)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "ambiguous order", "run3_a.pt", "run3_b.pt", "both have step 3")


def test_region_accepts_a_quoted_glob_and_records_sha256_when_asked(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "region.json"

    code, _, _ = run_cli(
        capsys, "region", f"{healthy_run}/step[0-2].safetensors", "--sha256", "--out", out
    )

    assert code == EXIT_OK
    region = load_region(out)
    assert [s.step for s in region.snapshots] == [0, 1, 2]
    expected = hashlib.sha256(snapshot_at(healthy_run, 0).read_bytes()).hexdigest()
    assert region.snapshots[0].sha256 == expected


def test_region_refuses_to_overwrite_its_output_without_force(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "region.json"
    out.write_text("keep me")

    code, _, err = run_cli(capsys, "region", healthy_run, "--out", out)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "region.json already exists; pass --force")
    assert out.read_text() == "keep me"

    assert run_cli(capsys, "region", healthy_run, "--out", out, "--force")[0] == EXIT_OK
    assert load_region(out).granularity == "iteration"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["region.json"]


def test_a_single_snapshot_is_not_enough_for_a_region(
    healthy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "region", snapshot_at(healthy_run, 0))

    assert code == EXIT_ERROR
    assert_one_line_error(err, "step0.safetensors", "at least two")
