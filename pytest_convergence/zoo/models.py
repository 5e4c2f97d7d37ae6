"""CPU-sized replicas of well-known architectures, for co-simulating a few training steps.

Each model keeps the layout and layer types of the architecture it is named after (so a bug in,
say, batch-norm handling or residual wiring shows up the way it would at full scale) but shrinks
channel widths and input size until one SGD step on a batch of 16 takes tens of milliseconds on
two CPU cores. Module names follow the usual reference implementations (torchvision where it has
the model), because failure reports name modules such as ``features.3`` or ``layer2.0.conv2``.

Factories take no arguments and draw every initial weight from the global RNG, so callers seed
with :func:`torch.manual_seed` and get identical weights for identical seeds. Models with batch
norm, or shallow enough not to need more, keep PyTorch's default layer initialization. The two
deep plain-ReLU networks (GoogLeNet-V1 and VGG-16, no batch norm) are He-initialized instead,
as their reference implementations are: under PyTorch's default init each layer shrinks the
signal about 2.4-fold, so after 13 or more layers their logits no longer depend on the input
(relative spread across a batch of 1e-6 to 1e-8) and early layers get next to no gradient, a
workload that would hide exactly the bugs a convergence test is meant to catch.
Dropout layers are kept where the original has them, for the module names, but default to
``p=0.0``: a zero-probability dropout returns its input without drawing from the RNG, so a
training step stays deterministic and a reference and a candidate can be compared step by step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "MODEL_SPECS",
    "BasicConv2d",
    "Bottleneck",
    "GoogLeNetV1Mini",
    "Inception",
    "LeNet5",
    "ModelSpec",
    "ResNet50Mini",
    "VGG16Mini",
    "WideBasicBlock",
    "WideResNetMini",
    "googlenet_v1_mini",
    "lenet5",
    "mlp",
    "resnet50_mini",
    "vgg16_mini",
    "wide_resnet_mini",
]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a zoo model and feed it: ``input_shape`` excludes the batch dimension."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int


def _he_initialize(model: nn.Module) -> None:
    """He-normal weights (fan-in, ReLU gain) and zero biases for every convolution and linear."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class BasicConv2d(nn.Module):
    """Convolution followed by ReLU, the unit GoogLeNet-V1 is built from (no batch norm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class Inception(nn.Module):
    """Inception module of Szegedy et al. 2015 ("Going Deeper with Convolutions").

    Four parallel branches over the same input, concatenated along channels: a 1x1 convolution,
    a 1x1 reduction then 3x3, a 1x1 reduction then a true 5x5 (torchvision substitutes a 3x3
    there), and a 3x3 max-pool then a 1x1 projection.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=5),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x))
        return torch.cat(branches, dim=1)


class GoogLeNetV1Mini(nn.Module):
    """GoogLeNet-V1 (Szegedy et al. 2015) with widths divided by 4, for 3x32x32 inputs.

    Keeps the original's ReLU-only convolutions (no batch norm), the 1x1-reduce/3x3 stem pair,
    ceil-mode 3x3/2 max-pools between stages, Inception blocks 3a-3b, 4a-4b and 5a-5b with the
    paper's branch proportions, global average pooling, dropout and one linear classifier. The
    7x7/2 first convolution becomes a 3x3/1 one (CIFAR-style), and blocks 4c-4e, the local
    response normalizations and the auxiliary classifiers are left out. Weights are He-normal
    with zero biases (see the module docstring).
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = BasicConv2d(3, 16, kernel_size=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(16, 16, kernel_size=1)
        self.conv3 = BasicConv2d(16, 48, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(
            48, ch1x1=16, ch3x3red=24, ch3x3=32, ch5x5red=4, ch5x5=8, pool_proj=8
        )
        self.inception3b = Inception(
            64, ch1x1=32, ch3x3red=32, ch3x3=48, ch5x5red=8, ch5x5=24, pool_proj=16
        )
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(
            120, ch1x1=48, ch3x3red=24, ch3x3=52, ch5x5red=4, ch5x5=12, pool_proj=16
        )
        self.inception4b = Inception(
            128, ch1x1=40, ch3x3red=28, ch3x3=56, ch5x5red=6, ch5x5=16, pool_proj=16
        )
        self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception5a = Inception(
            128, ch1x1=64, ch3x3red=40, ch3x3=80, ch5x5red=8, ch5x5=32, pool_proj=32
        )
        self.inception5b = Inception(
            208, ch1x1=96, ch3x3red=48, ch3x3=96, ch5x5red=12, ch5x5=32, pool_proj=32
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(256, num_classes)
        _he_initialize(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.maxpool4(self.inception4b(self.inception4a(x)))
        x = self.inception5b(self.inception5a(x))
        x = torch.flatten(self.avgpool(x), 1)
        logits: Tensor = self.fc(self.dropout(x))
        return logits


_VGG16_LAYOUT: tuple[int | str, ...] = (
    *(8, 8, "M"),
    *(16, 16, "M"),
    *(32, 32, 32, "M"),
    *(64, 64, 64, "M"),
    *(64, 64, 64, "M"),
)


class VGG16Mini(nn.Module):
    """VGG-16 (configuration D of Simonyan & Zisserman 2015) with channels divided by 8.

    Thirteen padded 3x3 convolutions in stages of 2-2-3-3-3, each stage closed by a 2x2 max-pool,
    then three linear layers with ReLU and dropout. ``features`` and ``classifier`` are indexed
    exactly as torchvision's ``vgg16`` (``features.0`` ... ``features.30``, ``classifier.0``,
    ``.3``, ``.6``). A 3x32x32 input leaves a 1x1 map after the five pools, so the adaptive pool
    is 1x1 instead of 7x7 and the hidden linear width is 128 instead of 4096. Weights are
    He-normal with zero biases, like torchvision's convolutions (see the module docstring).
    """

    def __init__(self, num_classes: int = 10, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_LAYOUT:
            if isinstance(item, str):
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        _he_initialize(self)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        logits: Tensor = self.classifier(x)
        return logits


class Bottleneck(nn.Module):
    """ResNet bottleneck block (He et al. 2016): 1x1 reduce, 3x3, 1x1 expand by 4, each with BN.

    The stride sits on the 3x3 convolution ("ResNet v1.5", as torchvision); ``downsample`` is a
    strided 1x1 convolution plus BN on the shortcut whenever shape changes.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        merged: Tensor = self.relu(out + identity)
        return merged


