from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.regions import Region, Violation, calibrate, judge
from pytest_convergence.traces import CoSimulation, ParameterComparison, StepComparison, Trace
from pytest_convergence.workloads import Workload, get_workload


@pytest.fixture(scope="module")
def workload() -> Workload:
    return get_workload("mlp").with_options(steps=4)


@pytest.fixture(scope="module")
def region(workload: Workload) -> Region:
    return calibrate(workload, seeds=[0, 1], draws=3)


def scale_gradient(parameter: str, factor: float) -> Candidate:
    def transform(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        for name, gradient in named:
            if name == parameter:
                gradient.mul_(factor)

    return Candidate(f"{parameter} x{factor}", gradient_transform=transform)


def round_gradients(dtype: torch.dtype) -> Candidate:
    def transform(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        for _, gradient in named:
            gradient.copy_(gradient.to(dtype).to(gradient.dtype))

    return Candidate(f"gradients rounded to {dtype}", gradient_transform=transform)


def test_a_region_covers_every_parameter_and_says_what_it_was_calibrated_against(
    region: Region,
) -> None:
    assert list(region.parameters) == [f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")]
    assert region.calibration.kind == "reference-perturbation"
    assert region.calibration.seeds == (0, 1)
    assert "outputs perturbed by relative Gaussian noise 0.000488 and gradients by 0.00391" in (
        region.calibration.description
    )
    low, high = region.global_logm_delta
    assert low <= high
    for parameter in region.parameters.values():
        assert len(parameter.noise_limit) == 4
        assert parameter.bias_spread > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_gradients_stay_inside_the_default_region(
    workload: Workload, region: Region, dtype: torch.dtype
) -> None:
    verdict = judge(cosimulate(workload, round_gradients(dtype)), region)
    assert verdict.passed, verdict.violations[:3]
    assert verdict.checks > 0
    assert verdict.worst_ratio < 1.0


@pytest.mark.parametrize("factor", [0.5, 1.05])
def test_a_scaled_layer_gradient_is_caught_at_the_first_step_on_that_layer(
    workload: Workload, region: Region, factor: float
) -> None:
    verdict = judge(cosimulate(workload, scale_gradient("fc2.weight", factor)), region)
    first = verdict.first_violation
    assert first is not None
    assert (first.step, first.parameter) == (1, "fc2.weight")
    assert "bias" in first.check
    assert first.ratio > 1


def test_a_candidate_that_diverges_to_nan_fails_naming_step_and_parameter(
    workload: Workload, region: Region
) -> None:
    def poison(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        if step == 3:
            named[2][1].fill_(math.inf)

    run = cosimulate(workload, Candidate("inf", gradient_transform=poison))
    verdict = judge(run, region)
    first = verdict.first_violation
    assert first is not None
    assert (first.step, first.parameter, first.check) == (3, "fc2.weight", "non-finite weights")
    poisoned = next(p for p in run.comparisons[2].parameters if p.name == "fc2.weight")
    # Every weight the infinite gradient reached is Inf or NaN, and the verdict counts them.
    assert poisoned.nan_count + poisoned.inf_count == first.value > 0
    assert verdict.global_logm_undefined_from == 3


def test_counts_of_non_finite_weights_survive_the_trace_file_and_only_there(
    workload: Workload,
) -> None:
    def poison(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        if step == 2:
            named[2][1][0].fill_(math.nan)

    run = cosimulate(workload, Candidate("nan", gradient_transform=poison))
    text = run.to_json()
    assert text.count('"nan_count"') == sum(
        p.non_finite for c in run.comparisons for p in c.parameters
    )
    assert type(run).from_json(text).comparisons == run.comparisons


def test_a_nan_value_is_a_violation_not_a_pass() -> None:
    assert Violation(1, "w", "noise", math.nan, 2.0).ratio == math.inf


def test_the_replay_of_a_step_function_candidate_says_gradients_were_not_compared(
    workload: Workload,
) -> None:
    from pytest_convergence.replay import replay_step
    from pytest_convergence.zoo.candidates import accumulation_without_division

    finding = replay_step(workload, accumulation_without_division(), 1)
    assert not finding.gradients_compared
    assert "gradients not compared" in finding.describe()


def test_a_known_good_lossy_candidate_gets_its_own_region_centered_on_its_bias(
    workload: Workload,
) -> None:
    shrink = scale_gradient("fc3.weight", 0.9)
    own = calibrate(workload, candidate=shrink)
    assert own.calibration.kind == "candidate"
    assert own.calibration.candidate == shrink.name
    assert own.calibration.seeds == (0, 1, 2, 3, 4, 5)
    assert max(own.parameters["fc3.weight"].bias_center) < 0
    assert judge(cosimulate(workload.with_options(seed=9), shrink), own).passed
    worse = judge(cosimulate(workload, scale_gradient("fc3.weight", 1.1)), own)
    assert not worse.passed


def test_a_parameter_missing_from_the_region_is_an_error_asking_to_re_record(
    workload: Workload, region: Region
) -> None:
    run = cosimulate(workload, round_gradients(torch.float16))
    partial = Region(
        calibration=region.calibration,
        parameters={k: v for k, v in region.parameters.items() if k != "fc1.bias"},
        global_logm_delta=region.global_logm_delta,
        global_logm_gap_limit=region.global_logm_gap_limit,
    )
    with pytest.raises(ValueError, match=r"'fc1\.bias' .* not in the baseline region.*re-record"):
        judge(run, partial)


def test_a_region_built_with_zero_spreads_is_judged_without_dividing_by_zero(
    workload: Workload, region: Region
) -> None:
    steps = region.calibration.steps
    zeroed = replace(
        region,
        parameters={
            name: replace(bounds, bias_spread=0.0, radial_spread=0.0, rounding_scale=(0.0,) * steps)
            for name, bounds in region.parameters.items()
        },
    )
    verdict = judge(cosimulate(workload, scale_gradient("fc2.weight", 0.5)), zeroed)
    assert not verdict.passed


def test_violation_ratio_puts_the_value_beside_its_limit() -> None:
    assert Violation(1, "w", "noise", 3.0, 2.0).ratio == 1.5
    assert Violation(1, "w", "zeros", 0, 0).ratio == 0.0
    assert Violation(1, "w", "zeros", 2, 0).ratio == math.inf


def decayed_weights(parameter: str, factor: float) -> Candidate:
    """Weight decay applied twice to one parameter: an error along the weights themselves, far
    smaller than the update (a relative shrink of ``1 - factor`` per step)."""

    def after_step(model: torch.nn.Module) -> None:
        dict(model.named_parameters())[parameter].mul_(factor)

    return Candidate(f"{parameter} decayed x{factor}", after_step=after_step)


def test_a_small_shrink_along_the_weights_is_caught_by_the_radial_shift(
    workload: Workload, region: Region
) -> None:
    verdict = judge(cosimulate(workload, decayed_weights("fc2.weight", 1 - 2.5e-5)), region)
    first = verdict.first_violation
    assert first is not None
    assert first.parameter == "fc2.weight"
    assert "radial shift" in first.check
    assert first.value < 0
    bias_checks = [v for v in verdict.violations if "bias" in v.check]
    assert bias_checks == [], "the shrink is too small to show along the update"


def test_noise_limits_extrapolate_a_heavy_tailed_calibration() -> None:
    from pytest_convergence.regions import NOISE_MARGIN, Z_LIMIT, _noise_limit

    steady = [1.0, 1.1, 0.9, 1.05, 0.95]
    assert _noise_limit(steady) == pytest.approx(NOISE_MARGIN * 1.1)
    heavy = [0.01, 1.0, 0.1, 0.5, 0.02]
    logs = [math.log(x) for x in heavy]
    mean = sum(logs) / len(logs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
    assert _noise_limit(heavy) == pytest.approx(math.exp(mean + Z_LIMIT * sd))
    assert _noise_limit(heavy) > NOISE_MARGIN * 1.0
    assert _noise_limit([0.3, 0.0]) == pytest.approx(NOISE_MARGIN * 0.3)


def test_z_limits_follow_the_calibrations_degrees_of_freedom(workload: Workload) -> None:
    """Perturbation regions: 2 seeds x 3 draws per step, centered, over 4 steps = 24 degrees of
    freedom. A known-good candidate on 3 seeds: 2 per step around an estimated center."""
    from pytest_convergence.regions import prediction_limit

    region = calibrate(workload, seeds=[0, 1], draws=3)
    for parameter in region.parameters.values():
        assert parameter.bias_z_limit == pytest.approx(prediction_limit(24))
        assert parameter.radial_z_limit == pytest.approx(prediction_limit(24))
    own = calibrate(workload, candidate=round_gradients(torch.bfloat16), seeds=[0, 1, 2])
    for parameter in own.parameters.values():
        assert parameter.bias_z_limit == pytest.approx(prediction_limit(8, 3))
    assert prediction_limit(8, 3) > prediction_limit(24) > 6.0


def test_a_candidate_region_needs_two_seeds(workload: Workload) -> None:
    with pytest.raises(ValueError, match=r"needs at least 2 distinct seeds, got \[5, 5\]"):
        calibrate(workload, candidate=round_gradients(torch.bfloat16), seeds=[5, 5])


def test_the_region_z_limit_is_the_limit_a_verdict_uses(workload: Workload) -> None:
    """A score between the Gaussian 6 and the region's t limit passes; beyond it, it fails."""
    from dataclasses import replace

    region = calibrate(workload, seeds=[0, 1], draws=3)
    run = cosimulate(workload, scale_gradient("fc2.weight", 0.8))
    worst = judge(run, region).worst
    assert worst is not None
    assert "bias" in worst.check
    limits = {
        name: replace(p, bias_z_limit=abs(worst.value) * 1.01)
        for name, p in region.parameters.items()
    }
    assert judge(run, replace(region, parameters=limits)).worst_ratio < 1.0
    limits = {
        name: replace(p, bias_z_limit=abs(worst.value) * 0.99)
        for name, p in region.parameters.items()
    }
    assert not judge(run, replace(region, parameters=limits)).passed


def test_a_region_that_saw_no_error_still_tolerates_rounding(workload: Workload) -> None:
    """A known-good candidate identical to the reference leaves every parameter's calibration
    error exactly zero; a later run that rounds the weights differently (one unit in the last
    place) must pass, and a real bug must still fail."""
    exact = Candidate("exact", gradient_transform=lambda named, step: None)
    region = calibrate(workload, candidate=exact, seeds=[0, 1, 2])
    assert all(max(p.rounding_scale) > 0 for p in region.parameters.values())

    def one_ulp_up(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.nextafter(parameter, parameter + parameter.sign()))

    rounded = judge(cosimulate(workload, Candidate("ulp", after_step=one_ulp_up)), region)
    assert rounded.passed, rounded.first_violation
    assert rounded.worst_ratio < 0.5
    assert not judge(cosimulate(workload, scale_gradient("fc2.weight", 0.99)), region).passed


# --- update noise over steps ---------------------------------------------------------------------

NOISE_SPREAD = 0.2  # log units
NOISE_LIMIT = 6.6


def noise_region(steps: int) -> Region:
    """One parameter whose typical noise is 1.0 at every step, with wide per-step limits, so
    only the noise combined over steps can fail."""
    from pytest_convergence.regions import Calibration, ParameterRegion

    flat = (0.0,) * steps
    parameter = ParameterRegion(
        name="w",
        count=100,
        bias_center=flat,
        bias_spread=1e3,
        bias_z_limit=6.6,
        radial_center=flat,
        radial_spread=1e3,
        radial_z_limit=6.6,
        error_scale=(1.0,) * steps,
        noise_scale=(1.0,) * steps,
        noise_limit=(1e9,) * steps,
        noise_log_spread=NOISE_SPREAD,
        noise_z_limit=NOISE_LIMIT,
        zero_change_limit=1,
        logm_gap_limit=1.0,
        rounding_scale=(1e-9,) * steps,
    )
    calibration = Calibration("reference-perturbation", "synthetic", 1e-3, 1, None, (0,), steps)
    return Region(calibration, {"w": parameter}, (-1.0, 1.0), 1.0)


def noisy_run(noises: Sequence[float]) -> CoSimulation:
    """A co-simulation of one parameter whose update noise at each step is ``noises[step - 1]``."""
    run = CoSimulation("synthetic", "c", 0, len(noises), "float32", "cpu", Trace("reference"))
    for step, noise in enumerate(noises, start=1):
        parameter = ParameterComparison(
            "w", 100, None, None, 0, 0, 1.0, noise, bias=0.0, noise=noise, radial=0.0
        )
        run.comparisons.append(StepComparison(step, 1.0, 1.0, None, None, None, (parameter,)))
    return run


def noise_violations(noises: Sequence[float]) -> list[Violation]:
    verdict = judge(noisy_run(noises), noise_region(len(noises)))
    return [v for v in verdict.violations if v.check.startswith("update noise over steps")]


@given(
    steps=st.integers(1, 32),
    spike_step=st.integers(0, 31),
    spike=st.floats(1e-6, 1e12),
)
def test_one_spike_of_any_size_never_adds_up_to_a_violation(
    steps: int, spike_step: int, spike: float
) -> None:
    noises = [1.0] * steps
    noises[spike_step % steps] = spike
    assert noise_violations(noises) == []


@given(steps=st.integers(1, 32), factor=st.floats(1.0, 1e6))
def test_noise_raised_by_the_same_factor_every_step_fails_once_the_evidence_adds_up(
    steps: int, factor: float
) -> None:
    from pytest_convergence.regions import NOISE_SCORE_CAP

    score = min(math.log(factor) / NOISE_SPREAD, NOISE_SCORE_CAP)
    expected = [s for s in range(1, steps + 1) if score * math.sqrt(s) > NOISE_LIMIT]
    found = noise_violations([factor] * steps)
    assert [v.step for v in found] == expected
    assert all(v.value == pytest.approx(score * math.sqrt(v.step)) for v in found)


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16))
def test_less_noise_than_calibration_is_no_evidence(noises: list[float]) -> None:
    """Judged with a limit just above zero: any positive evidence at all would fail."""
    region = noise_region(len(noises))
    strict = replace(region, parameters={"w": replace(region.parameters["w"], noise_z_limit=1e-12)})
    verdict = judge(noisy_run(noises), strict)
    assert verdict.passed


def test_a_quiet_start_does_not_cancel_the_evidence_of_the_steps_after_it() -> None:
    """A bug acting from step 3 of an otherwise exact candidate: its first steps have no noise
    at all (a log ratio of -16 spreads), which must not hide what follows."""
    noises = [0.0, 0.0] + [math.exp(5 * NOISE_SPREAD)] * 14
    assert noise_violations(noises)


@pytest.fixture(scope="module")
def adam_lenet5() -> tuple[Workload, Region]:
    workload = get_workload("adamw-lenet5")
    return workload, calibrate(workload)


def test_a_gradient_slice_dropped_every_step_passes_each_step_and_fails_over_steps(
    adam_lenet5: tuple[Workload, Region],
) -> None:
    """One eighth of fc1's gradient rows left at zero under AdamW: every step's noise is inside
    its limit, and the noise combined over steps is not."""
    from pytest_convergence.zoo.candidates import dropped_gradient_rows

    workload, region = adam_lenet5
    verdict = judge(
        cosimulate(workload.with_options(seed=100), dropped_gradient_rows("fc1.weight")), region
    )
    first = verdict.first_violation
    assert first is not None
    assert first.check.startswith("update noise over steps 1-")
    assert first.parameter == "fc1.weight"
    others = [v for v in verdict.violations if not v.check.startswith("update noise over steps")]
    assert others == []
