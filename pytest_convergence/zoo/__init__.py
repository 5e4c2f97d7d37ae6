"""A zoo of CPU-sized training workloads: reduced replicas of well-known architectures.

Convergence tests need real layer layouts (Inception concatenations, bottleneck residuals,
batch-norm statistics) to exercise realistic bugs, but must train a few steps in milliseconds;
:mod:`pytest_convergence.zoo.models` keeps the layouts and shrinks the widths.
"""

from pytest_convergence.zoo import workloads as workloads  # registers the zoo's workloads
