"""Filter pruning: L1-norm filter choice, masks re-applied after a step, the physically smaller
model equal to the masked one, and a forgotten mask's signature (pruned weights grow back)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_convergence.batches import default_loss
from pytest_convergence.cosim import cosimulate, train
from pytest_convergence.traces import CoSimulation
from pytest_convergence.training_step import StepContext
from pytest_convergence.workloads import Workload, get_workload
from pytest_convergence.zoo.pruning import (
    PRUNED_A,
    FilterPrunedVGG16Mini,
    apply_filter_masks,
    kept_indices,
    mask_not_reapplied,
    physically_smaller_model,
    prune_filters,
    pruned_weight_count,
    smaller_model,
)


@pytest.fixture(scope="module")
def pruned_vgg() -> Workload:
    return get_workload("pruned-vgg16-mini").with_options(steps=2)


def chain(bias: float = 0.1) -> nn.Sequential:
    """conv(1->4) - relu - conv(4->3) - relu - flatten - linear(3*2*2 -> 2), biases ``bias``.

    The first convolution's filters have L1 norms 4, 1, 3, 1 (filter k holds the value v_k in
    all 4 of its weights): the two smallest are filters 1 and 3, a tie broken by index.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 2),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 2),
    )
    with torch.no_grad():
        first = model.get_submodule("0")
        assert isinstance(first, nn.Conv2d)
        first.weight.copy_(
            torch.tensor([1.0, -0.25, 0.75, 0.25]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
        )
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
                module.bias.fill_(bias)
    return model


def zeros(model: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


# Masks -----------------------------------------------------------------------------------------


def test_the_filters_with_the_smallest_l1_norms_are_pruned_ties_by_index() -> None:
    model = chain()
    prune_filters(model, ["0"], fraction=0.5)
    assert model.get_buffer("0.pruned_filters").tolist() == [False, True, False, True]
    assert model.get_buffer("2.pruned_inputs").tolist() == [False, True, False, True]
    weight = model.get_parameter("0.weight").detach()
    assert weight[[1, 3]].abs().sum() == 0
    assert bool((weight[[0, 2]] != 0).all())
    assert bool((model.get_parameter("2.weight").detach()[:, [1, 3]] == 0).all())
    # Biases stay: a pruned filter's map is the constant relu(bias) the masked kernels ignore.
    assert bool((model.get_parameter("0.bias").detach() == 0.1).all())
    one_filter = chain()
    prune_filters(one_filter, ["0"], fraction=0.25)
    assert one_filter.get_buffer("0.pruned_filters").tolist() == [False, True, False, False]


def test_a_linear_layer_after_a_flatten_loses_every_feature_of_a_pruned_channel() -> None:
    model = chain()
    prune_filters(model, ["2"], fraction=0.34)
    pruned_channel = model.get_buffer("2.pruned_filters").nonzero().item()
    expected = [feature // 4 == pruned_channel for feature in range(12)]
    assert model.get_buffer("5.pruned_inputs").tolist() == expected
    assert pruned_weight_count(model) == 4 + 2 * 4


@pytest.mark.parametrize(
    ("layers", "fraction", "message"),
    [
        (["3"], 0.5, "no convolution named '3'"),
        (["5"], 0.5, "no convolution named '5'"),
        (["0"], 1.0, r"fraction must be in \[0, 1\)"),
    ],
)
def test_pruning_refuses_what_it_cannot_prune(
    layers: list[str], fraction: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        prune_filters(chain(), layers, fraction)


def test_the_masks_set_pruned_weights_back_to_zero_and_leave_the_rest() -> None:
    model = chain()
    prune_filters(model, ["0"], fraction=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        expected = [p.detach().clone() for p in model.parameters()]
        apply_filter_masks(model)
    assert zeros(model) == pruned_weight_count(model) == 2 * 4 + 3 * 2
    for before, after in zip(expected, model.parameters(), strict=True):
        kept = after != 0
        assert torch.equal(after[kept], before[kept])


def test_the_pruned_vgg_holds_li_et_al_pruned_a_at_half_width() -> None:
    torch.manual_seed(0)
    model = FilterPrunedVGG16Mini()
    assert pruned_weight_count(model) == zeros(model) == 151_948
    for name in PRUNED_A:
        filters, _ = kept_indices(model.get_submodule(name))
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        assert filters is not None
        assert len(filters) == conv.out_channels // 2


# The physically smaller model ---------------------------------------------------------------


def test_the_smaller_model_keeps_the_names_and_computes_the_masked_models_function() -> None:
    torch.manual_seed(1)
    model = FilterPrunedVGG16Mini()
    small = smaller_model(model)
    assert [n for n, _ in small.named_parameters()] == [n for n, _ in model.named_parameters()]
    conv = small.get_submodule("features.19")
    assert isinstance(conv, nn.Conv2d)
    assert tuple(conv.weight.shape) == (32, 32, 3, 3)
    assert conv.in_channels == conv.out_channels == 32
    assert sum(p.numel() for p in small.parameters()) < 0.45 * sum(
        p.numel() for p in model.parameters()
    )
    inputs = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(small(inputs), model(inputs), rtol=1e-5, atol=1e-6)


def test_the_smaller_models_step_scatters_the_masked_models_gradients() -> None:
    model = chain()
    prune_filters(model, ["0"], fraction=0.5)
    inputs, targets = torch.randn(5, 1, 3, 3), torch.tensor([0, 1, 1, 0, 1])
    F.cross_entropy(model(inputs), targets).backward()
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    step_fn = physically_smaller_model().step_fn
    assert step_fn is not None
    context = StepContext(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        step=1,
        forward=default_loss(F.cross_entropy),
    )
    step_fn(context, (inputs, targets))
    actual = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(actual) == len(expected) == 6
    # The masked model's connected kernels do get a gradient (relu(bias) is their input), which
    # its masks discard after the step; the small model has no such kernels and scatters zeros.
    connected = expected[2][:, [1, 3]]
    assert float(connected.abs().sum()) > 0
    connected.zero_()
    expected[2][:, [1, 3]] = connected
    for scattered, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(scattered, reference)


def test_the_physically_smaller_model_co_simulates_within_float_rounding(
    pruned_vgg: Workload,
) -> None:
    run = cosimulate(pruned_vgg, physically_smaller_model())
    parameters = [p for c in run.comparisons for p in c.parameters]
    assert max(p.relative_error for p in parameters) < 1e-4
    assert all(p.zero_change == 0 for p in parameters)


# A forgotten mask -------------------------------------------------------------------------------


def regrown(run: CoSimulation, step: int) -> dict[str, int]:
    return {p.name: -p.zero_change for p in run.comparisons[step - 1].parameters if p.zero_change}


def test_without_the_masks_the_kernels_reading_a_pruned_filter_grow_back(
    pruned_vgg: Workload,
) -> None:
    run = cosimulate(pruned_vgg, mask_not_reapplied())
    grown = regrown(run, 1)
    readers = {"features.2.weight", *(f"features.{i}.weight" for i in (19, 21, 24, 26, 28))}
    assert set(grown) == readers | {"classifier.0.weight"}
    assert all(count > 0 for count in grown.values())
    assert grown["features.21.weight"] > 0.05 * 64 * 64 * 9


def test_a_free_running_forgotten_mask_loses_the_pruned_network() -> None:
    workload = get_workload("pruned-vgg16-mini").with_options(steps=2)
    _, masked = train(workload)
    _, forgetful = train(workload, mask_not_reapplied())
    assert zeros(masked) == pruned_weight_count(masked)
    assert zeros(forgetful) < pruned_weight_count(forgetful) - 10_000


@pytest.mark.parametrize(("bias", "grows_back"), [(0.1, True), (0.0, False)])
def test_a_forgotten_mask_matters_only_where_a_pruned_map_is_not_zero(
    bias: float, grows_back: bool
) -> None:
    # Why the workload draws nonzero biases: a pruned filter with a zero bias has an all-zero
    # map, ReLU passes no gradient at zero, and nothing pruned would ever move.
    model = chain(bias=bias)
    prune_filters(model, ["0"], fraction=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    inputs, targets = torch.randn(5, 1, 3, 3), torch.tensor([0, 1, 1, 0, 1])
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        apply_filter_masks(model)
    unchanged = all(torch.equal(a, b) for a, b in zip(trained, model.parameters(), strict=True))
    assert unchanged is not grows_back
