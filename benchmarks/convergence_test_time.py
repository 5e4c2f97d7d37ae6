"""Wall time of one whole convergence check with its baseline present, against its floor.

A check is what ``convergence.check(candidate)`` does in a test: load the baseline, build the
reference and the candidate, co-simulate 8 steps, judge. Its floor is what any co-simulation
must pay: the 16 plain training steps of reference and candidate (zero_grad, forward,
backward, optimizer step; the candidate's under its own context), on models built beforehand,
timed in the same process. Floor and check alternate, repeat after repeat, so both see the
same load of a shared machine; the ratio is of their medians. Recording the baseline
(calibration) is timed too, for information: it runs once, not on every PR.

The candidate is ``thread_count(1)``: a legitimate variant that passes (no replay, no report,
the common case) and runs its own forward and backward, as most candidates do.

    python benchmarks/convergence_test_time.py               # every zoo workload, 7 repeats
    python benchmarks/convergence_test_time.py mlp lenet5    # some of them
    python benchmarks/convergence_test_time.py --check       # exit 1 when a target is missed

Targets: a whole check at most 5 s on a 2-core machine (issue 3), and at most 1.3 times its
floor (issue 15; the transformer's, 1.5 times, issue 16).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from pytest_convergence import zoo
from pytest_convergence.candidates import Candidate
from pytest_convergence.checks import ConvergenceChecker
from pytest_convergence.config import ConvergenceConfig
from pytest_convergence.workloads import Workload, get_workload, workload_names
from pytest_convergence.zoo.candidates import thread_count

TARGET_SECONDS = 5.0
TARGET_RATIO = 1.3
# Workloads with a target of their own: a transformer's recipe (scheduler, clipping, dict
# batches) is issue 16's.
TARGET_RATIOS = {"transformer-lm": 1.5}


def floor_seconds(workload: Workload, candidate: Candidate) -> float:
    """The 16 plain training steps of reference and candidate, in lockstep, on the workload's
    batches, as a plain PyTorch loop writes them (forward and loss, backward, clipping, the
    optimizer and scheduler steps): models, optimizers and batches are built before the clock
    starts."""
    sides = []
    reference = workload.build_model()
    for model, context in ((reference, None), (copy.deepcopy(reference), candidate)):
        optimizer = workload.make_optimizer(model)
        schedule = workload.scheduler_factory
        scheduler = schedule(optimizer) if schedule is not None else None
        sides.append((model, optimizer, scheduler, context))
    batches = workload.make_batches()
    start = time.perf_counter()
    for batch in batches:
        for model, optimizer, scheduler, context in sides:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with context.forward_context() if context is not None else nullcontext():
                loss = workload.loss(model, batch)
                loss.backward()  # type: ignore[no-untyped-call]
            if workload.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), workload.clip_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if workload.after_step is not None:
                with torch.no_grad():
                    workload.after_step(model)
    return time.perf_counter() - start


def main() -> int:
    zoo.register()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", help="zoo workloads (default: all)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    names = args.workloads or workload_names()
    print(f"Whole convergence check, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"  {'workload':<28}{'record s':>10}{'check s':>10}{'floor s':>10}{'check/floor':>13}"
        f"  targets <= {TARGET_SECONDS:.0f} s, <= {TARGET_RATIO:g}x"
    )
    missed = False
    candidate = thread_count(1)
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            workload = get_workload(name)
            start = time.perf_counter()
            ConvergenceChecker(ConvergenceConfig(Path(folder), record=True)).check(candidate, name)
            record = time.perf_counter() - start
            checks, floors = [], []
            for _ in range(args.repeats):
                floors.append(floor_seconds(workload, candidate))
                checker = ConvergenceChecker(ConvergenceConfig(Path(folder)))
                start = time.perf_counter()
                checker.check(candidate, name)
                checks.append(time.perf_counter() - start)
            check, floor = statistics.median(checks), statistics.median(floors)
            ratio = check / floor
            met = check <= TARGET_SECONDS and ratio <= TARGET_RATIOS.get(name, TARGET_RATIO)
            missed |= not met
            print(
                f"  {name:<28}{record:>10.1f}{check:>10.3f}{floor:>10.3f}{ratio:>12.2f}x"
                f"  {'met' if met else 'MISSED'}"
            )
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
