"""The zoo models keep their architectures' layouts, train end to end, and build reproducibly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_convergence.zoo.models import (
    MODEL_SPECS,
    Bottleneck,
    Inception,
    ModelSpec,
    WideBasicBlock,
    WideResNetMini,
    googlenet_v1_mini,
    lenet5,
    resnet50_mini,
    vgg16_mini,
    wide_resnet_mini,
)

SPEC_NAMES = sorted(MODEL_SPECS)


def _batch(spec: ModelSpec, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.randn(size, *spec.input_shape)
    targets = torch.randint(0, spec.num_classes, (size,))
    return inputs, targets


def test_model_specs_cover_the_zoo_under_their_own_names() -> None:
    assert set(MODEL_SPECS) == {
        "googlenet-v1-mini",
        "vgg16-mini",
        "resnet50-mini",
        "lenet5",
        "wide-resnet-mini",
        "mlp",
    }
    assert all(name == spec.name for name, spec in MODEL_SPECS.items())


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_model_maps_its_input_shape_to_class_logits(name: str) -> None:
    spec = MODEL_SPECS[name]
    torch.manual_seed(0)
    model = spec.factory()
    inputs, _ = _batch(spec, size=3)

    logits = model(inputs)

    assert logits.shape == (3, spec.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_model_s_logits_at_initialization_depend_on_its_input(name: str) -> None:
    spec = MODEL_SPECS[name]
    torch.manual_seed(0)
    model = spec.factory()
    inputs, _ = _batch(spec, size=16)

    logits = model(inputs).detach()

    assert logits.std(dim=0).mean() > 1e-2 * logits.pow(2).mean().sqrt()


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_backward_gives_every_parameter_a_nonzero_gradient(name: str) -> None:
    spec = MODEL_SPECS[name]
    torch.manual_seed(0)
    model = spec.factory().train()
    inputs, targets = _batch(spec)

    F.cross_entropy(model(inputs), targets).backward()

    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_two_factory_calls_under_the_same_seed_build_identical_weights(name: str) -> None:
    factory = MODEL_SPECS[name].factory
    torch.manual_seed(1234)
    first = factory().state_dict()
    torch.manual_seed(1234)
    second = factory().state_dict()
    torch.manual_seed(4321)
    other = factory().state_dict()

    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_a_training_step_does_not_draw_from_the_global_rng(name: str) -> None:
    spec = MODEL_SPECS[name]
    torch.manual_seed(0)
    model = spec.factory().train()
    inputs, targets = _batch(spec)
    state = torch.get_rng_state()

    F.cross_entropy(model(inputs), targets).backward()

    assert torch.equal(state, torch.get_rng_state())


def test_vgg16_mini_has_thirteen_convolutions_in_stages_2_2_3_3_3_and_three_linear_layers() -> None:
    model = vgg16_mini()

    stages: list[int] = [0]
    for layer in model.features:
        if isinstance(layer, nn.MaxPool2d):
            stages.append(0)
        elif isinstance(layer, nn.Conv2d):
            assert layer.kernel_size == (3, 3)
            stages[-1] += 1
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]

    assert stages == [2, 2, 3, 3, 3, 0]
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert linears == ["classifier.0", "classifier.3", "classifier.6"]
    assert isinstance(model.features[28], nn.Conv2d)
    assert isinstance(model.features[30], nn.MaxPool2d)


def test_resnet50_mini_has_sixteen_bottleneck_blocks_in_stages_3_4_6_3() -> None:
    model = resnet50_mini()
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]

    assert [len(stage) for stage in stages] == [3, 4, 6, 3]
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 16
    for stage in stages:
        blocks = list(stage)
        assert all(isinstance(block, Bottleneck) for block in blocks)
        assert blocks[0].downsample is not None
        assert all(block.downsample is None for block in blocks[1:])
        for block in blocks:
            assert isinstance(block, Bottleneck)
            assert block.conv3.out_channels == 4 * block.conv1.out_channels
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1 + 16 * 3 + 4
    assert isinstance(model.get_submodule("layer2.0.conv2"), nn.Conv2d)


def test_googlenet_inception_blocks_output_the_sum_of_their_branch_channels() -> None:
    torch.manual_seed(0)
    model = googlenet_v1_mini()
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, Inception)}
    seen: dict[str, int] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            seen[name] = out.shape[1]

        return hook

    for name, block in blocks.items():
        block.register_forward_hook(record(name))
    model(torch.randn(2, 3, 32, 32))

    assert len(blocks) >= 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for name, block in blocks.items():
        branch_convs = [
            [m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1]
            for branch in (block.branch1, block.branch2, block.branch3, block.branch4)
        ]
        assert [conv.kernel_size for conv in branch_convs] == [(1, 1), (3, 3), (5, 5), (1, 1)]
        assert seen[name] == block.out_channels == sum(c.out_channels for c in branch_convs)


def test_lenet5_has_the_classic_layout_and_parameter_count() -> None:
    model = lenet5()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (6, (5, 5), (2, 2)),
        (16, (5, 5), (0, 0)),
    ]
    assert [m.out_features for m in linears] == [120, 84, 10]
    assert sum(p.numel() for p in model.parameters()) == 61_706


def test_wide_resnet_mini_uses_pre_activation_blocks_at_widths_16k_32k_64k() -> None:
    model = wide_resnet_mini()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]

    assert [c.out_channels for c in convs] == [16, 32, 32, 64, 64, 128, 128]
    for stage in (model.layer1, model.layer2, model.layer3):
        block = stage[0]
        assert isinstance(block, WideBasicBlock)
        assert block.bn1.num_features == block.conv1.in_channels
        assert block.shortcut is not None


def test_wide_resnet_rejects_a_depth_not_of_the_form_6n_plus_4() -> None:
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNetMini(depth=12)
