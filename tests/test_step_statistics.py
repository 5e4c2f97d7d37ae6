from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.dlpack import to_dlpack  # type: ignore[attr-defined]

from pytest_convergence import metrics
from pytest_convergence.metrics import parameter_logms
from pytest_convergence.step_statistics import (
    FlatWeights,
    KeptGradients,
    ParameterLayout,
    WeightSeries,
    compare_weights,
    gradient_norms,
    step_trace,
)
from pytest_convergence.traces import ParameterStep, StepTrace
from tests.conftest import reference_logm

# Every test on both paths: the compiled kernel and the tensor operations.
pytestmark = pytest.mark.usefixtures("computation")


@st.composite
def parameter_lists(draw: st.DrawFn) -> list[torch.Tensor]:
    sizes = draw(st.lists(st.integers(1, 3000), min_size=1, max_size=6))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tensors = []
    for size in sizes:
        tensor = torch.randn(size, generator=generator) * 10.0 ** draw(st.floats(-4, 1))
        tensor[torch.rand(size, generator=generator) < draw(st.sampled_from([0.0, 0.3]))] = 0
        tensors.append(tensor)
    return tensors


@st.composite
def steps(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Weights before and after a step, and its gradients, of mixed float32/float64
    parameters (each kind of parameter takes its own loop in the compiled trace)."""
    before = draw(parameter_lists())
    dtypes = [draw(st.sampled_from([torch.float32, torch.float64])) for _ in before]
    before = [tensor.to(dtype) for tensor, dtype in zip(before, dtypes, strict=True)]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    gradients = [torch.randn(t.shape, generator=generator).to(t.dtype) for t in before]
    after = [t - 0.01 * g for t, g in zip(before, gradients, strict=True)]
    return before, after, gradients


def with_gradients(
    tensors: list[torch.Tensor], gradients: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """``tensors`` with ``gradients`` as their ``.grad``, as backward leaves parameters."""
    for tensor, gradient in zip(tensors, gradients, strict=True):
        tensor.grad = gradient
    return tensors


def exact_norms(gradients: list[torch.Tensor]) -> list[float]:
    return [float(g.detach().to_dense().double().norm()) for g in gradients]


@given(steps())
def test_a_snapshot_taken_after_a_step_carries_its_update_norms(
    step: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]],
) -> None:
    before, after, gradients = step
    layout = ParameterLayout([f"p{i}" for i in range(len(after))], after)
    norms = gradient_norms(with_gradients(after, list(gradients)))
    weights = FlatWeights.of(
        layout, after, previous=FlatWeights.of(layout, before), gradient_norms=norms
    )
    concatenated = torch.cat([t.double().reshape(-1) for t in after])
    assert np.array_equal(np.asarray(weights.values), concatenated.numpy())
    updates = [float((a.double() - b.double()).norm()) for a, b in zip(after, before, strict=True)]
    assert weights.update_norms == pytest.approx(updates, rel=1e-12)
    assert weights.gradient_norms is norms
    # Gradient norms are reported, never judged: the tensor path sums float32 in float32.
    assert norms == pytest.approx(exact_norms(gradients), rel=1e-6)
    parts = parameter_logms({f"p{i}": t for i, t in enumerate(after)})
    assert weights.zeros == [part.zeros for part in parts]
    assert weights.logms == pytest.approx([part.logm for part in parts], abs=1e-12)


@given(steps())
def test_a_snapshot_that_reuses_a_spent_one_is_the_snapshot_it_would_be_anew(
    step: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]],
) -> None:
    before, after, _ = step
    layout = ParameterLayout([f"p{i}" for i in range(len(after))], after)
    previous = FlatWeights.of(layout, before)
    fresh = FlatWeights.of(layout, after, previous=previous)
    spent = FlatWeights.of(layout, [torch.full_like(t, 7.0) for t in after])
    reused = FlatWeights.of(layout, after, previous=previous, reuse=spent)
    assert np.array_equal(np.asarray(reused.values), np.asarray(fresh.values))
    assert (reused.logms, reused.zeros, reused.squares, reused.update_norms) == (
        fresh.logms,
        fresh.zeros,
        fresh.squares,
        fresh.update_norms,
    )
    if layout.compiled_trace(after, None) is not None:  # the compiled path writes in place
        assert reused.values is spent.values


def test_a_snapshot_series_overwrites_only_the_snapshot_two_steps_back() -> None:
    weights = [torch.randn(30), torch.randn(4, 5)]
    layout = ParameterLayout(["a", "b"], weights)
    series = WeightSeries(layout, weights)
    first = series.latest
    kept = np.asarray(first.values).copy()
    values = []
    for _ in range(3):
        for weight in weights:
            weight.add_(0.1)
        before, after = series.advance(weights, None)
        assert series.latest is after
        assert after.update_norms == pytest.approx(
            [0.1 * math.sqrt(w.numel()) for w in weights], rel=1e-6
        )
        values.append(after.values)
        if len(values) == 1:
            assert before is first
            assert np.array_equal(np.asarray(first.values), kept)  # still read by this step
    if layout.compiled_trace(weights, None) is not None:  # the compiled path writes in place
        assert values[1] is first.values
        assert values[2] is values[0]


def test_a_snapshot_cannot_overwrite_the_previous_one_it_reads() -> None:
    weights = [torch.randn(30), torch.randn(4, 5)]
    layout = ParameterLayout(["a", "b"], weights)
    previous = FlatWeights.of(layout, weights)
    with pytest.raises(ValueError, match="reuse must not be previous"):
        FlatWeights.of(layout, weights, previous=previous, reuse=previous)


def test_a_spent_snapshot_of_another_size_is_not_overwritten() -> None:
    weights = [torch.randn(30), torch.randn(4, 5)]
    layout = ParameterLayout(["a", "b"], weights)
    other = [torch.randn(3)]
    spent = FlatWeights.of(ParameterLayout(["c"], other), other)
    kept = np.asarray(spent.values).copy()
    snapshot = FlatWeights.of(layout, weights, reuse=spent)
    assert np.asarray(snapshot.values).shape == (50,)
    assert np.array_equal(np.asarray(spent.values), kept)


def test_tensors_the_compiled_trace_cannot_read_take_the_general_path() -> None:
    """Half precision and strided tensors are not float32/float64 C-contiguous buffers: the
    snapshot is still complete and exact."""
    weights = [torch.randn(40, 30), torch.randn(30, 40).t(), torch.randn(7).half()]
    previous = [torch.zeros(40, 30), torch.zeros(40, 30), torch.zeros(7).half()]
    layout = ParameterLayout(["a", "strided", "half"], weights)
    snapshot = FlatWeights.of(layout, weights, previous=FlatWeights.of(layout, previous))
    assert layout.compiled_trace(weights, None) is None
    assert snapshot.update_norms == pytest.approx([float(w.double().norm()) for w in weights])
    assert snapshot.logms == pytest.approx([reference_logm(w) for w in weights], abs=1e-12)


def test_the_compiled_trace_refuses_what_it_cannot_read_and_rejects_wrong_sizes() -> None:
    """None (nothing written) sends the caller to the general path; a size that does not add
    up is a caller's bug and raises."""
    kernel = pytest.importorskip("pytest_convergence._logm_kernel")
    weights = [np.ones(3, dtype=np.float32), np.full(2, 2.0)]
    out = np.full(5, -1.0)
    for unreadable in (
        [np.ones(3, dtype=np.float16), weights[1]],
        [np.ones((3, 2))[:, 0], weights[1]],
    ):
        assert kernel.trace_parameters(unreadable, None, out) is None
        assert out.tolist() == [-1.0] * 5
    logms, zeros, squares, update_norms, global_logm = kernel.trace_parameters(
        weights, np.zeros(5), out
    )
    assert out.tolist() == [1.0, 1.0, 1.0, 2.0, 2.0]
    assert (logms, zeros, squares) == ([0.0, pytest.approx(math.log10(2))], [0, 0], [3.0, 8.0])
    assert global_logm == pytest.approx(2 * math.log10(2) / 5)
    assert update_norms == [math.sqrt(3), math.sqrt(8)]
    with pytest.raises(ValueError, match="out"):
        kernel.trace_parameters(weights, None, np.empty(4))
    with pytest.raises(ValueError, match="out"):
        kernel.trace_parameters(weights, np.zeros(4), out)


def test_the_compiled_sums_of_squares_read_capsules_of_compact_cpu_tensors_only() -> None:
    """Gradients come as DLPack capsules: only CPU float32/float64 tensors in compact
    row-major order are read, wherever they start in their storage."""
    kernel = pytest.importorskip("pytest_convergence._logm_kernel")
    offset = torch.arange(10.0)[4:7]  # a view into the middle of its storage
    capsules = [to_dlpack(offset), to_dlpack(torch.ones(1, 2, dtype=torch.float64))]
    assert kernel.sums_of_squares(capsules) == [16.0 + 25.0 + 36.0, 2.0]
    assert kernel.sums_of_squares([np.ones(3, np.float32), np.empty(0, np.float32)]) == [3.0, 0.0]
    assert kernel.sums_of_squares([]) == []
    for refused in (torch.ones(3).bfloat16(), torch.ones(3, 2)[:, 0], torch.ones(2, 3).t()):
        assert kernel.sums_of_squares([to_dlpack(refused), capsules[1]]) is None
    assert kernel.sums_of_squares([np.ones(3, np.float16)]) is None
    with pytest.raises(TypeError):
        kernel.sums_of_squares(3)


@given(parameter_lists())
def test_flat_statistics_match_the_exact_per_parameter_logm(tensors: list[torch.Tensor]) -> None:
    layout = ParameterLayout([f"p{i}" for i in range(len(tensors))], tensors)
    flat = FlatWeights.of(layout, tensors)
    expected = parameter_logms({f"p{i}": t for i, t in enumerate(tensors)})
    for index, part in enumerate(expected):
        assert flat.zeros[index] == part.zeros
        squares = float(tensors[index].double().square().sum())
        assert flat.squares[index] == pytest.approx(squares, rel=1e-12, abs=1e-300)
        actual = flat.logms[index]
        assert (actual is None) == (part.logm is None)
        if actual is not None:
            assert actual == pytest.approx(part.logm, abs=1e-12)
    if any(t.count_nonzero() for t in tensors):
        assert flat.global_logm == pytest.approx(reference_logm(*tensors), abs=1e-9)


def test_weights_without_a_nonzero_value_have_no_logm() -> None:
    """LoGM averages over nonzero weights only: an all-zero parameter (or model) has none."""
    tensors = [torch.zeros(5), torch.tensor([0.0, 10.0, -100.0])]
    layout = ParameterLayout(["dead", "alive"], tensors)
    flat = FlatWeights.of(layout, tensors)
    assert flat.logms == [None, pytest.approx(1.5)]
    assert flat.global_logm == pytest.approx(1.5)
    assert FlatWeights.of(layout, [torch.zeros(5), torch.zeros(3)]).global_logm is None


def test_a_non_finite_parameter_is_flagged_and_has_no_logm() -> None:
    tensors = [torch.ones(4), torch.tensor([1.0, math.nan]), torch.tensor([math.inf])]
    layout = ParameterLayout(["a", "b", "c"], tensors)
    flat = FlatWeights.of(layout, tensors)
    assert flat.finite == [True, False, False]
    assert flat.logms[1] is None
    assert flat.global_logm is None


def test_kept_gradients_are_a_copy_until_the_next_step_with_zeros_for_missing_ones() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    parameters = list(model.parameters())
    model(torch.randn(5, 3)).square().sum().backward()
    parameters[3].grad = None  # a parameter that took no part in the loss
    expected = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in parameters]
    kept = KeptGradients(parameters).copy_from(parameters)
    for parameter in parameters[:3]:
        assert parameter.grad is not None
        parameter.grad.mul_(3.0)  # an optimizer or a later hook changing .grad in place
    assert len(kept) == 4
    assert all(torch.equal(k, e) for k, e in zip(kept, expected, strict=True))
    assert [k.shape for k in kept[1:3]] == [p.shape for p in parameters[1:3]]
    again = kept.copy_from(parameters)
    assert again is kept  # the same buffers, overwritten
    assert torch.equal(kept[0], 3.0 * expected[0])
    with pytest.raises(ValueError, match="hold 4 parameters, got 3"):
        kept.copy_from(parameters[:3])


