"""The caller's side of a distributed co-simulation: check, launch the ranks, collect rank 0's run.

:func:`cosimulate_distributed` runs the real thing: ``world_size`` processes, each holding two
DDP-wrapped copies of the workload's model (:mod:`pytest_convergence.distributed.rank`).
Rendezvous goes through a ``file://`` store in a fresh temporary folder (no TCP port to collide
with a neighbouring pytest-xdist worker), and the batches travel to the ranks as one file of
tensors in it; the folder never outlives the run
(:mod:`~pytest_convergence.distributed.run_folder`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from pytest_convergence.batches import batch_size, to_device
from pytest_convergence.distributed.hooks import DistributedHook
from pytest_convergence.distributed.rank import BATCHES_FILE, RankConfig, WorkloadSpec, run_rank
from pytest_convergence.distributed.run_folder import run_folder
from pytest_convergence.distributed.supervision import (
    RESULT_FILE,
    World,
    choose_start_method,
    launch_and_wait,
    reissue_warnings,
)
from pytest_convergence.errors import DistributedRunError
from pytest_convergence.regions import (
    DEFAULT_CANDIDATE_CALIBRATION_SEEDS,
    Calibration,
    Region,
    region_from_runs,
    require_candidate_seeds,
)
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload, get_workload, workload_sources

__all__ = ["BACKENDS", "calibrate_distributed", "cosimulate_distributed"]

BACKENDS = ("gloo", "nccl")


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
    method = choose_start_method(start_method)
    pickled_hook = _check_arguments(resolved, hook, world_size, backend, timeout_s)
    portable = _portable(resolved)
    cuda = backend == "nccl" or resolved.device.startswith("cuda")
    batches = [to_device(batch, torch.device("cpu")) for batch in resolved.make_batches()]
    for index, batch in enumerate(batches):
        if batch_size(batch) % world_size:
            raise ValueError(
                f"workload {resolved.name!r}: batch {index} has {batch_size(batch)} samples, "
                f"not divisible by world_size={world_size}; every rank must get an equal shard"
            )
    with run_folder() as folder:
        torch.save(batches, folder / BATCHES_FILE)
        world = World(
            folder=str(folder),
            world_size=world_size,
            backend=backend,
            timeout_s=timeout_s,
            start_method=method,
            what=f"distributed co-simulation of workload {resolved.name!r} with hook {hook.name!r}",
        )
        config = RankConfig(
            world=world,
            init_method=(folder / "rendezvous").as_uri(),
            threads=max(1, torch.get_num_threads() // world_size),
            workload=portable,
            hook=pickled_hook,
            cuda=cuda,
            sys_path=tuple(sys.path),
            cwd=os.getcwd(),
        )
        launch_and_wait(world, run_rank, config)
        reissue_warnings(folder, world_size)
        return CoSimulation.from_json(
            (folder / RESULT_FILE).read_text(encoding="utf-8"), source="rank 0"
        )


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


def _portable(workload: Workload) -> WorkloadSpec:
    """The workload without its batches (they travel as tensors), pickled when possible."""
    stripped = dataclasses.replace(workload, batches=())
    try:
        return WorkloadSpec(pickled=pickle.dumps(stripped), name=workload.name)
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
    return WorkloadSpec(
        pickled=None, name=workload.name, overrides=overrides, sources=workload_sources()
    )


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
