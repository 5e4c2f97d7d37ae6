"""How accurate is each precision policy's own arithmetic? The tolerance its region needs.

For each policy and workload, regions are calibrated at relative operation tolerances from
2^-12 to 2^-6 (the gradient tolerance kept at the policy's), and the policy's own arithmetic
(the reference trained under it: TF32 emulated by rounding matmul and convolution inputs,
autocast to bfloat16, autocast to float16 with a GradScaler) is judged against each on held-out
seeds. The smallest tolerance under which every seed passes is the policy's need on that
workload; ``pytest_convergence.precision`` ships, per policy, the largest need over the
workloads. Prints one table; docs/detection.md keeps the run.

    python benchmarks/precision_policies.py
    python benchmarks/precision_policies.py --workloads mlp lenet5 --seeds 2   # quicker
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import torch

from pytest_convergence import zoo
from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.precision import get_policy
from pytest_convergence.regions import calibrate, judge
from pytest_convergence.workloads import get_workload
from pytest_convergence.zoo.candidates import tf32_matmuls

WORKLOADS = ("transformer-lm", "adamw-lenet5", "lenet5", "mlp", "vgg16-mini")
TOLERANCES = tuple(2.0**-exponent for exponent in range(12, 5, -1))
FIRST_SEED = 100

# The policy's own arithmetic, as a candidate of an fp32 reference.
ARITHMETIC: dict[str, Callable[[], Candidate]] = {
    "tf32": tf32_matmuls,
    "bf16-autocast": lambda: Candidate("bf16-autocast", precision="bf16-autocast"),
    "fp16-autocast": lambda: Candidate("fp16-autocast", precision="fp16-autocast"),
}


def worst_ratio(
    workload: str, policy: str, tolerance: float, gradient_tolerance: float, seeds: int
) -> float:
    """The policy's arithmetic, worst over held-out seeds, against a region at ``tolerance``."""
    base = get_workload(workload)
    region = calibrate(
        base, tolerance=tolerance, gradient_tolerance=gradient_tolerance, precision=policy
    )
    return max(
        judge(
            cosimulate(base.with_options(seed=FIRST_SEED + s), ARITHMETIC[policy]()), region
        ).worst_ratio
        for s in range(seeds)
    )


def smallest_passing(ratios: list[float]) -> float | None:
    """The smallest tolerance from which every larger one passes too (ratios in the order of
    TOLERANCES, smallest tolerance first)."""
    need = None
    for tolerance, ratio in reversed(list(zip(TOLERANCES, ratios, strict=True))):
        if ratio > 1.0:
            break
        need = tolerance
    return need


def main() -> int:
    zoo.register()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--policies", nargs="*", default=list(ARITHMETIC))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--gradient-tolerance",
        type=float,
        default=None,
        help="the gradients' tolerance (default: each policy's own)",
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seeds {FIRST_SEED}..")
    columns = "".join(f"{f'2^{math.log2(t):.0f}':>9}" for t in TOLERANCES)
    for policy in args.policies:
        gradients = args.gradient_tolerance or get_policy(policy).gradient_tolerance
        print(
            f"\n{policy} (gradient tolerance {gradients:.3g}); "
            f"worst ratio to the region's limits at each operation tolerance"
        )
        print(f"  {'workload':<16}{columns}   needs")
        needs = []
        for workload in args.workloads:
            ratios = [worst_ratio(workload, policy, t, gradients, args.seeds) for t in TOLERANCES]
            need = smallest_passing(ratios)
            needs.append(need)
            cells = "".join(f"{r:>9.3g}" for r in ratios)
            print(f"  {workload:<16}{cells}   {'-' if need is None else f'{need:.3g}'}", flush=True)
        known = [n for n in needs if n is not None]
        shipped = get_policy(policy).tolerance
        print(f"  largest need {max(known):.3g}; shipped {shipped:.3g}" if known else "  none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
