"""Large mini-batch training (Naganuma & Yokota 2019) under co-simulation: gradient accumulation
takes the large batch's step, accumulation that forgets to divide the loss does not.

Workloads ``large-batch-lenet5`` and ``mixup-lenet5`` (``pytest_convergence.zoo.large_batch``):
LeNet-5 without batch norm, batches of 256, lr 0.1 by the linear scaling rule; the second mixes
every batch with Beta(0.7, 0.7) weights and trains on the soft targets. The legitimate
candidate splits each batch into 4 micro-batches and weights each loss by its share; the bug
back-propagates each micro-batch's mean loss as is, a step 4 times too large (bias 3).

What was measured (regions calibrated on seeds 0-2, candidates judged on seeds 100-104):
accumulation stays within 0.0004 of a limit; the missing division leaves the region at step 1
on every seed, 190 to 340 times over a limit.

Run: ``pytest --convergence -rx examples/seeds/test_large_batch.py``. Baselines used:
``baselines/large-batch-lenet5.json`` and ``baselines/mixup-lenet5.json``.
"""

from __future__ import annotations

import pytest

from pytest_convergence.assertions import ConvergenceError
from pytest_convergence.checks import BoundCheck
from pytest_convergence.zoo.candidates import accumulation_without_division
from pytest_convergence.zoo.large_batch import gradient_accumulation

WORKLOADS = ["large-batch-lenet5", "mixup-lenet5"]


@pytest.mark.convergence
@pytest.mark.parametrize("workload", WORKLOADS)
def test_gradient_accumulation_over_micro_batches_trains_like_the_large_batch(
    convergence: BoundCheck, workload: str
) -> None:
    convergence.check(gradient_accumulation(micro_batches=4), workload=workload)


@pytest.mark.xfail(
    raises=ConvergenceError,
    strict=True,
    reason="demonstration: accumulating 4 micro-batches without dividing the loss makes every "
    "update 4x too large (bias 3), caught at step 1",
)
@pytest.mark.convergence
@pytest.mark.parametrize("workload", WORKLOADS)
def test_accumulation_without_dividing_the_loss_is_caught(
    convergence: BoundCheck, workload: str
) -> None:
    convergence.check(accumulation_without_division(micro_batches=4), workload=workload)
