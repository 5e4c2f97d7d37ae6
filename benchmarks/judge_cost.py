"""What the verdict's "update noise over steps" check adds to a whole convergence check.

Issue 17 asks that the new statistics cost at most 10% more check time. Two whole-check runs
of ``convergence_test_time.py`` on two trees differ by more than that from load alone, so this
measures the new check where it runs, side by side in one process: one co-simulation of the
passing candidate ``thread_count(1)`` is judged again and again against its workload's region,
alternately by ``regions.judge`` as it is and with the noise-over-steps evidence left out (its
function replaced, for the measurement only, by one that returns a row at once). The share is
the difference of their medians over the median whole check (``ConvergenceChecker.check``,
timed in the same loop).

    python benchmarks/judge_cost.py                      # five zoo workloads, 7 repeats
    python benchmarks/judge_cost.py mlp --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pytest_convergence import regions, zoo
from pytest_convergence.baselines import baseline_path, load_baseline
from pytest_convergence.checks import ConvergenceChecker
from pytest_convergence.config import ConvergenceConfig
from pytest_convergence.cosim import cosimulate
from pytest_convergence.workloads import get_workload
from pytest_convergence.zoo.candidates import thread_count

DEFAULT_WORKLOADS = ("mlp", "lenet5", "vgg16-mini", "transformer-lm", "resnet50-mini")
JUDGE_ROUNDS = 20  # judgements per timing: one takes well under a millisecond on small models


def _without_noise_evidence(
    step: int, parameter: object, bounds: object, index: int, cumulative: object
) -> regions.CheckRow:
    return (step, "", "", 0.0, 1.0)


def _timed(action: Callable[[], object], rounds: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        action()
    return (time.perf_counter() - start) / rounds


def measure(name: str, folder: Path, repeats: int) -> tuple[float, float, float]:
    """Median seconds of a whole check, of a judgement, and of one without the noise check."""
    candidate = thread_count(1)
    ConvergenceChecker(ConvergenceConfig(folder, record=True)).check(candidate, name)
    region = load_baseline(baseline_path(folder, name)).region
    run = cosimulate(get_workload(name), candidate)

    def check() -> None:
        ConvergenceChecker(ConvergenceConfig(folder)).check(candidate, name)

    def judge() -> None:
        regions.judge(run, region)

    checks, judged, without = [], [], []
    original = regions._noise_evidence
    for _ in range(repeats):
        checks.append(_timed(check))
        judged.append(_timed(judge, JUDGE_ROUNDS))
        regions._noise_evidence = _without_noise_evidence  # type: ignore[assignment]
        try:
            without.append(_timed(judge, JUDGE_ROUNDS))
        finally:
            regions._noise_evidence = original
    return statistics.median(checks), statistics.median(judged), statistics.median(without)


def main() -> int:
    zoo.register()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "workloads", nargs="*", help=f"zoo workloads (default: {DEFAULT_WORKLOADS})"
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"The noise-over-steps check's cost, torch {torch.__version__}, {threads} threads")
    print(f"  {'workload':<18}{'check ms':>10}{'judge ms':>10}{'without ms':>12}{'share':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.workloads or DEFAULT_WORKLOADS:
            check, judge, bare = measure(name, Path(folder), args.repeats)
            print(
                f"  {name:<18}{check * 1e3:>10.1f}{judge * 1e3:>10.2f}{bare * 1e3:>12.2f}"
                f"{(judge - bare) / check:>8.1%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
