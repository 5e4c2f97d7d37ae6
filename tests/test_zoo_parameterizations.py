"""Dirac and symmetric parameterizations: the layers compute their definitions, the legitimate
re-arrangements compute the same, the bugs do not, and co-simulation shows each signature."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pytest_convergence import regions
from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload, get_workload
from pytest_convergence.zoo.parameterizations import (
    DiracConv2d,
    SymmetricLinear,
    dirac_delta,
    dirac_folded,
    dirac_identity,
    dirac_wrong_normalization_axis,
    filter_normalized,
    sgd_without_vector_decay,
    symmetric_diagonal_counted_twice,
    symmetric_unfolded,
    symmetrized,
)

# (in_channels, out_channels) pairs where one width divides the other, as Dirac layers need.
dirac_widths = st.tuples(st.integers(1, 4), st.integers(1, 3), st.booleans()).map(
    lambda drawn: (drawn[0], drawn[0] * drawn[1]) if drawn[2] else (drawn[0] * drawn[1], drawn[0])
)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dirac_layer(in_channels: int, out_channels: int, seed: int) -> DiracConv2d:
    """A Dirac layer with random scales, so a test does not pass by a = 1, b = 0.1 alone."""
    torch.manual_seed(seed)
    layer = DiracConv2d(in_channels, out_channels)
    with torch.no_grad():
        layer.alpha.uniform_(0.5, 1.5)
        layer.beta.uniform_(-1.0, 1.0)
    return layer


def _swapped(candidate: Candidate, model: nn.Module) -> nn.Module:
    assert candidate.model_transform is not None
    return candidate.model_transform(model)


# Dirac parameterization ----------------------------------------------------------------------


def test_convolving_with_the_dirac_delta_returns_the_input() -> None:
    inputs = torch.randn(2, 5, 7, 6, generator=_seeded(0))

    output = F.conv2d(inputs, dirac_delta(5, 5, 3), padding=1)

    torch.testing.assert_close(output, inputs, rtol=0, atol=0)


@given(widths=dirac_widths, seed=st.integers(0, 2**16))
def test_the_identity_path_equals_convolving_with_the_repeated_delta(
    widths: tuple[int, int], seed: int
) -> None:
    in_channels, out_channels = widths
    inputs = torch.randn(2, in_channels, 5, 4, generator=_seeded(seed))

    expected = F.conv2d(inputs, dirac_delta(in_channels, out_channels, 3), padding=1)

    torch.testing.assert_close(dirac_identity(inputs, out_channels), expected)


@given(widths=dirac_widths, kernel=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2**16))
def test_filter_normalization_gives_every_output_filter_unit_norm(
    widths: tuple[int, int], kernel: int, seed: int
) -> None:
    in_channels, out_channels = widths
    weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=_seeded(seed))

    norms = torch.linalg.vector_norm(filter_normalized(weight), dim=(1, 2, 3))

    torch.testing.assert_close(norms, torch.ones(out_channels))


@given(widths=dirac_widths, seed=st.integers(0, 2**16))
def test_a_dirac_convolution_is_the_scaled_identity_plus_a_scaled_normalized_convolution(
    widths: tuple[int, int], seed: int
) -> None:
    in_channels, out_channels = widths
    layer = _dirac_layer(in_channels, out_channels, seed)
    inputs = torch.randn(3, in_channels, 6, 5, generator=_seeded(seed + 1))
    weight = layer.weight.detach()
    normalized = weight / torch.linalg.vector_norm(weight, dim=(1, 2, 3), keepdim=True)
    identity = F.conv2d(inputs, dirac_delta(in_channels, out_channels, 3), padding=1)

    expected = layer.alpha.detach().view(1, -1, 1, 1) * identity + layer.beta.detach().view(
        1, -1, 1, 1
    ) * F.conv2d(inputs, normalized, padding=1)

    torch.testing.assert_close(layer(inputs).detach(), expected)


def test_a_fresh_dirac_convolution_starts_as_the_identity_plus_one_tenth() -> None:
    torch.manual_seed(0)
    layer = DiracConv2d(4, 4)

    assert torch.equal(layer.alpha.detach(), torch.ones(4))
    assert torch.equal(layer.beta.detach(), torch.full((4,), 0.1))


@given(widths=dirac_widths, seed=st.integers(0, 2**16))
def test_one_convolution_with_the_folded_weight_equals_the_reference_layer(
    widths: tuple[int, int], seed: int
) -> None:
    in_channels, out_channels = widths
    layer = _dirac_layer(in_channels, out_channels, seed)
    inputs = torch.randn(2, in_channels, 6, 6, generator=_seeded(seed + 1))
    reference = layer(inputs).detach()

    folded = _swapped(dirac_folded(), layer)

    assert type(folded) is not DiracConv2d
    torch.testing.assert_close(folded(inputs).detach(), reference)
    torch.testing.assert_close(
        F.conv2d(inputs, layer.folded_weight().detach(), padding=1), reference
    )


@pytest.mark.parametrize("axis", ["input", "output"])
def test_normalizing_over_the_wrong_axis_changes_the_weight_and_the_output(axis: str) -> None:
    layer = _dirac_layer(8, 8, seed=0)
    inputs = torch.randn(2, 8, 6, 6, generator=_seeded(1))
    reference_weight = layer.normalized_weight().detach()
    reference_output = layer(inputs).detach()

    buggy = _swapped(dirac_wrong_normalization_axis(axis), layer)  # type: ignore[arg-type]
    assert isinstance(buggy, DiracConv2d)
    filter_norms = torch.linalg.vector_norm(buggy.normalized_weight().detach(), dim=(1, 2, 3))

    assert not torch.allclose(buggy.normalized_weight().detach(), reference_weight, atol=1e-3)
    assert not torch.allclose(buggy(inputs).detach(), reference_output, atol=1e-3)
    # Per filter the weight is no longer unit-norm: the convolution outweighs the identity.
    assert filter_norms.mean() > 2.0


def test_normalizing_over_the_input_channels_gives_filters_of_norm_root_kernel_area() -> None:
    # Each of a 3x3 filter's nine columns gets unit norm: the filter's norm is exactly 3.
    layer = _swapped(dirac_wrong_normalization_axis("input"), _dirac_layer(6, 6, seed=2))
    assert isinstance(layer, DiracConv2d)

    norms = torch.linalg.vector_norm(layer.normalized_weight().detach(), dim=(1, 2, 3))

    torch.testing.assert_close(norms, torch.full((6,), 3.0))


def test_an_unknown_normalization_axis_is_refused() -> None:
    with pytest.raises(ValueError, match="axis must be 'input' or 'output'"):
        dirac_wrong_normalization_axis("spatial")  # type: ignore[arg-type]


@pytest.mark.parametrize(("in_channels", "out_channels"), [(4, 6), (6, 4), (0, 3)])
def test_dirac_layers_refuse_widths_that_do_not_divide_each_other(
    in_channels: int, out_channels: int
) -> None:
    with pytest.raises(ValueError, match="one width to divide the other"):
        DiracConv2d(in_channels, out_channels)


def test_dirac_layers_refuse_an_even_kernel() -> None:
    with pytest.raises(ValueError, match="odd kernel_size"):
        DiracConv2d(4, 4, kernel_size=2)


def test_the_optimizer_exempts_every_vector_from_weight_decay() -> None:
    model = get_workload("diracnet-mini").build_model()

    optimizer = sgd_without_vector_decay(weight_decay=5e-4)(model.parameters())

    decays = {
        id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
    }
    for name, parameter in model.named_parameters():
        expected = 0.0 if parameter.dim() == 1 else 5e-4
        assert decays[id(parameter)] == expected, name


# Symmetric parameterization ------------------------------------------------------------------


@given(size=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_the_symmetric_weight_is_symmetric_and_keeps_the_stored_upper_triangle(
    size: int, seed: int
) -> None:
    weight = torch.randn(size, size, generator=_seeded(seed))

    symmetric = symmetrized(weight)

    assert torch.equal(symmetric, symmetric.T)
    assert torch.equal(symmetric.triu(), weight.triu())


@given(size=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_the_unfolded_symmetric_layer_equals_the_reference_layer(size: int, seed: int) -> None:
    torch.manual_seed(seed)
    layer = SymmetricLinear(size)
    inputs = torch.randn(5, size, generator=_seeded(seed + 1))
    reference = layer(inputs).detach()

    unfolded = _swapped(symmetric_unfolded(), layer)

    torch.testing.assert_close(unfolded(inputs).detach(), reference)


def test_counting_the_diagonal_twice_adds_the_diagonal_once_more_and_nothing_else() -> None:
    torch.manual_seed(0)
    layer = SymmetricLinear(6)
    reference = layer.symmetric_weight().detach()

    buggy = _swapped(symmetric_diagonal_counted_twice(), layer)
    assert isinstance(buggy, SymmetricLinear)

    difference = buggy.symmetric_weight().detach() - reference
    torch.testing.assert_close(difference, torch.diag(layer.weight.detach().diagonal()))


def test_the_strict_lower_triangle_of_a_symmetric_layer_gets_no_gradient() -> None:
    torch.manual_seed(0)
    layer = SymmetricLinear(5)

    layer(torch.randn(4, 5)).square().sum().backward()

    gradient = layer.weight.grad
    assert gradient is not None
    rows, columns = torch.triu_indices(5, 5)
    assert torch.equal(gradient.tril(-1), torch.zeros(5, 5))
    assert gradient[rows, columns].abs().min() > 0


# Candidates on models ------------------------------------------------------------------------

CANDIDATES = [
    pytest.param("diracnet-mini", dirac_folded, id="dirac-folded"),
    pytest.param(
        "diracnet-mini", lambda: dirac_wrong_normalization_axis("input"), id="dirac-input-axis"
    ),
    pytest.param(
        "diracnet-mini", lambda: dirac_wrong_normalization_axis("output"), id="dirac-output-axis"
    ),
    pytest.param("symmetric-mlp", symmetric_unfolded, id="symmetric-unfolded"),
    pytest.param("symmetric-mlp", symmetric_diagonal_counted_twice, id="symmetric-diagonal-twice"),
]


@pytest.mark.parametrize(("workload", "factory"), CANDIDATES)
def test_a_candidate_keeps_the_reference_parameters_themselves(
    workload: str, factory: Callable[[], Candidate]
) -> None:
    model = get_workload(workload).build_model()
    before = list(model.named_parameters())

    swapped = _swapped(factory(), model)

    after = list(swapped.named_parameters())
    assert [name for name, _ in after] == [name for name, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before, strict=True))


@pytest.mark.parametrize(
    ("factory", "layer"),
    [(dirac_folded, "DiracConv2d"), (symmetric_unfolded, "SymmetricLinear")],
)
def test_a_candidate_refuses_a_model_without_its_layers(
    factory: Callable[[], Candidate], layer: str
) -> None:
    with pytest.raises(ValueError, match=f"replaces {layer} layers, but the model"):
        _swapped(factory(), get_workload("mlp").build_model())


# Co-simulation signatures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirac() -> Workload:
    return get_workload("diracnet-mini").with_options(steps=2)


@pytest.fixture(scope="module")
def symmetric() -> Workload:
    return get_workload("symmetric-mlp").with_options(steps=2)


def _largest(run: CoSimulation, attribute: str) -> float:
    values = [getattr(p, attribute) for c in run.comparisons for p in c.parameters]
    return float(max(abs(value) for value in values if value is not None))


# Largest update noise allowed: batch norm makes a Dirac scale's gradient a sum with heavy
# cancellation (a channel's output is invariant to scaling a and b together), so float32
# rounding reaches ~3e-3 of the update there; the symmetric MLP has no such amplification.
@pytest.mark.parametrize(
    ("fixture", "factory", "noise_limit"),
    [("dirac", dirac_folded, 1e-2), ("symmetric", symmetric_unfolded, 1e-4)],
)
def test_a_legitimate_re_arrangement_differs_by_rounding_only(
    fixture: str,
    factory: Callable[[], Candidate],
    noise_limit: float,
    request: pytest.FixtureRequest,
) -> None:
    run = cosimulate(request.getfixturevalue(fixture), factory())

    assert _largest(run, "bias") < 1e-3
    assert _largest(run, "noise") < noise_limit


@pytest.mark.parametrize("axis", ["input", "output"])
def test_wrong_axis_normalization_scrambles_the_dirac_scales_from_step_1(
    dirac: Workload, axis: str
) -> None:
    run = cosimulate(dirac, dirac_wrong_normalization_axis(axis))  # type: ignore[arg-type]

    first = {p.name: p for p in run.comparisons[0].parameters}
    scales = [p for name, p in first.items() if name.endswith((".alpha", ".beta"))]
    assert len(scales) == 12
    # Each scale's update is off by about its own size: nothing like rounding.
    assert min(p.noise for p in scales) > 0.3
    assert first["group0.0.conv.weight"].noise > 0.05


def test_counting_the_diagonal_twice_shows_as_update_noise_in_every_layer(
    symmetric: Workload,
) -> None:
    run = cosimulate(symmetric, symmetric_diagonal_counted_twice())

    first = run.comparisons[0].parameters
    assert all(p.noise > 0.05 for p in first if p.name.endswith(".weight"))


def test_the_symmetric_bug_leaves_a_calibrated_region_and_the_unfolded_layer_does_not(
    symmetric: Workload,
) -> None:
    region = regions.calibrate(symmetric, seeds=[0, 1], draws=2)
    held_out = symmetric.with_options(seed=100)

    legitimate = regions.judge(cosimulate(held_out, symmetric_unfolded()), region)
    buggy = regions.judge(cosimulate(held_out, symmetric_diagonal_counted_twice()), region)

    assert legitimate.passed, legitimate.worst
    assert not buggy.passed
    assert buggy.first_violation is not None
    assert buggy.first_violation.step == 1
