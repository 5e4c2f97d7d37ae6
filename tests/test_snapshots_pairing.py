"""Pairing two snapshots' tensors where names differ: by values, then by dimensions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pytest_convergence.snapshots import (
    DuplicateTensor,
    Snapshot,
    TensorPair,
    UnpairedTensors,
    pair_tensors,
)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_snapshots_with_the_same_names_pair_by_name_without_loading_a_tensor() -> None:
    def never() -> torch.Tensor:
        raise AssertionError("a tensor was loaded")

    loaders: dict[str, Callable[[], torch.Tensor]] = {"w": never, "b": never}

    pairing = pair_tensors(Snapshot(loaders), Snapshot(dict(reversed(loaders.items()))))

    assert pairing.pairs == (TensorPair("w", "w", "name"), TensorPair("b", "b", "name"))
    assert pairing.by_name


def test_renamed_tensors_with_equal_values_pair_by_values_in_any_axis_order() -> None:
    dense, conv = randn(16, 8, seed=0), randn(6, 3, 5, 5, seed=1)  # torch layouts
    other_dense = randn(16, 8, seed=2)
    first = {"fc.weight": dense, "fc2.weight": other_dense, "conv.weight": conv}
    # Flax's layouts: Dense kernels (in, out), convolution kernels HWIO.
    second = {
        "Dense_1/kernel": other_dense.T.contiguous(),
        "Conv_0/kernel": conv.permute(2, 3, 1, 0).contiguous(),
        "Dense_0/kernel": dense.T.contiguous(),
    }

    pairing = pair_tensors(first, second)

    assert pairing.pairs == (
        TensorPair("fc.weight", "Dense_0/kernel", "values", (1, 0)),
        TensorPair("fc2.weight", "Dense_1/kernel", "values", (1, 0)),
        TensorPair("conv.weight", "Conv_0/kernel", "values", (2, 3, 1, 0)),
    )
    assert not pairing.by_name


def test_equal_values_of_other_dtypes_and_signed_zeros_still_pair_by_values() -> None:
    weight = torch.tensor([[0.5, -0.0], [0.25, 1.0]])
    bias = torch.tensor([-0.0, 2.0])
    second = {"k": torch.tensor([[0.5, 0.0], [0.25, 1.0]], dtype=torch.float16), "p": bias + 1}

    pairing = pair_tensors({"w": weight, "b": bias}, second)

    assert pairing.pairs == (
        TensorPair("w", "k", "values", None),
        TensorPair("b", "p", "dimensions", None),
    )


def test_tensors_stored_once_are_duplicates_counted_once() -> None:
    embedding, ones = randn(10, 8, seed=0), torch.ones(16)
    first = {
        "embed.weight": embedding,
        "head.weight": embedding.clone(),  # tied
        "norm1.weight": ones,
        "norm2.weight": ones.clone(),  # equal at initialization
    }
    second = {"head.weight": embedding, "norm1.weight": ones}

    pairing = pair_tensors(first, second)

    assert pairing.pairs == (
        TensorPair("head.weight", "head.weight", "name"),
        TensorPair("norm1.weight", "norm1.weight", "name"),
    )
    assert pairing.duplicates == (
        DuplicateTensor("A", "embed.weight", "head.weight"),
        DuplicateTensor("A", "norm2.weight", "norm1.weight"),
    )
    assert pairing.unpaired == ()


def test_equal_tensors_both_snapshots_hold_pair_one_to_one_and_the_surplus_is_duplicates() -> None:
    embedding, zeros = randn(10, 8, seed=0), torch.zeros(16)
    first = {"embed.weight": embedding, "head.weight": embedding.clone(), "b1": zeros}
    first |= {"b2": zeros.clone(), "b3": zeros.clone()}
    # An exporter's transposed copy of the tied weight, and two of the three zero biases.
    second = {"head.weight": embedding, "val_9": embedding.T.contiguous()}
    second |= {"val_1": zeros, "val_2": zeros.clone()}

    pairing = pair_tensors(first, second)

    assert pairing.pairs == (
        TensorPair("embed.weight", "val_9", "values", (1, 0)),
        TensorPair("head.weight", "head.weight", "name"),
        TensorPair("b1", "val_1", "values"),
        TensorPair("b2", "val_2", "values"),
    )
    assert pairing.duplicates == (DuplicateTensor("A", "b3", "b1"),)


def test_layouts_of_duplicates_compose_through_their_group() -> None:
    weight = randn(2, 3, 4, seed=0)
    second = {"x": weight.permute(2, 0, 1).contiguous(), "y": weight.permute(1, 2, 0).contiguous()}

    pairing = pair_tensors({"w": weight}, second)

    assert pairing.pairs == (TensorPair("w", "x", "values", (2, 0, 1)),)
    assert pairing.duplicates == (DuplicateTensor("B", "y", "x", (2, 0, 1)),)
    x, y = second["x"], second["y"]
    assert torch.equal(x.permute(2, 0, 1), y)


def test_the_only_tensors_left_with_some_dimensions_pair_by_dimensions() -> None:
    # Two implementations: the values differ, so only the dimensions tell.
    first = {"fc1.weight": randn(16, 8, seed=0), "square": randn(4, 4, seed=1)}
    second = {"val_0": randn(8, 16, seed=2), "val_1": randn(4, 4, seed=3)}

    pairing = pair_tensors(first, second)

    assert pairing.pairs == (
        TensorPair("fc1.weight", "val_0", "dimensions", (1, 0)),
        TensorPair("square", "val_1", "dimensions", None),  # equal shapes keep their layout
    )


def test_a_tensor_left_after_its_twin_paired_by_values_pairs_by_dimensions() -> None:
    kept = randn(16, 8, seed=0)
    first = {"fc1.weight": kept, "fc2.weight": randn(16, 8, seed=1)}
    second = {"val_6": randn(8, 16, seed=2), "val_0": kept.T.contiguous()}

    pairing = pair_tensors(first, second)

    assert pairing.pairs == (
        TensorPair("fc1.weight", "val_0", "values", (1, 0)),
        TensorPair("fc2.weight", "val_6", "dimensions", (1, 0)),
    )


def test_tensors_whose_dimensions_repeat_and_values_differ_are_left_unpaired_saying_why() -> None:
    first = {"x": randn(4, 4, seed=0), "y": randn(4, 4, seed=1), "bn.weight": torch.ones(3)}
    second = {"p": randn(4, 4, seed=2), "q": randn(4, 4, seed=3), "val_2": torch.tensor(0.5)}

    pairing = pair_tensors(first, second)

    assert pairing.pairs == ()
    assert pairing.unpaired == (
        UnpairedTensors(
            ("x", "y"),
            ("p", "q"),
            "A's 'x', 'y' and B's 'p', 'q' all have dimensions 4 x 4 in some axis order, and "
            "none of A's has values equal to one of B's, so which is which cannot be told",
        ),
        UnpairedTensors(
            ("bn.weight",),
            (),
            "A's 'bn.weight': no tensor of B is left with dimensions 3 in any axis order (an "
            "exporter may have folded them into another tensor, as a batch norm into a "
            "convolution, or dropped them)",
        ),
        UnpairedTensors(
            (),
            ("val_2",),
            "B's 'val_2': no tensor of A is left that is a scalar (an exporter's graph "
            "constants, or weights A does not hold)",
        ),
    )


def test_a_layout_neither_shapes_nor_values_decide_is_left_unpaired() -> None:
    pairing = pair_tensors({"w": randn(4, 4, 3, seed=0)}, {"k": randn(4, 3, 4, seed=1)})

    (unpaired,) = pairing.unpaired
    assert (unpaired.names_a, unpaired.names_b) == (("w",), ("k",))
    assert "match in 2 axis orders" in unpaired.reason


def test_a_shared_name_with_another_shape_is_never_paired() -> None:
    weight = randn(6, 5, seed=0)

    pairing = pair_tensors({"w": weight, "b": torch.ones(2)}, {"w": weight.T, "c": torch.ones(2)})

    assert pairing.pairs == (TensorPair("b", "c", "values"),)
    assert pairing.unpaired == (UnpairedTensors(("w",), ("w",), "'w' has shape [6, 5] vs [5, 6]"),)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pairing_by_values_holds_for_every_float_dtype(dtype: torch.dtype) -> None:
    weight = randn(3, 7, seed=0).to(dtype)

    pairing = pair_tensors({"w": weight, "v": randn(3, 7, seed=1).to(dtype)}, {
        "a": randn(3, 7, seed=2).to(dtype), "b": weight.T.contiguous()
    })  # fmt: skip

    assert pairing.pairs == (
        TensorPair("w", "b", "values", (1, 0)),
        TensorPair("v", "a", "dimensions", None),
    )
