"""Large mini-batch workloads: accumulation reproduces the large batch, mixup mixes convexly and
reproducibly, and co-simulation shows the forgotten division as a bias of micro_batches - 1."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from pytest_convergence import regions
from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.engine import Implementation
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload, get_workload, sgd, synthetic_classification
from pytest_convergence.zoo.candidates import accumulation_without_division
from pytest_convergence.zoo.large_batch import (
    LARGE_BATCH,
    gradient_accumulation,
    linear_scaled_learning_rate,
    mixup,
    mixup_classification,
)
from pytest_convergence.zoo.models import MLP

WORKLOADS = ["large-batch-lenet5", "mixup-lenet5"]


def _small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(in_features=6, hidden=8, num_classes=3)


def _accumulated_gradients(
    candidate: Candidate,
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The candidate's loss and the gradients its step leaves, one step of the engine (an lr-0
    optimizer keeps the weights, so the gradients are those of the initial model)."""
    workload = Workload("one-batch", lambda: model, [(inputs, targets)], steps=1)
    frozen = Candidate(
        candidate.name,
        micro_batches=candidate.micro_batches,
        step_fn=candidate.step_fn,
        optimizer_factory=lambda parameters: torch.optim.SGD(parameters, lr=0.0),
    )
    trained = Implementation.around(workload, frozen, model).train_step((inputs, targets), 1)
    loss = torch.tensor(trained.loss)
    return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _batch_gradients(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()  # type: ignore[no-untyped-call]
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _classification_batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 6, generator=generator), torch.randint(
        0, 3, (size,), generator=generator
    )


# Gradient accumulation -----------------------------------------------------------------------


def test_the_linear_scaling_rule_gives_0_1_for_every_256_samples() -> None:
    assert linear_scaled_learning_rate(256) == pytest.approx(0.1)
    assert linear_scaled_learning_rate(2048) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        linear_scaled_learning_rate(0)


