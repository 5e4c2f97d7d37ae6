"""Tracing overhead: the statistics a co-simulation records per step, against the step itself.

For every zoo model, measured side by side in one run: a plain training step (zero_grad,
forward, loss, backward, optimizer step) and the tracing that follows it in a co-simulation
(the step's flat snapshot with per-parameter LoGM, zero counts, weight, update and gradient
norms, then the step's trace record). Prints medians over 31 steps and the ratio.

    python benchmarks/tracing_overhead.py            # all zoo models
    python benchmarks/tracing_overhead.py --check    # exit 1 when a ratio exceeds 10%

Target (issue 3): tracing at most 10% of a training step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from pytest_convergence.tracing import FlatWeights, ParameterLayout, step_trace
from pytest_convergence.workloads import get_workload, workload_names

TARGET = 0.10


def measure(name: str, repeats: int) -> tuple[float, float]:
    workload = get_workload(name).with_options(steps=repeats + 2)
    model = workload.build_model()
    optimizer = workload.optimizer_factory(model.parameters())
    batches = workload.make_batches()
    named = list(model.named_parameters())
    layout = ParameterLayout([n for n, _ in named], [p for _, p in named])
    previous = FlatWeights.of(layout, [p for _, p in named])
    step_times, trace_times = [], []
    for index, (inputs, targets) in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        workload.loss_fn(model(inputs), targets).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        stepped = time.perf_counter()
        # The gradients the step used are still in .grad (a co-simulation keeps copies anyway,
        # for its candidates, so copying them is not counted here).
        gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in named]
        after = FlatWeights.of(
            layout, [p for _, p in named], previous=previous, gradients=gradients
        )
        step_trace(layout, after, step=index + 1, loss=0.0)
        traced = time.perf_counter()
        previous = after
        if index >= 2:  # warm-up steps excluded
            step_times.append(stepped - start)
            trace_times.append(traced - stepped)
    return statistics.median(step_times), statistics.median(trace_times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    print(f"Tracing overhead, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  {'workload':<20}{'step ms':>10}{'tracing ms':>12}{'ratio':>9}")
    worst = 0.0
    for name in workload_names():
        step, trace = measure(name, args.repeats)
        ratio = trace / step
        worst = max(worst, ratio)
        print(f"  {name:<20}{step * 1e3:>10.2f}{trace * 1e3:>12.2f}{ratio:>8.1%}")
    verdict = "met" if worst <= TARGET else "MISSED"
    print(f"  worst ratio {worst:.1%} (target <= {TARGET:.0%}): {verdict}")
    return 1 if args.check and worst > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
