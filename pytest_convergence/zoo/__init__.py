"""A zoo of CPU-sized training workloads: reduced replicas of well-known architectures.

Convergence tests need real layer layouts (Inception concatenations, bottleneck residuals,
batch-norm statistics) to exercise realistic bugs, but must train a few steps in milliseconds;
:mod:`pytest_convergence.zoo.models` keeps the layouts and shrinks the widths.
"""

from pytest_convergence.zoo import large_batch as large_batch  # seeds' workloads (issue 6)
from pytest_convergence.zoo import parameterizations as parameterizations
from pytest_convergence.zoo import pruning as pruning
from pytest_convergence.zoo import quantized as quantized
from pytest_convergence.zoo import workloads as workloads  # registers the zoo's workloads
