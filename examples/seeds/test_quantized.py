"""Quantized training (Li et al. 2017, "Training Quantized Nets: A Deeper Understanding") under
co-simulation: BinaryConnect and stochastic rounding, each with a legitimate kernel and a bug.

Workloads ``binaryconnect-mlp`` and ``stochastic-rounding-lenet5``
(``pytest_convergence.zoo.quantized``): an MLP with binary (+-1) weights in the forward pass, a
full-precision copy for the update, clipped to [-1, 1] after each step; and LeNet-5 with every
weight on the 8-bit fixed-point grid <1, 7>, each update stochastically rounded onto it.

What was measured (default regions calibrated on seeds 0-2, candidates judged on seeds
100-104): the multiplication-free binary kernel stays within 0.001 of a limit and the fused
rounding kernel rounds exactly as the reference (worst ratio 0); updating the binarized weights
leaves the region at step 1 on every seed (update noise 150 to 190 times its limit), and so
does round-to-nearest (update bias -1: every sub-half-step update lost).

Run: ``pytest --convergence -rx examples/seeds/test_quantized.py``. Baselines used:
``baselines/binaryconnect-mlp.json`` and ``baselines/stochastic-rounding-lenet5.json``.
"""

from __future__ import annotations

import pytest

from pytest_convergence.assertions import ConvergenceError
from pytest_convergence.checks import BoundCheck
from pytest_convergence.zoo.quantized import (
    binarized_weight_update,
    fused_stochastic_rounding,
    popcount_binary_linear,
    round_to_nearest,
)


@pytest.mark.convergence(workload="binaryconnect-mlp")
def test_a_multiplication_free_binary_kernel_trains_like_the_reference(
    convergence: BoundCheck,
) -> None:
    convergence.check(popcount_binary_linear())


@pytest.mark.xfail(
    raises=ConvergenceError,
    strict=True,
    reason="demonstration: updating the binarized weights instead of the full-precision copy "
    "puts every weight on +-1, caught at step 1",
)
@pytest.mark.convergence(workload="binaryconnect-mlp")
def test_updating_the_binarized_weights_is_caught(convergence: BoundCheck) -> None:
    convergence.check(binarized_weight_update())


@pytest.mark.convergence(workload="stochastic-rounding-lenet5")
def test_a_fused_stochastic_rounding_kernel_trains_like_the_reference(
    convergence: BoundCheck,
) -> None:
    convergence.check(fused_stochastic_rounding())


@pytest.mark.xfail(
    raises=ConvergenceError,
    strict=True,
    reason="demonstration: round-to-nearest drops every update below half a grid step (the "
    "stall Li et al. describe), caught at step 1",
)
@pytest.mark.convergence(workload="stochastic-rounding-lenet5")
def test_round_to_nearest_instead_of_stochastic_rounding_is_caught(
    convergence: BoundCheck,
) -> None:
    convergence.check(round_to_nearest())