@given(
    batch_size=st.integers(1, 24),
    micro_batches=st.integers(1, 8),
    soft=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_accumulation_with_division_equals_the_large_batch_gradient(
    batch_size: int, micro_batches: int, soft: bool, seed: int
) -> None:
    inputs, labels = _classification_batch(batch_size, seed)
    targets = F.softmax(torch.randn(batch_size, 3), dim=1) if soft else labels
    expected_loss, expected = _batch_gradients(_small_model(seed), inputs, targets)

    loss, actual = _accumulated_gradients(
        gradient_accumulation(micro_batches), _small_model(seed), inputs, targets
    )

    torch.testing.assert_close(loss, expected_loss)
    for gradient, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(gradient, reference)


@given(micro_batches=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_accumulation_without_division_is_micro_batches_times_the_batch_gradient(
    micro_batches: int, seed: int
) -> None:
    inputs, targets = _classification_batch(4 * micro_batches, seed)
    _, expected = _batch_gradients(_small_model(seed), inputs, targets)

    _, actual = _accumulated_gradients(
        accumulation_without_division(micro_batches), _small_model(seed), inputs, targets
    )

    for gradient, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(gradient, micro_batches * reference)


def test_gradient_accumulation_refuses_fewer_than_one_micro_batch() -> None:
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        gradient_accumulation(0)


def test_the_large_batch_workloads_have_no_batch_norm() -> None:
    # Accumulation equals the large batch only without it (see the module docstring).
    for name in WORKLOADS:
        model = get_workload(name).build_model()
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_the_large_batch_workloads_train_on_256_samples_with_the_scaled_rate() -> None:
    for name in WORKLOADS:
        workload = get_workload(name)
        (inputs, _), *_ = workload.with_options(steps=1).make_batches()
        optimizer = workload.optimizer_factory(workload.build_model().parameters())

        assert inputs.shape == (LARGE_BATCH, 1, 28, 28)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


# Mixup ---------------------------------------------------------------------------------------


def test_mixup_combines_each_sample_with_its_partner() -> None:
    inputs = torch.arange(6.0).reshape(3, 2)
    targets = torch.eye(3)
    permutation = torch.tensor([2, 0, 1])

    mixed_inputs, mixed_targets = mixup(inputs, targets, 0.25, permutation)

    torch.testing.assert_close(mixed_inputs, 0.25 * inputs + 0.75 * inputs[permutation])
    torch.testing.assert_close(mixed_targets[0], torch.tensor([0.25, 0.0, 0.75]))


@pytest.mark.parametrize(
    ("lam", "permutation", "message"),
    [
        (1.5, torch.arange(3), "lambda must lie in"),
        (0.5, torch.arange(2), "one entry per sample"),
    ],
)
def test_mixup_refuses_a_bad_lambda_or_permutation(
    lam: float, permutation: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mixup(torch.zeros(3, 2), torch.eye(3), lam, permutation)


def test_mixup_batches_refuse_a_non_positive_alpha() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mixup_classification((4,), 3, alpha=0.0)


def _recovered_lambda(targets: torch.Tensor, labels: torch.Tensor) -> float:
    """The batch's lambda, read off a row whose two samples have different labels."""
    own = targets.gather(1, labels.unsqueeze(1)).squeeze(1)
    # A row mixing two samples of one class holds lam + (1 - lam): 1 up to rounding.
    mixed = own[own < 1.0 - 1e-6]
    assume(mixed.numel() > 0)
    return float(mixed[0])


@given(seed=st.integers(0, 2**20))
def test_mixup_batches_are_convex_combinations_of_the_plain_batch(seed: int) -> None:
    size, classes = 16, 10
    (plain_inputs, labels), *_ = synthetic_classification((5,), classes, size)(
        seed, 1, torch.float64, torch.device("cpu")
    )
    (inputs, targets), *_ = mixup_classification((5,), classes, size)(
        seed, 1, torch.float64, torch.device("cpu")
    )
    lam = _recovered_lambda(targets, labels)
    assume(lam < 0.999)

    # Each mixed sample minus its own share is (1 - lam) times exactly one plain sample.
    partners = (inputs - lam * plain_inputs) / (1.0 - lam)
    distances = torch.cdist(partners, plain_inputs)
    partner = distances.argmin(dim=1)

    assert targets.dtype == torch.float64
    assert torch.all(targets >= 0)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(size, dtype=torch.float64))
    assert torch.all(distances.min(dim=1).values < 1e-6)
    assert sorted(partner.tolist()) == list(range(size))
    expected_targets = lam * F.one_hot(labels, classes) + (1 - lam) * F.one_hot(
        labels[partner], classes
    )
    torch.testing.assert_close(targets, expected_targets.to(torch.float64))


def test_mixup_batches_are_deterministic_from_the_seed() -> None:
    source = mixup_classification((1, 4, 4), 10, batch_size=8)
    cpu = torch.device("cpu")

    first = source(3, 4, torch.float32, cpu)
    again = source(3, 4, torch.float32, cpu)
    other = source(4, 4, torch.float32, cpu)

    for (x, y), (x_again, y_again) in zip(first, again, strict=True):
        assert torch.equal(x, x_again)
        assert torch.equal(y, y_again)
    assert not torch.equal(first[0][1], other[0][1])


def test_mixup_draws_a_new_lambda_for_every_batch() -> None:
    batches = mixup_classification((2,), 10, batch_size=64)(
        0, 4, torch.float32, torch.device("cpu")
    )

    # A batch's targets take the values {0, lam, 1 - lam, 1 (up to rounding)}: its largest
    # share below 1 is max(lam, 1 - lam).
    shares = {round(float(t[t < 1.0 - 1e-4].max()), 6) for _, t in batches}

    assert len(shares) == 4


# Co-simulation signatures --------------------------------------------------------------------


def _plain(name: str) -> Workload:
    """Two steps of plain SGD: an update is exactly -lr times the gradient."""
    return get_workload(name).with_options(
        steps=2, optimizer_factory=sgd(lr=0.1, momentum=0.0, weight_decay=0.0)
    )


def _biases(run: CoSimulation) -> list[float]:
    return [p.bias for c in run.comparisons for p in c.parameters if p.bias is not None]


@pytest.mark.parametrize("name", WORKLOADS)
def test_accumulation_without_division_biases_every_update_by_micro_batches_minus_one(
    name: str,
) -> None:
    run = cosimulate(_plain(name), accumulation_without_division(4))

    biases = _biases(run)
    assert len(biases) == 2 * 10
    assert biases == pytest.approx([3.0] * len(biases), abs=1e-3)


@pytest.mark.parametrize("name", WORKLOADS)
def test_gradient_accumulation_differs_from_the_large_batch_by_rounding_only(name: str) -> None:
    run = cosimulate(_plain(name), gradient_accumulation(4))

    assert max(abs(b) for b in _biases(run)) < 1e-4
    assert max(p.relative_error for c in run.comparisons for p in c.parameters) < 1e-4


@pytest.mark.parametrize("name", WORKLOADS)
@pytest.mark.parametrize(
    ("factory", "passes"),
    [
        pytest.param(lambda: gradient_accumulation(4), True, id="with-division"),
        pytest.param(lambda: accumulation_without_division(4), False, id="without-division"),
    ],
)
def test_a_calibrated_region_admits_accumulation_and_catches_the_missing_division(
    name: str, factory: Callable[[], Candidate], passes: bool
) -> None:
    workload = get_workload(name).with_options(steps=2)
    region = regions.calibrate(workload, seeds=[0], draws=2)

    verdict = regions.judge(cosimulate(workload.with_options(seed=100), factory()), region)

    assert verdict.passed is passes, verdict.worst
