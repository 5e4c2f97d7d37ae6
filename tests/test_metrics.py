from __future__ import annotations

import importlib.util
import itertools
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pytest_convergence import NonFiniteWeightError, logm, metrics, parameter_logms, parameter_stats
from pytest_convergence.metrics import (
    PARALLEL_TENSOR,
    SMALL_TENSOR,
    ParameterLogm,
    compose_logm_sum,
    difference_norms,
    logm_sum,
)
from tests.conftest import reference_logm

EXACT = 1e-9
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# Every test on both paths: the compiled kernel and the tensor operations.
pytestmark = pytest.mark.usefixtures("computation")


def test_the_compiled_kernel_is_built_and_each_path_is_the_one_tested(computation: str) -> None:
    """CI installs with a C compiler; a silently missing kernel would only show as slowness."""
    assert importlib.util.find_spec("pytest_convergence._logm_kernel") is not None
    assert metrics.compiled_kernel_available() is (computation == "compiled-kernel")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensors_split_across_threads_stay_exact(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(PARALLEL_TENSOR + 12_345, generator=generator, dtype=torch.float64)
    values[::997] = 0.0
    values[5::1009] = torch.finfo(dtype).tiny / 4
    tensor = values.to(dtype)
    part = logm_sum(tensor)
    assert part.zeros == int((tensor == 0).sum())
    assert part.log10_sum / part.nonzero == pytest.approx(reference_logm(tensor), abs=EXACT)


@pytest.mark.parametrize("position", [0, 511, 1023, 1024, 5000, 9999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_special_value_anywhere_in_a_block_is_handled_exactly(
    position: int, dtype: torch.dtype
) -> None:
    for special in (0.0, torch.finfo(dtype).tiny / 8, torch.finfo(dtype).max, 1e-30):
        tensor = torch.linspace(0.01, 3.0, 10_000, dtype=dtype)
        tensor[position] = special
        part = logm_sum(tensor)
        assert part.zeros == (1 if special == 0.0 else 0)
        assert part.log10_sum / part.nonzero == pytest.approx(reference_logm(tensor), abs=EXACT)


@st.composite
def weight_tensors(draw: st.DrawFn, max_size: int = 300_000) -> torch.Tensor:
    """Realistic and hostile weight tensors built from a drawn recipe (fast for big sizes)."""
    size = draw(st.one_of(st.integers(1, 300), st.integers(SMALL_TENSOR - 200, max_size)))
    dtype = draw(st.sampled_from(DTYPES))
    scale = 10.0 ** draw(st.floats(-6, 3))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    values = torch.randn(size, generator=generator, dtype=torch.float64) * scale
    zero_fraction = draw(st.sampled_from([0.0, 0.0, 0.01, 0.5]))
    values[torch.rand(size, generator=generator) < zero_fraction] = 0.0
    if draw(st.booleans()):
        tiny = torch.finfo(dtype).tiny
        values[torch.rand(size, generator=generator) < 0.01] = tiny / 4  # subnormal in dtype
    tensor = values.to(dtype)
    if tensor.count_nonzero() == 0:
        tensor[0] = 1.0
    return tensor


@given(weight_tensors())
def test_it_agrees_with_a_float64_reference_for_every_dtype_size_and_zero_pattern(
    tensor: torch.Tensor,
) -> None:
    assert logm(tensor) == pytest.approx(reference_logm(tensor), abs=EXACT)


@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True),
    ).filter(lambda a: bool(np.any(a != 0)))
)
def test_it_agrees_with_the_reference_on_arbitrary_float32_values(array: np.ndarray) -> None:
    assert logm(array) == pytest.approx(reference_logm(torch.from_numpy(array)), abs=EXACT)


