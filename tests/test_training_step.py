"""The user's training step as the reference: dict batches and models that return their loss,
parameter groups by name, schedulers, clipping, micro-batches, step functions, torch.compile."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_convergence.batches import Batch, BatchError, describe, split
from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.engine import Implementation
from pytest_convergence.replay import replay_step
from pytest_convergence.training_state import TrainingState
from pytest_convergence.training_step import NamedParameters, StepContext
from pytest_convergence.workloads import Workload


class Output:
    """What a Hugging Face model returns: an object with a loss and logits."""

    def __init__(self, loss: torch.Tensor, logits: torch.Tensor) -> None:
        self.loss = loss
        self.logits = logits


class TinyLM(nn.Module):
    """A model that takes keyword inputs and computes its own loss."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8, 11)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.head(self.dropout(self.norm(self.embed(input_ids))))
        loss = (
            F.cross_entropy(logits.flatten(0, 1), labels.flatten()) if labels is not None else None
        )
        assert loss is not None
        return Output(loss, logits)


def dict_batches(seed: int, steps: int, dtype: torch.dtype, device: torch.device) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, 11, (8, 5), generator=generator)
        batches.append({"input_ids": ids.to(device), "labels": ids.roll(-1, dims=1).to(device)})
    return batches


def adamw_without_decay_on_norms_and_biases(parameters: NamedParameters) -> torch.optim.Optimizer:
    decay = [p for name, p in parameters.named() if name.endswith("weight") and "norm" not in name]
    rest = [
        p for name, p in parameters.named() if not (name.endswith("weight") and "norm" not in name)
    ]
    return torch.optim.AdamW(
        [{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1
    )


def warmup_then_decay(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 3) * 0.5 ** max(0, step - 3)
    )


def lm(steps: int = 4, **changes: object) -> Workload:
    fields: dict[str, object] = {
        "name": "tiny-lm",
        "model_factory": TinyLM,
        "batches": dict_batches,
        "optimizer_factory": adamw_without_decay_on_norms_and_biases,
        "scheduler_factory": warmup_then_decay,
        "clip_grad_norm": 1.0,
        "steps": steps,
    }
    fields.update(changes)
    return Workload(**fields)  # type: ignore[arg-type]


def worst_relative_error(run_comparisons: list) -> float:  # type: ignore[type-arg]
    return max(p.relative_error for c in run_comparisons for p in c.parameters)


# --- batches -----------------------------------------------------------------------------------


def test_a_dict_batch_trains_a_model_that_returns_its_own_loss() -> None:
    run = cosimulate(lm(), Candidate("same", context=contextlib.nullcontext))
    assert len(run.comparisons) == 4
    assert worst_relative_error(run.comparisons) == 0.0
    assert all(math.isfinite(c.reference_loss) for c in run.comparisons)


def test_a_dict_batch_is_split_into_micro_batches_key_by_key() -> None:
    (batch,) = dict_batches(0, 1, torch.float32, torch.device("cpu"))
    halves = split(batch, 2)
    assert [describe(half) for half in halves] == [
        "{'input_ids': int64[4, 5], 'labels': int64[4, 5]}"
    ] * 2


def test_a_model_that_returns_no_loss_is_refused_with_what_it_returned() -> None:
    workload = Workload("no-loss", lambda: nn.Linear(5, 3), [{"input": torch.randn(4, 5)}], steps=1)
    with pytest.raises(BatchError, match=r"model returned a tensor of shape \[4, 3\], not a loss"):
        workload.loss(nn.Linear(5, 3), {"input": torch.randn(4, 5)})


def test_a_batch_of_strings_is_refused_at_registration_naming_the_batch() -> None:
    with pytest.raises(BatchError, match=r"workload 'text': batch 0 holds a str"):
        Workload("text", TinyLM, [{"input_ids": "the cat"}], steps=1)


def test_a_batch_whose_tensors_disagree_on_the_batch_size_is_refused() -> None:
    with pytest.raises(BatchError, match="must share their first dimension"):
        Workload("ragged", TinyLM, [(torch.zeros(4, 3), torch.zeros(5))], steps=1)


def test_several_inputs_in_a_tuple_are_passed_positionally() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    batch = ((torch.randn(6, 3), torch.randn(6, 4)), torch.randint(0, 2, (6,)))
    workload = Workload("pair", Pair, [batch] * 2, steps=2)
    run = cosimulate(workload, Candidate("same", context=contextlib.nullcontext))
    assert worst_relative_error(run.comparisons) == 0.0


# --- the optimizer, by name, and its re-sync by parameter identity ----------------------------


def test_an_optimizer_factory_gets_the_parameters_by_name() -> None:
    implementation = Implementation.build(lm(), Candidate("reference"))
    groups = implementation.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    named = dict(implementation.model.named_parameters())
    assert groups[0]["params"] == [named["embed.weight"], named["head.weight"]]


def test_a_candidate_with_one_parameter_group_re_syncs_and_its_decay_bug_shows() -> None:
    """The natural form of a weight-decay bug: one group, decay on norms and biases too."""

    def one_group(parameters: NamedParameters) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.1)

    run = cosimulate(lm(), Candidate("decay-everywhere", optimizer_factory=one_group))
    last = {p.name: p for p in run.comparisons[-1].parameters}
    assert last["embed.weight"].relative_error < 1e-5  # in the decay group on both sides
    assert last["norm.weight"].radial is not None
    assert last["norm.weight"].radial < -1e-4  # decayed towards zero, every step


