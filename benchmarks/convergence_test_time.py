"""Wall time of one whole convergence check with its baseline present, per zoo workload.

A check is what ``convergence.check(candidate)`` does in a test: load the baseline, co-simulate
8 steps of reference and candidate, judge. Recording the baseline (calibration) is timed too,
for information: it runs once, not on every PR.

    python benchmarks/convergence_test_time.py            # zoo workloads, 3 repeats
    python benchmarks/convergence_test_time.py --check    # exit 1 when a check exceeds 5 s

Target (issue 3): a whole convergence test (8 steps, reference + candidate, baseline present)
at most 5 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pytest_convergence import zoo
from pytest_convergence.candidates import Candidate
from pytest_convergence.checks import ConvergenceChecker
from pytest_convergence.config import ConvergenceConfig
from pytest_convergence.workloads import get_workload, workload_names

TARGET_SECONDS = 5.0


def passing_candidate(name: str) -> Candidate:
    """A candidate that passes, so the check times the common case (no replay, no report): the
    workload's own optimizer, rebuilt by the candidate. A zoo candidate such as foreach SGD
    would carry the zoo's hyper-parameters, which the seed workloads' recipes do not share."""
    return Candidate(
        "own-optimizer-rebuilt", optimizer_factory=get_workload(name).optimizer_factory
    )


def main() -> int:
    zoo.register()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", default=workload_names())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    print(f"Whole convergence check, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  {'workload':<28}{'record s':>10}{'check s':>10}  target <= {TARGET_SECONDS:.0f} s")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in args.workloads:
            candidate = passing_candidate(name)
            start = time.perf_counter()
            ConvergenceChecker(ConvergenceConfig(Path(folder), record=True)).check(candidate, name)
            record = time.perf_counter() - start
            timings = []
            for _ in range(args.repeats):
                checker = ConvergenceChecker(ConvergenceConfig(Path(folder)))
                start = time.perf_counter()
                checker.check(candidate, name)
                timings.append(time.perf_counter() - start)
            check = statistics.median(timings)
            worst = max(worst, check)
            verdict = "met" if check <= TARGET_SECONDS else "MISSED"
            print(f"  {name:<28}{record:>10.1f}{check:>10.2f}  {verdict}")
    return 1 if args.check and worst > TARGET_SECONDS else 0


if __name__ == "__main__":
    sys.exit(main())
