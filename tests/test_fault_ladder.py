"""The fault ladder: each fault does what its class says at its size, and the report it
measures agrees with a fault injected alone."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_convergence import fault_ladder
from pytest_convergence.cosim import cosimulate
from pytest_convergence.fault_ladder import fault_candidate, measure_power, skipped_faults
from pytest_convergence.power import CATCH_MARGIN, FAULT_SIZES, FAULTS, MODEL
from pytest_convergence.regions import Region, calibrate, judge
from pytest_convergence.training_step import NamedParameters
from pytest_convergence.workloads import Workload, get_workload

MLP = get_workload("mlp").with_options(steps=4)


def transformed(fault: str, size: float, gradient: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """``gradient`` after ``steps`` steps of ``fault``'s gradient transform (the same gradient
    each step)."""
    candidate = fault_candidate(fault, size, MLP)
    assert candidate.gradient_transform is not None
    result = gradient.clone()
    for step in range(1, steps + 1):
        result = gradient.clone()
        candidate.gradient_transform([("w", result)], step)
    return result


gradients = (
    st.integers(2, 60)
    .flatmap(lambda n: st.lists(st.floats(-10, 10, allow_subnormal=False), min_size=n, max_size=n))
    .filter(lambda values: math.hypot(*values) > 1e-3)
)
sizes = st.sampled_from(FAULT_SIZES)


@settings(max_examples=40, deadline=None)
@given(gradients, sizes)
def test_a_direction_only_fault_keeps_the_norm_and_turns_by_its_size(values, size) -> None:
    gradient = torch.tensor(values, dtype=torch.float64)
    turned = transformed("direction-only", size, gradient)
    assert torch.linalg.norm(turned).item() == pytest.approx(torch.linalg.norm(gradient).item())
    cosine = torch.dot(turned, gradient) / torch.linalg.norm(turned) / torch.linalg.norm(gradient)
    assert cosine.item() == pytest.approx(math.sqrt(1 - size * size), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(gradients, sizes)
def test_a_dropped_slice_zeroes_the_last_fraction_of_the_elements(values, size) -> None:
    gradient = torch.tensor(values).reshape(len(values), 1).add(100.0)
    dropped = transformed("dropped-slice", size, gradient).flatten()
    count = math.ceil(size * len(values))
    assert (dropped[len(values) - count :] == 0).all()
    assert (dropped[: len(values) - count] != 0).all()


def test_a_gradient_scale_fault_scales_by_one_minus_its_size() -> None:
    gradient = torch.tensor([1.0, -2.0])
    assert torch.equal(transformed("gradient-scale", 0.2, gradient), gradient * 0.8)


def test_a_stale_gradient_fault_mixes_in_the_previous_steps_gradient() -> None:
    candidate = fault_candidate("stale-gradient", 0.5, MLP)
    assert candidate.gradient_transform is not None
    first, second = torch.tensor([2.0]), torch.tensor([4.0])
    candidate.gradient_transform([("w", first)], 1)
    candidate.gradient_transform([("w", second)], 2)
    assert first.item() == 2.0  # no previous step to be stale from
    assert second.item() == 3.0


def test_a_layer_fault_on_named_parameters_leaves_the_others_alone() -> None:
    candidate = fault_candidate("gradient-scale", 1.0, MLP, parameters={"a"})
    assert candidate.gradient_transform is not None
    a, b = torch.ones(2), torch.ones(2)
    candidate.gradient_transform([("a", a), ("b", b)], 1)
    assert a.tolist() == [0.0, 0.0]
    assert b.tolist() == [1.0, 1.0]


def optimizer_of(fault: str, size: float, workload: Workload = MLP) -> torch.optim.Optimizer:
    candidate = fault_candidate(fault, size, workload)
    assert candidate.optimizer_factory is not None
    return candidate.optimizer_factory(NamedParameters(workload.build_model()))


def test_model_faults_change_every_groups_hyper_parameter_by_their_size() -> None:
    # The zoo's mlp trains with SGD(lr=0.05, momentum=0.9, weight_decay=5e-4).
    group = optimizer_of("learning-rate", 0.5).param_groups[0]
    assert group["lr"] == pytest.approx(0.05 * 1.5)
    group = optimizer_of("momentum", 0.5).param_groups[0]
    assert group["momentum"] == pytest.approx(0.9 * 0.5)
    group = optimizer_of("weight-decay", 1.0).param_groups[0]
    assert group["weight_decay"] == pytest.approx(5e-4 * 2)


def test_a_momentum_fault_on_adam_changes_beta1_only() -> None:
    adam = MLP.with_options(
        optimizer_factory=lambda parameters: torch.optim.Adam(parameters, betas=(0.9, 0.99))
    )
    assert optimizer_of("momentum", 0.2, adam).param_groups[0]["betas"] == pytest.approx(
        (0.72, 0.99)
    )


def test_faults_the_optimizer_has_no_hyper_parameter_for_are_skipped_with_why() -> None:
    plain = MLP.with_options(optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    assert skipped_faults(plain) == {
        "momentum": "SGD has no momentum or betas",
        "weight-decay": "no parameter group of SGD has weight decay",
    }
    assert skipped_faults(MLP) == {}


def test_a_model_fault_reuses_the_reference_gradients() -> None:
    # No second forward and backward: the fault changes the optimizer only.
    assert fault_candidate("learning-rate", 0.1, MLP).only_transforms_gradients


@pytest.fixture(scope="module")
def region() -> Region:
    return calibrate(MLP, seeds=[0, 1], draws=2)


def test_the_report_has_every_fault_class_and_every_parameter(region: Region) -> None:
    report = measure_power(MLP, region)
    assert [power.fault for power in report.faults] == [fault.name for fault in FAULTS]
    assert (report.seed, report.steps) == (MLP.seed, MLP.steps)
    for power in report.faults:
        assert power.sizes == FAULT_SIZES
        layer = next(f for f in FAULTS if f.name == power.fault).scope == "layer"
        assert list(power.caught) == (list(region.parameters) if layer else [MODEL])


def test_a_gross_fault_is_caught_on_every_weight_matrix(region: Region) -> None:
    report = measure_power(MLP, region)
    scale = report.fault("gradient-scale")
    assert scale is not None
    for name, catch in scale.caught.items():
        if name.endswith("weight"):
            assert catch is not None, name
            assert 1 <= catch.step <= MLP.steps


def test_every_catch_the_report_claims_is_made_by_the_fault_injected_alone(
    region: Region,
) -> None:
    report = measure_power(MLP, region)
    for power in report.faults:
        for target, catch in power.caught.items():
            if catch is None:
                continue
            parameters = None if target == MODEL else {target}
            alone = cosimulate(MLP, fault_candidate(power.fault, catch.size, MLP, parameters))
            verdict = judge(alone, region)
            assert verdict.first_violation is not None, (power.fault, target, catch)
            margin = [v.step for v in verdict.violations if v.ratio >= CATCH_MARGIN]
            assert margin[0] == catch.step, (power.fault, target)
            assert verdict.worst_ratio == pytest.approx(catch.ratio), (power.fault, target)


def test_a_size_caught_only_just_over_its_limit_is_not_claimed(region: Region) -> None:
    report = measure_power(MLP, region)
    claimed = [c for p in report.faults for c in p.caught.values() if c is not None]
    assert claimed
    assert min(catch.ratio for catch in claimed) >= CATCH_MARGIN


def test_a_smaller_ladder_is_measured_as_given(region: Region) -> None:
    report = measure_power(MLP, region, sizes=(1.0, 0.5))
    assert all(power.sizes == (0.5, 1.0) for power in report.faults)


def test_faults_train_under_the_precision_policy_given_unless_it_is_the_workloads() -> None:
    assert fault_candidate("gradient-scale", 0.1, MLP, precision="bf16-autocast").precision == (
        "bf16-autocast"
    )
    assert fault_candidate("momentum", 0.1, MLP, precision=MLP.precision).precision is None


def test_a_model_too_large_for_all_sides_at_once_is_measured_in_batches_alike(
    region: Region, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = measure_power(MLP, region)
    monkeypatch.setattr(fault_ladder, "SIDE_MEMORY_BUDGET", 1)  # one side per reference run
    assert measure_power(MLP, region) == whole
