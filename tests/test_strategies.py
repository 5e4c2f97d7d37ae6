"""Convolution configurations from hypothesis: always valid, within bounds, seeded inputs."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_convergence.strategies import Conv2dConfig, conv2d_configs


@settings(max_examples=25, deadline=None)
@given(conv2d_configs(max_batch=3, max_channels=5, max_size=9))
def test_every_config_stays_within_its_bounds_and_fits_the_kernel(config: Conv2dConfig) -> None:
    assert 1 <= config.batch <= 3
    assert 1 <= config.in_channels <= 5
    assert 1 <= config.out_channels <= 5
    assert config.kernel_size == 3
    assert config.stride == 1
    assert config.padding in (0, 1)
    assert config.dtype == torch.float32
    assert min(config.height, config.width) + 2 * config.padding >= 3
    assert max(config.height, config.width) <= 9


@settings(max_examples=25, deadline=None)
@given(
    conv2d_configs(
        max_size=7,
        kernel_sizes=(1, 3, 5),
        strides=(1, 2),
        paddings=(0, 1, 2),
        dtypes=(torch.float32, torch.bfloat16),
    )
)
def test_conv2d_accepts_every_config_and_gives_the_predicted_shape(config: Conv2dConfig) -> None:
    input, weight, bias = config.make_inputs(0)
    assert input.shape == (config.batch, config.in_channels, config.height, config.width)
    kernel = config.kernel_size
    assert weight.shape == (config.out_channels, config.in_channels, kernel, kernel)
    assert (bias is not None) == config.bias
    assert {t.dtype for t in (input, weight, bias) if t is not None} == {config.dtype}
    output = F.conv2d(input.float(), weight.float(), None, **config.kwargs)
    assert output.shape == config.output_shape


def test_inputs_are_reproducible_from_their_seed_and_differ_across_seeds() -> None:
    config = Conv2dConfig(2, 3, 4, 5, 6, 3, 1, 1, torch.float32, bias=True)
    first, again, other = config.make_inputs(7), config.make_inputs(7), config.make_inputs(8)
    for a, b in zip(first, again, strict=True):
        assert a is not None
        assert b is not None
        assert torch.equal(a, b)
    assert first[0] is not None
    assert other[0] is not None
    assert not torch.equal(first[0], other[0])


def test_weights_are_scaled_by_fan_in_so_outputs_stay_of_order_one() -> None:
    config = Conv2dConfig(4, 64, 64, 8, 8, 3, 1, 1, torch.float32, bias=False)
    input, weight, _ = config.make_inputs(0)
    assert float(weight.std()) == pytest.approx((64 * 9) ** -0.5, rel=0.05)
    assert 0.5 < float(F.conv2d(input, weight, padding=1).std()) < 2.0


def test_the_smallest_config_is_what_a_failure_shrinks_to() -> None:
    seen: list[Conv2dConfig] = []

    @settings(max_examples=50, deadline=None, database=None)
    @given(conv2d_configs())
    def fails_on_everything(config: Conv2dConfig) -> None:
        seen.append(config)
        raise AssertionError

    with pytest.raises(AssertionError):
        fails_on_everything()
    smallest = seen[-1]
    assert (smallest.batch, smallest.in_channels, smallest.out_channels) == (1, 1, 1)
    assert (smallest.height, smallest.width, smallest.padding, smallest.bias) == (3, 3, 0, False)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_batch": 0}, "max_batch must be >= 1, got 0"),
        ({"kernel_sizes": ()}, "kernel_sizes must not be empty"),
        ({"dtypes": (torch.int64,)}, "dtypes must be floating dtypes"),
        ({"max_size": 2, "paddings": (0,)}, "no kernel size in [3] fits a 2x2 input"),
    ],
)
def test_impossible_bounds_are_rejected_up_front(
    arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        conv2d_configs(**arguments)  # type: ignore[arg-type]


def test_an_invalid_config_names_the_problem() -> None:
    with pytest.raises(ValueError, match="a 1x5 input padded by 0 is smaller than the 3x3 kernel"):
        Conv2dConfig(1, 1, 1, 1, 5, 3, 1, 0, torch.float32, bias=False)
    with pytest.raises(ValueError, match="in_channels must be >= 1, got 0"):
        Conv2dConfig(1, 0, 1, 5, 5, 3, 1, 0, torch.float32, bias=False)


def test_configs_are_hashable_and_compare_by_value() -> None:
    config = Conv2dConfig(1, 2, 3, 4, 5, 3, 1, 0, torch.float16, bias=True)
    assert config == Conv2dConfig(1, 2, 3, 4, 5, 3, 1, 0, torch.float16, bias=True)
    assert len({config, Conv2dConfig(1, 2, 3, 4, 5, 3, 1, 0, torch.float16, bias=True)}) == 1
    assert isinstance(conv2d_configs(), st.SearchStrategy)


def test_without_hypothesis_the_import_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "pytest_convergence.strategies")
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match=r"needs hypothesis.*pytest-convergence\[test\]"):
        importlib.import_module("pytest_convergence.strategies")
