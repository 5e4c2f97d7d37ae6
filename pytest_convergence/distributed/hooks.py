"""The DDP communication hooks under test, described so that spawned workers can rebuild them.

PyTorch's own hooks (all-reduce, fp16 compression, PowerSGD) and a custom int8 hook whose
quantization is the very arithmetic of the single-process ``int8_exchange``
(:func:`pytest_convergence.compression.quantize_int8_partitions`), with the LoGM paper's
wrong-scale bug as an option.
"""

from __future__ import annotations

import contextlib
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from pytest_convergence.compression import quantize_int8_partitions

__all__ = [
    "CommHook",
    "DistributedHook",
    "HookFactory",
    "Int8HookState",
    "allreduce_hook",
    "fp16_compress_hook",
    "int8_comm_hook",
    "int8_hook",
    "powersgd_hook",
    "with_evaluated_annotations",
]

# A DDP communication hook: (its state, one bucket) -> a future of the bucket's reduced tensor.
CommHook: TypeAlias = Callable[[Any, GradBucket], torch.futures.Future[torch.Tensor]]
# Builds a hook's state and function for the candidate's process group, inside each worker.
HookFactory: TypeAlias = Callable[[dist.ProcessGroup], tuple[object, CommHook]]


@dataclass(frozen=True)
class DistributedHook:
    """A DDP communication hook under test, described so that spawned workers can rebuild it.

    ``factory`` runs inside every worker with the candidate's process group and returns the
    hook's state and function for ``DistributedDataParallel.register_comm_hook``. It must pickle
    by reference: a module-level function, or a ``functools.partial`` of one with picklable
    arguments (a closure or a lambda cannot cross into a spawned process). ``name`` names the
    candidate in reports and in its own baseline file, ``<workload>--<name>.json``.
    """

    name: str
    factory: HookFactory
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a distributed hook needs a non-empty name")


def _allreduce_factory(group: dist.ProcessGroup) -> tuple[object, CommHook]:
    return group, default_hooks.allreduce_hook


def _fp16_factory(group: dist.ProcessGroup) -> tuple[object, CommHook]:
    return group, default_hooks.fp16_compress_hook


def _powersgd_factory(
    group: dist.ProcessGroup, *, matrix_approximation_rank: int, start_powerSGD_iter: int
) -> tuple[object, CommHook]:
    state = powerSGD_hook.PowerSGDState(
        process_group=group,
        matrix_approximation_rank=matrix_approximation_rank,
        start_powerSGD_iter=start_powerSGD_iter,
    )
    return state, powerSGD_hook.powerSGD_hook


def allreduce_hook() -> DistributedHook:
    """PyTorch's ``default_hooks.allreduce_hook``: DDP's built-in reduction written as a hook.

    The reference as a candidate. It must give exactly zero error: anything else means the
    harness itself does not re-sync or shard identically on both sides.
    """
    return DistributedHook(
        name="ddp-allreduce-hook",
        factory=_allreduce_factory,
        description="default_hooks.allreduce_hook: divide by the world size, all-reduce (sum)",
    )


def fp16_compress_hook() -> DistributedHook:
    """PyTorch's ``default_hooks.fp16_compress_hook``: buckets cast to float16, all-reduced,
    cast back. A correct lossy exchange, relative error about 2^-11 per element."""
    return DistributedHook(
        name="ddp-fp16-compress-hook",
        factory=_fp16_factory,
        description="default_hooks.fp16_compress_hook: buckets all-reduced in float16",
    )


