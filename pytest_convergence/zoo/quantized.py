"""Quantized training: BinaryConnect, and stochastic rounding onto a fixed-point grid.

Li et al. 2017 ("Training Quantized Nets: A Deeper Understanding") compare two ways of training
a network whose weights end up low-precision:

- **BinaryConnect** (Courbariaux et al. 2015) keeps a full-precision copy ``w`` of every weight
  for the update and uses binary weights ``sign(w)`` (+1 where ``w >= 0``, else -1) in the
  forward and backward passes. The gradient with respect to the binary weights updates ``w``
  directly (straight through), and ``w`` is clipped to [-1, 1] after every step so that it
  stays where a few updates can flip its sign. The full-precision copy is what lets many small
  updates add up; Li et al. trace BinaryConnect's lead over purely quantized training to it.
- **Stochastic rounding** (Gupta et al. 2015) keeps no full-precision copy: weights live on a
  fixed-point grid of step ``delta``, and every updated weight is rounded onto it, up with a
  probability equal to the fraction of a step it lies above the grid point below. An update
  smaller than ``delta`` then still moves a weight, in expectation by exactly its size.
  Round-to-nearest would drop every update below ``delta / 2``: training stalls.

Workloads (registered on import, 8 steps of 16-sample synthetic batches):

- ``binaryconnect-mlp``: :class:`BinaryConnectMLP`, three binary linear layers with batch norm,
  SGD lr 1.0, momentum 0.9, no weight decay; after each step the full-precision weights are
  clipped to [-1, 1] (:func:`clip_binary_weights`). Batch norm makes the loss depend on the
  signs of the weights only, so the rate sets how fast weights cross the [-1, 1] box, not a
  step on the loss: at 1.0 about 1% of the weights flip sign and as many reach the clipping
  bound within the 8 steps (at the zoo's 0.05, 0.1%: a BinaryConnect whose binary weights
  barely change).
- ``stochastic-rounding-lenet5``: :class:`FixedPointLeNet5`, LeNet-5 whose every parameter is
  stored on the 8-bit fixed-point grid <1, 7> (step 2^-7, range [-1, 1 - 2^-7]); plain SGD
  lr 0.05 (the update rule Li et al. analyse), each updated weight stochastically rounded
  onto the grid (:func:`stochastic_rounding`).

Candidates, one factory each:

- :func:`popcount_binary_linear` (legitimate): a multiplication-free binary-weight kernel.
- :func:`binarized_weight_update` (BUG): updates applied to the binarized weights.
- :func:`fused_stochastic_rounding` (legitimate): one vectorized rounding over all parameters.
- :func:`round_to_nearest` (BUG): deterministic rounding instead of stochastic rounding.

What such weights do to the statistics: clipped BinaryConnect weights sit at exactly +-1 (many
equal magnitudes, log10|w| = 0), and grid weights take a few dozen values with many exact zeros
(8% of LeNet-5's ``fc1`` weights). LoGM is taken over nonzero weights with zeros counted apart,
and the region checks the update (its bias and noise) and the zero count, none of which needs
distinct magnitudes: the default regions pass both legitimate kernels and catch both bugs at
step 1 on every held-out seed (100-104). One weakness is measured, not fixed here: stochastic
rounding moves a weight by a whole step or not at all, so a perturbation changes an update only
where a draw lies right at a rounding threshold. On small tensors (the bias vectors) the 12
calibration runs saw no change at all, and the region admits none (noise limit 0, bias spread
at its floor): a candidate that is legitimately less exact than the kernels here, such as a
bf16 gradient exchange, fails on one held-out seed of five.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pytest_convergence.batches import Batch
from pytest_convergence.candidates import Candidate
from pytest_convergence.training_step import StepContext
from pytest_convergence.workloads import Workload, sgd, synthetic_classification
from pytest_convergence.zoo.models import LeNet5

__all__ = [
    "BINARYCONNECT_MLP",
    "STOCHASTIC_ROUNDING_LENET5",
    "BinaryConnectMLP",
    "BinaryLinear",
    "BinaryLinearKernel",
    "FixedPointGrid",
    "FixedPointLeNet5",
    "binarize",
    "binarized_weight_update",
    "binary_linear",
    "binaryconnect_mlp",
    "clip_binary_weights",
    "fixed_point_lenet5",
    "fused_stochastic_rounding",
    "fused_stochastic_rounding_step",
    "grid_of",
    "popcount_binary_linear",
    "popcount_binary_linear_kernel",
    "round_to_nearest",
    "round_to_nearest_step",
    "stochastic_rounding",
]

# (inputs, full-precision weight, bias) -> outputs computed with the binarized weight.
BinaryLinearKernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]


# --------------------------------------------------------------------------------------------
# BinaryConnect
# --------------------------------------------------------------------------------------------


def binarize(weight: Tensor) -> Tensor:
    """Deterministic BinaryConnect binarization: +1 where ``weight >= 0``, else -1.

    Not ``torch.sign``, which maps 0 to 0: a binary weight has no third value.
    """
    return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)


class _StraightThroughSign(torch.autograd.Function):
    """``binarize`` forward; the gradient passes to the full-precision weight unchanged."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        return binarize(weight)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        return grad_output


