"""Co-simulation on real multi-process data parallelism: DDP communication hooks under test.

The single-process runner (:mod:`pytest_convergence.cosim`) simulates a gradient exchange over
virtual workers. That checks the arithmetic of a compression scheme, not the code that ships: a
``DistributedDataParallel`` communication hook runs per bucket (in DDP's bucket order, not the
model's), inside autograd's backward, on futures, over a real process group. Bugs live there
too: a partition boundary computed per bucket, a division by the world size done twice, an
error-feedback buffer keyed by the wrong bucket. :func:`cosimulate_distributed` runs the real
thing: ``world_size`` spawned processes, each holding two DDP-wrapped copies of the workload's
model, the reference with DDP's built-in all-reduce and the candidate with the hook under test.

Every step, on every rank: the reference's weights, buffers, optimizer state and RNG state are
captured (:class:`pytest_convergence.cosim._State`, exactly as in single-process co-simulation),
the reference steps on the rank's shard of the batch, the candidate is re-synced to the captured
state (parameters copied in place, so the tensors DDP's buckets point at stay the same) and
steps. The hook's own state (PowerSGD's error feedback, say) is the candidate's business and is
never reset: a real job keeps it too. Rank 0 turns the step into a
:class:`~pytest_convergence.traces.StepComparison` with the same functions as ``cosim.py``, and
sends the finished :class:`~pytest_convergence.traces.CoSimulation` back to the caller as JSON.

Process management is built to never hang a test session: rendezvous goes through a
``file://`` store in a fresh temporary folder (no TCP port to collide with a neighbouring
pytest-xdist worker), the parent watches its workers against a deadline, a worker's exception
text comes back through a file, and stragglers are terminated, then killed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import connection, get_all_start_methods, get_context
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from pytest_convergence.candidates import REFERENCE
from pytest_convergence.cosim import (
    _Implementation,
    _layout,
    _module_types,
    _require_finite,
    _State,
)
from pytest_convergence.regions import (
    DEFAULT_CANDIDATE_CALIBRATION_SEEDS,
    DEFAULT_TOLERANCE,
    Calibration,
    Region,
    calibrate,
    region_from_runs,
    require_candidate_seeds,
)
from pytest_convergence.traces import CoSimulation, StepComparison, Trace
from pytest_convergence.tracing import (
    FlatWeights,
    SnapshotSeries,
    compare_weights,
    gradient_norms,
    step_trace,
)
from pytest_convergence.workloads import Batch, Workload, get_workload
from pytest_convergence.zoo.candidates import quantize_int8_partitions

if TYPE_CHECKING:
    from pytest_convergence.checks import BoundCheck, CheckResult

__all__ = [
    "BACKENDS",
    "FAILURE_GRACE_S",
    "FORKSERVER_PRELOAD",
    "START_METHODS",
    "TERMINATE_GRACE_S",
    "DistributedHook",
    "DistributedRunError",
    "DistributedWorkerWarning",
    "Int8HookState",
    "allreduce_hook",
    "calibrate_distributed",
    "check_distributed",
    "cosimulate_distributed",
    "fp16_compress_hook",
    "int8_comm_hook",
    "int8_hook",
    "powersgd_hook",
]

_T = TypeVar("_T")

BACKENDS = ("gloo", "nccl")
START_METHODS = ("forkserver", "spawn")
# What a fork server imports once so that its workers start in milliseconds: torch, the
# optimizer machinery an optimizer's first step imports lazily (torch._dynamo: about 4 s of a
# fresh interpreter's start on a loaded machine), DDP and this module.
FORKSERVER_PRELOAD = ("torch", "torch._dynamo", "pytest_convergence.distributed")
# A DDP communication hook: (its state, one bucket) -> a future of the bucket's reduced tensor.
CommHook: TypeAlias = Callable[[Any, GradBucket], torch.futures.Future[torch.Tensor]]
# Builds a hook's state and function for the candidate's process group, inside each worker.
HookFactory: TypeAlias = Callable[[dist.ProcessGroup], tuple[object, CommHook]]

# After the first worker fails, how long its peers get to report their own view before they are
# terminated. Peers blocked in a collective with the dead rank usually fail within milliseconds
# (connection closed); what they say is secondary, the first failure is the diagnosis.
FAILURE_GRACE_S = 2.0
# terminate() (SIGTERM), then kill() (SIGKILL) for a worker that ignores it.
TERMINATE_GRACE_S = 5.0
_POLL_S = 0.5
_TAIL_LINES = 25
_RESULT = "result.json"
_BATCHES = "batches.pt"


class DistributedRunError(RuntimeError):
    """A distributed co-simulation could not complete: a worker raised, died, or hung, or the
    requested backend cannot run here. Not a verdict on the candidate: the run never finished.

    ``rank`` is the rank that failed first (None when the run timed out as a whole or never
    started); ``exitcode`` its exit code; ``worker_error`` the traceback it sent back.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        exitcode: int | None = None,
        worker_error: str = "",
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.worker_error = worker_error

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: rebuild through a helper, so the error survives pickling
        # (pytest-xdist and multiprocessing pickle exceptions).
        return (_rebuild_error, (str(self), self.rank, self.exitcode, self.worker_error))


