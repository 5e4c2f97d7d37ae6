"""Co-simulation: step a reference and candidates in lockstep from identical state.

Local (re-synced) co-simulation: before every step each candidate is reset to the reference's
weights, buffers, optimizer state and RNG state, then both take one step on the same batch
(:func:`pytest_convergence.engine.run_lockstep`). Each step's difference is then the candidate's
own, which is what lets a verdict name the first step and parameter.

Free-running training (:func:`train`) runs one implementation on its own for the cumulative view:
loss curves and LoGM trajectories, and the peer methods of the detection benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from pytest_convergence.candidates import REFERENCE, Candidate
from pytest_convergence.engine import (
    CandidateSide,
    Implementation,
    parameter_layout,
    reference_recipe,
    run_lockstep,
)
from pytest_convergence.step_statistics import WeightSeries, step_trace
from pytest_convergence.traces import CoSimulation, Trace
from pytest_convergence.workloads import Workload

__all__ = ["cosimulate", "cosimulate_many", "train"]


def cosimulate(workload: Workload, candidate: Candidate) -> CoSimulation:
    """Run ``candidate`` against the reference of ``workload``, re-synced every step."""
    return cosimulate_many(workload, [candidate])[0]


def cosimulate_many(workload: Workload, candidates: Sequence[Candidate]) -> list[CoSimulation]:
    """Several candidates against one reference run (calibration draws share the reference)."""
    if not candidates:
        raise ValueError("cosimulate_many needs at least one candidate")
    workers = {candidate.workers for candidate in candidates}
    if len(workers) != 1:
        raise ValueError(
            f"candidates co-simulated together must use the same number of workers, got {workers}"
        )
    reference = Implementation.build(workload, reference_recipe(candidates[0]))
    sides = [CandidateSide.build(workload, reference, candidate) for candidate in candidates]
    return run_lockstep(workload, reference, sides, workload.make_batches())


def train(workload: Workload, candidate: Candidate = REFERENCE) -> tuple[Trace, nn.Module]:
    """Free-running training of one implementation; its trace and its final model."""
    implementation = Implementation.build(workload, candidate)
    trace = Trace(label=candidate.name)
    layout = parameter_layout(implementation.model)
    series = WeightSeries(layout, list(implementation.model.parameters()))
    trace.steps.append(step_trace(layout, series.latest, step=0, loss=None))
    for index, batch in enumerate(workload.make_batches()):
        trained = implementation.train_step(batch, index + 1, traced=True)
        _, after = series.advance(list(implementation.model.parameters()), trained.gradient_norms)
        if not math.isfinite(trained.loss) or not all(after.finite):
            break
        trace.steps.append(step_trace(layout, after, step=index + 1, loss=trained.loss))
    return trace, implementation.model
