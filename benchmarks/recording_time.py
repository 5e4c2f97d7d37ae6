"""What the power report adds to a recording: the fault ladder beside the calibration.

Recording a baseline calibrates its region (the reference under 4 perturbations at 3 seeds)
and, since the power report, runs the fault ladder against it (every fault class at every size
as sides of one co-simulation, :func:`pytest_convergence.fault_ladder.measure_power`). Both,
and one plain co-simulation of a passing candidate (what a check costs), are timed alternately
in one process, so the ratios printed compare figures taken under the same load.

    python benchmarks/recording_time.py                  # five zoo workloads, 3 repeats
    python benchmarks/recording_time.py mlp --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pytest_convergence import zoo
from pytest_convergence.cosim import cosimulate
from pytest_convergence.fault_ladder import measure_power
from pytest_convergence.regions import Region, calibrate, judge
from pytest_convergence.workloads import get_workload
from pytest_convergence.zoo.candidates import thread_count

DEFAULT_WORKLOADS = ("mlp", "lenet5", "vgg16-mini", "transformer-lm", "resnet50-mini")


def _timed(action: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = action()
    return time.perf_counter() - start, value


def measure(name: str, repeats: int) -> tuple[float, float, float]:
    """Median seconds of a calibration, of the ladder against it, and of one check."""
    workload = get_workload(name)
    candidate = thread_count(torch.get_num_threads())
    calibrations, ladders, checks = [], [], []
    for _ in range(repeats):
        seconds, region = _timed(lambda: calibrate(workload))
        assert isinstance(region, Region)
        calibrations.append(seconds)
        ladders.append(_timed(lambda: measure_power(workload, region))[0])  # noqa: B023
        checks.append(_timed(lambda: judge(cosimulate(workload, candidate), region))[0])  # noqa: B023
    return statistics.median(calibrations), statistics.median(ladders), statistics.median(checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    zoo.register()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, medians of {args.repeats}")
    print(
        f"{'workload':<16} {'calibration':>11} {'ladder':>8} {'check':>7} "
        f"{'ladder/calibration':>18} {'ladder/check':>12}"
    )
    for name in args.workloads:
        calibration, ladder, check = measure(name, args.repeats)
        print(
            f"{name:<16} {calibration:>10.2f}s {ladder:>7.2f}s {check:>6.2f}s "
            f"{ladder / calibration:>17.2f}x {ladder / check:>11.1f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
