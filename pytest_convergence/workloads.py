"""Workloads: a few iterations of training, described completely enough to replay exactly.

A workload names everything that decides the weights after N steps (model, data, loss, optimizer,
seed, dtype, device), so a reference and a candidate run from identical initial weights on
identical batches, and a baseline recorded today applies to the run tomorrow. It also says how
one step trains, as the user's loop does: the forward pass that gives the loss
(:mod:`pytest_convergence.batches`), micro-batches, gradient clipping, a learning-rate scheduler,
a precision policy (:mod:`pytest_convergence.precision`), or a step function of its own
(:mod:`pytest_convergence.training_step`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from pytest_convergence.batches import Batch, BatchError, Forward, LossFunction, default_loss
from pytest_convergence.batches import place as place_batch
from pytest_convergence.batches import validate as validate_batch
from pytest_convergence.precision import DEFAULT_POLICY, PrecisionPolicy, get_policy
from pytest_convergence.registry import Registry
from pytest_convergence.training_step import NamedParameters, SchedulerFactory, StepFunction

__all__ = [
    "AfterStep",
    "Batch",
    "BatchSource",
    "OptimizerFactory",
    "Workload",
    "add_workload_source",
    "get_workload",
    "is_registered",
    "load_workload_sources",
    "register_workload",
    "sgd",
    "synthetic_classification",
    "workload_names",
    "workload_sources",
]

# Called with (seed, steps, dtype, device); returns exactly `steps` batches. Users may instead
# pass a fixed sequence, any iterable of batches, or a DataLoader.
BatchSource: TypeAlias = (
    "Callable[[int, int, torch.dtype, torch.device], Sequence[Batch]] | Iterable[Batch]"
)
# Given the model's parameters (iterable as model.parameters(), or by name: NamedParameters).
OptimizerFactory: TypeAlias = Callable[[NamedParameters], torch.optim.Optimizer]
# Runs on the model right after every optimizer step, as a training loop's own code does.
AfterStep: TypeAlias = Callable[[nn.Module], None]


def sgd(lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4) -> OptimizerFactory:
    """SGD with momentum and weight decay, the optimizer of the LoGM paper's models."""

    def factory(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)

    return factory


def synthetic_classification(
    input_shape: Sequence[int], num_classes: int, batch_size: int = 16
) -> Callable[[int, int, torch.dtype, torch.device], list[Batch]]:
    """Deterministic random inputs and labels from a seed: no data set to download or ship.

    A few steps of training on random labels exercise the same kernels, gradients and optimizer
    arithmetic as real data, which is all a co-simulation compares.
    """

    def make(seed: int, steps: int, dtype: torch.dtype, device: torch.device) -> list[Batch]:
        generator = torch.Generator().manual_seed(seed + 1_000_003)
        batches = []
        for _ in range(steps):
            inputs = torch.randn(batch_size, *input_shape, generator=generator)
            targets = torch.randint(0, num_classes, (batch_size,), generator=generator)
            batches.append((inputs.to(device=device, dtype=dtype), targets.to(device)))
        return batches

    return make


