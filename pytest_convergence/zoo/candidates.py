"""A library of realistic candidates: legitimate variants and convergence bugs.

Each factory returns a fresh :class:`~pytest_convergence.candidates.Candidate` describing how an
implementation differs from the reference training step of a workload. Build a new one per run:
the candidates that keep private state across steps (:func:`stale_gradient`,
:func:`error_feedback_int8_exchange`) carry it in the closure they were built with.

**Legitimate variants** change *how* a step is computed, never *what* it computes: another
summation order (:func:`unfold_conv2d`), other kernels (:func:`onednn_disabled`,
:func:`channels_last`, :func:`thread_count`), another optimizer implementation
(:func:`foreach_sgd`, :func:`for_loop_sgd`) or a correct lossy gradient exchange over virtual
workers (:func:`fp16_exchange`, :func:`bf16_exchange`, :func:`int8_exchange`,
:func:`error_feedback_int8_exchange`). A co-simulation must pass them (the int8 ones against a
region calibrated with a known-good int8 exchange: their error is far above float rounding).

**Bugs** are modelled on mistakes that ship in real training code; each docstring says where
such a bug occurs in practice. They change what a step computes, usually by a consistent factor
(a bias, in the terms of :mod:`pytest_convergence.regions`), sometimes only by added noise.

:func:`fp16_conv_accumulation` sits in between: a reduced-precision convolution kernel, correct
as a kernel but less precise than the default region's tolerance (bf16 rounding of every
gradient) may or may not admit; see ``docs/detection.md`` for what was measured.

The zoo's hyper-parameters (SGD, lr 0.05, momentum 0.9, weight decay 5e-4) are the defaults of
the optimizer factories here.

Length: a catalogue of two dozen independent candidates, each a short factory with a docstring
saying where its bug ships; the detection benchmark and the examples import them by name, and
one module per handful of them would scatter a list that is read as a list.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import StateDict
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_convergence.batches import Batch
from pytest_convergence.candidates import Candidate, GradientExchange
from pytest_convergence.compression import (
    flatten_gradients,
    last_partition_parameters,
    mean_over_workers,
    quantize_int8_partitions,
    unflatten_gradients,
)
from pytest_convergence.training_step import StepContext
from pytest_convergence.workloads import OptimizerFactory

__all__ = [
    "LEARNING_RATE",
    "MOMENTUM",
    "WEIGHT_DECAY",
    "FusedSGD",
    "accumulation_without_division",
    "bf16_exchange",
    "channels_last",
    "conv_without_bias",
    "dropped_gradient_rows",
    "dropped_worker_exchange",
    "error_feedback_int8_exchange",
    "for_loop_sgd",
    "foreach_sgd",
    "fp16_conv_accumulation",
    "fp16_exchange",
    "int8_exchange",
    "last_partition_parameters",
    "loss_scale_mismatch",
    "onednn_disabled",
    "quantize_int8_partitions",
    "rotated_gradient_rows",
    "scaled_layer_gradient",
    "stale_gradient",
    "stale_gradient_rows",
    "sum_instead_of_mean_exchange",
    "tf32_matmuls",
    "thread_count",
    "unfold_conv2d",
    "weight_decay_doubled",
    "wrong_momentum",
]

LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

Conv2d = Callable[..., torch.Tensor]
IntPair = int | Sequence[int]

_CONV2D = "conv2d"
_FUNCTIONAL = "F"  # torch.nn.modules.conv's name for torch.nn.functional


# --------------------------------------------------------------------------------------------
# Kernel patching
# --------------------------------------------------------------------------------------------


def _conv2d_holders() -> list[types.ModuleType]:
    """Every namespace ``nn.Conv2d`` and user code read ``conv2d`` from, each once.

    ``torch.nn.modules.conv`` calls ``F.conv2d`` through its own reference to the functional
    module; today that is the same module object as ``torch.nn.functional``, but patching both
    names keeps the patch effective should either ever be rebound.
    """
    holders: list[types.ModuleType] = []
    for holder in (torch.nn.functional, getattr(torch.nn.modules.conv, _FUNCTIONAL)):
        if not any(holder is seen for seen in holders):
            holders.append(holder)
    return holders


@contextlib.contextmanager
def _conv2d_patched(make: Callable[[Conv2d], Conv2d]) -> Iterator[None]:
    """Replace ``conv2d`` by ``make(original)`` and restore the originals, even on errors."""
    originals = [(holder, getattr(holder, _CONV2D)) for holder in _conv2d_holders()]
    replacement = make(originals[0][1])
    try:
        for holder, _ in originals:
            setattr(holder, _CONV2D, replacement)
        yield
    finally:
        for holder, original in reversed(originals):
            setattr(holder, _CONV2D, original)


def _pair(value: IntPair) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = (int(v) for v in value)
    return (first, second)


def _unfold_conv2d_kernel(original: Conv2d) -> Conv2d:
    def conv2d(  # noqa: PLR0917  (F.conv2d's own signature)
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: IntPair = 1,
        padding: IntPair | str = 0,
        dilation: IntPair = 1,
        groups: int = 1,
    ) -> torch.Tensor:
        if groups != 1 or isinstance(padding, str) or input.dim() != 4 or weight.dim() != 4:
            return original(input, weight, bias, stride, padding, dilation, groups)
        batch, _, height, width = input.shape
        out_channels, _, kernel_h, kernel_w = weight.shape
        strides, paddings, dilations = _pair(stride), _pair(padding), _pair(dilation)
        columns = F.unfold(
            input, (kernel_h, kernel_w), dilation=dilations, padding=paddings, stride=strides
        )
        out_h = (height + 2 * paddings[0] - dilations[0] * (kernel_h - 1) - 1) // strides[0] + 1
        out_w = (width + 2 * paddings[1] - dilations[1] * (kernel_w - 1) - 1) // strides[1] + 1
        output = weight.reshape(out_channels, -1).matmul(columns)
        if bias is not None:
            output = output + bias.reshape(1, -1, 1)
        return output.reshape(batch, out_channels, out_h, out_w)

    return conv2d


def unfold_conv2d() -> Candidate:
    """Convolution as im2col (``F.unfold``) followed by one matrix product.

    Models the classic "lowering" implementation of convolution (Caffe, early cuDNN, many
    accelerator back ends): the same sums in another order. Supports stride, padding and
    dilation with ``groups=1``; string padding, grouped and unbatched convolutions fall back to
    the original kernel.
    """
    return Candidate(
        name="unfold-conv2d",
        context=lambda: _conv2d_patched(_unfold_conv2d_kernel),
        description="conv2d as unfold + matmul: another summation order",
    )


@contextlib.contextmanager
def _onednn_off() -> Iterator[None]:
    # torch.backends.mkldnn.flags() warns about TF32 on CPU builds; set the flag directly.
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


def onednn_disabled() -> Candidate:
    """oneDNN (MKL-DNN) switched off: PyTorch's native CPU convolution kernels instead.

    Models a deployment whose back end differs from the developer's: another library, other
    blocking and other summation orders, the same mathematics. On builds without oneDNN this
    is the reference itself.
    """
    return Candidate(
        name="onednn-disabled",
        context=_onednn_off,
        description="oneDNN disabled: native CPU convolution kernels",
    )


def _channels_last_kernel(original: Conv2d) -> Conv2d:
    def conv2d(
        input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if input.dim() == 4:
            input = input.contiguous(memory_format=torch.channels_last)
        if weight.dim() == 4:
            weight = weight.contiguous(memory_format=torch.channels_last)
        return original(input, weight, *args, **kwargs)

    return conv2d


def _to_channels_last(model: nn.Module) -> nn.Module:
    # nn.Module.to accepts memory_format; torch's annotations do not say so.
    converted: nn.Module = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return converted


def channels_last() -> Candidate:
    """Model and convolution inputs in NHWC (``torch.channels_last``) memory format.

    Models the usual mixed-precision performance recipe (``model.to(memory_format=...)``):
    other kernels and other reduction orders for convolutions and batch norm.
    """
    return Candidate(
        name="channels-last",
        context=lambda: _conv2d_patched(_channels_last_kernel),
        model_transform=_to_channels_last,
        description="model and conv inputs in channels_last memory format",
    )


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def thread_count(threads: int = 1) -> Candidate:
    """The reference on another number of intra-op threads.

    Models a CI runner or a production host with another core count: parallel reductions split
    their sums differently, so results differ in the last bits.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return Candidate(
        name=f"threads-{threads}",
        context=lambda: _threads(threads),
        description=f"torch.set_num_threads({threads}) around forward and backward",
    )


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


