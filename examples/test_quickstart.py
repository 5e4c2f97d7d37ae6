"""Quickstart: legitimate implementation changes pass, a real bug is caught.

Each test co-simulates 8 training steps of a zoo workload's reference and a candidate from the
same weights on the same batches, and judges the candidate against ``baselines/<workload>.json``
(the reference with operations perturbed at fp16 and gradients at bf16 precision). Run with
``pytest --convergence -rx examples/``; record baselines with ``--convergence-record``.
"""

from __future__ import annotations

import pytest

from pytest_convergence.assertions import ConvergenceError
from pytest_convergence.zoo.candidates import (
    channels_last,
    foreach_sgd,
    scaled_layer_gradient,
    thread_count,
    unfold_conv2d,
)


@pytest.mark.convergence(workload="vgg16-mini")
def test_a_foreach_sgd_matches_the_reference_optimizer(convergence):
    convergence.check(foreach_sgd())


@pytest.mark.convergence(workload="vgg16-mini")
def test_convolution_as_unfold_and_matmul_sums_in_another_order_but_converges(convergence):
    convergence.check(unfold_conv2d())


@pytest.mark.convergence(workload="resnet50-mini")
def test_channels_last_memory_format_converges_through_batch_norm(convergence):
    convergence.check(channels_last())


@pytest.mark.convergence(workload="resnet50-mini")
def test_another_thread_count_converges(convergence):
    convergence.check(thread_count(1))


@pytest.mark.convergence(workload="vgg16-mini")
def test_a_layer_whose_gradient_is_ten_percent_short_is_caught(convergence):
    """Shown with ``-rP``: the co-simulation diff a reviewer would read."""
    with pytest.raises(ConvergenceError) as caught:
        convergence.check(scaled_layer_gradient("features.10.weight", 0.9))
    assert "parameter 'features.10.weight'" in str(caught.value)
    print(caught.value)
