"""Winograd convolution under co-simulation: correct tiles converge, a wrong constant does not.

Run with ``pytest --convergence -rx examples/winograd/``. Correct F(2x2,3x3) and F(4x4,3x3)
kernels must train like direct convolution on VGG-16 and ResNet-50 replicas: their extra
rounding is far inside the default region (operations accurate to fp16 rounding). The two
expected failures are the bugs this example exists to show, marked ``xfail(strict=True)``: the
suite stays green while they are caught, and turns red the day a change stops catching them.
``-rx`` prints each with its reason; run one alone without ``-rx`` and with
``--runxfail`` to see the full failure message (which layer, which step, by how much).
"""

from __future__ import annotations

import pytest
from winograd import (
    winograd_candidate,
    winograd_fp16_transforms,
    winograd_wrong_constant,
)

from pytest_convergence.assertions import ConvergenceError
from pytest_convergence.checks import BoundCheck

WORKLOADS = ["vgg16-mini", "resnet50-mini"]


@pytest.mark.convergence
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("tile", ["F2x2_3x3", "F4x4_3x3"])
def test_correct_winograd_trains_like_direct_convolution(
    convergence: BoundCheck, workload: str, tile: str
) -> None:
    convergence.check(winograd_candidate(tile), workload=workload)  # type: ignore[arg-type]


@pytest.mark.xfail(
    raises=ConvergenceError,
    strict=True,
    reason="caught bug: Winograd F(2x2,3x3) with G[1][0] = 0.45 instead of 0.5 leaves the "
    "region at step 1; the replay names the first convolution (features.0 or conv1)",
)
@pytest.mark.convergence
@pytest.mark.parametrize("workload", WORKLOADS)
def test_a_wrong_transform_constant_is_caught(convergence: BoundCheck, workload: str) -> None:
    convergence.check(winograd_wrong_constant(), workload=workload)


@pytest.mark.xfail(
    raises=ConvergenceError,
    strict=True,
    reason="caught precision bug: Winograd F(4x4,3x3) with float16 transforms biases the "
    "classifier's update at step 1 beyond the default region (fp16-accurate operations)",
)
@pytest.mark.convergence(workload="vgg16-mini")
def test_float16_transforms_in_f4x4_are_caught(convergence: BoundCheck) -> None:
    convergence.check(winograd_fp16_transforms("F4x4_3x3"))
