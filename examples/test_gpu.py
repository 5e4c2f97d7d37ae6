"""On a CUDA machine every example also runs on the GPU, and TF32 is a legitimate variant.

Run the whole suite on the GPU with ``pytest --convergence --convergence-device cuda examples/``;
GPU regions live beside the CPU ones as ``baselines/<workload>-cuda.json``. TF32 matmuls and
convolutions round their inputs to 10 mantissa bits: correct, but far less precise than float32,
so each setting gets its own recorded region (``baselines/resnet50-mini-cuda--tf32-on.json`` and
``...--tf32-off.json``), and later kernels are held to the behaviour of the setting they run
under. Without CUDA these tests are skipped with a reason (``-rs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from pytest_convergence.candidates import Candidate
from pytest_convergence.checks import BoundCheck


def tf32(enabled: bool) -> Candidate:
    """TF32 on or off for cuBLAS matmuls and cuDNN convolutions, restored afterwards."""

    @contextlib.contextmanager
    def flags() -> Iterator[None]:
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

    state = "on" if enabled else "off"
    return Candidate(f"tf32-{state}", context=flags, description=f"TF32 {state} on CUDA")


@pytest.mark.convergence(workload="resnet50-mini", device="cuda")
@pytest.mark.parametrize("enabled", [True, False])
def test_each_tf32_setting_holds_to_its_own_region(convergence: BoundCheck, enabled: bool) -> None:
    convergence.check(tf32(enabled), own_region=True)