def powersgd_hook(
    matrix_approximation_rank: int = 1, start_powerSGD_iter: int = 2
) -> DistributedHook:
    """PyTorch's PowerSGD hook (Vogels et al. 2019) with error feedback and warm start.

    Gradients of matrices (and convolution kernels viewed as matrices) are replaced by a rank
    ``matrix_approximation_rank`` approximation; vectors are all-reduced uncompressed. The first
    ``start_powerSGD_iter`` steps use a plain all-reduce. Lossy by design: per step, part of a
    matrix gradient is held back and re-added in later steps through error feedback.
    """
    factory = functools.partial(
        _powersgd_factory,
        matrix_approximation_rank=matrix_approximation_rank,
        start_powerSGD_iter=start_powerSGD_iter,
    )
    return DistributedHook(
        name=f"ddp-powersgd-hook-r{matrix_approximation_rank}-start{start_powerSGD_iter}",
        factory=factory,
        description=(
            f"powerSGD_hook, matrix_approximation_rank={matrix_approximation_rank}, "
            f"start_powerSGD_iter={start_powerSGD_iter}, error feedback and warm start"
        ),
    )


@dataclass
class Int8HookState:
    """State of :func:`int8_comm_hook`: its process group and quantization settings."""

    process_group: dist.ProcessGroup
    partitions: int
    last_partition_scale: float


def int8_comm_hook(state: Int8HookState, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Int8 compression of one DDP bucket, per partition, then an average over the ranks.

    The bucket's flat gradient is split into ``partitions`` nearly equal chunks, each quantized
    to int8 with its own scale ``max|x| / 127`` and de-quantized
    (:func:`pytest_convergence.compression.quantize_int8_partitions`, the very function the
    single-process ``int8_exchange`` uses); the de-quantized values are all-reduced and divided
    by the world size. It sends float32, not int8 codes: the numerics of an int8 exchange, not
    its bandwidth, which is what a convergence check is about.
    """
    restored = quantize_int8_partitions(
        bucket.buffer(), state.partitions, state.last_partition_scale
    )
    world_size = dist.get_world_size(state.process_group)
    work = dist.all_reduce(restored, group=state.process_group, async_op=True)
    assert work is not None

    def average(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        return future.value()[0].div_(world_size)

    return work.get_future().then(average)  # type: ignore[no-any-return,unused-ignore]


def _int8_factory(
    group: dist.ProcessGroup, *, partitions: int, last_partition_scale: float
) -> tuple[object, CommHook]:
    return Int8HookState(group, partitions, last_partition_scale), int8_comm_hook


def int8_hook(partitions: int = 4, last_partition_scale: float = 1.0) -> DistributedHook:
    """A custom DDP hook: per-bucket int8 compression in ``partitions`` partitions.

    ``last_partition_scale=1.0`` is correct. Any other value is the bug of the LoGM paper's case
    study (Shen et al. 2018): the last partition de-quantized with a wrong scale. Under DDP the
    partitions are taken per bucket, and which parameters a bucket's last partition holds
    changes after the first step: DDP fills its first buckets in model order and rebuilds them
    in the order gradients became ready (reversed), so the bug hits the classifier at step 1
    and the *first* layers from step 2 on, where the single-process ``int8_exchange`` always
    hits the classifier.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    factory = functools.partial(
        _int8_factory, partitions=partitions, last_partition_scale=last_partition_scale
    )
    suffix = "" if last_partition_scale == 1.0 else f"-last-x{last_partition_scale:g}"
    kind = "correct" if last_partition_scale == 1.0 else "BUG: last partition mis-scaled"
    return DistributedHook(
        name=f"ddp-int8-hook-{partitions}{suffix}",
        factory=factory,
        description=(
            f"int8 compression of each DDP bucket in {partitions} partitions, last partition "
            f"de-quantized x{last_partition_scale:g} ({kind})"
        ),
    )


def with_evaluated_annotations(hook: CommHook) -> CommHook:
    """The hook with its annotations evaluated, for DDP's signature check.

    ``register_comm_hook`` compares the annotations of ``bucket`` and of the return value with
    ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` by equality; in a module with
    ``from __future__ import annotations`` (this one, and much typed code) they are strings and
    a correct hook is refused. Evaluating them changes nothing else, and only in this worker.
    """
    annotations = getattr(hook, "__annotations__", None)
    if annotations and any(isinstance(value, str) for value in annotations.values()):
        # Unresolvable names: leave them, and let DDP say what it expects.
        with contextlib.suppress(NameError, TypeError):
            hook.__annotations__ = typing.get_type_hints(hook)
    return hook