def test_kept_gradients_of_a_double_backward_carry_no_graph() -> None:
    weight = torch.nn.Parameter(torch.randn(5))
    (gradient,) = torch.autograd.grad(weight.pow(3).sum(), weight, create_graph=True)
    assert gradient.requires_grad
    weight.grad = gradient
    (kept,) = KeptGradients([weight]).copy_from([weight])
    assert not kept.requires_grad
    assert torch.equal(kept, gradient.detach())


def test_kept_sparse_gradients_stay_sparse_as_the_optimizer_saw_them() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)  # its gradient is sparse
    embedding(torch.tensor([1, 4, 4])).sum().backward()
    assert embedding.weight.grad is not None
    assert embedding.weight.grad.is_sparse
    bias = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    bias.grad = torch.randn(6, dtype=torch.float64)
    kept = KeptGradients([embedding.weight, bias]).copy_from([embedding.weight, bias])
    assert kept[0].is_sparse
    assert torch.equal(kept[0].to_dense(), embedding.weight.grad.to_dense())
    assert not kept[1].is_sparse
    assert torch.equal(kept[1], bias.grad)


def test_gradient_norms_of_sparse_half_missing_and_double_backward_gradients(
    computation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled pass reads float32/float64 dense gradients; everything else gives the same
    norms through torch (the compiled pass is refused as a whole)."""
    compiled: list[list[float]] = []  # what the kernel summed
    kernel_sums = metrics.sums_of_squares

    def spied(arrays: list[object]) -> list[float] | None:
        sums = kernel_sums(arrays)
        if sums is not None:
            compiled.append(sums)
        return sums

    monkeypatch.setattr(metrics, "sums_of_squares", spied)
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 4, 4])).sum().backward()
    assert embedding.weight.grad is not None
    double = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    half = torch.nn.Parameter(torch.randn(4).half())
    missing = torch.nn.Parameter(torch.randn(5))
    cubic = torch.nn.Parameter(torch.randn(5))
    (graph_gradient,) = torch.autograd.grad(cubic.pow(3).sum(), cubic, create_graph=True)
    with_gradients([double, half], [torch.randn(6, dtype=torch.float64), torch.randn(4).half()])
    cubic.grad = graph_gradient
    readable = [double, missing]
    assert gradient_norms(readable) == pytest.approx([float(double.grad.norm()), 0.0])
    assert len(compiled) == (computation == "compiled-kernel")
    for other in (embedding.weight, half, cubic):
        parameters = [*readable, other]
        expected = [*exact_norms([double.grad, torch.zeros(5)]), *exact_norms([other.grad])]
        assert gradient_norms(parameters) == pytest.approx(expected, rel=1e-3)
    # The kernel reads a gradient with a graph (its values), and refuses sparse and half ones.
    assert len(compiled) == (2 if computation == "compiled-kernel" else 0)


def test_a_step_trace_records_norms_of_weights_updates_and_gradients() -> None:
    before = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])]
    after = [torch.tensor([3.0, 5.0]), torch.tensor([0.0, 1.0])]
    layout = ParameterLayout(["w", "b"], before)
    weights = FlatWeights.of(
        layout, after, previous=FlatWeights.of(layout, before), gradient_norms=[2.0, 0.0]
    )
    trace = step_trace(layout, weights, step=1, loss=0.5)
    weight, bias = trace.parameters
    assert (weight.weight_norm, weight.update_norm, weight.grad_norm) == pytest.approx(
        (math.sqrt(34), 1.0, 2.0)
    )
    assert (bias.zeros, bias.update_norm, bias.logm) == (1, 0.0, 0.0)


def test_a_step_traces_records_are_built_when_first_read_as_they_would_be_at_once() -> None:
    weights = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])]
    layout = ParameterLayout(["w", "b"], weights)
    snapshot = FlatWeights.of(layout, weights)
    trace = step_trace(layout, snapshot, step=0, loss=None)
    # A later snapshot overwriting this one's vector leaves the trace's statistics alone.
    FlatWeights.of(layout, [torch.ones(2), torch.ones(2)], reuse=snapshot)
    eager = StepTrace(
        0,
        None,
        snapshot.global_logm,
        (
            ParameterStep("w", 2, 0, snapshot.logms[0], 5.0, 0.0, None),
            ParameterStep("b", 2, 1, 0.0, 1.0, 0.0, None),
        ),
    )
    assert trace == eager
    assert repr(trace) == repr(eager)
    assert trace.to_dict() == eager.to_dict()
    assert trace.parameters is trace.parameters
    assert trace != StepTrace(1, None, snapshot.global_logm, eager.parameters)


def test_comparisons_split_the_error_into_bias_along_the_update_and_noise_across_it() -> None:
    start = [torch.zeros(2)]
    reference = [torch.tensor([1.0, 0.0])]
    candidate = [torch.tensor([1.5, 0.5])]
    layout = ParameterLayout(["w"], start)
    (comparison,) = compare_weights(
        layout,
        FlatWeights.of(layout, start),
        FlatWeights.of(layout, reference),
        FlatWeights.of(layout, candidate),
    )
    assert comparison.bias == pytest.approx(0.5)
    assert comparison.noise == pytest.approx(0.5)
    assert comparison.relative_error == pytest.approx(math.sqrt(0.5))


def test_the_radial_shift_is_the_error_along_the_weights_relative_to_the_update() -> None:
    start = [torch.tensor([3.0, 4.0])]
    reference = [torch.tensor([3.0, 5.0])]  # update (0, 1), weights of norm sqrt(34)
    shrunk = [torch.tensor([3.0, 5.0]) * 0.99]  # error -0.01 * weights: a weight-decay error
    layout = ParameterLayout(["w"], start)
    flat = [FlatWeights.of(layout, t) for t in (start, reference, shrunk)]
    (comparison,) = compare_weights(layout, *flat)
    assert comparison.radial == pytest.approx(-0.01 * math.sqrt(34), rel=1e-5)
    sideways = [torch.tensor([3.0 + 5.0 / 34, 5.0 - 3.0 / 34])]  # error orthogonal to weights
    (orthogonal,) = compare_weights(layout, flat[0], flat[1], FlatWeights.of(layout, sideways))
    assert orthogonal.radial == pytest.approx(0.0, abs=1e-6)  # float32 rounding
    assert orthogonal.noise > 0


def test_flattening_follows_in_place_updates_reassigned_data_and_other_models() -> None:
    """Flat vectors come from cached views of the parameters' storage; each way a model's
    weights can change between steps must show in the next vector."""
    first = torch.nn.Linear(3, 2)
    second = torch.nn.Linear(3, 2)
    layout = ParameterLayout(["weight", "bias"], list(first.parameters()))

    def flat(model: torch.nn.Module) -> list[float]:
        flattened = layout.flatten(list(model.parameters())).tolist()
        snapshot = np.asarray(FlatWeights.of(layout, list(model.parameters())).values).tolist()
        assert snapshot == flattened  # the compiled trace reads the same cached views
        return flattened

    def expected(model: torch.nn.Module) -> list[float]:
        return [float(v) for p in model.parameters() for v in p.detach().reshape(-1)]

    assert flat(first) == expected(first)
    with torch.no_grad():
        first.weight.mul_(2.0)  # an optimizer's in-place step
    assert flat(first) == expected(first)
    assert flat(second) == expected(second)  # the other side of a co-simulation
    first.weight.data = torch.randn(2, 3)  # a reassigned tensor: a new storage
    assert flat(first) == expected(first)
    first.weight.data = torch.randn(3, 2).t()  # not contiguous: copied, not viewed
    assert flat(first) == expected(first)
    for _ in range(6):  # more models than the cache keeps
        other = torch.nn.Linear(3, 2)
        assert flat(other) == expected(other)
    assert flat(second) == expected(second)


def test_empty_parameters_sum_to_zero_wherever_they_sit() -> None:
    after = [torch.ones(3), torch.empty(0), torch.full((2,), 2.0), torch.empty(0)]
    before = [torch.zeros(3), torch.empty(0), torch.full((2,), 1.0), torch.empty(0)]
    layout = ParameterLayout(["a", "empty", "b", "last"], after)
    norms = gradient_norms(with_gradients(after, [t.clone() for t in after]))
    weights = FlatWeights.of(
        layout, after, previous=FlatWeights.of(layout, before), gradient_norms=norms
    )
    trace = step_trace(layout, weights, step=1, loss=None)
    norms = [norm for p in trace.parameters for norm in (p.weight_norm, p.update_norm, p.grad_norm)]
    root3, root8, root2 = math.sqrt(3), math.sqrt(8), math.sqrt(2)
    expected = [root3, root3, root3, 0, 0, 0, root8, root2, root8, 0, 0, 0]
    assert norms == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gradient_norms_of_every_dtype(dtype: torch.dtype) -> None:
    strided = torch.randn(3, 4).to(dtype).t()
    gradients = [torch.randn(5, 7).to(dtype), strided, torch.zeros(4, dtype=dtype)]
    parameters = with_gradients([torch.empty_like(g) for g in gradients], list(gradients))
    assert gradient_norms(parameters) == pytest.approx(exact_norms(gradients), rel=1e-6)


def test_a_diverged_candidate_is_data_not_a_warning() -> None:
    """inf - inf and inf * 0 give NaN without a NumPy warning (the suite turns warnings into
    errors, as a user's may): the verdict reports the non-finite weights."""
    start = [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]
    reference = [torch.tensor([math.inf, 1.0]), torch.tensor([3.0])]
    candidate = [torch.tensor([math.inf, math.nan]), torch.tensor([4.0])]
    layout = ParameterLayout(["w", "b"], start)
    flat = [FlatWeights.of(layout, side) for side in (start, reference, candidate)]
    comparisons = compare_weights(layout, *flat)
    assert [c.non_finite for c in comparisons] == [True, False]
    norms = gradient_norms(with_gradients(candidate, [t.clone() for t in candidate]))
    diverged = FlatWeights.of(layout, candidate, previous=flat[1], gradient_norms=norms)
    trace = step_trace(layout, diverged, step=1, loss=None)
    assert math.isnan(trace.parameters[0].grad_norm)
    assert math.isnan(trace.parameters[0].update_norm)
    assert trace.parameters[1].update_norm == 1.0
