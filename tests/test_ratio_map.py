"""The map of ratios to limits must never disagree with the verdict it illustrates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_convergence.cosim import cosimulate
from pytest_convergence.ratio_map import RATIO_CEILING, RATIO_FLOOR, ratio_color, ratio_map
from pytest_convergence.regions import (
    Calibration,
    ParameterRegion,
    Region,
    calibrate,
    check_rows,
    judge,
)
from pytest_convergence.traces import CoSimulation, ParameterComparison, StepComparison, Trace
from pytest_convergence.workloads import Workload, get_workload
from tests.test_regions import scale_gradient

NAMES = ("conv.weight", "conv.bias", "fc.weight")


def synthetic_region(steps: int) -> Region:
    """Parameters whose per-step limits are round numbers: noise 0.1, bias z 6, zeros 4."""
    flat = (0.0,) * steps
    parameters = {
        name: ParameterRegion(
            name=name,
            count=100,
            bias_center=flat,
            bias_spread=0.05,
            bias_z_limit=6.0,
            radial_center=flat,
            radial_spread=0.05,
            radial_z_limit=6.0,
            error_scale=(1.0,) * steps,
            noise_scale=(0.05,) * steps,
            noise_limit=(0.1,) * steps,
            noise_log_spread=0.5,
            noise_z_limit=6.0,
            zero_change_limit=4,
            logm_gap_limit=1.0,
            rounding_scale=(1e-9,) * steps,
        )
        for name in NAMES
    }
    calibration = Calibration("reference-perturbation", "synthetic", 1e-3, 1, None, (0,), steps)
    return Region(calibration, parameters, (-1.0, 1.0), 1.0)


# One parameter at one step: (bias, noise, radial, candidate zeros).
Sample = tuple[float, float, float, int]


def synthetic_run(samples: Sequence[Sequence[Sample]]) -> CoSimulation:
    """``samples[step - 1][parameter]``: the candidate's errors on each of NAMES at each step."""
    run = CoSimulation("synthetic", "c", 0, len(samples), "float32", "cpu", Trace("reference"))
    for step, per_parameter in enumerate(samples, start=1):
        parameters = tuple(
            ParameterComparison(
                name, 100, None, None, 0, zeros, 1.0, noise, bias=bias, noise=noise, radial=radial
            )
            for name, (bias, noise, radial, zeros) in zip(NAMES, per_parameter, strict=True)
        )
        run.comparisons.append(StepComparison(step, 1.0, 1.0, None, None, None, parameters))
    return run


samples = st.tuples(
    st.floats(-2.0, 2.0),
    st.floats(0.0, 1.0),
    st.floats(-2.0, 2.0),
    st.integers(0, 8),
)
runs = st.integers(1, 6).flatmap(
    lambda steps: st.lists(
        st.lists(samples, min_size=len(NAMES), max_size=len(NAMES)),
        min_size=steps,
        max_size=steps,
    )
)


@given(runs)
def test_the_largest_cell_is_the_verdicts_worst_ratio(values: list[list[Sample]]) -> None:
    run = synthetic_run(values)

    found = ratio_map(run, synthetic_region(len(values)))

    assert max(max(row) for row in found.ratios) == found.verdict.worst_ratio
    assert found.verdict == judge(run, synthetic_region(len(values)))


@given(runs)
def test_the_cells_over_1_are_exactly_the_pairs_with_a_violation(
    values: list[list[Sample]],
) -> None:
    found = ratio_map(synthetic_run(values), synthetic_region(len(values)))

    over = {
        (found.parameters[r], found.steps[c])
        for r, row in enumerate(found.ratios)
        for c, ratio in enumerate(row)
        if ratio > 1.0
    }
    assert over == {(v.parameter, v.step) for v in found.verdict.violations}
    first = found.first_violation_cell
    assert (first is None) == found.verdict.passed
    if first is not None:
        assert found.ratios[first[0]][first[1]] > 1.0


