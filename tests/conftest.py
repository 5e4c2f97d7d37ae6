from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import settings

from pytest_convergence import metrics, zoo
from pytest_convergence.workloads import add_workload_source

pytest_plugins = ["pytester"]


def _import_lazy_torch_modules() -> None:
    """pytester's in-process runs drop modules first imported inside them, and torch cannot
    register its operator libraries twice: import what an optimizer step and a report pull in
    lazily before any run starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    parameter = torch.nn.Parameter(torch.ones(2))
    parameter.grad = torch.ones(2)
    torch.optim.SGD([parameter], lr=0.1, momentum=0.9).step()


_import_lazy_torch_modules()
# The zoo's workloads, for tests that look them up without a convergence session.
add_workload_source(zoo.SOURCE)


@pytest.fixture(scope="module", params=["compiled-kernel", "tensor-path"])
def computation(request: pytest.FixtureRequest) -> Iterator[str]:
    """LoGM and the traces' statistics come from the compiled kernel on CPU, and from tensor
    operations on accelerators and in installs without a C compiler: a module that uses this
    fixture runs every test on both."""
    if request.param == "compiled-kernel":
        assert metrics.compiled_kernel_available(), "the C kernel was not built at install"
        yield request.param
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "_logm_kernel", None)
        yield request.param


# A conftest for pytester projects: a 3-step workload small enough to co-simulate in a second.
TINY_WORKLOAD_CONFTEST = """
from torch import nn
from pytest_convergence.workloads import Workload, register_workload, sgd, synthetic_classification

def tiny():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

register_workload(
    Workload(
        name="tiny",
        model_factory=tiny,
        batches=synthetic_classification((8,), 4, batch_size=8),
        optimizer_factory=sgd(lr=0.1),
        steps=3,
    ),
    replace_existing=True,
)
"""

settings.register_profile("default", deadline=None, max_examples=40)
settings.load_profile("default")


def reference_logm(*tensors: torch.Tensor) -> float:
    """Mean log10|w| over nonzero weights, in float64 with an exactly rounded sum."""
    logs: list[float] = []
    for tensor in tensors:
        values = tensor.detach().to(torch.float64).reshape(-1).numpy()
        logs.extend(np.log10(np.abs(values[values != 0])).tolist())
    return math.fsum(logs) / len(logs)
