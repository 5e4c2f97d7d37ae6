"""The zoo's named workloads: each model with deterministic synthetic data and SGD.

Registered by :func:`pytest_convergence.zoo.register`, which the plugin calls the first time a
convergence test looks a workload up: ``@pytest.mark.convergence(workload="vgg16-mini")`` works
without set-up. Hyper-parameters follow the LoGM paper's
setting (SGD, momentum 0.9, weight decay 5e-4); learning rates are scaled so that eight steps
on random labels move every layer without diverging.
"""

from __future__ import annotations

from pytest_convergence.workloads import Workload, sgd, synthetic_classification
from pytest_convergence.zoo.models import MODEL_SPECS

__all__ = ["ZOO_WORKLOADS"]

_LEARNING_RATES = {
    "googlenet-v1-mini": 0.05,
    "vgg16-mini": 0.05,
    "resnet50-mini": 0.05,
    "lenet5": 0.05,
    "wide-resnet-mini": 0.05,
    "mlp": 0.05,
}

ZOO_WORKLOADS: dict[str, Workload] = {}
for _name, _spec in MODEL_SPECS.items():
    ZOO_WORKLOADS[_name] = Workload(
        name=_name,
        model_factory=_spec.factory,
        batches=synthetic_classification(_spec.input_shape, _spec.num_classes, batch_size=16),
        optimizer_factory=sgd(lr=_LEARNING_RATES[_name], momentum=0.9, weight_decay=5e-4),
        steps=8,
        description=f"{_name}: 8 SGD steps on synthetic 16-sample batches",
    )
