from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload, get_workload, sgd
from pytest_convergence.zoo import candidates as zoo


@pytest.fixture(scope="module")
def mlp() -> Workload:
    return get_workload("mlp").with_options(steps=2)


@pytest.fixture(scope="module")
def lenet() -> Workload:
    return get_workload("lenet5").with_options(steps=2)


def plain(workload: Workload) -> Workload:
    """Plain SGD (no momentum, no weight decay): an update is exactly -lr times the gradient."""
    return workload.with_options(optimizer_factory=sgd(momentum=0.0, weight_decay=0.0))


def biases(run: CoSimulation, step: int) -> dict[str, float | None]:
    return {p.name: p.bias for p in run.comparisons[step - 1].parameters}


def largest(run: CoSimulation, attribute: str) -> float:
    values = [getattr(p, attribute) for c in run.comparisons for p in c.parameters]
    return max(abs(v) if v is not None else 0.0 for v in values)


# Legitimate variants -------------------------------------------------------------------------

# (factory, largest |bias| allowed): exact-arithmetic variants differ in rounding only; the
# reduced-precision exchanges round each gradient element (fp16: 2^-11, bf16: 2^-8 relative), so a
# small tensor's bias may reach about that size.
VARIANTS: list[tuple[Callable[[], Candidate], float]] = [
    (zoo.unfold_conv2d, 1e-3),
    (zoo.onednn_disabled, 1e-3),
    (zoo.channels_last, 1e-3),
    (lambda: zoo.thread_count(1), 1e-3),
    (zoo.foreach_sgd, 1e-3),
    (zoo.for_loop_sgd, 1e-3),
    (zoo.fp16_exchange, 1e-3),
    (zoo.bf16_exchange, 1e-2),
]


@pytest.mark.parametrize(("factory", "bias_limit"), VARIANTS)
@pytest.mark.parametrize("fixture", ["mlp", "lenet"])
def test_legitimate_variants_co_simulate_with_tiny_error(
    factory: Callable[[], Candidate],
    bias_limit: float,
    fixture: str,
    request: pytest.FixtureRequest,
) -> None:
    workload: Workload = request.getfixturevalue(fixture)
    candidate = factory()
    run = cosimulate(workload, candidate)
    assert candidate.description
    assert len(run.comparisons) == 2
    assert largest(run, "bias") < bias_limit
    assert max(p.relative_error for c in run.comparisons for p in c.parameters) < 1e-2


def test_unfold_convolution_matches_conv2d_with_stride_padding_and_dilation() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 3, 9, 11, generator=generator, requires_grad=True)
    weight = torch.randn(5, 3, 3, 2, generator=generator, requires_grad=True)
    bias = torch.randn(5, generator=generator)
    original = F.conv2d
    cases: list[dict[str, Any]] = [
        {},
        {"stride": 2, "padding": 1},
        {"stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)},
    ]
    for options in cases:
        expected = original(inputs, weight, bias, **options)
        (expected_grad,) = torch.autograd.grad(expected.sum(), weight)
        with zoo.unfold_conv2d().forward_context():
            assert F.conv2d is not original
            actual = F.conv2d(inputs, weight, bias, **options)
        (actual_grad,) = torch.autograd.grad(actual.sum(), weight)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-4)


def test_unfold_convolution_falls_back_to_the_original_for_groups_and_string_padding() -> None:
    inputs = torch.randn(1, 4, 6, 6)
    grouped = torch.randn(4, 2, 3, 3)
    with zoo.unfold_conv2d().forward_context():
        grouped_output = F.conv2d(inputs, grouped, groups=2)
        same = F.conv2d(inputs, grouped[:, :1].repeat(1, 4, 1, 1), padding="same")
    assert torch.equal(grouped_output, torch.conv2d(inputs, grouped, groups=2))
    assert same.shape == (1, 4, 6, 6)


