"""Weight parameterizations (Zagoruyko 2017): Dirac and symmetric layers, their legitimate
re-arrangements and their bugs.

A parameterized layer computes its weight from stored parameters at every step, so the same
layer can be written as several sequences of operations: the parameterization applied as
separate operations, folded into one weight tensor, or never materialized at all. Those are the
legitimate variants a co-simulation must pass; a slip in the parameterization itself (the wrong
normalization axis, the diagonal counted twice) is a bug that trains, slowly and wrongly, without
ever raising an error.

Two workloads, registered on import:

``diracnet-mini``
    A DiracNet (Zagoruyko & Komodakis 2017, "DiracNets: training very deep neural networks
    without skip-connections") for 3x32x32 inputs: a 3x3 stem convolution to 16 channels with
    batch norm, three groups of two Dirac blocks at widths 16, 32 and 64 with 2x2 max-pools
    between groups, a final ReLU, global average pooling and one linear layer. Each block is
    ReLU, Dirac convolution, batch norm, as in the authors' code. A Dirac convolution computes
    ``y = diag(a) (I * x) + diag(b) (W_norm * x)``: ``I`` the Dirac delta (identity)
    convolution, ``W_norm`` the weight with each output filter divided by its Euclidean norm
    over its (in, kh, kw) elements; ``a`` starts at 1, ``b`` at 0.1, ``W`` is drawn from
    N(0, 1). As the paper prescribes, ``a`` and ``b`` get no weight decay (nor does any other
    vector: biases and batch-norm affine parameters); matrices and filters get 5e-4. SGD with
    lr 0.05 and momentum 0.9 on synthetic 16-sample batches, 8 steps, like the zoo's workloads.
``symmetric-mlp``
    A four-layer MLP on 64 features whose two square hidden layers (128x128) use the
    triangular symmetric parameterization ("Exploring weight symmetry in deep neural
    networks", Hu, Zagoruyko & Komodakis): ``W_hat = triu(W) + triu(W, 1)^T``, i.e. the upper
    triangle with its diagonal mirrored below it (the paper's ``diag(v) + triu(W) + triu(W)^T``
    with ``v`` stored on ``W``'s diagonal, and the PyTorch parametrizations tutorial's
    ``Symmetric`` module). SGD with lr 0.05, momentum 0.9, weight decay 5e-4, 16-sample
    batches, 8 steps.

Candidates (build a fresh one per run):

- :func:`dirac_folded` (legitimate): the Dirac parameterization folded into one weight tensor
  and one convolution, as the paper does at inference and the authors' training code does at
  every step;
- :func:`dirac_wrong_normalization_axis` (BUG): the filter normalization taken over the input
  channels (``F.normalize(weight)`` on the 4-D weight, the flattening forgotten) or over the
  output channels;
- :func:`symmetric_unfolded` (legitimate): the symmetric weight never materialized, the output
  computed from the triangle's two products, as a symmetric matrix product (SYMM) routine does;
- :func:`symmetric_diagonal_counted_twice` (BUG): ``triu(W) + triu(W)^T``, the diagonal added
  twice.

A candidate swaps the class of the layers it re-implements for a subclass that shares their
parameters, so reference and candidate keep the same parameter names and shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pytest_convergence.candidates import Candidate
from pytest_convergence.workloads import OptimizerFactory, Workload, sgd, synthetic_classification

__all__ = [
    "DIRACNET_WORKLOAD",
    "SYMMETRIC_WORKLOAD",
    "DiracBlock",
    "DiracConv2d",
    "DiracNetMini",
    "SymmetricLinear",
    "SymmetricMLP",
    "dirac_delta",
    "dirac_folded",
    "dirac_identity",
    "dirac_wrong_normalization_axis",
    "diracnet_mini",
    "filter_normalized",
    "sgd_without_vector_decay",
    "symmetric_diagonal_counted_twice",
    "symmetric_mlp",
    "symmetric_unfolded",
    "symmetrized",
]

LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
# Initial values of the Dirac scales, from the paper: the identity dominates at first.
DIRAC_ALPHA_INIT = 1.0
DIRAC_BETA_INIT = 0.1

NormalizationAxis = Literal["input", "output"]


# --------------------------------------------------------------------------------------------
# Dirac parameterization
# --------------------------------------------------------------------------------------------


def filter_normalized(weight: Tensor) -> Tensor:
    """``weight`` with each output filter divided by its Euclidean norm over (in, kh, kw)."""
    return F.normalize(weight.flatten(1), dim=1).view_as(weight)


def dirac_delta(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """The identity convolution ``I`` of a Dirac layer, generalized to unequal widths as the
    authors' ``dirac_delta``: a square delta repeated along the wider side."""
    _check_dirac_widths(in_channels, out_channels)
    width = min(in_channels, out_channels)
    square = torch.zeros(width, width, kernel_size, kernel_size, dtype=dtype, device=device)
    nn.init.dirac_(square)
    repeats = (max(out_channels // in_channels, 1), max(in_channels // out_channels, 1), 1, 1)
    return square.repeat(*repeats)


def dirac_identity(inputs: Tensor, out_channels: int) -> Tensor:
    """``I * x`` without a convolution: channels repeated (widening) or summed in groups
    (narrowing), exactly what :func:`dirac_delta` computes as a padded stride-1 convolution."""
    in_channels = inputs.shape[1]
    _check_dirac_widths(in_channels, out_channels)
    if out_channels >= in_channels:
        return inputs.repeat(1, out_channels // in_channels, 1, 1)
    batch, _, height, width = inputs.shape
    groups = inputs.reshape(batch, in_channels // out_channels, out_channels, height, width)
    return groups.sum(dim=1)


def _check_dirac_widths(in_channels: int, out_channels: int) -> None:
    wider, narrower = max(in_channels, out_channels), min(in_channels, out_channels)
    if narrower < 1 or wider % narrower:
        raise ValueError(
            f"a Dirac layer needs one width to divide the other, got in_channels={in_channels}, "
            f"out_channels={out_channels}"
        )


class DiracConv2d(nn.Module):
    """Dirac-parameterized 3x3 (or any odd size) convolution, stride 1, 'same' padding, no bias.

    ``y = diag(alpha) (I * x) + diag(beta) (filter_normalized(weight) * x)``, computed as the
    definition reads: the identity path and one convolution with the normalized weight, scaled
    per output channel and added. :meth:`folded_weight` is the single equivalent weight.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        _check_dirac_widths(in_channels, out_channels)
        if kernel_size % 2 == 0:
            raise ValueError(f"a Dirac convolution needs an odd kernel_size, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.alpha = nn.Parameter(torch.full((out_channels,), DIRAC_ALPHA_INIT))
        self.beta = nn.Parameter(torch.full((out_channels,), DIRAC_BETA_INIT))

    def normalized_weight(self) -> Tensor:
        return filter_normalized(self.weight)

    def folded_weight(self) -> Tensor:
        """``diag(alpha) I + diag(beta) W_norm``: one weight tensor for one convolution."""
        delta = dirac_delta(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            dtype=self.weight.dtype,
            device=self.weight.device,
        )
        alpha = self.alpha.view(-1, 1, 1, 1)
        beta = self.beta.view(-1, 1, 1, 1)
        return alpha * delta + beta * self.normalized_weight()

    def forward(self, x: Tensor) -> Tensor:
        identity = dirac_identity(x, self.out_channels)
        convolved = F.conv2d(x, self.normalized_weight(), padding=self.kernel_size // 2)
        return self.alpha.view(1, -1, 1, 1) * identity + self.beta.view(1, -1, 1, 1) * convolved


class _FoldedDiracConv2d(DiracConv2d):
    """One convolution with the folded weight: the same layer, other arithmetic."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.folded_weight(), padding=self.kernel_size // 2)


class _InputAxisNormalizedDiracConv2d(DiracConv2d):
    """BUG: ``F.normalize(weight)`` on the 4-D weight: its default ``dim=1`` normalizes each
    (filter, kh, kw) column over the input channels, not each filter over all its elements."""

    def normalized_weight(self) -> Tensor:
        return F.normalize(self.weight, dim=1)


class _OutputAxisNormalizedDiracConv2d(DiracConv2d):
    """BUG: the flattened weight normalized along ``dim=0``: across filters, not within one."""

    def normalized_weight(self) -> Tensor:
        return F.normalize(self.weight.flatten(1), dim=0).view_as(self.weight)


class DiracBlock(nn.Module):
    """ReLU, Dirac convolution, batch norm: one layer of a DiracNet group (no skip connection,
    the identity lives in the weight)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DiracConv2d(in_channels, out_channels)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        normalized: Tensor = self.bn(self.conv(F.relu(x)))
        return normalized


class DiracNetMini(nn.Module):
    """DiracNet for 3x32x32 inputs: stem, three groups of Dirac blocks, pooling, classifier.

    Groups run at 32x32, 16x16 and 8x8 with widths ``widths``; the first block of a group
    changes the width (its identity repeats channels), as in the authors' code.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks_per_group: int = 2,
    ) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(widths[0])
        self.group0 = self._group(widths[0], widths[0], blocks_per_group)
        self.group1 = self._group(widths[0], widths[1], blocks_per_group)
        self.group2 = self._group(widths[1], widths[2], blocks_per_group)
        self.fc = nn.Linear(widths[2], num_classes)

    @staticmethod
    def _group(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
        first = DiracBlock(in_channels, out_channels)
        return nn.Sequential(
            first, *(DiracBlock(out_channels, out_channels) for _ in range(1, blocks))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.group0(self.bn0(self.conv0(x)))
        x = self.group1(F.max_pool2d(x, 2))
        x = self.group2(F.max_pool2d(x, 2))
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1)
        logits: Tensor = self.fc(x)
        return logits


def diracnet_mini() -> DiracNetMini:
    """A fresh :class:`DiracNetMini` for 3x32x32 inputs and 10 classes."""
    return DiracNetMini()


def sgd_without_vector_decay(
    lr: float = LEARNING_RATE, momentum: float = MOMENTUM, weight_decay: float = WEIGHT_DECAY
) -> OptimizerFactory:
    """SGD with weight decay on matrices and filters only: the Dirac scales ``a`` and ``b``
    (and biases, batch-norm affine parameters) would otherwise be pulled towards zero, which
    the paper avoids by exempting them."""

    def factory(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        listed = list(parameters)
        groups = [
            {"params": [p for p in listed if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in listed if p.dim() <= 1], "weight_decay": 0.0},
        ]
        return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum)

    return factory


def dirac_folded() -> Candidate:
    """Every Dirac convolution as one convolution with the folded weight
    ``diag(a) I + diag(b) W_norm``.

    Models the authors' training code (``F.conv2d(x, alpha * delta + beta * normalize(w))``)
    and the folding the paper recommends for inference: one convolution instead of a
    convolution, a copy and an addition. Mathematically the reference; the arithmetic differs
    (the identity's weight goes through the convolution's sums). Signature: relative errors at
    float32 rounding, inside the default region.
    """
    return Candidate(
        name="dirac-folded",
        model_transform=lambda model: _swap_layers(model, DiracConv2d, _FoldedDiracConv2d),
        description="Dirac parameterization folded into one weight tensor, one conv2d",
    )


def dirac_wrong_normalization_axis(axis: NormalizationAxis = "input") -> Candidate:
    """BUG: the Dirac layer's filter normalization taken over the wrong axis.

    ``axis="input"``: ``F.normalize(weight)`` applied to the 4-D weight, the usual
    ``.view(out_channels, -1)`` forgotten; ``F.normalize`` defaults to ``dim=1`` and divides
    each (filter, kh, kw) column by its norm over the input channels. ``axis="output"``: the
    flattened weight normalized along ``dim=0`` (across filters), a transposed-layout slip.
    Either way ``W_norm``'s elements are about ``sqrt(kh * kw)`` (3x for 3x3) or
    ``sqrt(in * kh * kw / out)`` times too large and shaped differently: the convolutional
    path outweighs the identity from step 1, so every layer's update is biased and noisy.
    """
    if axis not in ("input", "output"):
        raise ValueError(f"axis must be 'input' or 'output', got {axis!r}")
    replacement: type[DiracConv2d] = (
        _InputAxisNormalizedDiracConv2d if axis == "input" else _OutputAxisNormalizedDiracConv2d
    )
    return Candidate(
        name=f"dirac-normalized-over-{axis}-channels",
        model_transform=lambda model: _swap_layers(model, DiracConv2d, replacement),
        description=f"Dirac weight normalized over the {axis} channels instead of per filter",
    )


# --------------------------------------------------------------------------------------------
# Symmetric (triangular) parameterization
# --------------------------------------------------------------------------------------------


def symmetrized(weight: Tensor) -> Tensor:
    """``triu(W) + triu(W, 1)^T``: the upper triangle, diagonal included, mirrored once."""
    return weight.triu() + weight.triu(1).transpose(-2, -1)


class SymmetricLinear(nn.Module):
    """Square linear layer with the triangular symmetric weight :func:`symmetrized` (weight).

    Only the upper triangle and diagonal of ``weight`` are used: its strict lower triangle gets
    no gradient and only decays, as in a layer parameterized with
    ``torch.nn.utils.parametrize``. Initialized like ``nn.Linear``.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        template = nn.Linear(features, features)
        self.weight = nn.Parameter(template.weight.detach().clone())
        self.bias = nn.Parameter(template.bias.detach().clone())

    def symmetric_weight(self) -> Tensor:
        return symmetrized(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.symmetric_weight(), self.bias)


class _UnfoldedSymmetricLinear(SymmetricLinear):
    """``x W_hat^T = x triu(W)^T + x triu(W, 1)``: two triangle products, no symmetric matrix."""

    def forward(self, x: Tensor) -> Tensor:
        upper = F.linear(x, self.weight.triu(), self.bias)
        return upper + F.linear(x, self.weight.triu(1).transpose(0, 1))


class _DiagonalTwiceSymmetricLinear(SymmetricLinear):
    """BUG: ``triu(W) + triu(W)^T``: both triangles include the diagonal."""

    def symmetric_weight(self) -> Tensor:
        return self.weight.triu() + self.weight.triu().transpose(-2, -1)


class SymmetricMLP(nn.Module):
    """Linear, two symmetric square layers, linear; ReLU between them.

    The first and last layers change the width and stay free, as the paper keeps the layers it
    cannot make square (its 1x1 bottleneck convolutions) unconstrained.
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = SymmetricLinear(hidden)
        self.fc3 = SymmetricLinear(hidden)
        self.fc4 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        logits: Tensor = self.fc4(x)
        return logits


def symmetric_mlp() -> SymmetricMLP:
    """A fresh :class:`SymmetricMLP` for 64 features and 10 classes."""
    return SymmetricMLP()


def symmetric_unfolded() -> Candidate:
    """Every symmetric layer computed from its triangle without building the symmetric weight.

    Models a symmetric matrix product (BLAS SYMM, the speed-up the paper points to): the
    output is ``x triu(W)^T + x triu(W, 1)``, two products whose sums run in another order
    than the reference's one product with ``W_hat``. Signature: relative errors at float32
    rounding, inside the default region.
    """
    return Candidate(
        name="symmetric-unfolded",
        model_transform=lambda model: _swap_layers(
            model, SymmetricLinear, _UnfoldedSymmetricLinear
        ),
        description="symmetric layers as two triangle products, W_hat never materialized",
    )


def symmetric_diagonal_counted_twice() -> Candidate:
    """BUG: the triangular parameterization written ``triu(W) + triu(W)^T``.

    The paper writes ``diag(v) + triu(W) + triu(W)^T`` with a strictly upper triangular ``W``;
    an implementation that stores ``v`` on ``W``'s diagonal must mirror only the strict upper
    triangle (``triu(W, 1)``), and forgetting the offset (``triu``'s default is 0) doubles the
    diagonal. The layer still trains, on another function: every symmetric layer's output,
    hence every layer's gradient, changes by the extra diagonal, and the diagonal's own
    gradient doubles. Signature: update noise and bias far beyond rounding from step 1.
    """
    return Candidate(
        name="symmetric-diagonal-counted-twice",
        model_transform=lambda model: _swap_layers(
            model, SymmetricLinear, _DiagonalTwiceSymmetricLinear
        ),
        description="symmetric weight built as triu(W) + triu(W)^T: diagonal added twice",
    )


def _swap_layers(
    model: nn.Module, original: type[nn.Module], replacement: type[nn.Module]
) -> nn.Module:
    """Re-class every ``original`` layer of ``model`` in place as ``replacement``, a subclass
    that shares its parameters: the candidate keeps the reference's parameter names."""
    swapped = 0
    for module in model.modules():
        if type(module) is original:
            module.__class__ = replacement
            swapped += 1
    if not swapped:
        raise ValueError(
            f"candidate replaces {original.__name__} layers, but the model "
            f"({type(model).__name__}) has none; use it with a workload built from them"
        )
    return model


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------

DIRACNET_WORKLOAD = Workload(
    name="diracnet-mini",
    model_factory=diracnet_mini,
    batches=synthetic_classification((3, 32, 32), 10, batch_size=16),
    optimizer_factory=sgd_without_vector_decay(),
    steps=8,
    description="diracnet-mini: DiracNet (Dirac-parameterized convs + BN), 8 SGD steps on "
    "synthetic 16-sample batches, no weight decay on the Dirac scales",
)

SYMMETRIC_WORKLOAD = Workload(
    name="symmetric-mlp",
    model_factory=symmetric_mlp,
    batches=synthetic_classification((64,), 10, batch_size=16),
    optimizer_factory=sgd(lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    steps=8,
    description="symmetric-mlp: MLP with two triangular-symmetric 128x128 layers, 8 SGD "
    "steps on synthetic 16-sample batches",
)
