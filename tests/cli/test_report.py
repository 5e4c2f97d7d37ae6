"""pytest-convergence report: the HTML page of a trace, with the region it is drawn against."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_convergence.cli import EXIT_ERROR, EXIT_OK
from pytest_convergence.regions import Region
from tests.cli.helpers import PAPER_FILES, assert_one_line_error, run_cli
from tests.test_html_report import make_region, make_run


def test_report_writes_a_page_beside_the_trace_and_refuses_to_overwrite_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], measured_region: Path
) -> None:
    trace = make_run().write(tmp_path / "trace.json")

    code, out, _ = run_cli(capsys, "report", trace, "--baseline", measured_region)
    again, _, err = run_cli(capsys, "report", trace)

    assert code == EXIT_OK
    page = tmp_path / "report.html"
    assert f"Wrote {page} with the region of {measured_region}" in out
    assert "fc.weight" in page.read_text()
    assert again == EXIT_ERROR
    assert_one_line_error(err, "report.html already exists; pass --force")
    assert run_cli(capsys, "report", trace, "--force", "--out", tmp_path / "r.html")[0] == EXIT_OK


def save_mlp_baseline(path: Path, region: Region) -> Path:
    from pytest_convergence.baselines import Provenance, save_baseline
    from pytest_convergence.environment import current_environment

    provenance = Provenance.from_environment(
        current_environment("cpu", 0), workload="mlp", candidate=None, dtype="float32"
    )
    return save_baseline(path, region, provenance)


def test_report_draws_the_region_of_a_co_simulation_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = save_mlp_baseline(tmp_path / "mlp.json", make_region())
    trace = make_run().write(tmp_path / "trace.json")

    code, _, _ = run_cli(
        capsys, "report", trace, "--baseline", baseline, "--out", tmp_path / "p.html"
    )

    assert code == EXIT_OK
    page = (tmp_path / "p.html").read_text()
    assert "region [-2.0000e-03, +1.0000e-03]" in page
    assert "<strong>Passed</strong>: all 30 checks stayed inside the region" in page
    assert '<svg class="map"' in page


def test_report_of_a_failing_trace_opens_with_its_verdict_and_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    region = make_region(weight_noise_limits=(0.1, 0.005, 1e-4))
    baseline = save_mlp_baseline(tmp_path / "mlp.json", region)
    trace = make_run().write(tmp_path / "trace.json")

    code, _, _ = run_cli(capsys, "report", trace, "--baseline", baseline)

    assert code == EXIT_OK
    page = (tmp_path / "report.html").read_text()
    assert "<strong>Failed</strong>: 2 of 30 checks left the region" in page
    assert 'id="first-violation"' in page


def test_report_against_a_named_baseline_of_another_model_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    region = make_region()
    conv = replace(region.parameters["fc.weight"], name="conv.weight")
    other = replace(region, parameters={"conv.weight": conv})
    baseline = save_mlp_baseline(tmp_path / "other.json", other)
    trace = make_run().write(tmp_path / "trace.json")

    code, _, err = run_cli(capsys, "report", trace, "--baseline", baseline)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "other.json", "'fc.weight'", "is not in the baseline region")
    assert not (tmp_path / "report.html").exists()


def test_report_finds_the_workloads_baseline_and_survives_a_broken_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "baselines").mkdir()
    guessed = tmp_path / "baselines" / "mlp.json"  # make_run()'s workload
    shutil.copy(PAPER_FILES["resnet50"], guessed)
    trace = make_run().write(tmp_path / "trace.json")

    found = run_cli(capsys, "report", trace)
    guessed.write_text("{")
    broken = run_cli(capsys, "report", trace, "--out", "broken.html")

    assert found[0] == EXIT_OK
    assert "with the region of baselines/mlp.json" in found[1]
    assert broken[0] == EXIT_OK
    assert_one_line_error(broken[2], "warning: no region band", "baselines/mlp.json")
    assert "none given" in (tmp_path / "broken.html").read_text()


def test_report_of_a_file_that_is_not_a_trace_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.json"
    trace.write_text('{"schema": "something else"}')

    code, _, err = run_cli(capsys, "report", trace)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "trace.json", "malformed co-simulation trace")
    assert not (tmp_path / "report.html").exists()
