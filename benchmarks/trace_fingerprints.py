"""SHA-256 fingerprints of co-simulation traces, free runs, regions and failure findings.

A restructure of the stepping engine must not move a single bit of what a check measures. This
script runs a fixed set of co-simulations (every way a candidate can differ: kernel context,
model transform, gradient transform, exchange over virtual workers, own optimizer, own step
function, own post-step code), free runs, a calibration, a replay, a loss-landscape slice and a
DDP co-simulation, and prints one SHA-256 per artefact of its exact serialized form. Run it on
two commits and compare the outputs line by line:

    python benchmarks/trace_fingerprints.py > before.txt     # on the old commit
    python benchmarks/trace_fingerprints.py > after.txt      # on the new one
    diff before.txt after.txt                                # no output: identical

    python benchmarks/trace_fingerprints.py --quick          # lenet5 and mlp only, no DDP
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from typing import Any

import torch

from pytest_convergence import zoo
from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate, train
from pytest_convergence.workloads import Workload, get_workload
from pytest_convergence.zoo.candidates import (
    foreach_sgd,
    int8_exchange,
    scaled_layer_gradient,
    stale_gradient,
    thread_count,
    unfold_conv2d,
    wrong_momentum,
)
from pytest_convergence.zoo.large_batch import gradient_accumulation
from pytest_convergence.zoo.pruning import mask_not_reapplied

WORKLOADS = ("lenet5", "mlp", "vgg16-mini")
QUICK_WORKLOADS = ("lenet5", "mlp")


def _register_zoo() -> None:
    """The zoo registered itself on import before commit 5dfe9f4 and through ``register()``
    since: the script runs on both, to compare them."""
    register = getattr(zoo, "register", None)
    if register is not None:
        register()


def _first_weight(workload: Workload) -> str:
    return next(name for name, _ in workload.build_model().named_parameters())


def candidates(workload: Workload) -> list[Candidate]:
    """One candidate for each way a candidate can differ from the reference."""
    return [
        thread_count(1),  # kernel context
        unfold_conv2d(),  # kernel context, conv only (a no-op on an MLP)
        Candidate("channels-first-copy", model_transform=lambda model: model),  # model transform
        scaled_layer_gradient(_first_weight(workload), 0.9),  # gradient transform, reused grads
        stale_gradient(),  # gradient transform with state
        int8_exchange(workers=4),  # exchange over virtual workers
        foreach_sgd(),  # own optimizer
        wrong_momentum(),  # own optimizer, other hyper-parameters
        gradient_accumulation(4),  # own step function
        Candidate("no-post-step", after_step=lambda model: None),  # own post-step code
    ]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def fingerprints(quick: bool) -> list[tuple[str, Callable[[], str]]]:
    rows: list[tuple[str, Callable[[], str]]] = []
    for name in QUICK_WORKLOADS if quick else WORKLOADS:
        workload = get_workload(name)
        rows.append((f"{name} free run reference", lambda w=workload: repr(train(w)[0])))
        for candidate in candidates(workload):
            rows.append(
                (
                    f"{name} co-simulation {candidate.name}",
                    lambda w=workload, c=candidate: cosimulate(w, c).to_json(),
                )
            )
        rows.append(
            (
                f"{name} free run {thread_count(1).name}",
                lambda w=workload: repr(train(w, thread_count(1))[0]),
            )
        )
    rows += _failure_path_rows()
    rows += _verdict_rows()
    rows.append(("pruned-vgg16-mini co-simulation mask-not-reapplied", _pruned))
    if not quick:
        rows.append(("lenet5 DDP co-simulation fp16 hook", _ddp))
    return rows


def _failure_path_rows() -> list[tuple[str, Callable[[], str]]]:
    from pytest_convergence.diagnostics import loss_landscape_slice
    from pytest_convergence.regions import calibrate
    from pytest_convergence.replay import replay_step

    mlp = get_workload("mlp").with_options(steps=3)
    bug = scaled_layer_gradient("fc2.weight", 0.5)
    return [
        ("mlp calibration, 3 steps", lambda: _region_numbers(calibrate(mlp))),
        ("mlp replay of step 2", lambda: replay_step(mlp, bug, 2).describe()),
        ("mlp loss-landscape slice at step 2", lambda: loss_landscape_slice(mlp, bug, 2).to_json()),
    ]


def _region_numbers(region: Any) -> str:
    """A region's limits and what it was calibrated against, in words (the fields a later
    version adds to its records aside)."""
    return repr(
        (
            region.parameters,
            region.global_logm_delta,
            region.global_logm_gap_limit,
            region.calibration.description,
            region.calibration.seeds,
        )
    )


def _verdict_rows() -> list[tuple[str, Callable[[], str]]]:
    """Verdicts against a committed baseline: every check's count, violations and the worst."""
    from pathlib import Path

    from pytest_convergence.baselines import load_baseline
    from pytest_convergence.regions import judge

    folder = Path(__file__).resolve().parent.parent / "baselines"
    rows: list[tuple[str, Callable[[], str]]] = []
    for name, candidate in (
        ("lenet5", thread_count(1)),
        ("lenet5", scaled_layer_gradient("conv1.weight", 0.9)),
        ("vgg16-mini", wrong_momentum()),
        ("resnet50-mini", scaled_layer_gradient("layer4.2.conv3.weight", 0.5)),
    ):

        def verdict(name: str = name, candidate: Candidate = candidate) -> str:
            region = load_baseline(folder / f"{name}.json").region
            return repr(judge(cosimulate(get_workload(name), candidate), region))

        rows.append((f"{name} verdict {candidate.name}", verdict))
    return rows


def _pruned() -> str:
    return cosimulate(get_workload("pruned-vgg16-mini"), mask_not_reapplied()).to_json()


def _ddp() -> str:
    from pytest_convergence.distributed import cosimulate_distributed, fp16_compress_hook

    return cosimulate_distributed(get_workload("lenet5"), fp16_compress_hook()).to_json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lenet5 and mlp only, no DDP")
    args = parser.parse_args()
    _register_zoo()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, produce in fingerprints(args.quick):
        print(f"{digest(produce())}  {label}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