def test_a_candidate_scheduler_that_skips_the_warm_up_shows_at_step_one() -> None:
    def no_warm_up(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** max(0, step - 3))

    run = cosimulate(lm(), Candidate("no-warm-up", scheduler_factory=no_warm_up))
    first = {p.name: p for p in run.comparisons[0].parameters}
    assert first["head.weight"].bias == pytest.approx(2.0, rel=0.05)  # lr 1 against 1/3


def test_each_side_steps_its_own_scheduler_in_lockstep() -> None:
    same = Candidate("same-schedule", scheduler_factory=warmup_then_decay)
    run = cosimulate(lm(steps=6), same)
    assert worst_relative_error(run.comparisons) == 0.0


def test_clipping_applies_to_the_global_norm_before_the_step() -> None:
    clipped = Implementation.build(lm(clip_grad_norm=1e-3), Candidate("reference"))
    free = Implementation.build(lm(clip_grad_norm=None), Candidate("reference"))
    (batch,) = dict_batches(0, 1, torch.float32, torch.device("cpu"))
    norms_clipped = clipped.train_step(batch, 1, traced=True).gradient_norms
    norms_free = free.train_step(batch, 1, traced=True).gradient_norms
    assert norms_clipped is not None
    assert norms_free is not None
    assert math.hypot(*norms_clipped) == pytest.approx(1e-3, rel=1e-4)
    assert math.hypot(*norms_free) > 1e-2


# --- micro-batches and random streams -----------------------------------------------------------


def test_micro_batches_without_dropout_train_like_the_whole_batch() -> None:
    run = cosimulate(lm(), Candidate("accumulate-2", micro_batches=2))
    assert worst_relative_error(run.comparisons) < 1e-4


def test_micro_batches_through_dropout_are_said_to_draw_another_random_stream() -> None:
    workload = lm(model_factory=lambda: TinyLM(dropout=0.3))
    finding = replay_step(workload, Candidate("accumulate-2", micro_batches=2), 1)
    assert finding.random_stream_differs
    assert "the random stream differs" in finding.describe()
    assert "Candidate(random_stream=True)" in finding.describe()


def test_a_candidate_declared_random_stream_is_replayed_module_by_module() -> None:
    workload = lm(model_factory=lambda: TinyLM(dropout=0.3))
    candidate = Candidate("accumulate-2", micro_batches=2, random_stream=True)
    assert not replay_step(workload, candidate, 1).random_stream_differs


# --- mixed precision with a GradScaler ------------------------------------------------------------


def test_a_grad_scalers_state_is_captured_and_restored_with_the_training_state() -> None:
    implementation = Implementation.build(lm(precision="fp16-autocast"), Candidate("reference"))
    assert implementation.scaler is not None
    (batch,) = dict_batches(0, 1, torch.float32, torch.device("cpu"))
    implementation.train_step(batch, 1, traced=False)
    state = TrainingState.capture(implementation)
    scale = implementation.scaler.get_scale()
    implementation.scaler.update(new_scale=scale / 8)
    state.restore(implementation)
    assert implementation.scaler.get_scale() == scale


