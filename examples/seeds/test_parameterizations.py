"""Weight parameterizations (Zagoruyko 2017) under co-simulation: re-arranged layers train like
the definition, a slip in the parameterization does not.

Workloads ``diracnet-mini`` and ``symmetric-mlp`` (``pytest_convergence.zoo.parameterizations``).
The legitimate candidates compute each layer with other arithmetic: the Dirac parameterization
folded into one weight tensor and one convolution, the symmetric weight never materialized
(two triangle products). The bugs change the function: the Dirac filter normalization taken
over the input or the output channels instead of per filter, and the symmetric weight built as
``triu(W) + triu(W)^T``, which counts the diagonal twice.

What was measured (regions calibrated on seeds 0-2, candidates judged on seeds 100-104): the
folded Dirac layers stay within 0.04 of a limit and the unfolded symmetric layers within
0.0002; each bug leaves the region at step 1 on every seed, 10 to 22 times over a limit.

Run: ``pytest --convergence -rx examples/seeds/test_parameterizations.py``. Baselines used:
``baselines/diracnet-mini.json`` and ``baselines/symmetric-mlp.json``.
"""

from __future__ import annotations

import pytest

from pytest_convergence.assertions import ConvergenceError
from pytest_convergence.checks import BoundCheck
from pytest_convergence.zoo.parameterizations import (
    dirac_folded,
    dirac_wrong_normalization_axis,
    symmetric_diagonal_counted_twice,
    symmetric_unfolded,
)


@pytest.mark.convergence(workload="diracnet-mini")
def test_folding_the_dirac_parameterization_into_one_convolution_passes(
    convergence: BoundCheck,
) -> None:
    convergence.check(dirac_folded())


@pytest.mark.xfail(
    raises=ConvergenceError,
    strict=True,
    reason="demonstration: the Dirac filter normalization taken over the wrong axis "
    "(F.normalize on the 4-D weight, or across filters) scales the convolutional path ~3x "
    "against the identity; every Dirac scale's update leaves the region at step 1",
)
@pytest.mark.convergence(workload="diracnet-mini")
@pytest.mark.parametrize("axis", ["input", "output"])
def test_normalizing_dirac_filters_over_the_wrong_axis_is_caught(
    convergence: BoundCheck, axis: str
) -> None:
    convergence.check(dirac_wrong_normalization_axis(axis))  # type: ignore[arg-type]


@pytest.mark.convergence(workload="symmetric-mlp")
def test_symmetric_layers_computed_from_the_triangle_pass(convergence: BoundCheck) -> None:
    convergence.check(symmetric_unfolded())


@pytest.mark.xfail(
    raises=ConvergenceError,
    strict=True,
    reason="demonstration: triu(W) + triu(W)^T counts the diagonal twice; the layers train "
    "another function and every weight's update is noisy beyond rounding at step 1",
)
@pytest.mark.convergence(workload="symmetric-mlp")
def test_a_symmetric_weight_with_the_diagonal_counted_twice_is_caught(
    convergence: BoundCheck,
) -> None:
    convergence.check(symmetric_diagonal_counted_twice())