def test_parameters_run_down_in_model_order_and_steps_across() -> None:
    values = [[(0.0, 0.01, 0.0, 0)] * len(NAMES)] * 4
    values[2] = [(0.0, 0.01, 0.0, 0), (0.0, 0.5, 0.0, 0), (0.0, 0.01, 0.0, 0)]

    found = ratio_map(synthetic_run(values), synthetic_region(4))

    assert found.parameters == NAMES
    assert found.steps == (1, 2, 3, 4)
    assert [len(row) for row in found.ratios] == [4, 4, 4]
    assert found.first_violation_cell == (1, 2)  # conv.bias at step 3
    cell = found.cells[1][2]
    assert cell is not None
    assert (cell.check, cell.value, cell.limit) == ("update noise", 0.5, 0.1)
    assert found.ratios[1][2] == pytest.approx(5.0)


def test_each_cell_keeps_its_worst_check_of_all_the_checks_at_that_pair() -> None:
    values = [[(0.0, 0.01, 0.0, 0), (0.0, 0.01, 0.0, 6), (0.0, 0.01, 0.0, 0)]]
    run = synthetic_run(values)

    found = ratio_map(run, synthetic_region(1))

    rows = [row for row in check_rows(run, synthetic_region(1)) if row[1] == "conv.bias"]
    assert len(rows) > 1
    cell = found.cells[1][0]
    assert cell is not None
    assert cell.check == "zero count change"
    assert cell.ratio == pytest.approx(6 / 4)


def test_non_finite_weights_are_an_infinitely_bad_cell() -> None:
    run = synthetic_run([[(0.0, 0.01, 0.0, 0)] * len(NAMES)])
    broken = run.comparisons[0]
    weight = broken.parameters[2]
    weight.non_finite, weight.nan_count = True, 3

    found = ratio_map(run, synthetic_region(1))

    assert found.ratios[2][0] == math.inf
    assert found.verdict.worst_ratio == math.inf
    assert ratio_color(math.inf) == ratio_color(RATIO_CEILING)


def test_a_parameter_the_region_does_not_know_is_the_judges_error() -> None:
    region = synthetic_region(1)
    del region.parameters["fc.weight"]

    with pytest.raises(ValueError, match=r"'fc\.weight' .* is not in the baseline region"):
        ratio_map(synthetic_run([[(0.0, 0.01, 0.0, 0)] * len(NAMES)]), region)


def rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


@given(st.floats(0.0, 1.0))
def test_a_ratio_up_to_its_limit_is_blue(ratio: float) -> None:
    red, _, blue = rgb(ratio_color(ratio))
    assert blue > red


@given(st.floats(1.0, 1e300, exclude_min=True))
def test_a_ratio_over_its_limit_is_red(ratio: float) -> None:
    red, green, blue = rgb(ratio_color(ratio))
    assert red - max(green, blue) > 90


def test_the_colours_saturate_three_decades_either_side_of_the_limit() -> None:
    assert ratio_color(0.0) == ratio_color(RATIO_FLOOR) == ratio_color(RATIO_FLOOR / 10)
    assert ratio_color(math.nan) == ratio_color(RATIO_CEILING) == ratio_color(1e9)
    assert ratio_color(0.01) != ratio_color(0.1)
    assert ratio_color(10.0) != ratio_color(100.0)


# --- a zoo workload --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp() -> tuple[Workload, Region]:
    workload = get_workload("mlp").with_options(steps=3)
    return workload, calibrate(workload, seeds=[0, 1], draws=2)


def test_a_scaled_layer_lights_up_its_own_row_from_the_first_step(
    mlp: tuple[Workload, Region],
) -> None:
    workload, region = mlp

    found = ratio_map(cosimulate(workload, scale_gradient("fc2.weight", 0.5)), region)

    first = found.first_violation_cell
    assert first is not None
    assert (found.parameters[first[0]], found.steps[first[1]]) == ("fc2.weight", 1)
    assert found.ratios[first[0]][first[1]] > 1.0
    assert max(max(row) for row in found.ratios) == found.verdict.worst_ratio
    assert found.parameters == tuple(region.parameters)
