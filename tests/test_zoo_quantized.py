"""Quantized-training workloads: BinaryConnect's binary forward, full-precision update and
clipping; stochastic rounding onto a fixed-point grid; the legitimate kernels equal to the
reference's, and the bugs' signatures under co-simulation."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pytest_convergence.cosim import cosimulate, train
from pytest_convergence.traces import CoSimulation, ParameterComparison
from pytest_convergence.workloads import Workload, get_workload
from pytest_convergence.zoo.quantized import (
    BinaryConnectMLP,
    BinaryLinear,
    FixedPointGrid,
    FixedPointLeNet5,
    binarize,
    binarized_weight_update,
    binary_linear,
    clip_binary_weights,
    fused_stochastic_rounding,
    fused_stochastic_rounding_step,
    grid_of,
    popcount_binary_linear,
    popcount_binary_linear_kernel,
    round_to_nearest,
    stochastic_rounding,
)

GRID = FixedPointGrid(integer_bits=1, fraction_bits=7)


@pytest.fixture(scope="module")
def binaryconnect() -> Workload:
    return get_workload("binaryconnect-mlp").with_options(steps=2)


@pytest.fixture(scope="module")
def stochastic_lenet() -> Workload:
    return get_workload("stochastic-rounding-lenet5").with_options(steps=2)


def by_name(run: CoSimulation, step: int) -> dict[str, ParameterComparison]:
    return {p.name: p for p in run.comparisons[step - 1].parameters}


# BinaryConnect -------------------------------------------------------------------------------


def test_binarize_gives_plus_one_from_zero_up_and_minus_one_below() -> None:
    weights = torch.tensor([-0.7, -1e-30, 0.0, -0.0, 1e-30, 0.3])
    assert binarize(weights).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def test_a_binary_layer_computes_with_sign_weights_and_keeps_full_precision_parameters() -> None:
    torch.manual_seed(0)
    layer = BinaryLinear(5, 3)
    inputs = torch.randn(4, 5)
    assert layer.bias is None
    weight = layer.weight.detach()
    assert float(weight.abs().max()) <= 1.0
    assert not torch.equal(weight.abs(), torch.ones(3, 5))
    torch.testing.assert_close(layer(inputs), inputs @ torch.sign(weight).t())


def test_the_straight_through_gradient_reaches_the_full_precision_weight_unchanged() -> None:
    torch.manual_seed(1)
    weight = torch.empty(3, 5).uniform_(-1, 1).requires_grad_()
    inputs = torch.randn(4, 5)
    upstream = torch.randn(4, 3)
    binary_linear(inputs, weight, None).backward(upstream)
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, upstream.t() @ inputs)


@given(
    batch=st.integers(1, 6),
    in_features=st.integers(1, 9),
    out_features=st.integers(1, 7),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_popcount_kernel_matches_the_reference_kernel_forward_and_backward(
    batch: int, in_features: int, out_features: int, with_bias: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, in_features, generator=generator)
    weight = torch.empty(out_features, in_features).uniform_(-1, 1, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    upstream = torch.randn(batch, out_features, generator=generator)
    results = []
    for kernel in (binary_linear, popcount_binary_linear_kernel):
        leaves = [t.clone().requires_grad_() for t in (inputs, weight)]
        bias_leaf = None if bias is None else bias.clone().requires_grad_()
        outputs = kernel(leaves[0], leaves[1], bias_leaf)
        outputs.backward(upstream)
        grads = [leaf.grad for leaf in (*leaves, bias_leaf) if leaf is not None]
        results.append([outputs.detach(), *grads])
    reference, popcount = results
    assert len(reference) == len(popcount)
    for expected, actual in zip(reference, popcount, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_clipping_after_a_step_touches_only_the_binary_layers() -> None:
    torch.manual_seed(2)
    model = BinaryConnectMLP()
    with torch.no_grad():
        model.fc2.weight.mul_(3.0)
        model.bn2.weight.fill_(2.5)
        clip_binary_weights(model)
    clipped = model.fc2.weight.detach().abs()
    assert float(clipped.max()) == 1.0
    assert int((clipped == 1.0).sum()) > clipped.numel() // 2
    assert torch.equal(model.bn2.weight, torch.full((128,), 2.5))


def test_the_popcount_kernel_co_simulates_within_float_rounding(binaryconnect: Workload) -> None:
    run = cosimulate(binaryconnect, popcount_binary_linear())
    errors = [p.relative_error for c in run.comparisons for p in c.parameters]
    assert max(errors) < 1e-4
    assert max(errors) > 0.0  # another arithmetic, not the reference's kernel by mistake


def test_updating_the_binarized_weights_puts_them_on_plus_minus_one(
    binaryconnect: Workload,
) -> None:
    run = cosimulate(binaryconnect, binarized_weight_update())
    fc1 = by_name(run, 1)["fc1.weight"]
    assert fc1.reference_logm is not None
    assert fc1.candidate_logm is not None
    # Uniform weights in [-1, 1] have LoGM -1/ln(10); weights one small update from +-1, ~0.
    assert fc1.reference_logm < -0.4
    assert fc1.candidate_logm > -0.01
    assert fc1.noise > 100.0


# Stochastic rounding -------------------------------------------------------------------------


def test_a_fixed_point_grid_has_its_step_and_range() -> None:
    assert (GRID.step, GRID.lowest_code, GRID.highest_code) == (2**-7, -128, 127)
    assert FixedPointGrid(4, 12).step == 2**-12
    with pytest.raises(ValueError, match="integer_bits"):
        FixedPointGrid(0, 7)
    with pytest.raises(ValueError, match="fraction_bits"):
        FixedPointGrid(1, -1)


finite_values = st.floats(-1.5, 1.5, allow_nan=False, width=32)
unit_noise = st.floats(0.0, 1.0, exclude_max=True, width=32)


@given(values=st.lists(finite_values, min_size=1, max_size=20), noise=unit_noise)
def test_stochastic_rounding_lands_on_a_grid_neighbour_of_the_value(
    values: list[float], noise: float
) -> None:
    tensor = torch.tensor(values)
    rounded = GRID.stochastic(tensor, torch.full_like(tensor, noise)).double()
    assert GRID.contains(rounded)
    codes = tensor.double() / GRID.step
    below, above = (
        bound.clamp(GRID.lowest_code, GRID.highest_code) * GRID.step
        for bound in (codes.floor(), codes.ceil())
    )
    assert bool(((rounded == below) | (rounded == above)).all())


@given(code=st.integers(-128, 127), noise=unit_noise)
def test_a_weight_on_the_grid_stays_there_whatever_the_draw(code: int, noise: float) -> None:
    # A weight whose update is zero (a dead unit's) must not random-walk.
    on_grid = torch.tensor([code * GRID.step])
    assert torch.equal(GRID.stochastic(on_grid, torch.tensor([noise])), on_grid)


@given(value=st.floats(-0.99, 0.99, allow_nan=False))
def test_stochastic_rounding_is_unbiased_over_its_noise(value: float) -> None:
    # Evenly spaced noise is an exact quadrature of the uniform distribution: the average
    # rounding misses the value by at most one step over the number of noise points.
    points = 4096
    noise = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    rounded = GRID.stochastic(torch.full((points,), value, dtype=torch.float64), noise)
    assert abs(float(rounded.mean()) - value) <= GRID.step / points


@given(code=st.integers(-100, 100), offset=st.floats(-0.49, 0.49))
def test_round_to_nearest_loses_every_update_below_half_a_step(code: int, offset: float) -> None:
    start = code * GRID.step
    updated = torch.tensor([start + offset * GRID.step], dtype=torch.float64)
    assert GRID.nearest(updated).item() == start


def test_a_fixed_point_lenet_starts_on_its_grid_with_many_zeros_and_equal_magnitudes() -> None:
    torch.manual_seed(3)
    model = FixedPointLeNet5()
    assert grid_of(model) == GRID
    assert all(GRID.contains(p.detach()) for p in model.parameters())
    fc1 = model.fc1.weight.detach()
    assert int((fc1 == 0).sum()) > 0.05 * fc1.numel()
    assert len(torch.unique(fc1.abs())) < 10


def test_rounding_needs_a_model_built_on_a_grid() -> None:
    with pytest.raises(TypeError, match="FixedPointGrid"):
        stochastic_rounding(nn.Linear(2, 2))


def _moved_off_grid(seed: int) -> FixedPointLeNet5:
    torch.manual_seed(seed)
    model = FixedPointLeNet5()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3 * GRID.step)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fused_rounding_kernel_rounds_exactly_as_the_per_tensor_loop(seed: int) -> None:
    reference, fused = _moved_off_grid(seed), _moved_off_grid(seed)
    torch.manual_seed(100 + seed)
    with torch.no_grad():
        stochastic_rounding(reference)
    torch.manual_seed(100 + seed)
    with torch.no_grad():
        fused_stochastic_rounding_step(fused)
    moved = 0
    start = _moved_off_grid(seed)
    for expected, actual, before in zip(
        reference.parameters(), fused.parameters(), start.parameters(), strict=True
    ):
        assert GRID.contains(actual.detach())
        assert torch.equal(actual, expected)
        moved += int((actual != GRID.nearest(before.detach())).sum())
    assert moved > 0  # the noise decided some roundings, not round-to-nearest


def test_each_stochastic_rounding_step_leaves_the_weights_on_the_grid() -> None:
    workload = get_workload("stochastic-rounding-lenet5").with_options(steps=2)
    trace, model = train(workload)
    assert len(trace.steps) == 3
    assert all(GRID.contains(p.detach()) for p in model.parameters())
    _, again = train(workload)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )


def test_the_fused_rounding_kernel_co_simulates_exactly(stochastic_lenet: Workload) -> None:
    run = cosimulate(stochastic_lenet, fused_stochastic_rounding())
    assert all(p.error_norm == 0.0 for c in run.comparisons for p in c.parameters)


def test_round_to_nearest_drops_every_sub_half_step_update(stochastic_lenet: Workload) -> None:
    run = cosimulate(stochastic_lenet, round_to_nearest())
    fc1 = by_name(run, 1)["fc1.weight"]
    # Every fc1 update is far below half a step: the reference moves some weights by one step,
    # the candidate none, so its update is exactly zero and its bias exactly -1.
    assert fc1.reference_update_norm >= GRID.step
    assert fc1.bias == -1.0
    assert fc1.noise == 0.0


def test_the_quantized_workloads_keep_their_reference_finite_on_the_benchmark_seeds() -> None:
    for name in ("binaryconnect-mlp", "stochastic-rounding-lenet5"):
        trace, _ = train(get_workload(name).with_options(seed=104))
        assert len(trace.steps) == 9
        assert all(torch.isfinite(torch.tensor(trace.losses())))


def test_the_popcount_candidate_swaps_the_kernel_of_binary_layers_only() -> None:
    torch.manual_seed(4)
    reference = BinaryConnectMLP()
    transform = popcount_binary_linear().model_transform
    assert transform is not None
    swapped = transform(copy.deepcopy(reference))
    for module in swapped.modules():
        if isinstance(module, BinaryLinear):
            assert module.kernel is popcount_binary_linear_kernel
        else:
            assert not hasattr(module, "kernel")
    inputs = torch.randn(8, 64)
    torch.testing.assert_close(swapped(inputs), reference(inputs), rtol=1e-5, atol=1e-5)
