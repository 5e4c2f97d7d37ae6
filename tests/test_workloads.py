from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.workloads import (
    Workload,
    get_workload,
    register_workload,
    synthetic_classification,
    workload_names,
)


def linear() -> nn.Module:
    return nn.Linear(4, 3)


def test_the_zoo_registers_the_papers_models_and_their_companions() -> None:
    assert set(workload_names()) >= {
        "googlenet-v1-mini",
        "vgg16-mini",
        "resnet50-mini",
        "lenet5",
        "wide-resnet-mini",
        "mlp",
    }


def test_an_unknown_workload_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown workload 'vgg19'; registered workloads: .*mlp"):
        get_workload("vgg19")


def test_an_unknown_workload_suggests_the_closest_registered_names() -> None:
    with pytest.raises(ValueError, match=r"unknown workload 'lenet'; did you mean 'lenet5'\? "):
        get_workload("lenet")


def test_registering_a_name_twice_needs_replace_existing() -> None:
    workload = Workload("twice", linear, synthetic_classification((4,), 3))
    register_workload(workload, replace_existing=True)
    with pytest.raises(ValueError, match="already registered"):
        register_workload(workload)


def test_synthetic_batches_are_identical_for_the_same_seed_and_differ_across_seeds() -> None:
    workload = Workload("s", linear, synthetic_classification((4,), 3), steps=2)
    first, again = workload.make_batches(), workload.make_batches()
    other = workload.with_options(seed=1).make_batches()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])


def test_a_dataloader_can_supply_the_batches() -> None:
    data = TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    workload = Workload("loader", linear, DataLoader(data, batch_size=4), steps=3)
    batches = workload.make_batches()
    assert [b[0].shape for b in batches] == [torch.Size([4, 4])] * 3
    run = cosimulate(workload, Candidate("same", gradient_transform=lambda named, step: None))
    assert len(run.comparisons) == 3


def test_a_list_of_tensors_is_cast_to_the_workload_dtype() -> None:
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))] * 2
    workload = Workload("list", linear, batches, steps=2, dtype=torch.float64)
    assert all(inputs.dtype == torch.float64 for inputs, _ in workload.make_batches())


def test_too_few_batches_is_an_error_naming_the_workload() -> None:
    workload = Workload("short", linear, [(torch.randn(2, 4), torch.tensor([0, 1]))], steps=3)
    with pytest.raises(ValueError, match="workload 'short' needs 3 batches, its data gave 1"):
        workload.make_batches()


def test_a_batch_that_is_neither_a_pair_nor_a_dict_is_refused_at_its_first_use() -> None:
    """A lone tensor is no batch the default forward pass can use: refused by the first
    forward, naming what the batch holds and what was expected."""
    workload = Workload("bad", linear, [torch.randn(2, 4)], steps=1)
    (batch,) = workload.make_batches()
    with pytest.raises(TypeError, match=r"a batch of float32\[2, 4\]: the default forward pass"):
        workload.loss(linear(), batch)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"dtype": torch.int64}, "dtype must be floating"),
        ({"name": ""}, "non-empty str"),
    ],
)
def test_invalid_workloads_are_refused(changes: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "name": "w",
        "model_factory": linear,
        "batches": synthetic_classification((4,), 3),
    }
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        Workload(**arguments)  # type: ignore[arg-type]