class _PinnedSGD(torch.optim.SGD):
    """``torch.optim.SGD`` that keeps its own ``foreach`` choice when loading a state dict.

    ``Optimizer.load_state_dict`` replaces every hyper-parameter of a group by the saved one; a
    co-simulation re-syncs the candidate from the reference's state dict every step, which would
    silently turn a ``foreach=True`` candidate back into the reference's default implementation.
    """

    def __init__(self, params: Iterable[nn.Parameter], *, foreach: bool, **options: Any) -> None:
        super().__init__(params, foreach=foreach, **options)
        self._pinned_foreach = foreach

    def load_state_dict(self, state_dict: StateDict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["foreach"] = self._pinned_foreach


def _sgd_factory(
    foreach: bool, lr: float, momentum: float, weight_decay: float
) -> OptimizerFactory:
    def factory(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return _PinnedSGD(
            parameters, foreach=foreach, lr=lr, momentum=momentum, weight_decay=weight_decay
        )

    return factory


def foreach_sgd(
    lr: float = LEARNING_RATE, momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY
) -> Candidate:
    """SGD's multi-tensor (``foreach=True``) implementation: the default on GPUs.

    Same update rule as the per-parameter loop, computed with horizontally fused kernels.
    """
    return Candidate(
        name="sgd-foreach",
        optimizer_factory=_sgd_factory(True, lr, momentum, weight_decay),
        description=f"torch.optim.SGD(foreach=True, lr={lr}, momentum={momentum}, "
        f"weight_decay={weight_decay})",
    )


def for_loop_sgd(
    lr: float = LEARNING_RATE, momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY
) -> Candidate:
    """SGD's single-tensor (``foreach=False``) implementation: one parameter at a time."""
    return Candidate(
        name="sgd-for-loop",
        optimizer_factory=_sgd_factory(False, lr, momentum, weight_decay),
        description=f"torch.optim.SGD(foreach=False, lr={lr}, momentum={momentum}, "
        f"weight_decay={weight_decay})",
    )


class FusedSGD(torch.optim.Optimizer):
    """SGD with momentum and L2 weight decay written as one hand-fused update per tensor.

    Correct with the default knobs (it follows ``torch.optim.SGD``: the momentum buffer starts
    as the first decayed gradient, no dampening, no Nesterov) and keeps SGD's state layout
    (``momentum_buffer``), so it re-syncs from a reference ``torch.optim.SGD``. The knobs
    reproduce bugs of hand-written fused kernels:

    - ``decay_applications=2``: weight decay added to the gradient twice;
    - ``hardcoded_momentum``: a momentum constant baked into the kernel instead of the group's.

    Learning rate, momentum and weight decay are read from the parameter groups at every step,
    so a bug lives in the arithmetic, not in a hyper-parameter a state dict could overwrite.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = LEARNING_RATE,
        momentum: float = MOMENTUM,
        weight_decay: float = WEIGHT_DECAY,
        *,
        decay_applications: int = 1,
        hardcoded_momentum: float | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.decay_applications = decay_applications
        self.hardcoded_momentum = hardcoded_momentum

    @torch.no_grad()  # type: ignore[untyped-decorator,unused-ignore]
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            momentum = float(group["momentum"])
            if self.hardcoded_momentum is not None:
                momentum = self.hardcoded_momentum
            decay = float(group["weight_decay"]) * self.decay_applications
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                direction = parameter.grad.add(parameter, alpha=decay)
                if momentum != 0:
                    state = self.state[parameter]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = direction.clone()
                        state["momentum_buffer"] = buffer
                    else:
                        buffer.mul_(momentum).add_(direction)
                    direction = buffer
                parameter.add_(direction, alpha=-lr)
        return loss


def _fused_sgd_factory(
    lr: float,
    momentum: float,
    weight_decay: float,
    *,
    decay_applications: int = 1,
    hardcoded_momentum: float | None = None,
) -> OptimizerFactory:
    def factory(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return FusedSGD(
            parameters,
            lr,
            momentum,
            weight_decay,
            decay_applications=decay_applications,
            hardcoded_momentum=hardcoded_momentum,
        )

    return factory


def weight_decay_doubled(
    lr: float = LEARNING_RATE, momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY
) -> Candidate:
    """BUG: a fused SGD kernel that adds the L2 weight-decay term to the gradient twice.

    Occurs when decay is applied both by the fused optimizer and by the code around it (a
    trainer that adds ``wd * w`` to gradients for "all optimizers", a port from a framework
    whose optimizer did not decay, an epilogue copied into two kernels). Subtle: the decay term
    is small against the gradient early in training, and grows in importance as gradients
    shrink.
    """
    return Candidate(
        name="weight-decay-doubled",
        optimizer_factory=_fused_sgd_factory(lr, momentum, weight_decay, decay_applications=2),
        description="fused SGD adding the weight-decay term twice",
    )


def wrong_momentum(
    momentum: float = 0.99,
    lr: float = LEARNING_RATE,
    weight_decay: float = WEIGHT_DECAY,
) -> Candidate:
    """BUG: a fused SGD kernel with a hard-coded momentum (0.99) instead of the group's (0.9).

    Occurs in hand-written fused optimizers whose momentum is a compile-time constant or a
    default that never receives the configured value. Invisible at step 1 (PyTorch's momentum
    buffer starts as the first gradient), from step 2 on the update is too large.
    """
    return Candidate(
        name=f"wrong-momentum-{momentum:g}",
        optimizer_factory=_fused_sgd_factory(
            lr, MOMENTUM, weight_decay, hardcoded_momentum=momentum
        ),
        description=f"fused SGD with momentum hard-coded to {momentum:g}",
    )


# --------------------------------------------------------------------------------------------
# Gradient exchanges over virtual workers
# --------------------------------------------------------------------------------------------


def _rounding_exchange(dtype: torch.dtype) -> GradientExchange:
    def exchange(per_worker: Sequence[Sequence[torch.Tensor]], step: int) -> list[torch.Tensor]:
        rounded = [[g.to(dtype).to(g.dtype) for g in grads] for grads in per_worker]
        return mean_over_workers(rounded)

    return exchange


def fp16_exchange(workers: int = 4) -> Candidate:
    """Gradient all-reduce in float16: each worker's gradients rounded to fp16, then averaged.

    Models DDP's fp16 compression hook (``fp16_compress_hook``) and NCCL reductions of fp16
    gradients: a correct lossy exchange with relative error 2^-11 per element.
    """
    return Candidate(
        name=f"fp16-exchange-{workers}",
        exchange=_rounding_exchange(torch.float16),
        workers=workers,
        description=f"gradients rounded to float16 on each of {workers} workers, then averaged",
    )


def bf16_exchange(workers: int = 4) -> Candidate:
    """Gradient all-reduce in bfloat16: each worker's gradients rounded to bf16, then averaged.

    Models DDP's ``bf16_compress_hook``: a correct lossy exchange with relative error 2^-8 per
    element, the default region's tolerance.
    """
    return Candidate(
        name=f"bf16-exchange-{workers}",
        exchange=_rounding_exchange(torch.bfloat16),
        workers=workers,
        description=f"gradients rounded to bfloat16 on each of {workers} workers, then averaged",
    )


def int8_exchange(
    workers: int = 4, partitions: int = 4, last_partition_scale: float = 1.0
) -> Candidate:
    """Int8 gradient compression with per-partition scales, averaged over ``workers``.

    Each worker's gradients are flattened into one vector, split into ``partitions`` nearly
    equal chunks, each quantized to int8 with its own scale ``max|x| / 127`` and de-quantized;
    the de-quantized vectors are averaged. ``last_partition_scale=1.0`` is correct. Any other
    value is the bug of the LoGM paper's case study (Shen et al.): the last partition
    de-quantized with a wrong scale, so the parameters stored there (usually the classifier)
    train with a gradient ``last_partition_scale`` times too large.
    """

    def exchange(per_worker: Sequence[Sequence[torch.Tensor]], step: int) -> list[torch.Tensor]:
        restored = []
        for grads in per_worker:
            flat = flatten_gradients(grads)
            sent = quantize_int8_partitions(flat, partitions, last_partition_scale)
            restored.append(unflatten_gradients(sent, grads))
        return mean_over_workers(restored)

    suffix = "" if last_partition_scale == 1.0 else f"-last-x{last_partition_scale:g}"
    kind = "correct" if last_partition_scale == 1.0 else "BUG: last partition mis-scaled"
    return Candidate(
        name=f"int8-exchange-{workers}x{partitions}{suffix}",
        exchange=exchange,
        workers=workers,
        description=(
            f"int8 gradient compression in {partitions} partitions over {workers} workers, last "
            f"partition de-quantized x{last_partition_scale:g} ({kind})"
        ),
    )


def error_feedback_int8_exchange(workers: int = 4, partitions: int = 4) -> Candidate:
    """Int8 compression with per-worker error feedback (residual carried across steps).

    Each worker adds its previous quantization residual to its new gradient before quantizing
    and keeps the new residual (Seide et al. 2014, 1-bit SGD; Karimireddy et al. 2019): the
    compression error no longer accumulates in the weights. The residual is the candidate's
    private state: a co-simulation re-syncs weights, not it, which is exactly what a restarted
    job with a persisted residual does. Build a fresh candidate per run.
    """
    residuals: dict[int, torch.Tensor] = {}

    def exchange(per_worker: Sequence[Sequence[torch.Tensor]], step: int) -> list[torch.Tensor]:
        restored = []
        for worker, grads in enumerate(per_worker):
            flat = flatten_gradients(grads)
            previous = residuals.get(worker)
            if previous is not None and previous.shape == flat.shape:
                flat = flat + previous
            sent = quantize_int8_partitions(flat, partitions)
            residuals[worker] = flat - sent
            restored.append(unflatten_gradients(sent, grads))
        return mean_over_workers(restored)

    return Candidate(
        name=f"error-feedback-int8-exchange-{workers}x{partitions}",
        exchange=exchange,
        workers=workers,
        description=(
            f"int8 gradient compression in {partitions} partitions over {workers} workers with "
            "per-worker error feedback"
        ),
    )


def _sum_exchange(per_worker: Sequence[Sequence[torch.Tensor]], step: int) -> list[torch.Tensor]:
    return [torch.stack(grads).sum(dim=0) for grads in zip(*per_worker, strict=True)]


def sum_instead_of_mean_exchange(workers: int = 4) -> Candidate:
    """BUG: an all-reduce that sums gradients without dividing by the number of workers.

    Occurs when code switches from a framework that averages (DDP) to a raw
    ``dist.all_reduce`` (which sums by default), or when the division happens in a hook that
    was not registered. The update is ``workers`` times too large: bias ``workers - 1``.
    """
    return Candidate(
        name=f"sum-instead-of-mean-exchange-{workers}",
        exchange=_sum_exchange,
        workers=workers,
        description=f"gradients summed over {workers} workers, not averaged",
    )


def dropped_worker_exchange(workers: int = 4) -> Candidate:
    """BUG: one worker's gradient dropped from the reduction, the sum still divided by W.

    Occurs with straggler time-outs that zero-fill a missing contribution, a rank excluded from
    a process group by an off-by-one, or bucketed reductions that skip a bucket on one rank.
    The update shrinks by about 1/W and picks up the dropped shard's noise.
    """

    def exchange(per_worker: Sequence[Sequence[torch.Tensor]], step: int) -> list[torch.Tensor]:
        count = len(per_worker)
        kept = per_worker[:-1]
        return [torch.stack(grads).sum(dim=0) / count for grads in zip(*kept, strict=True)]

    return Candidate(
        name=f"dropped-worker-exchange-{workers}",
        exchange=exchange,
        workers=workers,
        description=f"last of {workers} workers' gradients dropped, sum still divided by {workers}",
    )


# --------------------------------------------------------------------------------------------
# Gradient, step and kernel bugs
# --------------------------------------------------------------------------------------------


def _one_gradient(
    parameter: str, change: Callable[[torch.Tensor, int], None]
) -> Callable[[Sequence[tuple[str, torch.Tensor]], int], None]:
    """A gradient transform that applies ``change`` to ``parameter``'s gradient in place."""

    def transform(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        for name, gradient in named:
            if name == parameter:
                change(gradient, step)
                return
        if step == 1:
            names = ", ".join(name for name, _ in named[:8])
            raise ValueError(f"no gradient for parameter {parameter!r}; parameters: {names}, ...")

    return transform


def _tail_rows(gradient: torch.Tensor, fraction: float) -> int:
    return max(1, int(gradient.shape[0] * fraction)) if gradient.dim() > 0 else 0


def scaled_layer_gradient(parameter: str, factor: float = 0.5) -> Candidate:
    """BUG: one parameter's gradient multiplied by ``factor`` (halved by default).

    Occurs with weights shared between two uses whose gradient a hand-written backward averages
    instead of sums, per-layer gradient scaling (LARS-style, or a loss scale) not undone for one
    layer, or a pipeline-parallel stage that divides its gradients by the micro-batch count
    twice. Signature: bias ``factor - 1`` on that parameter from step 1.
    """

    def scale(gradient: torch.Tensor, step: int) -> None:
        gradient.mul_(factor)

    return Candidate(
        name=f"layer-gradient-x{factor:g}",
        gradient_transform=_one_gradient(parameter, scale),
        description=f"gradient of {parameter} multiplied by {factor:g}",
    )


def dropped_gradient_rows(parameter: str, fraction: float = 0.125) -> Candidate:
    """BUG: the last ``fraction`` of one parameter's gradient rows is never written (zero).

    A tiled backward kernel whose grid is ``rows // tile`` instead of ``ceil(rows / tile)``
    skips the remainder tile; the rows it should have written keep the zeros of a fresh
    gradient buffer. Every step loses the same slice: a moderate error that returns each step,
    mostly off the update's direction (those weights stop learning; the rest train on).
    """

    def drop(gradient: torch.Tensor, step: int) -> None:
        gradient[-_tail_rows(gradient, fraction) :].zero_()

    return Candidate(
        name=f"dropped-gradient-rows-{fraction:g}",
        gradient_transform=_one_gradient(parameter, drop),
        description=f"last {fraction:g} of the rows of {parameter}'s gradient left at zero",
    )


def rotated_gradient_rows(parameter: str) -> Candidate:
    """BUG: one parameter's gradient rows written one row down (the last row to the first).

    An off-by-one in a backward kernel's output index (``row + 1`` modulo the row count, a
    tile offset applied twice): each weight row receives its neighbour's gradient. The
    gradient's norm is unchanged and, under an optimizer that normalizes each element's
    update (Adam), so is the update's size: a direction-only error, every step.
    """

    def rotate(gradient: torch.Tensor, step: int) -> None:
        gradient.copy_(torch.roll(gradient, shifts=1, dims=0))

    return Candidate(
        name="rotated-gradient-rows",
        gradient_transform=_one_gradient(parameter, rotate),
        description=f"rows of {parameter}'s gradient shifted by one (direction-only)",
    )


def stale_gradient_rows(parameter: str, fraction: float = 0.5) -> Candidate:
    """BUG: the last ``fraction`` of one parameter's gradient rows is the previous step's.

    A race in a double-buffered or overlapped gradient kernel: the tiles written after the
    buffers are swapped land in the buffer the optimizer reads a step later. Every step part
    of the gradient is one step old, a moderate recurring error with little bias at first
    (consecutive gradients point roughly the same way). The candidate keeps the previous
    rows as private state: build a fresh candidate per run.
    """
    previous: list[torch.Tensor] = []

    def stale(gradient: torch.Tensor, step: int) -> None:
        rows = _tail_rows(gradient, fraction)
        current = gradient[-rows:].clone()
        if previous and previous[0].shape == current.shape:
            gradient[-rows:].copy_(previous[0])
        previous[:] = [current]

    return Candidate(
        name=f"stale-gradient-rows-{fraction:g}",
        gradient_transform=_one_gradient(parameter, stale),
        description=f"last {fraction:g} of the rows of {parameter}'s gradient one step old",
    )


def stale_gradient() -> Candidate:
    """BUG: every step applies the previous step's gradient (step 1 applies its own).

    Occurs in asynchronous or pipelined trainers that overlap communication with the next
    forward pass and read the gradient buffer one step late, or in double-buffered gradient
    accumulation with swapped buffers. The candidate keeps the previous gradients as private
    state: build a fresh candidate per run.
    """
    previous: dict[str, torch.Tensor] = {}

    def transform(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        for name, gradient in named:
            current = gradient.clone()
            old = previous.get(name)
            if old is not None and old.shape == gradient.shape:
                gradient.copy_(old)
            previous[name] = current

    return Candidate(
        name="stale-gradient",
        gradient_transform=transform,
        description="each step applies the previous step's gradients",
    )


def accumulation_without_division(micro_batches: int = 4) -> Candidate:
    """BUG: gradient accumulation over micro-batches that forgets to divide the loss.

    The textbook mistake of gradient accumulation (and of many hand-rolled trainers): each
    micro-batch's mean loss is back-propagated as is, so the accumulated gradient is
    ``micro_batches`` times the batch gradient. Signature: bias about ``micro_batches - 1``.
    """

    def step_fn(context: StepContext, batch: Batch) -> torch.Tensor:
        losses = []
        for micro in context.split(batch, micro_batches):
            loss = context.loss(micro)
            context.backward(loss)  # BUG: should be loss / micro_batches
            losses.append(loss.detach())
        context.optimizer_step()
        return torch.stack(losses).mean()

    return Candidate(
        name=f"accumulation-without-division-{micro_batches}",
        step_fn=step_fn,
        description=(
            f"gradients accumulated over {micro_batches} micro-batches without dividing the loss"
        ),
    )


def loss_scale_mismatch(scale: float = 1024.0, unscale: float = 512.0) -> Candidate:
    """BUG: mixed-precision loss scaling undone with the wrong factor.

    The loss is multiplied by ``scale`` before backward and the gradients divided by
    ``unscale``: the update is ``scale / unscale`` times too large. Occurs with dynamic loss
    scalers whose scale grew (here 512 -> 1024) while the unscale step read the old value, or
    with a scale hard-coded in two places. Steps with non-finite gradients are skipped, as a
    real scaler does.
    """

    def step_fn(context: StepContext, batch: Batch) -> torch.Tensor:
        loss = context.loss(batch)
        (loss * scale).backward()  # type: ignore[no-untyped-call]
        gradients = [p.grad for p in context.model.parameters() if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in gradients):
            for gradient in gradients:
                gradient.div_(unscale)
            context.optimizer.step()
        return loss

    return Candidate(
        name=f"loss-scale-mismatch-{scale:g}-{unscale:g}",
        step_fn=step_fn,
        description=f"loss scaled by {scale:g}, gradients unscaled by {unscale:g}",
    )


def _no_bias_kernel(original: Conv2d) -> Conv2d:
    def conv2d(
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        return original(input, weight, None, *args, **kwargs)

    return conv2d


def conv_without_bias() -> Candidate:
    """BUG: a convolution kernel that forgets to add the bias.

    Occurs in hand-written or fused convolution kernels (conv + activation fusions, custom
    Triton/CUDA kernels, conv-BN folding done at training time) whose epilogue drops the bias.
    The bias then receives no gradient and moves by weight decay and momentum only. Models
    without convolution biases (batch-norm ResNets) are unaffected: there it is the reference.
    """
    return Candidate(
        name="conv-without-bias",
        context=lambda: _conv2d_patched(_no_bias_kernel),
        description="conv2d ignoring its bias",
    )


def _fp16_kernel(original: Conv2d) -> Conv2d:
    def rounded(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(torch.float16).to(tensor.dtype)

    def conv2d(
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        output = original(
            rounded(input),
            rounded(weight),
            None if bias is None else rounded(bias),
            *args,
            **kwargs,
        )
        return rounded(output)

    return conv2d


def fp16_conv_accumulation() -> Candidate:
    """GRAY ZONE: convolution with float16 operands and a float16 output.

    Models a reduced-precision kernel (tensor-core convolutions with fp16 inputs and outputs,
    a half-precision inference kernel reused for training): inputs, weights and bias rounded to
    fp16, the product accumulated in float32, the output rounded to fp16. The casts' backward
    rounds the gradients flowing through the convolution to fp16 as well, as a half-precision
    backward kernel would, including fp16's underflow of tiny gradients. Correct as a kernel;
    whether it is precise enough is what a region's tolerance decides.
    """
    return Candidate(
        name="fp16-conv",
        context=lambda: _conv2d_patched(_fp16_kernel),
        description="conv2d with float16-rounded operands and output",
    )


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------

_TF32_OPS = frozenset(
    {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.convolution.default,
        torch.ops.aten.convolution_backward.default,
    }
)


def _to_tf32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` rounded to TF32's 10-bit mantissa, to nearest even (a float32 tensor)."""
    bits = tensor.contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


class _TF32Matmuls(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Every matmul and convolution, forward and backward, on float32 inputs rounded to TF32."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in _TF32_OPS:
            args = tuple(
                _to_tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                for a in args
            )
        return func(*args, **(kwargs or {}))


def tf32_matmuls() -> Candidate:
    """TF32 tensor cores, emulated on any device: the inputs of every matmul and convolution
    (forward and backward) rounded to 10-bit mantissas, float32 accumulation.

    What ``torch.backends.cuda.matmul.allow_tf32 = True`` does on an Ampere or later GPU: a
    legitimate precision mode (the ``tf32`` policy), measurable on a CPU through this.
    """
    return Candidate(
        name="tf32-matmuls",
        context=_TF32Matmuls,
        description="matmul and convolution inputs rounded to TF32 (10-bit mantissas)",
    )
