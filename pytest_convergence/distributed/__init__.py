"""Co-simulation on real multi-process data parallelism: DDP communication hooks under test.

The single-process runner (:mod:`pytest_convergence.cosim`) simulates a gradient exchange over
virtual workers. That checks the arithmetic of a compression scheme, not the code that ships: a
``DistributedDataParallel`` communication hook runs per bucket (in DDP's bucket order, not the
model's), inside autograd's backward, on futures, over a real process group. Bugs live there
too: a partition boundary computed per bucket, a division by the world size done twice, an
error-feedback buffer keyed by the wrong bucket. :func:`cosimulate_distributed` runs the real
thing: ``world_size`` worker processes, each holding two DDP-wrapped copies of the workload's
model, the reference with DDP's built-in all-reduce and the candidate with the hook under test,
stepped by the same lockstep loop as a single-process co-simulation
(:func:`pytest_convergence.engine.run_lockstep`).

The package, one concern a module:

- :mod:`~pytest_convergence.distributed.hooks`: the hooks under test;
- :mod:`~pytest_convergence.distributed.cosimulation`: the caller's side (arguments, batches,
  launch, rank 0's result) and calibration against a known-good hook;
- :mod:`~pytest_convergence.distributed.rank`: one rank's half of the co-simulation;
- :mod:`~pytest_convergence.distributed.supervision`: starting, watching and stopping the
  worker processes, never hanging a test session, and never outliving the caller;
- :mod:`~pytest_convergence.distributed.run_folder`: the run's temporary folder, which never
  outlives the run;
- :mod:`~pytest_convergence.distributed.check`: ``check_distributed``, the fixture's check.
"""

from __future__ import annotations

from pytest_convergence.distributed.check import check_distributed
from pytest_convergence.distributed.cosimulation import (
    BACKENDS,
    calibrate_distributed,
    cosimulate_distributed,
)
from pytest_convergence.distributed.hooks import (
    DistributedHook,
    Int8HookState,
    allreduce_hook,
    fp16_compress_hook,
    int8_comm_hook,
    int8_hook,
    powersgd_hook,
)
from pytest_convergence.distributed.supervision import (
    FAILURE_GRACE_S,
    FORKSERVER_PRELOAD,
    START_METHODS,
    TERMINATE_GRACE_S,
)
from pytest_convergence.errors import DistributedRunError, DistributedWorkerWarning

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