def test_under_fp16_autocast_the_reference_co_simulates_against_itself_exactly() -> None:
    """Both sides scale, unscale and step through their own GradScaler, re-synced each step."""
    run = cosimulate(lm(precision="fp16-autocast"), Candidate("same-step"))
    assert worst_relative_error(run.comparisons) == 0.0


def test_a_step_the_grad_scaler_skips_for_an_overflow_leaves_the_weights_and_lowers_the_scale() -> (
    None
):
    """A loss scale that overflows fp16 makes the scaler skip the optimizer step, as a user's
    loop does; the engine steps through the scaler, not around it."""
    implementation = Implementation.build(lm(precision="fp16-autocast"), Candidate("reference"))
    assert implementation.scaler is not None
    first, second = dict_batches(0, 2, torch.float32, torch.device("cpu"))
    implementation.train_step(first, 1, traced=False)
    implementation.scaler.update(new_scale=2.0**40)
    before = [p.detach().clone() for p in implementation.model.parameters()]
    implementation.train_step(second, 2, traced=False)
    after = list(implementation.model.parameters())
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert implementation.scaler.get_scale() < 2.0**40


# --- the user's own step --------------------------------------------------------------------------


def own_step(context: StepContext, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A hand-written loop's step: accumulate, unscale, clip, step, schedule."""
    total = torch.zeros(())
    for micro in context.split(batch, 2):
        loss = context.loss(micro) / 2
        context.backward(loss)
        total = total + loss.detach()
    context.unscale()
    torch.nn.utils.clip_grad_norm_(context.model.parameters(), 1.0)
    context.optimizer_step()
    context.scheduler_step()
    return total


def test_the_workloads_own_step_is_the_reference_and_a_kernel_change_inherits_it() -> None:
    workload = lm(step_fn=own_step, clip_grad_norm=None)
    run = cosimulate(workload, Candidate("same", context=contextlib.nullcontext))
    assert worst_relative_error(run.comparisons) == 0.0
    assert run.reference.steps[1].parameters[0].grad_norm is not None  # read before the step


def test_a_gradient_transform_runs_inside_the_workloads_own_step() -> None:
    def halve_head(named: list[tuple[str, torch.Tensor]], step: int) -> None:
        for name, gradient in named:
            if name == "head.bias":
                gradient.mul_(0.5)

    workload = lm(
        step_fn=own_step,
        clip_grad_norm=None,
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    run = cosimulate(workload, Candidate("halved", gradient_transform=halve_head))
    first = {p.name: p for p in run.comparisons[0].parameters}
    assert first["head.bias"].bias == pytest.approx(-0.5, abs=1e-4)


# --- torch.compile ------------------------------------------------------------------------------


def test_a_torch_compiled_model_is_a_candidate_with_the_references_parameter_names() -> None:
    compiled = Candidate(
        "compiled", model_transform=lambda model: torch.compile(model, backend="eager")
    )
    run = cosimulate(lm(steps=2), compiled)
    assert run.comparisons[0].parameters[0].name == "embed.weight"
    assert worst_relative_error(run.comparisons) < 1e-5


def test_a_model_compiled_in_place_is_a_candidate_too() -> None:
    def compile_in_place(model: nn.Module) -> None:
        model.compile(backend="eager")

    run = cosimulate(lm(steps=2), Candidate("compiled-in-place", model_transform=compile_in_place))
    assert worst_relative_error(run.comparisons) < 1e-5


def test_a_compiled_candidate_is_compiled_ahead_and_its_time_reported_apart(
    tmp_path: Path,
) -> None:
    from pytest_convergence.checks import ConvergenceChecker
    from pytest_convergence.config import ConvergenceConfig
    from pytest_convergence.report import summary_lines

    checker = ConvergenceChecker(ConvergenceConfig(tmp_path, record=True))
    compiled = Candidate(
        "compiled", model_transform=lambda model: torch.compile(model, backend="eager")
    )
    result = checker.check(compiled, lm(steps=2))
    assert result.compile_seconds is not None
    assert result.compile_seconds > 0
    plain = checker.check(Candidate("same", context=contextlib.nullcontext), lm(steps=2))
    assert plain.compile_seconds is None
    row = {"verdict": "passed", "worst_ratio": 0.0, "compile_seconds": 1.234, "nodeid": "t"}
    assert summary_lines([row])[2].strip() == "compiled in 1.2 s, apart from the check"
