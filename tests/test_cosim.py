from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from pytest_convergence.candidates import Candidate, mean_exchange
from pytest_convergence.cosim import cosimulate, cosimulate_many, train
from pytest_convergence.traces import CoSimulation, TraceFormatError, from_constructor
from pytest_convergence.workloads import Workload, get_workload, sgd

PLAIN_SGD = sgd(lr=0.05, momentum=0.0, weight_decay=0.0)


def mlp(steps: int = 4, **changes: object) -> Workload:
    return get_workload("mlp").with_options(steps=steps, **changes)


def scale_gradient(parameter: str, factor: float) -> Candidate:
    def transform(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        for name, gradient in named:
            if name == parameter:
                gradient.mul_(factor)

    return Candidate(f"{parameter} x{factor}", gradient_transform=transform)


def test_an_identical_candidate_has_zero_error_at_every_step() -> None:
    run = cosimulate(mlp(), Candidate("same kernels", context=contextlib.nullcontext))
    assert len(run.comparisons) == 4
    for comparison in run.comparisons:
        assert comparison.candidate_loss == comparison.reference_loss
        for parameter in comparison.parameters:
            assert (parameter.bias, parameter.noise, parameter.error_norm) == (0.0, 0.0, 0.0)


def test_a_halved_gradient_shows_as_a_bias_of_minus_one_half_under_plain_sgd() -> None:
    workload = mlp(optimizer_factory=PLAIN_SGD)
    run = cosimulate(workload, scale_gradient("fc2.weight", 0.5))
    for comparison in run.comparisons:
        by_name = {p.name: p for p in comparison.parameters}
        assert by_name["fc2.weight"].bias == pytest.approx(-0.5, abs=1e-5)
        assert by_name["fc2.weight"].noise == pytest.approx(0.0, abs=1e-5)
        assert by_name["fc1.weight"].bias == 0.0


def test_steps_are_re_synced_so_an_error_does_not_compound() -> None:
    workload = mlp(steps=6, optimizer_factory=PLAIN_SGD)
    run = cosimulate(workload, scale_gradient("fc2.weight", 0.5))
    gaps = [
        next(p for p in c.parameters if p.name == "fc2.weight").error_norm
        / next(p for p in c.parameters if p.name == "fc2.weight").reference_update_norm
        for c in run.comparisons
    ]
    assert max(gaps) == pytest.approx(min(gaps), rel=1e-4)


def test_gradient_only_candidates_share_one_reference_run() -> None:
    candidates = [scale_gradient("fc1.bias", f) for f in (0.5, 2.0)]
    runs = cosimulate_many(mlp(optimizer_factory=PLAIN_SGD), candidates)
    biases = [r.comparisons[0].parameters[1].bias for r in runs]
    assert biases == [pytest.approx(-0.5, abs=1e-6), pytest.approx(1.0, abs=1e-6)]
    assert runs[0].reference.steps == runs[1].reference.steps


def test_the_candidate_starts_each_step_from_the_reference_optimizer_state() -> None:
    seen: list[float] = []

    def record_momentum(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        seen.append(float(named[0][1].abs().sum()))

    workload = mlp(steps=3)
    reference_trace, _ = train(workload)
    run = cosimulate(workload, Candidate("observer", gradient_transform=record_momentum))
    reference_losses = [s.loss for s in reference_trace.steps[1:]]
    assert reference_losses == [c.reference_loss for c in run.comparisons]
    assert all(c.parameters[0].bias == 0.0 for c in run.comparisons)


def test_a_non_finite_candidate_stops_the_run_at_that_step() -> None:
    def poison(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        if step == 2:
            named[0][1].fill_(math.nan)

    run = cosimulate(mlp(), Candidate("nan at step 2", gradient_transform=poison))
    assert [c.step for c in run.comparisons] == [1, 2]
    assert run.comparisons[-1].non_finite
    assert run.comparisons[-1].parameters[0].non_finite


def test_a_model_transform_must_keep_the_parameters() -> None:
    def widen(model: nn.Module) -> nn.Module:
        return nn.Sequential(model, nn.Linear(10, 10))

    with pytest.raises(ValueError, match="model_transform changed the parameters"):
        cosimulate(mlp(), Candidate("extra layer", model_transform=widen))


def test_an_exact_exchange_over_virtual_workers_matches_its_reference() -> None:
    candidate = Candidate("mean all-reduce", exchange=mean_exchange, workers=4)
    run = cosimulate(mlp(), candidate)
    assert all(p.error_norm == 0.0 for c in run.comparisons for p in c.parameters)


def test_a_co_simulation_round_trips_through_json() -> None:
    run = cosimulate(mlp(steps=2), scale_gradient("fc1.weight", 2.0))
    again = CoSimulation.from_json(run.to_json())
    assert again == run


def test_a_malformed_trace_names_its_source() -> None:
    with pytest.raises(ValueError, match=r"trace\.json: malformed co-simulation trace"):
        CoSimulation.from_json('{"schema": "other"}', source="trace.json")


def test_a_malformed_trace_names_the_place_in_the_document() -> None:
    document = json.loads(cosimulate(mlp(steps=2), scale_gradient("fc1.weight", 2.0)).to_json())
    document["comparisons"][1]["parameters"][0]["bias"] = "x"
    with pytest.raises(TraceFormatError) as caught:
        CoSimulation.from_json(json.dumps(document), source="trace.json")
    assert str(caught.value) == (
        "trace.json: malformed co-simulation trace "
        "(comparisons[1].parameters[0].bias: expected a number, found str 'x')"
    )


def test_a_trace_written_before_a_field_with_a_default_existed_still_reads() -> None:
    run = cosimulate(mlp(steps=2), scale_gradient("fc1.weight", 2.0))
    document = json.loads(run.to_json())
    for comparison in document["comparisons"]:
        for parameter in comparison["parameters"]:
            del parameter["radial"]
    again = CoSimulation.from_json(json.dumps(document))
    assert all(p.radial is None for c in again.comparisons for p in c.parameters)
    assert again.comparisons[0].parameters[0].bias == run.comparisons[0].parameters[0].bias


def test_a_measurement_field_of_a_type_no_file_can_hold_is_a_type_error() -> None:
    @dataclass(frozen=True)
    class Unreadable:
        steps: set[int]

    with pytest.raises(TypeError, match="no JSON parser for the type set"):
        from_constructor(Unreadable)


def test_co_simulation_is_deterministic() -> None:
    def fp16(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        for _, gradient in named:
            gradient.copy_(gradient.half().float())

    candidate = Candidate("fp16 gradients", gradient_transform=fp16)
    first, second = cosimulate(mlp(), candidate), cosimulate(mlp(), candidate)
    assert first.comparisons == second.comparisons


def test_free_running_training_records_every_step() -> None:
    trace, model = train(mlp(steps=3))
    assert [s.step for s in trace.steps] == [0, 1, 2, 3]
    assert len(trace.losses()) == 3
    assert len(trace.global_logm_deltas()) == 3
    assert isinstance(model, nn.Module)


def test_a_candidate_optimizer_keeps_its_own_hyper_parameters_when_re_synced() -> None:
    workload = mlp(optimizer_factory=PLAIN_SGD)
    faster = Candidate("lr x2", optimizer_factory=sgd(lr=0.1, momentum=0.0, weight_decay=0.0))
    run = cosimulate(workload, faster)
    for comparison in run.comparisons:
        assert comparison.parameters[0].bias == pytest.approx(1.0, abs=1e-5)


def test_a_candidate_optimizer_keeps_state_the_reference_optimizer_lacks() -> None:
    """AMSGrad's running maximum, or another optimizer's moments altogether: re-syncing to the
    reference's state dict must not drop them (the next step would fail or start over)."""
    made: list[torch.optim.Optimizer] = []

    def adam(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        made.append(torch.optim.Adam(parameters, lr=1e-3))
        return made[-1]

    run = cosimulate(
        mlp(steps=4, optimizer_factory=PLAIN_SGD), Candidate("adam", optimizer_factory=adam)
    )
    assert len(run.comparisons) == 4
    (optimizer,) = made
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {4}  # its own step count carried on, not restarted at every re-sync

    adam_workload = mlp(steps=4, optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3))
    amsgrad = Candidate(
        "amsgrad", optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True)
    )
    run = cosimulate(adam_workload, amsgrad)
    assert [c.step for c in run.comparisons] == [1, 2, 3, 4]
    assert all(math.isfinite(p.error_norm) for c in run.comparisons for p in c.parameters)


def zero_first_rows(model: nn.Module) -> None:
    """A pruning loop's post-step code: the first 4 output rows of fc1 stay pruned."""
    model.get_submodule("fc1").weight[:4].zero_()


def test_the_workload_after_step_code_runs_on_both_sides() -> None:
    workload = mlp(after_step=zero_first_rows)
    for candidate in (
        Candidate("same", context=contextlib.nullcontext),
        scale_gradient("fc2.weight", 1.0),
    ):
        run = cosimulate(workload, candidate)
        for comparison in run.comparisons:
            fc1 = {p.name: p for p in comparison.parameters}["fc1.weight"]
            assert fc1.bias == 0.0
            assert fc1.candidate_zeros == fc1.reference_zeros == 4 * 64


def test_a_candidate_after_step_replaces_the_workloads() -> None:
    workload = mlp(after_step=zero_first_rows)
    forgetful = Candidate("mask not re-applied", after_step=lambda model: None)
    assert not forgetful.only_transforms_gradients
    run = cosimulate(workload, forgetful)
    fc1 = {p.name: p for p in run.comparisons[0].parameters}["fc1.weight"]
    assert fc1.candidate_zeros < fc1.reference_zeros


class _BagOfWords(nn.Module):
    """An embedding with sparse gradients (as recommendation models have) and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8, sparse=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(dim=1))  # type: ignore[no-any-return]


def test_a_model_with_sparse_gradients_is_traced_and_its_candidate_sees_them_sparse() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 20, (6, 5), generator=generator), torch.randint(0, 3, (6,)))
        for _ in range(3)
    ]
    workload = Workload(  # torch's SGD takes sparse gradients without momentum or decay
        name="bag", model_factory=_BagOfWords, batches=batches, optimizer_factory=PLAIN_SGD, steps=3
    )
    sparse: list[dict[str, bool]] = []

    def record_layouts(named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        sparse.append({name: gradient.is_sparse for name, gradient in named})

    run = cosimulate(workload, Candidate("as the reference", gradient_transform=record_layouts))
    assert sparse == [{"embedding.weight": True, "head.weight": False, "head.bias": False}] * 3
    assert all(p.error_norm == 0.0 for c in run.comparisons for p in c.parameters)
    embedding = run.reference.steps[1].parameters[0]
    assert embedding.grad_norm is not None
    assert embedding.grad_norm > 0
