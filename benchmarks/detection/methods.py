"""Detection methods compared by the benchmark, each reduced to "flagged at step t, or not".

- ``ours``: co-simulation judged against a calibrated per-parameter region (``regions.judge``).
- ``loss-rtol-1e-2`` / ``loss-rtol-1e-3``: golden loss-curve comparison of free-running runs, as
  large-model CI does: flagged at the first step where |loss_c - loss_r| > rtol * |loss_r|.
- ``final-assert-close``: ``torch.testing.assert_close`` on the final weights of free-running
  runs (default float32 tolerances); only the final step counts.
- ``paper-logm-region``: the LoGM paper's method taken literally: the divergence region is
  min..max of the per-iteration global LoGM delta over 12 seed-varied reference runs (fresh
  weights and batches); a free-running candidate is flagged at the first step whose delta leaves
  it. ``paper-logm-region-per-step`` is the stricter variant with one min..max per iteration.
- ``cosim-global-logm``: global LoGM alone in our co-simulation: flagged at the first re-synced
  step where |global LoGM_c - global LoGM_r| exceeds the region's ``global_logm_gap_limit``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pytest_convergence.candidates import REFERENCE, Candidate, mean_exchange
from pytest_convergence.cosim import train
from pytest_convergence.regions import Region
from pytest_convergence.traces import CoSimulation, Trace
from pytest_convergence.workloads import Workload

PEER_METHODS = (
    "loss-rtol-1e-2",
    "loss-rtol-1e-3",
    "final-assert-close",
    "paper-logm-region",
    "paper-logm-region-per-step",
    "cosim-global-logm",
)
PAPER_SEEDS = tuple(range(1000, 1012))


def reference_recipe(workers: int) -> Candidate:
    """The reference a candidate over ``workers`` virtual workers is compared with: an exact
    mean exchange over the same workers, as the co-simulation itself uses (batch-norm
    statistics per shard and summation order then match)."""
    if workers == 1:
        return REFERENCE
    return Candidate(name="reference", exchange=mean_exchange, workers=workers)


@dataclass
class FreeRun:
    """A free-running training run: its trace, final weights and wall time."""

    trace: Trace
    weights: list[torch.Tensor]
    seconds: float


def free_run(workload: Workload, candidate: Candidate) -> FreeRun:
    start = time.perf_counter()
    trace, model = train(workload, candidate)
    seconds = time.perf_counter() - start
    return FreeRun(trace, [p.detach().clone() for p in model.parameters()], seconds)


def loss_curve_step(reference: Trace, candidate: Trace, rtol: float) -> int | None:
    """First step whose loss differs by more than ``rtol`` relative; a candidate that stopped
    early (non-finite) is flagged at its first missing step."""
    ref_losses = reference.losses()
    cand_losses = candidate.losses()
    for index, ref_loss in enumerate(ref_losses):
        if index >= len(cand_losses):
            return index + 1
        cand_loss = cand_losses[index]
        if not math.isfinite(cand_loss) or abs(cand_loss - ref_loss) > rtol * abs(ref_loss):
            return index + 1
    return None


def final_weights_step(
    reference: FreeRun, candidate: FreeRun, steps: int
) -> tuple[int | None, str]:
    """``steps`` when ``assert_close`` fails on any final parameter (with its message)."""
    if len(candidate.trace.steps) - 1 < steps:
        return steps, "candidate stopped early (non-finite weights)"
    for ref, cand in zip(reference.weights, candidate.weights, strict=True):
        try:
            torch.testing.assert_close(cand, ref)
        except AssertionError as error:
            return steps, str(error).splitlines()[0]
    return None, ""


@dataclass(frozen=True)
class PaperRegion:
    """min..max of the global LoGM delta over calibration runs, overall and per iteration."""

    low: float
    high: float
    per_step: tuple[tuple[float, float], ...]
    seconds: float
    diverged_runs: int = 0


def paper_region(workload: Workload, recipe: Candidate) -> PaperRegion:
    """The LoGM paper's region from 12 seed-varied free-running reference runs.

    A calibration run that diverges (non-finite weights) contributes the deltas it reached; an
    iteration no run reached has an empty per-step region (any candidate delta leaves it).
    """
    start = time.perf_counter()
    deltas: list[list[float]] = []
    for seed in PAPER_SEEDS:
        trace, _ = train(workload.with_options(seed=seed), recipe)
        deltas.append(trace.global_logm_deltas())
    flat = [d for run in deltas for d in run]
    per_step = []
    for index in range(workload.steps):
        reached = [run[index] for run in deltas if len(run) > index]
        per_step.append((min(reached), max(reached)) if reached else (math.inf, -math.inf))
    return PaperRegion(
        min(flat), max(flat), tuple(per_step), time.perf_counter() - start, diverged(deltas)
    )


def diverged(deltas: Sequence[Sequence[float]]) -> int:
    return sum(1 for run in deltas if len(run) < max(len(r) for r in deltas))


def paper_step(region: PaperRegion, candidate: Trace, steps: int, *, per_step: bool) -> int | None:
    deltas = candidate.global_logm_deltas()
    for index in range(steps):
        if index >= len(deltas):
            return index + 1  # stopped early: non-finite weights
        low, high = region.per_step[index] if per_step else (region.low, region.high)
        if not low <= deltas[index] <= high:
            return index + 1
    return None


def global_logm_gap_step(run: CoSimulation, region: Region) -> int | None:
    limit = region.global_logm_gap_limit
    for comparison in run.comparisons:
        if comparison.non_finite:
            return comparison.step
        ref = comparison.reference_global_logm
        cand = comparison.candidate_global_logm
        if ref is None or cand is None:
            continue
        if abs(cand - ref) > limit:
            return comparison.step
    return None


def median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
