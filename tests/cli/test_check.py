"""pytest-convergence check: the LoGM delta of two snapshots against a region, exit 0 or 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pytest_convergence as pc
from pytest_convergence.cli import EXIT_ERROR, EXIT_OK, EXIT_OUTSIDE
from pytest_convergence.paper_regions import (
    PAPER_REGIONS,
    REGION_SCHEMA,
    RegionFileError,
    load_region,
)
from tests.cli.helpers import (
    PAPER_FILES,
    STEPS,
    assert_one_line_error,
    global_logm,
    run_cli,
    snapshot_at,
)


def test_check_of_two_consecutive_healthy_snapshots_is_inside_their_region(
    healthy_run: Path, measured_region: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "check",
        snapshot_at(healthy_run, 3),
        snapshot_at(healthy_run, 4),
        "--baseline",
        measured_region,
    )

    assert code == EXIT_OK
    delta = global_logm(snapshot_at(healthy_run, 4)) - global_logm(snapshot_at(healthy_run, 3))
    assert f"LoGM delta: {delta:+.6e}" in out
    assert "Verdict: inside the region" in out
    assert "per iteration (measured from 7 snapshots" in out


def test_check_of_a_snapshot_with_weights_scaled_by_1_5_is_outside(
    healthy_run: Path, measured_region: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = snapshot_at(healthy_run, STEPS - 1)
    tampered = {name: 1.5 * tensor for name, tensor in pc.load_snapshot(last).items()}
    bad = pc.save_snapshot(tampered, tmp_path / "tampered.safetensors", step=STEPS)

    code, out, _ = run_cli(capsys, "check", last, bad, "--baseline", measured_region)

    assert code == EXIT_OUTSIDE
    assert f"LoGM delta: {math.log10(1.5):+.3e}"[:16] in out
    assert "Verdict: OUTSIDE the region" in out
    assert "above its bound" in out


@pytest.mark.parametrize("key", PAPER_REGIONS)
def test_check_against_the_paper_regions_passes_healthy_steps_and_flags_scaled_weights(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    last = snapshot_at(healthy_run, STEPS - 1)
    tampered = {name: 1.5 * tensor for name, tensor in pc.load_snapshot(last).items()}
    bad = pc.save_snapshot(tampered, tmp_path / "tampered.pt", step=STEPS)
    before = snapshot_at(healthy_run, STEPS - 2)

    healthy = run_cli(capsys, "check", before, last, "--baseline", PAPER_FILES[key])
    scaled = run_cli(capsys, "check", last, bad, "--baseline", f"paper:{key}")

    assert healthy[0] == EXIT_OK
    assert "per epoch" in healthy[1]
    assert "Note: the region is per epoch" in healthy[1]
    assert scaled[0] == EXIT_OUTSIDE


def test_check_shows_a_capped_parameter_table_and_json(
    healthy_run: Path, measured_region: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = snapshot_at(healthy_run, 1), snapshot_at(healthy_run, 2)

    code, out, _ = run_cli(capsys, "check", a, b, "--baseline", measured_region, "--rows", "1")
    json_code, json_out, _ = run_cli(capsys, "check", a, b, "--baseline", measured_region, "--json")

    assert code == json_code == EXIT_OK
    assert "parameter     LoGM A     LoGM B       delta  zeros A  zeros B" in out
    assert "... 3 more parameters (--rows 0 shows all)" in out
    result = json.loads(json_out)
    assert result["inside"] is True
    assert result["delta"] == pytest.approx(global_logm(b) - global_logm(a), abs=1e-12)
    assert [p["name"] for p in result["parameters"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert result["region"]["granularity"] == "iteration"


def test_check_orders_two_snapshots_by_their_stored_steps(
    healthy_run: Path, measured_region: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "check",
        snapshot_at(healthy_run, 4),
        snapshot_at(healthy_run, 3),
        "--baseline",
        measured_region,
    )

    assert code == EXIT_OK
    assert "(ordered by their stored steps)" in out


def test_check_calls_non_finite_weights_a_divergence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = pc.save_snapshot({"w": torch.tensor([1.0, 2.0])}, tmp_path / "a.pt", step=1)
    nan = pc.save_snapshot({"w": torch.tensor([1.0, math.nan])}, tmp_path / "b.pt", step=2)

    code, out, _ = run_cli(capsys, "check", good, nan, "--baseline", "paper:vgg16")

    assert code == EXIT_OUTSIDE
    assert "training diverged" in out
    assert "b.pt: parameter 'w' holds non-finite weights (1 NaN, 0 Inf)" in out


def test_check_refuses_a_co_simulation_baseline_naming_both_kinds(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = tmp_path / "mlp.json"
    baseline.write_text(json.dumps({"schema": "pytest-convergence/baseline", "schema_version": 1}))
    a, b = snapshot_at(healthy_run, 0), snapshot_at(healthy_run, 1)

    code, _, err = run_cli(capsys, "check", a, b, "--baseline", baseline)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "mlp.json", "co-simulation baseline", REGION_SCHEMA)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"granularity": "week"}, "granularity: 'week' is not one of iteration, epoch"),
        ({"region": [0.1, -0.1]}, "region: low 0.1 is above high -0.1"),
        ({"region": [0.0, "nan"]}, "region[1]: nan is not allowed"),
        ({"schema_version": 99}, "written by a newer pytest-convergence"),
        ({"extra": 1, "more": 2}, "unexpected key 'extra', 'more'"),
    ],
)
def test_a_malformed_region_file_is_refused_naming_the_file_and_the_entry(
    healthy_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: dict[str, object],
    message: str,
) -> None:
    document = json.loads(PAPER_FILES["vgg16"].read_text())
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**document, **edit}))
    a, b = snapshot_at(healthy_run, 0), snapshot_at(healthy_run, 1)

    code, _, err = run_cli(capsys, "check", a, b, "--baseline", broken)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "broken.json", message)


def test_check_of_snapshots_of_different_architectures_is_a_usage_error(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = pc.save_snapshot({"w": torch.ones(3)}, tmp_path / "other.pt", step=9)

    code, _, err = run_cli(
        capsys, "check", snapshot_at(healthy_run, 0), other, "--baseline", "paper:vgg16"
    )

    assert code == EXIT_ERROR
    assert_one_line_error(err, "do not hold the same parameters", "'0.weight' only in the first")


def test_a_region_file_names_every_missing_and_unexpected_key_at_once(tmp_path: Path) -> None:
    document = json.loads(PAPER_FILES["vgg16"].read_text())
    del document["provenance"]["paper"], document["provenance"]["dataset"]
    document["provenance"]["extra"] = 1
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))

    with pytest.raises(RegionFileError) as caught:
        load_region(broken)

    assert str(caught.value) == (
        f"{broken}: provenance: missing key 'paper', 'dataset'; unexpected key 'extra'"
    )


def test_a_region_file_accepts_a_utc_timestamp_written_with_z(tmp_path: Path) -> None:
    document = json.loads(PAPER_FILES["vgg16"].read_text())
    document["provenance"]["created"] = "2026-11-23T17:43:36Z"
    region = tmp_path / "z.json"
    region.write_text(json.dumps(document))

    assert load_region(region).provenance.created == "2026-11-23T17:43:36Z"
