"""pytest-convergence inspect: a baseline's provenance, calibration and power report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_convergence.cli import EXIT_ERROR, EXIT_OK
from pytest_convergence.power import FAULT_SIZES, MODEL, Catch, FaultPower, PowerReport
from tests.cli.helpers import assert_one_line_error, run_cli
from tests.cli.test_report import save_mlp_baseline
from tests.test_html_report import make_region

POWER = PowerReport(
    seed=0,
    steps=3,
    faults=(
        FaultPower(
            "gradient-scale", FAULT_SIZES, {"fc.weight": Catch(0.1, 2, 3.5), "fc.bias": None}
        ),
        FaultPower("learning-rate", FAULT_SIZES, {MODEL: Catch(0.02, 1, 40.0)}),
        FaultPower("momentum", FAULT_SIZES, skipped="SGD has no momentum or betas"),
    ),
)


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    return save_mlp_baseline(tmp_path / "mlp.json", replace(make_region(), power=POWER))


def test_inspect_prints_the_provenance_the_power_summary_and_a_layer_table(
    baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "inspect", baseline)
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0] == f"{baseline}: workload 'mlp', 2 parameters, 3 steps"
    assert lines[1] == "  calibrated on: test (seeds 0)"
    assert "power (faults injected at seed 0, 3 steps):" in lines
    assert (
        "  gradient-scale  caught on 1 of 2 layers from 10% (median 10%), by step 2; blind on "
        "fc.bias up to 100%" in lines
    )
    assert lines[-3:] == [
        "  parameter  gradient-scale",
        "  fc.weight    0.1 (step 2)",
        "  fc.bias                 -",
    ]


def test_inspect_caps_the_layer_table_at_rows(
    baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run_cli(capsys, "inspect", baseline, "--rows", "1")
    assert out.splitlines()[-1] == "  ... 1 more parameters (--rows 0 shows all)"


def test_inspect_json_gives_the_report_as_stored_and_the_suggested_steps(
    baseline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run_cli(capsys, "inspect", baseline, "--json")
    payload = json.loads(out)
    stored = json.loads(baseline.read_text())
    assert payload["power"] == stored["power"]
    assert payload["suggested_steps"] == 2
    assert payload["provenance"]["workload"] == "mlp"


def test_inspect_says_when_a_baseline_has_no_power_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_mlp_baseline(tmp_path / "old.json", make_region())
    _, out, _ = run_cli(capsys, "inspect", path)
    assert out.splitlines()[-1].startswith("no power report: recorded before power reports")


def test_inspect_of_a_damaged_baseline_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"schema": "pytest-convergence/baseline", "schema_version": 6}')
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == EXIT_ERROR
    assert_one_line_error(err, f"{path}: ", "missing key")