def _rebuild_error(
    message: str, rank: int | None, exitcode: int | None, worker_error: str
) -> DistributedRunError:
    return DistributedRunError(message, rank=rank, exitcode=exitcode, worker_error=worker_error)


class DistributedWorkerWarning(UserWarning):
    """A warning raised inside a worker process, re-issued in the caller's process.

    Workers are separate interpreters: their warnings would otherwise vanish into captured
    stderr, out of reach of the caller's warning filters (``filterwarnings = error`` included).
    The text names the ranks, the original category and where it was raised; filter this
    category with a message pattern to accept a specific one.
    """


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


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
    (:func:`pytest_convergence.zoo.candidates.quantize_int8_partitions`, the very function the
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


# --------------------------------------------------------------------------------------------
# The parent: launch, watch, collect
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WorkloadSpec:
    """How a worker gets the workload: the object itself when it pickles, otherwise its
    registered name plus the options the caller changed (the zoo's workloads hold closures)."""

    pickled: bytes | None
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> Workload:
        if self.pickled is not None:
            workload: Workload = pickle.loads(self.pickled)
            return workload
        return get_workload(self.name).with_options(**self.overrides)


@dataclass(frozen=True)
class _RunConfig:
    """Everything a worker needs. The hook travels pickled and is unpickled by the worker after
    it has taken the caller's ``sys.path`` and working folder: a fork server started earlier
    may not know where the caller's test modules live."""

    folder: str
    init_method: str
    world_size: int
    backend: str
    timeout_s: float
    threads: int
    workload: _WorkloadSpec
    hook: bytes
    hook_name: str
    cuda: bool
    start_method: str
    sys_path: tuple[str, ...]
    cwd: str


def cosimulate_distributed(
    workload: str | Workload,
    hook: DistributedHook,
    *,
    world_size: int = 2,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    start_method: str | None = None,
) -> CoSimulation:
    """Co-simulate ``hook`` against DDP's built-in all-reduce on ``world_size`` processes.

    Each rank trains on shard ``rank`` of every batch (batches are split evenly, as the
    single-process runner splits them over virtual workers). Returns rank 0's
    :class:`~pytest_convergence.traces.CoSimulation`, judged like any other. Raises
    :class:`DistributedRunError` naming the rank when a worker raises, dies or the run exceeds
    ``timeout_s`` seconds (workers are then terminated; nothing is left running).

    ``backend="nccl"`` runs rank r on ``cuda:r`` and needs ``world_size`` GPUs; ``"gloo"`` runs
    on the CPU, or on ``cuda:r`` when the workload's device is a CUDA device.

    ``start_method``: how workers start, never by forking the caller (its threads, locks and
    CUDA context would be copied mid-flight). ``"forkserver"`` (the default where the platform
    has it) forks them from a clean server process that has imported torch once, ``"spawn"``
    starts fresh interpreters: about 1 s against 13 s per run, measured on a loaded 2-core
    machine (see docs/distributed.md).
    """
    resolved = get_workload(workload) if isinstance(workload, str) else workload
    method = _start_method(start_method)
    pickled_hook = _check_arguments(resolved, hook, world_size, backend, timeout_s)
    portable = _portable(resolved)
    cuda = backend == "nccl" or resolved.device.startswith("cuda")
    batches = [(inputs.cpu(), targets.cpu()) for inputs, targets in resolved.make_batches()]
    for index, (inputs, _) in enumerate(batches):
        if inputs.shape[0] % world_size:
            raise ValueError(
                f"workload {resolved.name!r}: batch {index} has {inputs.shape[0]} samples, not "
                f"divisible by world_size={world_size}; every rank must get an equal shard"
            )
    folder = Path(tempfile.mkdtemp(prefix="pytest-convergence-ddp-"))
    try:
        torch.save(batches, folder / _BATCHES)
        config = _RunConfig(
            folder=str(folder),
            init_method=(folder / "rendezvous").as_uri(),
            world_size=world_size,
            backend=backend,
            timeout_s=timeout_s,
            threads=max(1, torch.get_num_threads() // world_size),
            workload=portable,
            hook=pickled_hook,
            hook_name=hook.name,
            cuda=cuda,
            start_method=method,
            sys_path=tuple(sys.path),
            cwd=os.getcwd(),
        )
        _launch_and_wait(config, resolved.name)
        _reissue_warnings(folder, world_size)
        return CoSimulation.from_json(
            (folder / _RESULT).read_text(encoding="utf-8"), source="rank 0"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start_method(requested: str | None) -> str:
    available = get_all_start_methods()
    if requested is None:
        return "forkserver" if "forkserver" in available else "spawn"
    if requested not in START_METHODS or requested not in available:
        raise ValueError(
            f"start_method must be one of {', '.join(m for m in START_METHODS if m in available)}"
            f", got {requested!r} (never 'fork': the caller's threads and CUDA context would be "
            "copied into the workers)"
        )
    return requested


def _check_arguments(
    workload: Workload, hook: DistributedHook, world_size: int, backend: str, timeout_s: float
) -> bytes:
    """Refuse what cannot work before starting a process; the hook, pickled."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not dist.is_available():
        raise DistributedRunError(
            f"torch.distributed is not available in this build (torch {torch.__version__})"
        )
    if backend == "gloo" and not dist.is_gloo_available():
        raise DistributedRunError(f"the gloo backend is not available (torch {torch.__version__})")
    if backend == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < world_size or not dist.is_nccl_available():
            raise DistributedRunError(
                f"backend='nccl' needs one CUDA device per rank: world_size={world_size}, "
                f"{gpus} CUDA device(s) visible, NCCL "
                f"{'available' if dist.is_nccl_available() else 'not built in'} "
                f"(torch {torch.__version__}); use backend='gloo' on the CPU"
            )
    try:
        return pickle.dumps(hook)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ValueError(
            f"hook {hook.name!r}: its factory cannot be sent to a spawned worker ({error}); use "
            "a module-level function, or functools.partial of one"
        ) from None


def _portable(workload: Workload) -> _WorkloadSpec:
    """The workload without its batches (they travel as tensors), pickled when possible."""
    stripped = dataclasses.replace(workload, batches=())
    try:
        return _WorkloadSpec(pickled=pickle.dumps(stripped), name=workload.name)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        reason = str(error)
    try:
        registered = dataclasses.replace(get_workload(workload.name), batches=())
    except ValueError:
        registered = None
    overrides = {
        "steps": workload.steps,
        "seed": workload.seed,
        "dtype": workload.dtype,
        "device": workload.device,
    }
    if registered is None or registered.with_options(**overrides) != stripped:
        raise ValueError(
            f"workload {workload.name!r} cannot be sent to a spawned worker ({reason}) and is not "
            "the registered workload of that name with other steps, seed, dtype or device; "
            "define its model and optimizer factories at module level (functools.partial of "
            "torch.optim.SGD pickles), or register it in a module the workers import"
        )
    return _WorkloadSpec(pickled=None, name=workload.name, overrides=overrides)


def _launch_and_wait(config: _RunConfig, workload: str) -> None:
    """Start one process per rank; return when all succeeded, raise otherwise. Never leaves a
    worker running: every path ends with stragglers terminated, then killed."""
    context: ForkServerContext | SpawnContext = (
        get_context("forkserver") if config.start_method == "forkserver" else get_context("spawn")
    )
    if isinstance(context, ForkServerContext):
        # Takes effect when this process first starts its fork server, and then for every
        # later run: the imports a worker needs are paid once per test process, not per rank.
        context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    processes: list[BaseProcess] = [
        context.Process(
            target=_worker,
            args=(rank, config),
            name=f"pytest-convergence-ddp-rank{rank}",
            daemon=True,  # dies with the caller, whatever happens to it
        )
        for rank in range(config.world_size)
    ]
    started = time.monotonic()
    failed_at: dict[int, float] = {}  # rank -> wall-clock time it failed
    try:
        for process in processes:
            process.start()
        running = set(range(config.world_size))
        give_up_at = started + config.timeout_s
        while running and time.monotonic() < give_up_at:
            ready = connection.wait(
                [processes[rank].sentinel for rank in running],
                timeout=min(_POLL_S, max(0.0, give_up_at - time.monotonic())),
            )
            exited = {rank for rank in running if processes[rank].exitcode is not None}
            if ready and not exited:
                time.sleep(0.01)  # closed its end of the pipe, not reaped yet
            running -= exited
            for rank in exited:
                if processes[rank].exitcode != 0:
                    failed_at[rank] = _error_time(config, rank)
                    give_up_at = min(give_up_at, time.monotonic() + FAILURE_GRACE_S)
        stuck = {rank: _progress_of(config, rank) for rank in sorted(running)}
    finally:
        exitcodes = _stop(processes)
    elapsed = time.monotonic() - started
    what = f"distributed co-simulation of workload {workload!r} with hook {config.hook_name!r}"
    if failed_at:
        # The root cause first: the rank whose exception came earliest; its peers then fail
        # in the collective it left (connection closed by peer) or are terminated.
        order = sorted(failed_at, key=lambda rank: (failed_at[rank], rank))
        raise _failure_error(what, config, exitcodes, order, stuck)
    if stuck:
        where = "; ".join(f"rank {rank} (at {place})" for rank, place in stuck.items())
        raise DistributedRunError(
            f"{what} did not finish within timeout_s={config.timeout_s:g} s "
            f"({config.world_size} ranks, {config.backend}); still running: {where}. "
            "Terminated. A rank waiting forever in a collective usually means another rank "
            "never reached it (a hook that blocks, or ranks issuing collectives in different "
            "orders)."
        )
    if not (Path(config.folder) / _RESULT).exists():
        raise DistributedRunError(
            f"{what}: every rank exited cleanly after {elapsed:.1f} s but rank 0 sent no result",
            rank=0,
        )


def _failure_error(
    what: str,
    config: _RunConfig,
    exitcodes: Sequence[int | None],
    failures: Sequence[int],
    stuck: dict[int, str],
) -> DistributedRunError:
    first = failures[0]
    exitcode = exitcodes[first]
    worker_error = _error_text(config, first)
    lines = [
        f"{what} failed: rank {first} {_describe_exit(exitcode)} "
        f"(at {_progress_of(config, first)})",
    ]
    if worker_error:
        lines.append(f"rank {first} raised:")
        lines.extend("  " + line for line in _tail(worker_error))
    else:
        lines.append(f"rank {first} sent no exception text (killed, or crashed in native code)")
    for rank in failures[1:]:
        text = _tail(_error_text(config, rank), 1)
        last = f": {text[-1]}" if text else ""
        lines.append(f"then rank {rank} {_describe_exit(exitcodes[rank])}{last}")
    for rank, place in stuck.items():
        lines.append(f"rank {rank} was terminated (at {place})")
    return DistributedRunError(
        "\n".join(lines), rank=first, exitcode=exitcode, worker_error=worker_error
    )


def _error_record(config: _RunConfig, rank: int) -> dict[str, Any]:
    text = _read(Path(config.folder) / f"error-{rank}.json")
    if not text:
        return {}
    record: dict[str, Any] = json.loads(text)
    return record


def _error_text(config: _RunConfig, rank: int) -> str:
    return str(_error_record(config, rank).get("traceback", ""))


def _error_time(config: _RunConfig, rank: int) -> float:
    """When ``rank`` raised (it says so in its error file), or now when it died silently."""
    return float(_error_record(config, rank).get("time", time.time()))


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


def _stop(processes: Sequence[BaseProcess]) -> list[int | None]:
    """Terminate, then kill, every worker still running; reap them all; their exit codes."""
    alive = [p for p in processes if p.pid is not None and p.exitcode is None]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in alive:
        if process.exitcode is None:
            process.kill()
            process.join(TERMINATE_GRACE_S)
    # Not closed: Process.close() races with another thread's Process.start(), which polls
    # every child of this process; the objects release their pipes when collected.
    return [p.exitcode for p in processes]


def _reissue_warnings(folder: Path, world_size: int) -> None:
    """Warnings raised in workers, issued here once each, naming the ranks that saw them."""
    seen: dict[tuple[str, str, str, int], list[int]] = {}
    for rank in range(world_size):
        path = folder / f"warnings-{rank}.json"
        if not path.exists():
            continue
        for category, message, filename, lineno in json.loads(path.read_text(encoding="utf-8")):
            seen.setdefault((category, message, filename, int(lineno)), []).append(rank)
    for (category, message, filename, lineno), ranks in seen.items():
        where = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        warnings.warn(
            DistributedWorkerWarning(f"{where}: {category}: {message} ({filename}:{lineno})"),
            stacklevel=3,
        )


def _progress_of(config: _RunConfig, rank: int) -> str:
    return _read(Path(config.folder) / f"progress-{rank}.txt") or "starting the interpreter"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _tail(text: str, lines: int = _TAIL_LINES) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------
# The workers
# --------------------------------------------------------------------------------------------


def _worker(rank: int, config: _RunConfig) -> None:
    """Entry point of a spawned worker: run, and report an exception and warnings as files."""
    folder = Path(config.folder)
    with warnings.catch_warnings(record=True) as caught:
        # Every warning is recorded (once per place, as Python shows them) and handed to the
        # caller, whose filters then decide: nothing is silenced here.
        warnings.simplefilter("default")
        failed = False
        try:
            _run_rank(rank, config)
        except BaseException:
            failed = True
            record = {"time": time.time(), "traceback": traceback.format_exc()}
            _write_atomically(folder / f"error-{rank}.json", json.dumps(record))
        records = [[w.category.__name__, str(w.message), w.filename, w.lineno] for w in caught]
    _write_atomically(folder / f"warnings-{rank}.json", json.dumps(records))
    # Everything the caller needs is on disk. Skip interpreter finalization: with torch loaded
    # it takes seconds (measured 2-4 s per worker on a loaded 2-core machine), and a spawned
    # child would otherwise pay it through ``sys.exit`` in ``multiprocessing.spawn``.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


def _run_rank(rank: int, config: _RunConfig) -> None:
    # What spawn gives a worker, also under a fork server started earlier: the caller's module
    # search path (a hook may live in a test module) and working folder.
    sys.path[:] = config.sys_path
    os.chdir(config.cwd)
    folder = Path(config.folder)
    progress = functools.partial(_write_atomically, folder / f"progress-{rank}.txt")
    progress("joining the process group")
    torch.set_num_threads(config.threads)
    device = torch.device(f"cuda:{rank}" if config.cuda else "cpu")
    if config.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=config.backend,
        init_method=config.init_method,
        rank=rank,
        world_size=config.world_size,
        timeout=datetime.timedelta(seconds=config.timeout_s),
    )
    run = _Rank(rank, config, device, progress).cosimulate()
    if run is not None:
        _write_atomically(folder / _RESULT, run.to_json())
    progress("finished")
    dist.destroy_process_group()


class _Rank:
    """One rank's half of the co-simulation: two DDP models stepping in lockstep."""

    def __init__(
        self, rank: int, config: _RunConfig, device: torch.device, progress: Callable[[str], None]
    ) -> None:
        self.rank = rank
        self.config = config
        self.progress = progress
        progress("building the models")
        self.hook: DistributedHook = pickle.loads(config.hook)
        self.workload = config.workload.resolve().with_options(
            device="cuda" if config.cuda else "cpu"
        )
        model = self.workload.build_model().to(device)
        candidate_model = copy.deepcopy(model)
        device_ids = [device.index] if config.cuda else None
        # The hook's collectives get a process group of their own, apart from the reference's
        # and the loss reduction's: a hook's state (PowerSGD's) is bound to its group.
        group = dist.new_group(backend=config.backend)
        self.reference = _Implementation(
            model, self.workload.optimizer_factory(model.parameters()), REFERENCE, self.workload
        )
        self.candidate = _Implementation(
            candidate_model,
            self.workload.optimizer_factory(candidate_model.parameters()),
            REFERENCE,
            self.workload,
        )
        self.reference_ddp = DistributedDataParallel(model, device_ids=device_ids)
        self.candidate_ddp = DistributedDataParallel(
            candidate_model, device_ids=device_ids, process_group=group
        )
        state, hook = self.hook.factory(group)
        self.candidate_ddp.register_comm_hook(state, _with_evaluated_annotations(hook))
        batches: list[Batch] = torch.load(Path(config.folder) / _BATCHES, weights_only=True)
        self.shards = [
            (
                inputs.chunk(config.world_size)[rank].to(device),
                targets.chunk(config.world_size)[rank].to(device),
            )
            for inputs, targets in batches
        ]

    def cosimulate(self) -> CoSimulation | None:
        """Step both sides through every batch; rank 0 returns the co-simulation."""
        workload = self.workload
        keep = self.rank == 0
        layout = _layout(self.reference.model)
        result = CoSimulation(
            workload=workload.name,
            candidate=self.hook.name,
            seed=workload.seed,
            steps=workload.steps,
            dtype=str(workload.dtype).removeprefix("torch."),
            device=workload.device,
            reference=Trace(label="reference"),
            module_types=_module_types(self.reference.model),
        )
        series = SnapshotSeries(layout, list(self.reference.model.parameters()))
        if keep:
            result.reference.steps.append(step_trace(layout, series.latest, step=0, loss=None))
        stopped = False
        for index, (inputs, targets) in enumerate(self.shards):
            step = index + 1
            self.progress(f"step {step}: reference")
            before = _State.capture(self.reference)
            reference_loss, norms = _ddp_step(
                self.reference_ddp, self.reference, inputs, targets, traced=keep
            )
            previous, after = series.advance(list(self.reference.model.parameters()), norms)
            _require_finite(layout, after, self.reference.model, step)
            self.progress(f"step {step}: candidate (comm hook {self.hook.name})")
            before.restore(self.candidate)
            candidate_loss, _ = _ddp_step(
                self.candidate_ddp, self.candidate, inputs, targets, traced=False
            )
            self.progress(f"step {step}: averaging the losses")
            losses = torch.stack([reference_loss, candidate_loss]).to(torch.float64)
            dist.all_reduce(losses)
            reference_mean, candidate_mean = (losses / self.config.world_size).tolist()
            if keep:
                result.reference.steps.append(
                    step_trace(layout, after, step=step, loss=reference_mean)
                )
                if not stopped:
                    candidate = FlatWeights.of(layout, list(self.candidate.model.parameters()))
                    comparison = StepComparison(
                        step=step,
                        reference_loss=reference_mean,
                        candidate_loss=candidate_mean,
                        reference_global_logm=after.global_logm,
                        candidate_global_logm=candidate.global_logm,
                        previous_global_logm=previous.global_logm,
                        parameters=compare_weights(layout, previous, after, candidate),
                    )
                    result.comparisons.append(comparison)
                    # As in cosim.py: once non-finite, later steps say nothing more. Every
                    # rank keeps stepping, so collectives stay matched.
                    stopped = comparison.non_finite
        return result if keep else None


def _with_evaluated_annotations(hook: CommHook) -> CommHook:
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


def _ddp_step(
    ddp: DistributedDataParallel,
    implementation: _Implementation,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    traced: bool,
) -> tuple[torch.Tensor, list[float] | None]:
    """One data-parallel training step on this rank's shard: the local loss and, when
    ``traced``, the norms of the exchanged gradients the optimizer saw."""
    implementation.model.train()
    implementation.optimizer.zero_grad(set_to_none=True)
    loss: torch.Tensor = implementation.workload.loss_fn(ddp(inputs), targets)
    loss.backward()  # type: ignore[no-untyped-call]
    norms = gradient_norms(list(implementation.model.parameters())) if traced else None
    implementation.optimizer.step()
    implementation.after_optimizer_step()
    return loss.detach(), norms


# --------------------------------------------------------------------------------------------
# Regions and checks
# --------------------------------------------------------------------------------------------


def calibrate_distributed(
    workload: Workload,
    hook: DistributedHook,
    *,
    seeds: Sequence[int] | None = None,
    world_size: int = 2,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    start_method: str | None = None,
) -> Region:
    """A region calibrated against a known-good (lossy) hook over real DDP runs, one per seed.

    The DDP counterpart of ``calibrate(workload, candidate=...)``: a hook whose error is far
    beyond float rounding (PowerSGD, int8) gets a region of its own, and later versions of it
    are held to that behaviour step by step.
    """
    if seeds is None:
        seeds = [workload.seed + offset for offset in range(DEFAULT_CANDIDATE_CALIBRATION_SEEDS)]
    require_candidate_seeds(workload, hook.name, seeds)
    runs = [
        cosimulate_distributed(
            workload.with_options(seed=seed),
            hook,
            world_size=world_size,
            backend=backend,
            timeout_s=timeout_s,
            start_method=start_method,
        )
        for seed in seeds
    ]
    description = f"known-good DDP comm hook {hook.name!r} over {world_size} ranks ({backend})"
    if hook.description:
        description += f": {hook.description}"
    calibration = Calibration(
        kind="candidate",
        description=description,
        tolerance=None,
        draws=1,
        candidate=hook.name,
        seeds=tuple(seeds),
        steps=workload.steps,
    )
    return region_from_runs(runs, calibration)


def check_distributed(
    convergence: BoundCheck,
    hook: DistributedHook,
    *,
    workload: str | Workload | None = None,
    steps: int | None = None,
    seed: int | None = None,
    known_good: DistributedHook | None = None,
    own_region: bool = False,
    world_size: int = 2,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    start_method: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CheckResult:
    """``convergence.check`` for a DDP hook: co-simulate it on ``world_size`` processes and
    judge it with the fixture's baselines, options, summary and report folders.

    Without ``known_good``, the region is the workload's single-process default region,
    ``<workload>.json``, the very file ``convergence.check`` uses (and records, under
    ``--convergence-record``): DDP's all-reduce over W ranks is an exact mean exchange over W
    workers up to summation order, and the statistics are relative to each step's update.
    ``known_good`` (or ``own_region=True``): a region calibrated from real DDP runs of that
    hook, ``<workload>--<hook name>.json``.
    """
    __tracebackhide__ = True
    checker = convergence.checker
    defaults = convergence.defaults
    chosen = workload if workload is not None else defaults.get("workload")
    if not isinstance(chosen, str | Workload):
        raise ValueError(
            "check_distributed() needs a workload: pass workload=..., or set "
            "@pytest.mark.convergence(workload=...)"
        )
    resolved = checker.resolve(
        chosen,
        steps=steps if steps is not None else _marker(defaults, "steps", int),
        seed=seed if seed is not None else _marker(defaults, "seed", int),
        dtype=_marker(defaults, "dtype", str),
        device=_marker(defaults, "device", str),
    )
    region_hook = hook if own_region else known_good

    def calibrate_region() -> Region:
        if region_hook is None:
            return calibrate(resolved, tolerance=tolerance)
        return calibrate_distributed(
            resolved,
            region_hook,
            world_size=world_size,
            backend=backend,
            timeout_s=timeout_s,
            start_method=start_method,
        )

    checks_before = len(checker.results)
    try:
        return checker.judge_run(
            resolved,
            hook.name,
            checker.baseline_for(resolved, region_hook.name if region_hook else None),
            run=lambda: cosimulate_distributed(
                resolved,
                hook,
                world_size=world_size,
                backend=backend,
                timeout_s=timeout_s,
                start_method=start_method,
            ),
            calibrate_region=calibrate_region,
            known_good=region_hook.name if region_hook else None,
            label=convergence.label,
        )
    finally:
        if len(checker.results) > checks_before:
            convergence.record(checker.results[-1])


def _marker(defaults: dict[str, object], key: str, kind: type[_T]) -> _T | None:
    """A marker argument of the expected type, or None (the checker's default applies)."""
    value = defaults.get(key)
    return value if isinstance(value, kind) else None
