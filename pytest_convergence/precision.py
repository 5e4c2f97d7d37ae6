"""Precision policies by name: how a training step runs its arithmetic, and what a region
calibrated for it must admit.

A policy is a training loop's precision set-up (TF32 matmuls, autocast to bfloat16 or float16,
a GradScaler) together with the accuracy that a legitimate implementation under it has: the
relative perturbation of every module output and of every gradient that the region's
calibration applies (:func:`pytest_convergence.regions.calibrate`). A user names the policy
their training uses (``Workload(precision="bf16-autocast")``, or a candidate that switches to
it); recording and checking name it, and the baseline of a policy other than ``fp32`` is a
file of its own (``<workload>@<policy>.json``).

The tolerances are measured (``benchmarks/precision_policies.py``): for each policy, the
policy's own arithmetic (the reference trained under it, against the reference in float32) was
judged on five held-out seeds of five workloads against regions at operation tolerances from
2^-12 to 2^-6; a policy ships one power of two above the largest tolerance any workload needed.
False alarms and detection under each are in ``docs/detection.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_POLICY", "POLICIES", "PrecisionPolicy", "get_policy"]


@dataclass(frozen=True)
class PrecisionPolicy:
    """A named precision set-up and the accuracy its region admits."""

    name: str
    description: str
    # The relative accuracy of every operation, and of every gradient, that a legitimate
    # implementation under this policy has (the region's calibration perturbs by these).
    tolerance: float
    gradient_tolerance: float
    autocast_dtype: torch.dtype | None = None
    # float16 gradients underflow without loss scaling: the step scales, unscales and skips
    # steps with non-finite gradients, as torch.amp.GradScaler does.
    grad_scaler: bool = False
    # TF32 tensor-core matmuls and convolutions (10-bit mantissas, float32 accumulation).
    tf32: bool = False

    def context(self, device_type: str) -> AbstractContextManager[object]:
        """What the forward pass (and the backward it records) runs under."""
        if self.autocast_dtype is not None:
            return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)
        if self.tf32 and device_type == "cuda":
            return _tf32_enabled()
        return contextlib.nullcontext()

    def make_scaler(self, device_type: str) -> torch.amp.GradScaler | None:
        """A GradScaler for this policy, or None."""
        if not self.grad_scaler:
            return None
        return torch.amp.GradScaler(device_type)


@contextlib.contextmanager
def _tf32_enabled() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


DEFAULT_POLICY = "fp32"

POLICIES: dict[str, PrecisionPolicy] = {
    policy.name: policy
    for policy in (
        # Every operation at least as accurate as fp16 rounding (2^-11: other kernels,
        # summation orders, Winograd tiles, memory formats) and the gradient exchange as bf16
        # rounding (2^-8): the regions calibrated before policies had names.
        PrecisionPolicy(
            "fp32",
            "float32 arithmetic, any kernel at least as accurate as fp16 rounding",
            tolerance=2.0**-11,
            gradient_tolerance=2.0**-8,
        ),
        # TF32 rounds matmul and convolution inputs to 10-bit mantissas (unit roundoff 2^-11)
        # and accumulates in float32. Measured with the rounding emulated on the CPU
        # (zoo.candidates.tf32_matmuls): every workload passed at 2^-12, so the fp32 policy's
        # accuracy admits it.
        PrecisionPolicy(
            "tf32",
            "TF32 matmuls and convolutions (10-bit mantissas, float32 accumulation)",
            tolerance=2.0**-11,
            gradient_tolerance=2.0**-8,
            tf32=True,
        ),
        # With gradients at 2^-8, the largest need was vgg16-mini's, 2^-10 (the others 2^-12
        # to 2^-11).
        PrecisionPolicy(
            "bf16-autocast",
            "torch.autocast to bfloat16 (8-bit mantissas) around forward and backward",
            tolerance=2.0**-9,
            gradient_tolerance=2.0**-8,
            autocast_dtype=torch.bfloat16,
        ),
        # Every workload passed at 2^-12 but vgg16-mini, which no tolerance up to 2^-6 admits
        # on the CPU (its first convolution's update grows along its weights, 480 sigma at
        # step 2): oneDNN's float16 convolutions accumulate in float16, a GPU's in float32.
        PrecisionPolicy(
            "fp16-autocast",
            "torch.autocast to float16 with a GradScaler (dynamic loss scaling)",
            tolerance=2.0**-11,
            gradient_tolerance=2.0**-8,
            autocast_dtype=torch.float16,
            grad_scaler=True,
        ),
    )
}


def get_policy(name: str) -> PrecisionPolicy:
    """The policy ``name``; ``ValueError`` lists the known ones otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        known = ", ".join(POLICIES)
        raise ValueError(f"unknown precision policy {name!r}; known policies: {known}") from None
