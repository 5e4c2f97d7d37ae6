"""assert_op_matches: limits derived from the reference's own error, messages that say why."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from examples.winograd.winograd import F2X2_3X3, Tile, winograd_conv2d
from pytest_convergence.opcheck import (
    DEFAULT_RTOL_FACTOR,
    Comparison,
    OpMismatchError,
    assert_op_matches,
)
from pytest_convergence.strategies import Conv2dConfig, conv2d_configs

wrong_constant = functools.partial(winograd_conv2d, constants=F2X2_3X3.with_entry("G", 1, 0, 0.45))
CONFIG = Conv2dConfig(2, 4, 3, 6, 7, 3, 1, 1, torch.float32, bias=True)


@pytest.mark.parametrize("tile", ["F2x2_3x3", "F4x4_3x3"])
@settings(max_examples=25, deadline=None)
@given(config=conv2d_configs())
def test_correct_winograd_kernels_match_conv2d_on_every_config(
    tile: Tile, config: Conv2dConfig
) -> None:
    kernel = functools.partial(winograd_conv2d, tile=tile)
    comparisons = assert_op_matches(kernel, F.conv2d, config.make_inputs(0), kwargs=config.kwargs)
    expected = ["output", "gradient of input 0", "gradient of input 1"]
    assert [c.quantity for c in comparisons][:3] == expected
    assert all(c.passed for c in comparisons)


def test_a_wrong_transform_constant_fails_naming_the_output_and_every_figure() -> None:
    with pytest.raises(OpMismatchError) as caught:
        assert_op_matches(wrong_constant, F.conv2d, CONFIG.make_inputs(0), kwargs=CONFIG.kwargs)
    message = str(caught.value)
    assert message.startswith(
        "candidate op does not match the reference op: output (float32, shape (2, 3, 6, 7))"
    )
    for fragment in (
        "Mismatched elements: ",
        "Greatest absolute difference: ",
        "allowed, ",
        "Greatest difference relative to the largest expected magnitude",
        f"Limit = rtol_factor x max(reference error, eps x scale) = {DEFAULT_RTOL_FACTOR:g} x ",
        "reference error ",
        ": the reference op in float32 against the reference op in float64",
        "the candidate op in float32 against the same float64 result",
        "3 of 4 quantities beyond their limits; the others:",
        "  gradient of input 0: greatest absolute difference ",
    ):
        assert fragment in message, (fragment, message)
    output = caught.value.comparisons[0]
    assert output.quantity == "output"
    assert output.ratio > 1e4


def test_float16_transforms_are_caught_at_the_kernel_level() -> None:
    fp16 = functools.partial(winograd_conv2d, transform_dtype=torch.float16)
    with pytest.raises(OpMismatchError, match=r"output \(float32"):
        assert_op_matches(fp16, F.conv2d, CONFIG.make_inputs(0), kwargs=CONFIG.kwargs)


def test_f4x4_is_measurably_less_accurate_than_f2x2_yet_within_the_default_factor() -> None:
    config = Conv2dConfig(2, 16, 16, 16, 16, 3, 1, 1, torch.float32, bias=False)
    inputs = config.make_inputs(0)

    def output_of(tile: Tile) -> Comparison:
        kernel = functools.partial(winograd_conv2d, tile=tile)
        return assert_op_matches(kernel, F.conv2d, inputs, kwargs=config.kwargs)[0]

    small, large = output_of("F2x2_3x3"), output_of("F4x4_3x3")
    assert small.reference_error == large.reference_error
    assert large.candidate_error > 2 * small.candidate_error
    assert large.candidate_error < large.limit


def test_an_exact_op_passes_with_zero_error() -> None:
    comparisons = assert_op_matches(lambda a: a + a, lambda a: 2 * a, [torch.randn(3, 4)])
    assert [c.quantity for c in comparisons] == ["output", "gradient of input 0"]
    assert all(c.candidate_error == 0 and c.reference_error == 0 for c in comparisons)
    assert all(c.limit > 0 for c in comparisons)


def test_the_same_arithmetic_passes_with_the_reference_s_own_error() -> None:
    comparisons = assert_op_matches(
        lambda a, b: a + b, torch.add, [torch.randn(64), torch.randn(64)]
    )
    assert comparisons[0].reference_error > 0
    assert all(c.candidate_error == c.reference_error for c in comparisons)


def test_a_shape_mismatch_is_reported_before_any_numbers() -> None:
    def cropped(
        input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int
    ) -> torch.Tensor:
        return F.conv2d(input, weight, bias, padding=padding)[..., :-1]

    with pytest.raises(
        OpMismatchError,
        match=r"The values for attribute 'shape' do not match: output has shape "
        r"\(2, 3, 6, 6\) from the candidate op, \(2, 3, 6, 7\) from the reference op\.",
    ):
        assert_op_matches(cropped, F.conv2d, CONFIG.make_inputs(0), kwargs={"padding": 1})


def test_a_wrong_gradient_is_caught_and_named_by_input() -> None:
    def wrong_backward(x: torch.Tensor) -> torch.Tensor:
        # Forward 2x, backward 1x: the straight-through mistake of a hand-written backward.
        return 2 * x.detach() + (x - x.detach())

    with pytest.raises(
        OpMismatchError,
        match=r"does not match the reference op: gradient of 'x' \(input 0\) \(float32",
    ):
        assert_op_matches(wrong_backward, lambda x: 2 * x, [torch.randn(5)], input_names=["x"])


def test_nan_in_the_candidate_counts_as_an_infinite_difference() -> None:
    def poisoned(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, torch.full_like(x, float("nan")))

    with pytest.raises(OpMismatchError, match=r"Greatest absolute difference: inf"):
        assert_op_matches(poisoned, torch.relu, [torch.randn(16)], backward=False)


def test_matching_infinities_are_no_difference() -> None:
    x = torch.tensor([0.0, 1.0, -2.0])
    assert_op_matches(lambda v: 1 / v, torch.reciprocal, [x], backward=False)


def test_a_detached_candidate_is_reported_as_not_differentiable() -> None:
    with pytest.raises(OpMismatchError, match="no gradient flows through it"):
        assert_op_matches(lambda x: (2 * x).detach(), lambda x: 2 * x, [torch.randn(3)])


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        (torch.randn(3), TypeError, r"use \(x,\) for a single tensor"),
        ([torch.randn(3), 2.0], TypeError, r"inputs\[1\] is a float; .* through kwargs="),
        ([torch.arange(3)], ValueError, "at least one floating-point input tensor"),
        ([torch.randn(3, dtype=torch.float64)], ValueError, "float64 inputs leave no wider"),
        (
            [torch.randn(3), torch.randn(3, dtype=torch.float16)],
            ValueError,
            "floating inputs must share one dtype, got float16, float32",
        ),
    ],
)
def test_misuse_raises_a_clear_error(inputs: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        assert_op_matches(torch.neg, torch.neg, inputs)  # type: ignore[arg-type]


def test_the_limit_scales_with_rtol_factor() -> None:
    inputs = CONFIG.make_inputs(0)
    kernel = functools.partial(winograd_conv2d, tile="F4x4_3x3")
    with pytest.raises(OpMismatchError, match="output"):
        assert_op_matches(kernel, F.conv2d, inputs, kwargs=CONFIG.kwargs, rtol_factor=0.01)
    with pytest.raises(ValueError, match="rtol_factor must be positive"):
        assert_op_matches(kernel, F.conv2d, inputs, rtol_factor=0)


def test_it_is_an_assertion_error_hidden_from_tracebacks() -> None:
    assert issubclass(OpMismatchError, AssertionError)
    with pytest.raises(OpMismatchError) as caught:
        assert_op_matches(lambda x: x + 1, torch.clone, [torch.ones(2)], backward=False)
    hidden = [
        entry.frame.f_locals.get("__tracebackhide__", False) for entry in caught.traceback[1:]
    ]
    assert hidden
    assert all(hidden)