@dataclass(frozen=True)
class Workload:
    """A few training iterations: the unit a baseline region is recorded for."""

    name: str
    model_factory: Callable[[], nn.Module]
    batches: BatchSource
    loss_fn: LossFunction = F.cross_entropy
    optimizer_factory: OptimizerFactory = field(default_factory=sgd)
    steps: int = 8
    seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    description: str = ""
    # Code the training loop runs after each optimizer step: pruning masks re-applied, weights
    # clipped (BinaryConnect) or rounded onto a fixed-point grid. Part of the reference, so a
    # candidate inherits it unless it brings its own (``Candidate.after_step``).
    after_step: AfterStep | None = None
    # (model, batch) -> loss. None: loss_fn(model(inputs), targets) for an (inputs, targets)
    # batch, the model's own loss (model(**batch).loss) for a dict batch.
    forward: Forward | None = None
    # Built on the optimizer, stepped after every optimizer step, on each side its own.
    scheduler_factory: SchedulerFactory | None = None
    # The global gradient norm is clipped to this before the optimizer step (after unscaling).
    clip_grad_norm: float | None = None
    # Gradients accumulated over this many micro-batches of each batch, one optimizer step.
    micro_batches: int = 1
    # The precision policy the step runs under (pytest_convergence.precision.POLICIES).
    precision: str = DEFAULT_POLICY
    # The user's own training step, given a StepContext: replaces micro_batches, clipping and
    # the optimizer and scheduler steps above, which it does itself.
    step_fn: StepFunction | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"workload name must be a non-empty str, got {self.name!r}")
        if self.steps < 1:
            raise ValueError(f"workload {self.name!r}: steps must be >= 1, got {self.steps}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"workload {self.name!r}: dtype must be floating, got {self.dtype}")
        if self.micro_batches < 1:
            raise ValueError(
                f"workload {self.name!r}: micro_batches must be >= 1, got {self.micro_batches}"
            )
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(
                f"workload {self.name!r}: clip_grad_norm must be > 0, got {self.clip_grad_norm}"
            )
        get_policy(self.precision)
        if not isinstance(self.batches, Iterable) and not callable(self.batches):
            raise BatchError(
                f"workload {self.name!r}: batches must be a function of (seed, steps, dtype, "
                f"device), a sequence, an iterable or a DataLoader, got "
                f"{type(self.batches).__name__}"
            )
        if isinstance(self.batches, Sequence) and self.batches:
            validate_batch(self.batches[0], f"workload {self.name!r}: batch 0")

    @property
    def policy(self) -> PrecisionPolicy:
        return get_policy(self.precision)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The loss of ``model`` on ``batch``: the workload's forward, or the default one."""
        forward = self.forward if self.forward is not None else default_loss(self.loss_fn)
        return forward(model, batch)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The workload's optimizer for ``model``, its factory given the named parameters."""
        return self.optimizer_factory(NamedParameters(model))

    def with_options(self, **changes: Any) -> Workload:
        """A copy with marker or command-line overrides (steps, seed, dtype, device)."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    def build_model(self) -> nn.Module:
        """Fresh model with the seed's initial weights, on the workload's device and dtype."""
        device = torch.device(self.device)
        if device.type == "cpu":
            # The CPU generator is all a CPU workload draws from; torch.manual_seed also queues
            # every accelerator's seeding, a tenth of a small model's build.
            torch.default_generator.manual_seed(self.seed)
        else:
            torch.manual_seed(self.seed)
        model = self.model_factory()
        return model.to(device=device, dtype=self.dtype)

    def parameter_counts(self) -> dict[str, int]:
        """The model's parameters by name, with their numbers of weights: what a baseline must
        describe. Built on the CPU, leaving torch's random state as it was."""
        with torch.random.fork_rng(devices=[]):
            model = self.model_factory()
        return {name: parameter.numel() for name, parameter in model.named_parameters()}

    def make_batches(self) -> list[Batch]:
        """Exactly ``steps`` batches, identical for reference and candidate."""
        device = torch.device(self.device)
        source = self.batches
        if callable(source) and not isinstance(source, torch.utils.data.DataLoader):
            batches = list(source(self.seed, self.steps, self.dtype, device))
        else:
            batches = list(itertools.islice(_batch_iterator(source), self.steps))
        if len(batches) < self.steps:
            raise ValueError(
                f"workload {self.name!r} needs {self.steps} batches, its data gave {len(batches)}"
            )
        return [self._placed(batch, index) for index, batch in enumerate(batches[: self.steps])]

    def _placed(self, batch: object, index: int) -> Batch:
        validate_batch(batch, f"workload {self.name!r}: batch {index}")
        return place_batch(batch, torch.device(self.device), self.dtype)


def _batch_iterator(source: Iterable[Batch]) -> Iterator[Batch]:
    return iter(source)


_REGISTRY = Registry[Workload]("workload")


def register_workload(workload: Workload, *, replace_existing: bool = False) -> Workload:
    """Make ``workload`` available by name to the marker, the fixture and the CLI."""
    return _REGISTRY.register(workload.name, workload, replace_existing=replace_existing)


def get_workload(name: str) -> Workload:
    """The registered workload ``name``; ``ValueError`` lists the known names otherwise."""
    return _REGISTRY.get(name)


def workload_names() -> list[str]:
    """Every registered workload, the sources' included."""
    return _REGISTRY.names()


def is_registered(name: str) -> bool:
    """Whether ``name`` is registered now (sources not loaded): a source's own check, so that
    it never replaces a workload registered before it was loaded."""
    return name in _REGISTRY


def add_workload_source(source: str) -> None:
    """Load ``source`` (``"package.module:function"``, a function that registers workloads)
    the first time a workload lookup needs it. The plugin adds the zoo's,
    ``"pytest_convergence.zoo:register"``, when convergence tests run."""
    _REGISTRY.add_source(source)


def workload_sources() -> tuple[str, ...]:
    """The sources added so far, for a worker process to add in its turn."""
    return _REGISTRY.sources()


def load_workload_sources(sources: Iterable[str]) -> None:
    """Add ``sources`` (another process's :func:`workload_sources`)."""
    for source in sources:
        _REGISTRY.add_source(source)