def test_channels_last_converts_the_model_and_the_convolution_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    candidate = zoo.channels_last()
    assert candidate.model_transform is not None
    conv = nn.Conv2d(3, 4, 3)
    candidate.model_transform(nn.Sequential(conv, nn.Linear(2, 2)))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen: list[torch.Tensor] = []
    original = F.conv2d

    def spy(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(input)
        return original(input, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    with candidate.forward_context():
        F.conv2d(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3))
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_foreach_sgd_keeps_its_implementation_when_re_synced_from_a_reference_state() -> None:
    parameter = nn.Parameter(torch.ones(3))
    reference = torch.optim.SGD([parameter], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for factory, expected in ((zoo.foreach_sgd, True), (zoo.for_loop_sgd, False)):
        optimizer_factory = factory().optimizer_factory
        assert optimizer_factory is not None
        optimizer = optimizer_factory([parameter])
        optimizer.load_state_dict(reference.state_dict())
        assert optimizer.param_groups[0]["foreach"] is expected
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def fused_and_torch(
    fused_options: dict[str, Any], torch_options: dict[str, Any], steps: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(10, generator=generator)
    gradients = [torch.randn(10, generator=generator) for _ in range(steps)]
    results = []
    for build in (
        lambda p: zoo.FusedSGD([p], **fused_options),
        lambda p: torch.optim.SGD([p], **torch_options),
    ):
        parameter = nn.Parameter(start.clone())
        optimizer = build(parameter)
        for gradient in gradients:
            parameter.grad = gradient.clone()
            optimizer.step()
        results.append(parameter.detach())
    return results[0], results[1]


def test_fused_sgd_is_torch_sgd_and_its_knobs_are_the_documented_bugs() -> None:
    base: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    torch.testing.assert_close(*fused_and_torch(base, base))
    doubled = {**base, "decay_applications": 2}
    torch.testing.assert_close(*fused_and_torch(doubled, {**base, "weight_decay": 1e-3}))
    hardcoded = {**base, "hardcoded_momentum": 0.99}
    torch.testing.assert_close(*fused_and_torch(hardcoded, {**base, "momentum": 0.99}))


def test_int8_quantization_rounds_each_partition_with_its_own_scale() -> None:
    flat = torch.cat([torch.linspace(-1, 1, 10), torch.zeros(10), torch.linspace(-8, 8, 10)])
    restored = zoo.quantize_int8_partitions(flat, 3)
    for chunk, back in zip(flat.tensor_split(3), restored.tensor_split(3), strict=True):
        scale = float(chunk.abs().max()) / 127
        assert float((chunk - back).abs().max()) <= scale / 2 + 1e-7
    doubled = zoo.quantize_int8_partitions(flat, 3, last_partition_scale=2.0)
    torch.testing.assert_close(doubled[20:], 2 * restored[20:])
    torch.testing.assert_close(doubled[:20], restored[:20])


def test_the_last_partition_holds_the_classifier_of_the_mlp() -> None:
    model = get_workload("mlp").build_model()
    names = zoo.last_partition_parameters(model.named_parameters(), 4)
    assert names == ["fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]


def test_correct_int8_exchange_is_unbiased_and_error_feedback_carries_the_residual(
    mlp: Workload,
) -> None:
    run = cosimulate(mlp, zoo.int8_exchange())
    assert largest(run, "bias") < 0.02
    candidate = zoo.error_feedback_int8_exchange(workers=2, partitions=2)
    assert candidate.exchange is not None
    generator = torch.Generator().manual_seed(3)
    steps = [
        [[torch.randn(5, generator=generator), torch.randn(3, generator=generator)] for _ in "ab"]
        for _ in range(4)
    ]
    sent_total = torch.zeros(8)
    true_total = torch.zeros(8)
    for step, per_worker in enumerate(steps, start=1):
        sent = candidate.exchange(per_worker, step)
        sent_total += torch.cat([g.reshape(-1) for g in sent])
        true_total += sum(torch.cat(grads) for grads in per_worker) / 2
    # Error feedback: what was sent over all steps differs from the true sum only by the last
    # residual (at most half a quantization step per element), not by an accumulated error.
    largest_gradient = max(float(torch.cat(g).abs().max()) for s in steps for g in s)
    assert float((sent_total - true_total).abs().max()) < largest_gradient / 127


# Bugs ----------------------------------------------------------------------------------------


def test_a_halved_layer_gradient_has_bias_minus_one_half_at_step_one(mlp: Workload) -> None:
    run = cosimulate(plain(mlp), zoo.scaled_layer_gradient("fc2.weight", 0.5))
    found = biases(run, 1)
    assert found["fc2.weight"] == pytest.approx(-0.5, abs=1e-5)
    assert all(abs(b or 0.0) < 1e-6 for n, b in found.items() if n != "fc2.weight")


def test_a_scaled_gradient_of_a_missing_parameter_is_an_error(mlp: Workload) -> None:
    with pytest.raises(ValueError, match="no gradient for parameter 'nope'"):
        cosimulate(mlp, zoo.scaled_layer_gradient("nope", 0.5))


def transformed(candidate: Candidate, gradients: list[torch.Tensor], step: int) -> torch.Tensor:
    """``gradients[0]`` (of parameter "w", beside an untouched "other") after the transform."""
    assert candidate.gradient_transform is not None
    other = torch.ones(3)
    named = [("other", other), ("w", gradients[0])]
    candidate.gradient_transform(named, step)
    assert torch.equal(other, torch.ones(3))
    return gradients[0]


def test_dropped_gradient_rows_zero_the_last_rows_every_step() -> None:
    candidate = zoo.dropped_gradient_rows("w", fraction=0.25)
    for step in (1, 2):
        gradient = transformed(candidate, [torch.arange(8.0).reshape(8, 1) + 1], step)
        assert gradient.flatten().tolist() == [1, 2, 3, 4, 5, 6, 0, 0]


def test_rotated_gradient_rows_move_each_row_one_down_keeping_the_norm() -> None:
    gradient = transformed(zoo.rotated_gradient_rows("w"), [torch.tensor([[1.0], [2.0], [3.0]])], 1)
    assert gradient.flatten().tolist() == [3, 1, 2]


def test_stale_gradient_rows_are_the_previous_steps_and_fresh_at_step_one() -> None:
    candidate = zoo.stale_gradient_rows("w", fraction=0.5)
    first = transformed(candidate, [torch.tensor([1.0, 2.0, 3.0, 4.0])], 1)
    assert first.tolist() == [1, 2, 3, 4]
    second = transformed(candidate, [torch.tensor([5.0, 6.0, 7.0, 8.0])], 2)
    assert second.tolist() == [5, 6, 3, 4]


@pytest.mark.parametrize(
    "factory", [zoo.dropped_gradient_rows, zoo.rotated_gradient_rows, zoo.stale_gradient_rows]
)
def test_a_one_layer_bug_on_a_missing_parameter_is_an_error(
    mlp: Workload, factory: Callable[[str], Candidate]
) -> None:
    with pytest.raises(ValueError, match="no gradient for parameter 'nope'"):
        cosimulate(mlp, factory("nope"))


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: zoo.sum_instead_of_mean_exchange(workers=4), 3.0),
        (lambda: zoo.accumulation_without_division(micro_batches=4), 3.0),
        (lambda: zoo.loss_scale_mismatch(scale=1024, unscale=512), 1.0),
    ],
)
def test_gradient_scale_bugs_have_the_expected_bias_on_every_parameter(
    lenet: Workload, factory: Callable[[], Candidate], expected: float
) -> None:
    run = cosimulate(plain(lenet), factory())
    for step in (1, 2):
        for bias in biases(run, step).values():
            assert bias == pytest.approx(expected, abs=1e-3)


def test_a_dropped_worker_shrinks_every_update(lenet: Workload) -> None:
    candidate = zoo.dropped_worker_exchange(workers=4)
    assert candidate.exchange is not None
    grads = [[torch.full((2,), float(w + 1))] for w in range(4)]
    torch.testing.assert_close(candidate.exchange(grads, 1)[0], torch.full((2,), 6 / 4))
    run = cosimulate(plain(lenet), candidate)
    weights = [b for n, b in biases(run, 1).items() if n.endswith("weight")]
    assert all(b is not None and -0.6 < b < -0.05 for b in weights)


def test_a_stale_gradient_matches_at_step_one_and_points_elsewhere_after(lenet: Workload) -> None:
    run = cosimulate(lenet, zoo.stale_gradient())
    assert all(p.error_norm == 0 for p in run.comparisons[0].parameters)
    assert all(p.relative_error > 0.3 for p in run.comparisons[1].parameters)


def test_a_convolution_without_bias_leaves_the_conv_biases_untrained(lenet: Workload) -> None:
    run = cosimulate(plain(lenet), zoo.conv_without_bias())
    found = biases(run, 1)
    assert found["conv1.bias"] == pytest.approx(-1.0)
    assert found["conv2.bias"] == pytest.approx(-1.0)


def test_a_hardcoded_momentum_shows_from_step_two(lenet: Workload) -> None:
    run = cosimulate(lenet, zoo.wrong_momentum(0.99))
    assert all(abs(b or 0.0) < 1e-6 for b in biases(run, 1).values())
    assert all((b or 0.0) > 0.01 for b in biases(run, 2).values())


def test_doubled_weight_decay_moves_weights_by_the_extra_decay(lenet: Workload) -> None:
    run = cosimulate(lenet, zoo.weight_decay_doubled())
    # lr * wd = 2.5e-5 per step: far below float32 gradients' effect, but not zero.
    assert all(p.error_norm > 0 for p in run.comparisons[0].parameters if p.name.endswith("weight"))


def test_int8_with_a_doubled_last_partition_biases_only_the_last_partitions_parameters(
    mlp: Workload,
) -> None:
    run = cosimulate(plain(mlp), zoo.int8_exchange(last_partition_scale=2.0))
    found = biases(run, 1)
    assert found["fc3.weight"] == pytest.approx(1.0, abs=0.05)
    assert found["fc3.bias"] == pytest.approx(1.0, abs=0.05)
    assert (found["fc2.weight"] or 0.0) > 0.1  # partly in the last partition
    assert abs(found["fc1.weight"] or 0.0) < 0.02


def test_fp16_convolution_rounds_its_output_to_half_precision() -> None:
    inputs, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with zoo.fp16_conv_accumulation().forward_context():
        output = F.conv2d(inputs, weight)
    assert torch.equal(output, output.half().float())
    torch.testing.assert_close(output, torch.conv2d(inputs, weight), rtol=1e-2, atol=1e-2)


# Global state --------------------------------------------------------------------------------


def conv2d_holders() -> list[object]:
    return [torch.nn.functional.conv2d, vars(torch.nn.modules.conv)["F"].conv2d]


@pytest.mark.parametrize(
    "factory",
    [zoo.unfold_conv2d, zoo.channels_last, zoo.conv_without_bias, zoo.fp16_conv_accumulation],
)
def test_conv2d_patches_are_restored_even_when_the_step_raises(
    factory: Callable[[], Candidate],
) -> None:
    before = conv2d_holders()
    patched: list[object] = []

    def step() -> None:
        with factory().forward_context():
            patched.extend(conv2d_holders())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        step()
    assert all(p is not b for p, b in zip(patched, before, strict=True))
    assert conv2d_holders() == before


def test_nested_conv2d_patches_unwind_in_order() -> None:
    original = F.conv2d
    with zoo.unfold_conv2d().forward_context():
        unfolded = F.conv2d
        with zoo.channels_last().forward_context():
            assert F.conv2d is not unfolded
        assert F.conv2d is unfolded
    assert F.conv2d is original


def test_thread_count_and_onednn_flag_are_restored_even_when_the_step_raises() -> None:
    threads = torch.get_num_threads()
    onednn = torch._C._get_mkldnn_enabled()
    inside: list[object] = []

    def step(candidate: Candidate) -> None:
        with candidate.forward_context():
            inside.append((torch.get_num_threads(), torch._C._get_mkldnn_enabled()))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        step(zoo.thread_count(1))
    with pytest.raises(RuntimeError, match="boom"):
        step(zoo.onednn_disabled())
    assert inside == [(1, onednn), (threads, False)]
    assert torch.get_num_threads() == threads
    assert torch._C._get_mkldnn_enabled() == onednn


def test_thread_count_rejects_zero_threads() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        zoo.thread_count(0)


def test_every_candidate_has_a_name_and_a_description() -> None:
    built = [
        zoo.unfold_conv2d(),
        zoo.onednn_disabled(),
        zoo.channels_last(),
        zoo.thread_count(1),
        zoo.foreach_sgd(),
        zoo.for_loop_sgd(),
        zoo.fp16_exchange(),
        zoo.bf16_exchange(),
        zoo.int8_exchange(),
        zoo.int8_exchange(last_partition_scale=2.0),
        zoo.error_feedback_int8_exchange(),
        zoo.scaled_layer_gradient("fc1.weight"),
        zoo.accumulation_without_division(),
        zoo.sum_instead_of_mean_exchange(),
        zoo.dropped_worker_exchange(),
        zoo.stale_gradient(),
        zoo.conv_without_bias(),
        zoo.weight_decay_doubled(),
        zoo.wrong_momentum(),
        zoo.loss_scale_mismatch(),
        zoo.fp16_conv_accumulation(),
    ]
    names = [c.name for c in built]
    assert len(set(names)) == len(names)
    assert all(c.description for c in built)
