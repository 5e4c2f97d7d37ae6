"""One rank's half of a distributed co-simulation: two DDP models stepping in lockstep.

Each rank holds two ``DistributedDataParallel`` copies of the workload's model, the reference
with DDP's built-in all-reduce and the candidate with the hook under test, and runs the
engine's lockstep loop (:func:`pytest_convergence.engine.run_lockstep`) on its shard of every
batch. What DDP changes is how a side takes its step (its forward pass goes through the DDP
wrapper, whose backward exchanges the gradients) and that the losses recorded are means over
the ranks; re-syncing copies parameters in place, so the tensors DDP's buckets point at stay
the same. The hook's own state (PowerSGD's error feedback, say) is the candidate's business
and is never reset: a real job keeps it too. Rank 0 records the co-simulation.
"""

from __future__ import annotations

import copy
import datetime
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pytest_convergence.batches import Batch, split, to_device
from pytest_convergence.candidates import Candidate
from pytest_convergence.distributed.hooks import DistributedHook, with_evaluated_annotations
from pytest_convergence.distributed.supervision import (
    RESULT_FILE,
    World,
    progress_writer,
    write_atomically,
)
from pytest_convergence.engine import CandidateSide, Implementation, run_lockstep
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload, get_workload, load_workload_sources

__all__ = ["BATCHES_FILE", "RankConfig", "WorkloadSpec", "run_rank"]

BATCHES_FILE = "batches.pt"


@dataclass(frozen=True)
class WorkloadSpec:
    """How a worker gets the workload: the object itself when it pickles, otherwise its
    registered name plus the options the caller changed, and the workload sources the caller
    had (where the name is registered)."""

    pickled: bytes | None
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def resolve(self) -> Workload:
        if self.pickled is not None:
            workload: Workload = pickle.loads(self.pickled)
            return workload
        load_workload_sources(self.sources)
        return get_workload(self.name).with_options(**self.overrides)


@dataclass(frozen=True)
class RankConfig:
    """Everything a rank needs besides its number. The hook travels pickled and is unpickled by
    the worker after it has taken the caller's ``sys.path`` and working folder: a fork server
    started earlier may not know where the caller's test modules live."""

    world: World
    init_method: str
    threads: int
    workload: WorkloadSpec
    hook: bytes
    cuda: bool
    sys_path: tuple[str, ...]
    cwd: str


def run_rank(rank: int, config: RankConfig) -> None:
    """A worker's body: join the process group, co-simulate, and (rank 0) leave the result."""
    # What spawn gives a worker, also under a fork server started earlier: the caller's module
    # search path (a hook may live in a test module) and working folder.
    sys.path[:] = config.sys_path
    os.chdir(config.cwd)
    world = config.world
    progress = progress_writer(world, rank)
    progress("joining the process group")
    torch.set_num_threads(config.threads)
    device = torch.device(f"cuda:{rank}" if config.cuda else "cpu")
    if config.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=world.backend,
        init_method=config.init_method,
        rank=rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(seconds=world.timeout_s),
    )
    progress("building the models")
    run = DataParallelRank(rank, config, device).cosimulate()
    if run is not None:
        write_atomically(Path(world.folder) / RESULT_FILE, run.to_json())
    progress("finished")
    dist.destroy_process_group()


class DataParallelRank:
    """The reference and the candidate of one rank, each a DDP-wrapped model."""

    def __init__(self, rank: int, config: RankConfig, device: torch.device) -> None:
        self.rank = rank
        self.config = config
        self.device = device
        self.progress = progress_writer(config.world, rank)
        self.hook: DistributedHook = pickle.loads(config.hook)
        self.workload = config.workload.resolve().with_options(
            device="cuda" if config.cuda else "cpu"
        )
        model = self.workload.build_model().to(device)
        candidate_model = copy.deepcopy(model)
        device_ids = [device.index] if config.cuda else None
        # The hook's collectives get a process group of their own, apart from the reference's
        # and the loss reduction's: a hook's state (PowerSGD's) is bound to its group.
        group = dist.new_group(backend=config.world.backend)
        recipe = Candidate(name=self.hook.name, description=self.hook.description)
        self.reference = Implementation.around(self.workload, recipe, model)
        self.candidate = Implementation.around(self.workload, recipe, candidate_model)
        self.reference.forward_model = DistributedDataParallel(model, device_ids=device_ids)
        candidate_ddp = DistributedDataParallel(
            candidate_model, device_ids=device_ids, process_group=group
        )
        state, hook = self.hook.factory(group)
        candidate_ddp.register_comm_hook(state, with_evaluated_annotations(hook))
        self.candidate.forward_model = candidate_ddp
        folder = Path(config.world.folder)
        batches: list[Batch] = torch.load(folder / BATCHES_FILE, weights_only=True)
        world_size = config.world.world_size
        self.shards = [to_device(split(batch, world_size)[rank], device) for batch in batches]

    def cosimulate(self) -> CoSimulation | None:
        """Step both sides through every shard; rank 0 returns the co-simulation. Every rank
        keeps stepping after a divergence, so collectives stay matched."""
        runs = run_lockstep(
            self.workload,
            self.reference,
            [CandidateSide(self.candidate.recipe, self.candidate)],
            self.shards,
            record=self.rank == 0,
            agree_on_losses=self._mean_over_ranks,
            step_after_divergence=True,
            progress=self._report,
        )
        return runs[0] if runs else None

    def _report(self, step: int, phase: str) -> None:
        where = "reference" if phase == "reference" else f"candidate (comm hook {self.hook.name})"
        self.progress(f"step {step}: {where}")

    def _mean_over_ranks(
        self, step: int, reference: float, candidates: list[float | None]
    ) -> tuple[float, list[float | None]]:
        """The step's losses averaged over the ranks, as the recorded losses (a collective)."""
        self.progress(f"step {step}: averaging the losses")
        local = [reference, *(loss if loss is not None else reference for loss in candidates)]
        losses = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(losses)
        reference_mean, *candidate_means = (losses / self.config.world.world_size).tolist()
        return reference_mean, list(candidate_means)