class ResNet50Mini(nn.Module):
    """ResNet-50 (He et al. 2016) with base width 4 instead of 64, on 3x32x32 inputs.

    Keeps the 3-4-6-3 bottleneck stages, expansion 4, batch norm everywhere, a 1x1 conv + BN
    downsample on the first block of every stage, global average pooling and one linear layer,
    named as torchvision (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``). The stem is the
    CIFAR one: a 3x3/1 convolution and no max-pool, so 32x32 maps shrink to 4x4 by ``layer4``.
    That keeps ``layer1`` at full resolution, which with 53 convolutions and as many batch norms
    makes this the slowest model of the zoo: base width 4 (channels 16 to 128 at block outputs)
    keeps a batch-16 SGD step near 60 ms on two CPU cores, where width 8 takes about 90 ms.
    """

    def __init__(
        self,
        num_classes: int = 10,
        base_width: int = 4,
        layers: tuple[int, int, int, int] = (3, 4, 6, 3),
    ) -> None:
        super().__init__()
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(base_width, layers[0], stride=1)
        self.layer2 = self._make_layer(base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(base_width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base_width * 8 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        stage = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_channels
        stage += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        logits: Tensor = self.fc(x)
        return logits


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) on 1x28x28 MNIST, a classic workload for K-FAC-style optimizers.

    Two 5x5 convolutions (6 then 16 channels) each followed by 2x2 max-pooling, then linear
    layers of 120, 84 and ``num_classes`` units. The first convolution is padded by 2 so a 28x28
    digit behaves like the original 32x32 input; activations are ReLU, as in modern reruns.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        logits: Tensor = self.fc3(x)
        return logits


class WideBasicBlock(nn.Module):
    """Pre-activation basic block of wide ResNets: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus shortcut.

    As in Zagoruyko & Komodakis' reference code, when the width or stride changes the shortcut is
    a 1x1 convolution applied to the *pre-activated* input; otherwise it is the raw input.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(activated)
        out: Tensor = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + identity


class WideResNetMini(nn.Module):
    """WRN-10-2 (Zagoruyko & Komodakis 2016, "Wide Residual Networks") on 3x32x32 inputs.

    A 3x3 stem convolution to 16 channels, three stages of ``(depth - 4) / 6`` pre-activation
    basic blocks at widths 16k, 32k and 64k (strides 1, 2, 2), a final BN-ReLU, global average
    pooling and one linear layer. Depth 10 gives one block per stage; the paper's CIFAR runs use
    the same family at larger depth and width (WRN-28-10 and the like).
    """

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 10,
        widen_factor: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"wide ResNet depth must be 6n + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(widths[0], widths[1], blocks, 1, dropout)
        self.layer2 = self._make_layer(widths[1], widths[2], blocks, 2, dropout)
        self.layer3 = self._make_layer(widths[2], widths[3], blocks, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _make_layer(
        in_planes: int, out_planes: int, blocks: int, stride: int, dropout: float
    ) -> nn.Sequential:
        stage = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        stage += [WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        x = torch.flatten(self.avgpool(x), 1)
        logits: Tensor = self.fc(x)
        return logits


class MLP(nn.Module):
    """Three linear layers with ReLU between them: the smallest workload, with no convolution."""

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))
        return logits


def googlenet_v1_mini() -> GoogLeNetV1Mini:
    """A fresh :class:`GoogLeNetV1Mini` for 3x32x32 inputs and 10 classes."""
    return GoogLeNetV1Mini()


def vgg16_mini() -> VGG16Mini:
    """A fresh :class:`VGG16Mini` for 3x32x32 inputs and 10 classes."""
    return VGG16Mini()


def resnet50_mini() -> ResNet50Mini:
    """A fresh :class:`ResNet50Mini` for 3x32x32 inputs and 10 classes."""
    return ResNet50Mini()


def lenet5() -> LeNet5:
    """A fresh :class:`LeNet5` for 1x28x28 inputs and 10 classes."""
    return LeNet5()


def wide_resnet_mini() -> WideResNetMini:
    """A fresh WRN-10-2 (:class:`WideResNetMini`) for 3x32x32 inputs and 10 classes."""
    return WideResNetMini()


def mlp() -> MLP:
    """A fresh :class:`MLP` for 64-dimensional inputs and 10 classes."""
    return MLP()


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("googlenet-v1-mini", googlenet_v1_mini, (3, 32, 32), 10),
        ModelSpec("vgg16-mini", vgg16_mini, (3, 32, 32), 10),
        ModelSpec("resnet50-mini", resnet50_mini, (3, 32, 32), 10),
        ModelSpec("lenet5", lenet5, (1, 28, 28), 10),
        ModelSpec("wide-resnet-mini", wide_resnet_mini, (3, 32, 32), 10),
        ModelSpec("mlp", mlp, (64,), 10),
    )
}