def binary_linear(inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The reference binary-weight linear layer: ``F.linear`` with ``binarize(weight)``."""
    binary = cast(Tensor, _StraightThroughSign.apply(weight))  # type: ignore[no-untyped-call]
    return F.linear(inputs, binary, bias)


class _PopcountBinaryLinear(torch.autograd.Function):
    """``x @ sign(W)^T`` as ``2 (x @ M^T) - sum(x)`` with the bit mask ``M = [W >= 0]``.

    Binary-weight kernels store one bit per weight and never multiply: each output is twice the
    sum of the inputs whose weight bit is set, minus the sum of all inputs. The same products in
    another arithmetic, with a hand-written backward of the same shape.
    """

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        bits = (weight >= 0).to(inputs.dtype)
        ctx.save_for_backward(inputs, bits)
        ctx.has_bias = bias is not None
        outputs = inputs.matmul(bits.t()).mul_(2).sub_(inputs.sum(dim=-1, keepdim=True))
        return outputs if bias is None else outputs.add_(bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        inputs, bits = ctx.saved_tensors
        grad_inputs = grad_output.matmul(bits).mul_(2).sub_(grad_output.sum(dim=-1, keepdim=True))
        # Straight through: the binary weight's gradient goes to the full-precision weight.
        grad_weight = (
            grad_output.reshape(-1, grad_output.shape[-1])
            .t()
            .matmul(inputs.reshape(-1, inputs.shape[-1]))
        )
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(dim=0)
        return grad_inputs, grad_weight, grad_bias if ctx.has_bias else None


def popcount_binary_linear_kernel(inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:class:`_PopcountBinaryLinear` as a :data:`BinaryLinearKernel`."""
    return cast(Tensor, _PopcountBinaryLinear.apply(inputs, weight, bias))  # type: ignore[no-untyped-call]


class BinaryLinear(nn.Linear):
    """A linear layer of BinaryConnect: ``self.weight`` is the full-precision copy, the forward
    pass uses its binarization through ``self.kernel`` (a candidate may swap the kernel).

    Weights start uniform in [-1, 1], the clipping range (Courbariaux et al.'s ``H = 1``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        nn.init.uniform_(self.weight, -1.0, 1.0)
        self.kernel: BinaryLinearKernel = binary_linear

    def forward(self, inputs: Tensor) -> Tensor:
        return self.kernel(inputs, self.weight, self.bias)


class BinaryConnectMLP(nn.Module):
    """A narrowed version of Courbariaux et al.'s permutation-invariant BinaryConnect MLP: binary
    linear layers of 128, 128 and ``num_classes`` units, each followed by batch norm (the output
    layer too), ReLU between them.

    Batch norm carries the scale that binary weights lack (a +-1 layer multiplies its input's
    scale by about the square root of its fan-in); its parameters stay full precision.
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = BinaryLinear(in_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = BinaryLinear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.fc3 = BinaryLinear(hidden, num_classes)
        self.bn3 = nn.BatchNorm1d(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        logits: Tensor = self.bn3(self.fc3(x))
        return logits


def binaryconnect_mlp() -> BinaryConnectMLP:
    """A fresh :class:`BinaryConnectMLP` for 64-dimensional inputs and 10 classes."""
    return BinaryConnectMLP()


def _binary_layers(model: nn.Module) -> Iterator[BinaryLinear]:
    return (module for module in model.modules() if isinstance(module, BinaryLinear))


def clip_binary_weights(model: nn.Module) -> None:
    """BinaryConnect's post-step code: every binary layer's full-precision weight clipped to
    [-1, 1]. Beyond it a weight's sign could not flip within a few updates any more."""
    for layer in _binary_layers(model):
        layer.weight.clamp_(-1.0, 1.0)


def _use_popcount_kernel(model: nn.Module) -> nn.Module:
    for layer in _binary_layers(model):
        layer.kernel = popcount_binary_linear_kernel
    return model


def popcount_binary_linear() -> Candidate:
    """Binary layers computed by a multiplication-free kernel: ``2 (x @ M^T) - sum(x)``.

    Models the bit-packed kernels binary-weight networks are deployed with (one bit per weight,
    additions only), here also used for training, with their own backward. Legitimate: the same
    products as ``F.linear`` with +-1 weights, in another arithmetic (a difference of two sums,
    so a little cancellation). Swaps the kernel of every :class:`BinaryLinear`; parameters and
    the straight-through gradient stay the reference's.
    """
    return Candidate(
        name="popcount-binary-linear",
        model_transform=_use_popcount_kernel,
        description="binary layers as 2 (x @ M^T) - sum(x) with the weight bit mask M",
    )


def _binarized_update_step(context: StepContext, batch: Batch) -> Tensor:
    with torch.no_grad():
        for layer in _binary_layers(context.model):
            layer.weight.copy_(binarize(layer.weight))
    loss = context.loss(batch)
    context.backward(loss)
    # BUG: the full-precision weights were never restored; the update lands on +-1.
    context.optimizer_step()
    return loss


def binarized_weight_update() -> Candidate:
    """BUG: the update is applied to the binarized weights instead of the full-precision copy.

    Occurs in the common PyTorch BinaryConnect pattern that binarizes ``weight.data`` in place
    before the forward pass and keeps the real values in a side copy (``weight.org``): when the
    copy is not restored before ``optimizer.step()`` (a refactor that moves the restore, an
    optimizer wrapper that steps first), every step starts from +-1 and the accumulated small
    updates, the point of BinaryConnect, are lost. Replaces the whole step (``step_fn``).
    Signature: at step 1 the binary layers' weights jump onto +-1 (their LoGM towards 0): an
    update error over a hundred times the reference update, far beyond the noise limit.
    """
    return Candidate(
        name="binarized-weight-update",
        step_fn=_binarized_update_step,
        description="updates applied to the binarized weights, full-precision copy lost",
    )


# --------------------------------------------------------------------------------------------
# Stochastic rounding onto a fixed-point grid
# --------------------------------------------------------------------------------------------


# Stochastic rounding decides in float64: a float32 weight over a power-of-two step, plus a
# float32 draw, is then an exact sum, so a rounding depends on the draw alone and two correct
# formulations agree bit for bit.
_EXACT = torch.float64


@dataclass(frozen=True)
class FixedPointGrid:
    """Signed fixed-point numbers <IL, FL> (Gupta et al. 2015): ``integer_bits`` bits before
    the binary point (the sign included) and ``fraction_bits`` after it.

    The step is ``2^-fraction_bits``, so scaling onto the integer codes and back is exact in
    floating point; codes are clamped to the representable range.
    """

    integer_bits: int = 1
    fraction_bits: int = 7

    def __post_init__(self) -> None:
        if self.integer_bits < 1:
            raise ValueError(f"integer_bits must be >= 1 (the sign), got {self.integer_bits}")
        if self.fraction_bits < 0:
            raise ValueError(f"fraction_bits must be >= 0, got {self.fraction_bits}")

    @property
    def step(self) -> float:
        return 2.0**-self.fraction_bits

    @property
    def lowest_code(self) -> int:
        return -(1 << (self.integer_bits + self.fraction_bits - 1))

    @property
    def highest_code(self) -> int:
        return (1 << (self.integer_bits + self.fraction_bits - 1)) - 1

    def nearest(self, values: Tensor) -> Tensor:
        """``values`` rounded to the nearest grid point (ties to even), clamped to the range."""
        codes = torch.round(values.to(_EXACT) / self.step)
        return self._values(codes, values.dtype)

    def stochastic(self, values: Tensor, noise: Tensor) -> Tensor:
        """``values`` rounded up with probability equal to their fraction of a step, given
        ``noise`` uniform in [0, 1) of the same shape: ``floor(values / step + noise)``."""
        codes = torch.floor(values.to(_EXACT) / self.step + noise.to(_EXACT))
        return self._values(codes, values.dtype)

    def contains(self, values: Tensor) -> bool:
        """Whether every value is a representable grid point."""
        codes = values.to(_EXACT) / self.step
        return bool(
            torch.all(codes == torch.round(codes))
            and torch.all((codes >= self.lowest_code) & (codes <= self.highest_code))
        )

    def _values(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        return codes.clamp_(self.lowest_code, self.highest_code).mul_(self.step).to(dtype)


class FixedPointLeNet5(LeNet5):
    """:class:`~pytest_convergence.zoo.models.LeNet5` with every parameter on ``grid``.

    The initial weights are rounded to the nearest grid point; from then on the training loop's
    post-step code keeps them there. ``grid`` is an attribute of the model because the post-step
    code receives only the model.
    """

    def __init__(self, grid: FixedPointGrid | None = None, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.grid = grid if grid is not None else FixedPointGrid()
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(self.grid.nearest(parameter))


def fixed_point_lenet5() -> FixedPointLeNet5:
    """A fresh :class:`FixedPointLeNet5` on the 8-bit grid <1, 7>."""
    return FixedPointLeNet5()


def grid_of(model: nn.Module) -> FixedPointGrid:
    """The fixed-point grid a model's weights live on (its ``grid`` attribute)."""
    grid = getattr(model, "grid", None)
    if not isinstance(grid, FixedPointGrid):
        raise TypeError(
            f"{type(model).__name__} has no FixedPointGrid in its 'grid' attribute; "
            "rounding onto a grid needs a model built for one (e.g. FixedPointLeNet5)"
        )
    return grid


def _uniform_noise(shape: torch.Size | tuple[int, ...], device: torch.device) -> Tensor:
    """Float32 uniform [0, 1) draws (24 random bits a weight) from the global CPU generator,
    whatever the weights' device: the draws then depend on the seed and on how many were taken,
    never on the device (CUDA's generator would give a fused kernel other numbers than a
    per-tensor loop)."""
    return torch.rand(shape, dtype=torch.float32).to(device)


def stochastic_rounding(model: nn.Module) -> None:
    """The reference post-step code: each parameter, in order, stochastically rounded onto the
    model's grid, one uniform draw per weight from the global generator."""
    grid = grid_of(model)
    for parameter in model.parameters():
        noise = _uniform_noise(parameter.shape, parameter.device)
        parameter.copy_(grid.stochastic(parameter, noise))


def fused_stochastic_rounding_step(model: nn.Module) -> None:
    """All parameters rounded in one vectorized pass over their concatenation.

    Draws as many uniforms as the per-tensor loop, in the same order, and compares each with
    the fraction a round-down would discard: round up exactly when ``noise >= 1 - fraction``,
    the comparison stochastic-rounding hardware makes with its random bits, equivalent to
    ``floor(values / step + noise)`` without forming that sum.
    """
    grid = grid_of(model)
    parameters = list(model.parameters())
    if not parameters:
        return
    flat = torch.cat([parameter.detach().reshape(-1).to(_EXACT) for parameter in parameters])
    noise = _uniform_noise(flat.shape, flat.device).to(_EXACT)
    scaled = torch.ldexp(flat, torch.tensor(grid.fraction_bits, device=flat.device))
    codes = torch.floor(scaled)
    discarded = scaled.sub_(codes)
    codes.add_(noise >= discarded.neg_().add_(1.0))
    values = codes.clamp_(grid.lowest_code, grid.highest_code).mul_(grid.step)
    pieces = torch.split(values, [parameter.numel() for parameter in parameters])
    for parameter, piece in zip(parameters, pieces, strict=True):
        parameter.copy_(piece.view_as(parameter))


def fused_stochastic_rounding() -> Candidate:
    """Stochastic rounding of all parameters in one vectorized kernel instead of a per-tensor
    loop.

    Models the fused "round every weight of the model" kernels of low-precision trainers (one
    launch over a flat buffer, the round-up decision taken by comparing random bits with the
    discarded fraction). Legitimate: the same draws, in the same order, decide the same
    roundings; only the arithmetic differs (in float64 both are exact for float32 weights, so
    they agree bit for bit). Replaces the post-step code (``after_step``) of
    :func:`stochastic_rounding`.
    """
    return Candidate(
        name="fused-stochastic-rounding",
        after_step=fused_stochastic_rounding_step,
        description="stochastic rounding of all parameters in one vectorized pass",
    )


def round_to_nearest_step(model: nn.Module) -> None:
    """Each parameter rounded to the nearest point of the model's grid."""
    grid = grid_of(model)
    for parameter in model.parameters():
        parameter.copy_(grid.nearest(parameter))


def round_to_nearest() -> Candidate:
    """BUG: the post-step rounding is round-to-nearest instead of stochastic.

    Occurs when a quantization helper's default mode is used (``torch.round``, a fake-quantize
    op, an inference-time quantizer reused for training) or a flag selecting stochastic
    rounding is dropped in a refactor. Every update smaller than half a grid step is lost, so
    with small learning rates almost every weight stays where it is; Li et al. (and Gupta et
    al. before them) show that such training stalls. Replaces the post-step code
    (``after_step``). Signature: from step 1 no weight moves where the reference's moved, an
    update bias of exactly -1 on every tensor whose updates all stay below half a step.
    """
    return Candidate(
        name="round-to-nearest",
        after_step=round_to_nearest_step,
        description="updated weights rounded to the nearest grid point, not stochastically",
    )


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------

BINARYCONNECT_MLP = Workload(
    name="binaryconnect-mlp",
    model_factory=binaryconnect_mlp,
    batches=synthetic_classification((64,), 10, batch_size=16),
    optimizer_factory=sgd(lr=1.0, momentum=0.9, weight_decay=0.0),
    steps=8,
    description="BinaryConnect MLP: sign weights forward, full-precision update, clipped "
    "to [-1, 1]; 8 SGD steps on synthetic 16-sample batches",
    after_step=clip_binary_weights,
)

STOCHASTIC_ROUNDING_LENET5 = Workload(
    name="stochastic-rounding-lenet5",
    model_factory=fixed_point_lenet5,
    batches=synthetic_classification((1, 28, 28), 10, batch_size=16),
    optimizer_factory=sgd(lr=0.05, momentum=0.0, weight_decay=0.0),
    steps=8,
    description="LeNet-5 on the fixed-point grid <1, 7>, every update stochastically "
    "rounded onto it; 8 plain SGD steps on synthetic 16-sample batches",
    after_step=stochastic_rounding,
)
