"""The HTML report must open anywhere, offline, and show what the trace holds."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_convergence.html_report import ReportBand, render_report, write_html_report
from pytest_convergence.html_verdict import FIRST_VIOLATION_ID
from pytest_convergence.ratio_map import RatioMap, ratio_color, ratio_map
from pytest_convergence.regions import Calibration, ParameterRegion, Region
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


def make_region(steps: int = 3, *, weight_noise_limits: tuple[float, ...] = ()) -> Region:
    """A region for make_run(): fc.weight's update noise (0.01 every step) is held to
    ``weight_noise_limits`` (default 0.1: inside), everything else well inside."""
    flat = (0.0,) * steps
    limits = weight_noise_limits or (0.1,) * steps

    def parameter(name: str, noise_limit: tuple[float, ...]) -> ParameterRegion:
        return ParameterRegion(
            name=name, count=40, bias_center=flat, bias_spread=1e3, bias_z_limit=6.0,
            radial_center=flat, radial_spread=1e3, radial_z_limit=6.0,
            error_scale=(1.0,) * steps, noise_scale=(0.01,) * steps, noise_limit=noise_limit,
            noise_log_spread=1.0, noise_z_limit=6.0, zero_change_limit=4, logm_gap_limit=1.0,
            rounding_scale=(1e-9,) * steps,
        )  # fmt: skip

    calibration = Calibration("reference-perturbation", "test", 2**-8, 1, None, (0,), steps)
    parameters = {
        "fc.weight": parameter("fc.weight", limits),
        "fc.bias": parameter("fc.bias", (1.0,) * steps),
    }
    return Region(calibration, parameters, (-2e-3, 1e-3), 1e-2)


def failing_map(steps: int = 3) -> RatioMap:
    """make_run(steps) against a region whose fc.weight noise limit drops to 0.005 at step 2
    (2x over) and to 1e-4 from step 3 on (100x over)."""
    limits = (0.1, 0.005) + (1e-4,) * (steps - 2)
    return ratio_map(make_run(steps=steps), make_region(steps, weight_noise_limits=limits))


def heat_map(page: str) -> str:
    match = re.search(r'<svg class="map".*?</svg>', page, re.S)
    assert match is not None
    return match.group(0)


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

    svgs = re.findall(r"<svg viewBox.*?</svg>", page, re.S)
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


# --- the verdict and the map ------------------------------------------------------------------


def test_the_page_opens_with_the_verdict_and_the_map_before_the_charts() -> None:
    page = render_report(make_run(), band=BAND, ratios=failing_map())

    verdict = page.index('<section class="verdict">')
    assert page.index("<h1>") < verdict < page.index('<svg class="map"')
    assert page.index('<svg class="map"') < page.index('<table class="meta">')
    assert page.index('<svg class="map"') < page.index('aria-label="Global LoGM after each step"')


def test_a_failing_verdict_counts_the_checks_that_left_the_region() -> None:
    page = render_report(make_run(), ratios=failing_map())

    assert "<strong>Failed</strong>: 2 of " in page
    assert "checks left the region, at 2 of 6 (step, parameter) cells" in page


def test_the_verdict_names_the_first_violation_where_the_failure_message_does() -> None:
    page = render_report(make_run(), ratios=failing_map())

    assert "First violation: step 2 of 3, parameter &#x27;fc.weight&#x27;" in page
    assert "update noise = 1.00e-02, limit 5.00e-03 (2x over)" in page


def test_the_verdict_gives_the_worst_ratio_and_where_it_was() -> None:
    page = render_report(make_run(), ratios=failing_map())

    assert "worst ratio 100x its limit" in page
    assert "Worst violation: step 3 of 3, parameter &#x27;fc.weight&#x27;" in page


def test_a_passing_verdict_says_so_and_names_the_check_closest_to_its_limit() -> None:
    page = render_report(make_run(), ratios=ratio_map(make_run(), make_region()))

    assert "<strong>Passed</strong>: all " in page
    assert (
        "the closest to its limit is zero count change of &#x27;fc.bias&#x27; at step 1, "
        "1 against 4 (0.25 of the limit)"
    ) in page
    assert FIRST_VIOLATION_ID not in page


def test_the_map_has_a_cell_per_parameter_and_step_with_its_numbers() -> None:
    svg = heat_map(render_report(make_run(steps=4), ratios=failing_map(steps=4)))

    cells = re.findall(r"<rect x=[^>]*><title>([^<]*)</title></rect>", svg)
    assert len(cells) == 2 * 4
    assert "fc.weight, step 2: update noise = 0.01, limit 0.005: ratio 2, outside the region" in (
        cells
    )
    assert ">fc.weight</text>" in svg
    assert ">fc.bias</text>" in svg
    assert ">step</text>" in svg


def test_the_map_colours_each_cell_by_its_ratio_with_the_break_at_the_limit() -> None:
    svg = heat_map(render_report(make_run(), ratios=failing_map()))

    assert f'fill="{ratio_color(2.0)}"><title>fc.weight, step 2:' in svg
    assert f'fill="{ratio_color(100.0)}"><title>fc.weight, step 3:' in svg
    assert ">1 (limit)</text>" in svg
    assert "red: outside the region" in svg


def test_the_map_frames_the_first_violating_cell() -> None:
    svg = heat_map(render_report(make_run(), ratios=failing_map()))

    frame = re.search(rf'<rect id="{FIRST_VIOLATION_ID}" x="([\d.]+)" y="([\d.]+)"', svg)
    cell = re.search(r'<rect x="([\d.]+)" y="([\d.]+)"[^>]*><title>fc.weight, step 2:', svg)
    assert frame is not None
    assert cell is not None
    assert float(frame.group(1)) == pytest.approx(float(cell.group(1)) + 1)
    assert float(frame.group(2)) == pytest.approx(float(cell.group(2)) + 1)
    assert "<title>first violation: fc.weight, step 2: update noise" in svg


def test_without_a_per_parameter_region_the_page_says_so_and_draws_no_map() -> None:
    page = render_report(make_run(), band=BAND)

    assert "No verdict and no map" in page
    assert "a global LoGM-delta region, with no per-parameter limits" in page
    assert "--baseline baselines/mlp.json" in page
    assert '<svg class="map"' not in page


def test_without_any_region_the_page_says_none_was_given() -> None:
    page = render_report(make_run())

    assert "No verdict and no map of where the candidate left its region: no region given" in page
    assert '<svg class="map"' not in page


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


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"
)
def test_chromium_shows_the_cells_outside_the_region_at_the_top_of_the_page(
    tmp_path: Path,
) -> None:
    import matplotlib.image

    ratios = failing_map(steps=6)
    page = write_html_report(make_run(steps=6), tmp_path / "report.html", band=BAND, ratios=ratios)
    screenshot = tmp_path / "report.png"

    subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--force-color-profile=srgb", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}",
            "--window-size=1280,1600", page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)

    pixels = matplotlib.image.imread(screenshot)[:, :, :3] * 255
    assert pixels.std() > 10  # not blank
    far_over = [int(ratio_color(100.0)[i : i + 2], 16) for i in (1, 3, 5)]
    matches = (abs(pixels - far_over) <= 6).all(axis=2)
    rows = matches.nonzero()[0]
    assert matches.sum() > 400  # four 100x cells, each tens of pixels wide
    # The map is in the first screenful, above the first chart (below 600 px at this width).
    assert rows.max() < 0.3 * pixels.shape[0]


def test_the_page_says_what_the_baseline_catches_after_the_verdict() -> None:
    from pytest_convergence.power import FAULT_SIZES, Catch, FaultPower, PowerReport

    report = PowerReport(
        0, 3, (FaultPower("gradient-scale", FAULT_SIZES, {"fc.weight": Catch(0.1, 2, 3.0)}),)
    )
    run = make_run()
    page = render_report(run, ratios=ratio_map(run, make_region()), power=report)
    assert page.index('<section class="verdict">') < page.index('<section class="power">')
    assert "gradient-scale  caught on 1 of 1 layers from 10%" in page
    assert '<td title="caught from size 0.1 at step 2, 3x">0.1 <span class="note">step 2' in page


def test_a_page_against_a_baseline_without_a_power_report_says_so() -> None:
    run = make_run()
    page = render_report(run, ratios=ratio_map(run, make_region()))
    assert "The baseline has no power report" in page
    assert '<section class="power">' not in render_report(run)
