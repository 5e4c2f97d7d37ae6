"""The HTML report must open anywhere, offline, and show what the trace holds."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_convergence.html_report import ReportBand, render_report, write_html_report
from pytest_convergence.traces import (
    CoSimulation,
    ParameterComparison,
    ParameterStep,
    StepComparison,
    StepTrace,
    Trace,
)

CHROMIUM = Path("/usr/bin/chromium")
BAND = ReportBand(-2e-3, 1e-3, "per-iteration LoGM-delta region", "baselines/mlp.json")


def make_run(
    *, candidate: str = "halved-last-layer", steps: int = 3, loss: float = 1.25
) -> CoSimulation:
    """A small hand-made trace: two parameters, the candidate drifting a little each step."""
    reference_logm = [-1.0 - 0.001 * step for step in range(steps + 1)]
    reference = Trace(
        label="reference",
        steps=[
            StepTrace(
                step=step,
                loss=loss - 0.01 * step,
                global_logm=reference_logm[step],
                parameters=(
                    ParameterStep("fc.weight", 40, 0, reference_logm[step], 2.0, 0.1, 0.5),
                    ParameterStep("fc.bias", 4, 1, -1.5, 0.3, 0.01, 0.1),
                ),
            )
            for step in range(steps + 1)
        ],
    )
    comparisons = [
        step_comparison(step, reference_logm[step - 1], reference_logm[step], loss)
        for step in range(1, steps + 1)
    ]
    return CoSimulation(
        workload="mlp",
        candidate=candidate,
        seed=0,
        steps=steps,
        dtype="float32",
        device="cpu",
        reference=reference,
        comparisons=comparisons,
    )


def step_comparison(step: int, before: float, after: float, loss: float) -> StepComparison:
    drifted = after + 0.0004 * step
    weight = ParameterComparison(
        name="fc.weight",
        count=40,
        reference_logm=after,
        candidate_logm=drifted,
        reference_zeros=0,
        candidate_zeros=0,
        reference_update_norm=0.1,
        error_norm=0.05 * step,
        bias=-0.5,
        noise=0.01,
    )
    bias = replace(
        weight, name="fc.bias", count=4, reference_logm=-1.5, candidate_logm=-1.5,
        reference_zeros=1, candidate_zeros=2, error_norm=1e-7, bias=1e-5, noise=2e-6,
    )  # fmt: skip
    return StepComparison(
        step=step,
        reference_loss=loss - 0.01 * step,
        candidate_loss=loss - 0.009 * step,
        reference_global_logm=after,
        candidate_global_logm=drifted,
        previous_global_logm=before,
        parameters=(weight, bias),
    )


def embedded_trace(page: str) -> CoSimulation:
    match = re.search(
        r'<script type="application/json" id="trace-data">\n(.*?)\n</script>', page, re.S
    )
    assert match is not None
    return CoSimulation.from_json(match.group(1))


def test_the_page_is_self_contained_with_no_network_reference() -> None:
    page = render_report(make_run(), band=BAND, source="convergence-report/t/trace.json")

    assert "http://" not in page
    assert "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<link" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "@import" not in page


def test_the_page_holds_the_whole_trace_and_its_numbers() -> None:
    run = make_run()

    page = render_report(run, band=BAND)

    assert embedded_trace(page) == run
    assert "fc.weight" in page
    assert "fc.bias" in page
    assert "halved-last-layer" in page
    assert "-1.00200000" in page  # the reference's global LoGM after step 2, in the steps table
    assert "baselines/mlp.json" in page


def test_the_charts_draw_both_trajectories_and_the_region_band() -> None:
    page = render_report(make_run(steps=4), band=BAND)

    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 3
    logm_chart, delta_chart, _ = svgs
    assert logm_chart.count("<polyline") == 2
    # One box per step around the step's starting LoGM, and one band across the delta chart.
    assert logm_chart.count("region [") == 4
    assert delta_chart.count("<title>region [-2.0000e-03, +1.0000e-03]</title>") == 1
    assert "reference" in logm_chart
    assert "candidate halved-last-layer" in logm_chart


def test_without_a_region_the_page_says_how_to_add_one() -> None:
    page = render_report(make_run(), band=None)

    assert "--baseline FILE" in page
    assert "region [" not in page


def test_a_region_far_wider_than_the_data_is_clipped_and_says_so() -> None:
    wide = ReportBand(-0.13456, 0.01279, "per-epoch region", "paper:vgg16")

    page = render_report(make_run(), band=wide)

    assert "The region extends beyond the plotted range" in page


def test_names_cannot_break_out_of_the_page_or_its_embedded_data() -> None:
    hostile = '</script><script>alert("x")</script><!--'
    run = make_run(candidate=hostile)

    page = render_report(run, band=BAND)

    assert page.count("</script>") == 2  # the embedded data and the table script
    assert "<script>alert" not in page
    assert embedded_trace(page).candidate == hostile


def test_non_finite_numbers_render_as_text_rather_than_failing() -> None:
    run = make_run(loss=float("nan"))
    last = run.comparisons[-1]
    broken = replace(last.parameters[0], error_norm=float("inf"), non_finite=True)
    run.comparisons[-1] = replace(last, parameters=(broken, *last.parameters[1:]))

    page = render_report(run, band=BAND)

    assert ">inf<" in page
    assert '<tr class="bad">' in page
    assert "no data" in page  # every loss is NaN: the loss chart has nothing to draw
    assert embedded_trace(page).comparisons[-1].parameters[0].error_norm == float("inf")


def test_writing_refuses_to_replace_a_page_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    write_html_report(make_run(), target, band=BAND)
    first = target.read_text(encoding="utf-8")

    with pytest.raises(FileExistsError, match=r"report\.html already exists"):
        write_html_report(make_run(steps=5), target)
    assert target.read_text(encoding="utf-8") == first

    write_html_report(make_run(steps=5), target, overwrite=True)
    assert target.read_text(encoding="utf-8") != first
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left behind


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"
)
def test_chromium_renders_the_page_headless(tmp_path: Path) -> None:
    page = write_html_report(make_run(steps=6), tmp_path / "report.html", band=BAND)
    screenshot = tmp_path / "report.png"

    subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot}", "--window-size=1280,1600", page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip

    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert screenshot.stat().st_size > 10_000  # a blank page compresses to a few kilobytes
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
