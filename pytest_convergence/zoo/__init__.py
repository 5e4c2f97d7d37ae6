"""A zoo of CPU-sized training workloads: reduced replicas of well-known architectures.

Convergence tests need real layer layouts (Inception concatenations, bottleneck residuals,
batch-norm statistics) to exercise realistic bugs, but must train a few steps in milliseconds;
:mod:`pytest_convergence.zoo.models` keeps the layouts and shrinks the widths.

Importing the zoo registers nothing: :func:`register` does, and whoever needs the zoo calls it
(the plugin adds it as a workload source, ``"pytest_convergence.zoo:register"``, so it loads the
first time a convergence test looks a workload up; benchmarks call it directly).
"""

from __future__ import annotations

from pytest_convergence.workloads import (
    Workload,
    add_workload_source,
    is_registered,
    register_workload,
)
from pytest_convergence.zoo import large_batch as large_batch  # seeds' workloads (issue 6)
from pytest_convergence.zoo import parameterizations as parameterizations
from pytest_convergence.zoo import pruning as pruning
from pytest_convergence.zoo import quantized as quantized
from pytest_convergence.zoo import transformer as transformer
from pytest_convergence.zoo import workloads as workloads

__all__ = ["SOURCE", "WORKLOADS", "register"]

# The zoo as a workload source (pytest_convergence.workloads.add_workload_source).
SOURCE = "pytest_convergence.zoo:register"

WORKLOADS: tuple[Workload, ...] = (
    *workloads.ZOO_WORKLOADS.values(),
    quantized.BINARYCONNECT_MLP,
    quantized.STOCHASTIC_ROUNDING_LENET5,
    pruning.PRUNED_VGG16_MINI,
    parameterizations.DIRACNET_WORKLOAD,
    parameterizations.SYMMETRIC_WORKLOAD,
    large_batch.LARGE_BATCH_WORKLOAD,
    large_batch.MIXUP_WORKLOAD,
    transformer.TRANSFORMER_LM,
    transformer.ADAMW_LENET5,
)


def register() -> None:
    """Register every zoo workload whose name is free: a workload of the same name registered
    before the zoo was loaded (a user's own ``mlp``) stays. The zoo also becomes a workload
    source, so that worker processes (DDP ranks) find it too."""
    add_workload_source(SOURCE)
    for workload in WORKLOADS:
        if not is_registered(workload.name):
            register_workload(workload)
