"""Hypothesis strategies for kernel tests: convolution configurations and their inputs.

A convolution kernel is usually tested on the few shapes its author thought of, and fails on
the one they did not: a width that is not a multiple of the tile, a single channel, a batch of
one, padding larger than the remainder. :func:`conv2d_configs` draws whole configurations
(batch, channels, spatial size, kernel, stride, padding, dtype, bias) that are always valid, and
shrinks a failure to the smallest one; :meth:`Conv2dConfig.make_inputs` turns a configuration
into seeded tensors. Pair them with :func:`pytest_convergence.opcheck.assert_op_matches`::

    @given(conv2d_configs())
    def test_kernel(config):
        assert_op_matches(my_conv2d, F.conv2d, config.make_inputs(0), kwargs=config.kwargs)

hypothesis is an optional dependency (the ``test`` extra): only this module imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - exercised by a test that hides hypothesis
    raise ImportError(
        "pytest_convergence.strategies needs hypothesis, an optional dependency: "
        "pip install 'pytest-convergence[test]' (or pip install hypothesis)"
    ) from error

__all__ = ["Conv2dConfig", "conv2d_configs"]


@dataclass(frozen=True)
class Conv2dConfig:
    """One 2-D convolution: ``F.conv2d(input, weight, bias, stride, padding)`` with an input of
    ``(batch, in_channels, height, width)`` and a ``kernel_size`` x ``kernel_size`` weight."""

    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel_size: int
    stride: int
    padding: int
    dtype: torch.dtype
    bias: bool

    def __post_init__(self) -> None:
        positive = {
            "batch": self.batch,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "height": self.height,
            "width": self.width,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if min(self.height, self.width) + 2 * self.padding < self.kernel_size:
            raise ValueError(
                f"a {self.height}x{self.width} input padded by {self.padding} is smaller than "
                f"the {self.kernel_size}x{self.kernel_size} kernel"
            )

    @property
    def kwargs(self) -> dict[str, Any]:
        """The non-tensor arguments of ``F.conv2d``: pass them to both ops."""
        return {"stride": self.stride, "padding": self.padding}

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        def side(size: int) -> int:
            return (size + 2 * self.padding - self.kernel_size) // self.stride + 1

        return (self.batch, self.out_channels, side(self.height), side(self.width))

    def make_inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(input, weight, bias)`` drawn from ``seed``; ``bias`` is None without one.

        Input ~ N(0, 1); weight and bias ~ N(0, 1 / fan_in), so outputs stay of order one at any
        channel count (as with a trained layer) and errors compare across configurations. Drawn
        in float64 and rounded once, so every dtype sees the same values up to its precision.
        """
        generator = torch.Generator().manual_seed(seed)
        fan_in = self.in_channels * self.kernel_size * self.kernel_size
        std = fan_in**-0.5

        def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
            values = torch.randn(*shape, generator=generator, dtype=torch.float64)
            return (values * scale).to(self.dtype)

        input = draw(self.batch, self.in_channels, self.height, self.width)
        k = self.kernel_size
        weight = draw(self.out_channels, self.in_channels, k, k, scale=std)
        bias = draw(self.out_channels, scale=std) if self.bias else None
        return input, weight, bias


def conv2d_configs(
    *,
    max_batch: int = 4,
    max_channels: int = 8,
    max_size: int = 12,
    kernel_sizes: Sequence[int] = (3,),
    strides: Sequence[int] = (1,),
    paddings: Sequence[int] = (0, 1),
    dtypes: Sequence[torch.dtype] = (torch.float32,),
) -> st.SearchStrategy[Conv2dConfig]:
    """Valid 2-D convolution configurations within the given bounds, shrinking towards the
    smallest (batch 1, one channel, the smallest input the kernel fits, no bias).

    Heights and widths range independently from the smallest size the kernel fits after padding
    to ``max_size``, so non-square inputs and sizes that are not multiples of a tile come up.
    """
    for name, bound in (
        ("max_batch", max_batch),
        ("max_channels", max_channels),
        ("max_size", max_size),
    ):
        if bound < 1:
            raise ValueError(f"{name} must be >= 1, got {bound}")
    for name, choices in (
        ("kernel_sizes", kernel_sizes),
        ("strides", strides),
        ("paddings", paddings),
        ("dtypes", dtypes),
    ):
        if len(choices) == 0:
            raise ValueError(f"{name} must not be empty")
    if any(not d.is_floating_point for d in dtypes):
        raise ValueError(f"dtypes must be floating dtypes, got {list(dtypes)}")
    fitting = [(k, p) for k in kernel_sizes for p in paddings if max(1, k - 2 * p) <= max_size]
    if not fitting:
        raise ValueError(
            f"no kernel size in {list(kernel_sizes)} fits a {max_size}x{max_size} input with "
            f"any padding in {list(paddings)}"
        )

    @st.composite
    def configs(draw: st.DrawFn) -> Conv2dConfig:
        kernel_size, padding = draw(st.sampled_from(fitting))
        smallest = max(1, kernel_size - 2 * padding)
        return Conv2dConfig(
            batch=draw(st.integers(1, max_batch)),
            in_channels=draw(st.integers(1, max_channels)),
            out_channels=draw(st.integers(1, max_channels)),
            height=draw(st.integers(smallest, max_size)),
            width=draw(st.integers(smallest, max_size)),
            kernel_size=kernel_size,
            stride=draw(st.sampled_from(list(strides))),
            padding=padding,
            dtype=draw(st.sampled_from(list(dtypes))),
            bias=draw(st.booleans()),
        )

    return configs()
