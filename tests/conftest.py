from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import settings

pytest_plugins = ["pytester"]

settings.register_profile("default", deadline=None, max_examples=40)
settings.load_profile("default")


def reference_logm(*tensors: torch.Tensor) -> float:
    """Mean log10|w| over nonzero weights, in float64 with an exactly rounded sum."""
    logs: list[float] = []
    for tensor in tensors:
        values = tensor.detach().to(torch.float64).reshape(-1).numpy()
        logs.extend(np.log10(np.abs(values[values != 0])).tolist())
    return math.fsum(logs) / len(logs)