@given(
    st.integers(1, 200_000),
    st.integers(0, 2**31),
    st.floats(1e-3, 1e3).map(lambda c: c * 1.0),
    st.booleans(),
)
def test_scaling_by_c_adds_log10_of_c(size: int, seed: int, c: float, negative: bool) -> None:
    weights = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    factor = -c if negative else c
    assert logm(weights * factor) == pytest.approx(logm(weights) + math.log10(c), abs=EXACT)


@given(st.integers(1, 100_000), st.integers(0, 2**31))
def test_it_is_invariant_to_permutation(size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(size, generator=generator)
    permuted = weights[torch.randperm(size, generator=generator)]
    assert logm(permuted) == pytest.approx(logm(weights), abs=EXACT)


@given(st.integers(2, 100_000), st.integers(0, 2**31), st.data())
def test_splitting_into_parameters_leaves_it_unchanged(
    size: int, seed: int, data: st.DataObject
) -> None:
    weights = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    cuts = sorted(data.draw(st.lists(st.integers(1, size - 1), max_size=4, unique=True)))
    bounds = [0, *cuts, size]
    parts = {f"p{i}": weights[a:b] for i, (a, b) in enumerate(itertools.pairwise(bounds))}
    assert logm(parts) == pytest.approx(logm(weights), abs=EXACT)


@given(st.lists(weight_tensors(max_size=40_000), min_size=1, max_size=4))
def test_a_concatenation_is_the_count_weighted_mean_of_its_parts(parts: list[torch.Tensor]) -> None:
    whole = torch.cat([part.to(torch.float64) for part in parts])
    per_part = parameter_logms({f"p{i}": part for i, part in enumerate(parts)})
    weighted = math.fsum(p.logm * (p.count - p.zeros) for p in per_part if p.logm is not None)
    nonzero = sum(p.count - p.zeros for p in per_part)
    assert logm(whole) == pytest.approx(weighted / nonzero, abs=EXACT)


def test_zeros_are_excluded_and_counted() -> None:
    weights = torch.tensor([0.0, 10.0, 0.0, 100.0])
    (only,) = parameter_logms({"w": weights})
    assert only.logm == pytest.approx(1.5)
    assert (only.count, only.zeros) == (4, 2)
    assert logm(weights) == pytest.approx(1.5)


def test_large_pruned_tensors_count_their_zeros_exactly() -> None:
    weights = torch.randn(1_000_000)
    weights[::3] = 0
    part = logm_sum(weights)
    assert part.zeros == int((weights == 0).sum())
    assert part.log10_sum / part.nonzero == pytest.approx(reference_logm(weights), abs=EXACT)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("size", [10, 2_000_000])
def test_a_non_finite_weight_raises_naming_the_parameter(bad: float, size: int) -> None:
    weights = torch.randn(size)
    weights[size // 2] = bad
    with pytest.raises(NonFiniteWeightError, match=r"parameter 'layer2.weight'.*non-finite"):
        logm({"layer1.weight": torch.ones(3), "layer2.weight": weights})


def test_the_non_finite_error_counts_nan_and_inf_separately() -> None:
    weights = torch.tensor([1.0, math.nan, math.inf, math.nan])
    with pytest.raises(NonFiniteWeightError) as caught:
        logm({"w": weights})
    assert (caught.value.nan_count, caught.value.inf_count) == (2, 1)
    assert "2 NaN, 1 Inf" in str(caught.value)


def test_empty_tensors_count_nothing_and_all_zero_parameters_have_no_logm() -> None:
    per_parameter = parameter_logms({"empty": torch.empty(0, 3), "dead": torch.zeros(5)})
    assert [(p.logm, p.count, p.zeros) for p in per_parameter] == [(None, 0, 0), (None, 5, 5)]


def test_global_logm_without_any_nonzero_weight_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"no nonzero weights \(5 weights, 5 zeros\)"):
        logm({"dead": torch.zeros(5), "empty": torch.empty(0)})


def test_a_module_contributes_its_parameters_and_not_its_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    names = [p.name for p in parameter_logms(model)]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert logm(model) == pytest.approx(reference_logm(*model.parameters()), abs=EXACT)


def test_a_state_dict_skips_integer_buffers_and_flattens_nested_mappings() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = OrderedDict(model=model.state_dict())
    names = [p.name for p in parameter_logms(state)]
    assert "model.1.num_batches_tracked" not in names
    assert "model.1.running_var" in names
    assert names[0] == "model.0.weight"


def test_numpy_arrays_and_mappings_of_arrays_are_accepted() -> None:
    array = np.array([[0.1, -10.0], [0.0, 1.0]], dtype=np.float32)
    assert logm(array) == pytest.approx(0.0, abs=1e-7)
    assert logm({"a": array}) == logm(array)


def test_non_contiguous_tensors_match_their_contiguous_copy() -> None:
    weights = torch.randn(64, 300, 90).permute(2, 0, 1)[::2]
    assert not weights.is_contiguous()
    assert logm(weights) == pytest.approx(reference_logm(weights), abs=EXACT)


def test_wrong_inputs_get_type_errors_that_say_what_was_expected() -> None:
    with pytest.raises(TypeError, match="not list"):
        logm([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LoGM is defined for floating weights"):
        logm(torch.arange(5))
    with pytest.raises(TypeError, match="'w' is a str"):
        logm({"w": "0.5"})


def test_companion_stats_match_numpy() -> None:
    weights = torch.randn(3, 50_000, dtype=torch.float64) * 0.1 + 1.0
    (stats,) = parameter_stats({"bn.weight": weights})
    array = weights.numpy()
    assert stats.l2_norm == pytest.approx(float(np.linalg.norm(array)), rel=1e-12)
    assert stats.std == pytest.approx(float(array.std()), rel=1e-10)
    assert stats.logm == pytest.approx(reference_logm(weights), abs=EXACT)


# --- composing parts, and differences of two tensors -------------------------------------------


@given(st.lists(weight_tensors(max_size=40_000), min_size=1, max_size=4))
def test_composing_the_parts_logms_gives_the_logm_of_their_concatenation(
    parts: list[torch.Tensor],
) -> None:
    whole = torch.cat([part.to(torch.float64) for part in parts])

    composed = compose_logm_sum(parameter_logms({f"p{i}": p for i, p in enumerate(parts)}))

    assert composed.logm == pytest.approx(logm(whole), abs=EXACT)
    assert composed.count == whole.numel()
    assert composed.zeros == int((whole == 0).sum())


def test_a_part_without_a_logm_contributes_only_its_zeros() -> None:
    parts = [ParameterLogm("dead", None, 4, 4), ParameterLogm("w", -1.5, 6, 2)]

    composed = compose_logm_sum(parts)

    assert (composed.logm, composed.nonzero, composed.zeros, composed.count) == (-1.5, 4, 6, 10)
    assert compose_logm_sum([ParameterLogm("dead", None, 3, 3)]).logm is None
    assert compose_logm_sum([]).logm is None


@given(st.integers(1, 5_000), st.integers(0, 2**31), st.integers(1, 700))
def test_difference_norms_match_float64_norms_whatever_the_chunk(
    size: int, seed: int, chunk: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(size, generator=generator)
    b = (a.double() + 1e-3 * torch.randn(size, generator=generator, dtype=torch.float64)).half()

    norms = difference_norms(a, b, chunk=chunk)

    difference = b.double() - a.double()
    expected = float(difference.norm() / a.double().norm())
    assert norms.relative_l2_error == pytest.approx(expected, rel=1e-9)
    assert norms.max_abs_diff == float(difference.abs().max())


def test_difference_norms_from_all_zero_weights_are_infinite_or_zero() -> None:
    zeros = torch.zeros(2, 3)

    assert difference_norms(zeros, torch.ones(6)).relative_l2_error == math.inf
    assert difference_norms(zeros, zeros).relative_l2_error == 0.0
    assert difference_norms(torch.empty(0), torch.empty(0)).max_abs_diff == 0.0
