"""Large mini-batch training (Naganuma & Yokota 2019): gradient accumulation and mixup.

Large-batch training reaches its batch size either at once or by accumulating gradients over
micro-batches that fit in memory; the two must take the same step. Mixup (Zhang et al. 2018),
which the seed paper uses to smooth the loss of large-batch runs, trains on convex combinations
of input pairs and of their one-hot targets.

Two workloads, registered on import, both LeNet-5 (no batch norm) on synthetic 1x28x28 batches
of 256 samples, SGD with momentum 0.9 and weight decay 5e-4, 8 steps:

``large-batch-lenet5``
    Hard labels, cross-entropy.
``mixup-lenet5``
    Every batch mixed with itself in a seeded random order, ``lambda ~ Beta(0.7, 0.7)`` drawn
    per batch from the seed (0.7 is the paper's mixup alpha for its large batches); targets are
    the mixed one-hot vectors and the loss is cross-entropy against them (``F.cross_entropy``
    with class-probability targets).

Learning rate: 0.1, from the linear scaling rule in the form Goyal et al. 2017 give it, 0.1 for
every 256 samples, the anchor large-batch SGD recipes (the seed paper's among them) scale from.
Scaling the zoo's small-batch ``lenet5`` setting (lr 0.05 at 16 samples) by 16 instead would
give 0.8, a rate Goyal et al. reach only after a gradual warm-up that eight steps cannot hold.
(It stays finite here too; a verdict compares updates relative to the reference's, so the
choice sets realism, not detection.)

Candidates (build a fresh one per run):

- :func:`gradient_accumulation` (legitimate): the batch as ``micro_batches`` micro-batches, each
  loss weighted by its share of the batch, gradients accumulated, one optimizer step;
- :func:`pytest_convergence.zoo.candidates.accumulation_without_division` (BUG, reused): the
  same without the weighting, so the step is ``micro_batches`` times too large.

Batch norm caveat: accumulation is equivalent to the large batch only without batch norm.
With it, every micro-batch is normalized by its own statistics (another function, not another
arithmetic) and the running statistics are updated once per micro-batch; a region for such a
model must be calibrated with the accumulating implementation as the known-good candidate.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pytest_convergence.candidates import Candidate
from pytest_convergence.workloads import (
    Batch,
    Workload,
    sgd,
    synthetic_classification,
)
from pytest_convergence.zoo.models import lenet5

__all__ = [
    "LARGE_BATCH",
    "LARGE_BATCH_LEARNING_RATE",
    "LARGE_BATCH_WORKLOAD",
    "MIXUP_ALPHA",
    "MIXUP_WORKLOAD",
    "gradient_accumulation",
    "linear_scaled_learning_rate",
    "mixup",
    "mixup_classification",
]

LARGE_BATCH = 256
MIXUP_ALPHA = 0.7
# Goyal et al. 2017: lr 0.1 for every 256 samples.
_BASE_LEARNING_RATE = 0.1
_BASE_BATCH = 256
_MIXUP_SEED_OFFSET = 2_000_003
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_scaled_learning_rate(batch_size: int) -> float:
    """``0.1 * batch_size / 256``: the linear scaling rule of large mini-batch SGD."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _BASE_LEARNING_RATE * batch_size / _BASE_BATCH


LARGE_BATCH_LEARNING_RATE = linear_scaled_learning_rate(LARGE_BATCH)


def mixup(
    inputs: torch.Tensor, targets: torch.Tensor, lam: float, permutation: torch.Tensor
) -> Batch:
    """``(lam x + (1 - lam) x[perm], lam y + (1 - lam) y[perm])`` for a batch and its one-hot
    (or soft) targets: each sample mixed with the one ``permutation`` pairs it with."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup lambda must lie in [0, 1], got {lam}")
    if permutation.shape != (inputs.shape[0],):
        raise ValueError(
            f"permutation must have one entry per sample ({inputs.shape[0]}), "
            f"got shape {tuple(permutation.shape)}"
        )
    mixed_inputs = lam * inputs + (1.0 - lam) * inputs[permutation]
    mixed_targets = lam * targets + (1.0 - lam) * targets[permutation]
    return mixed_inputs, mixed_targets


def mixup_classification(
    input_shape: Sequence[int],
    num_classes: int,
    batch_size: int = LARGE_BATCH,
    alpha: float = MIXUP_ALPHA,
) -> Callable[[int, int, torch.dtype, torch.device], list[Batch]]:
    """Synthetic classification batches (:func:`synthetic_classification`) passed through
    mixup: per batch one ``lambda ~ Beta(alpha, alpha)`` and one random pairing, both drawn
    from the seed, so reference, candidate and a later replay see the same mixed batches.
    Targets are class-probability vectors in the workload's dtype."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    plain = synthetic_classification(input_shape, num_classes, batch_size=batch_size)

    def make(seed: int, steps: int, dtype: torch.dtype, device: torch.device) -> list[Batch]:
        # Python's generator: torch's Beta sampler draws from the global RNG, not a Generator.
        lambdas = random.Random(seed + _MIXUP_SEED_OFFSET)
        pairing = torch.Generator().manual_seed(seed + _MIXUP_SEED_OFFSET)
        batches = []
        for inputs, labels in plain(seed, steps, dtype, device):
            one_hot = F.one_hot(labels, num_classes).to(dtype=dtype)
            permutation = torch.randperm(batch_size, generator=pairing).to(device)
            batches.append(mixup(inputs, one_hot, lambdas.betavariate(alpha, alpha), permutation))
        return batches

    return make


def gradient_accumulation(micro_batches: int = 4) -> Candidate:
    """Gradient accumulation: the batch split into ``micro_batches`` micro-batches, each one's
    mean loss scaled by its share of the batch before backward, one optimizer step at the end.

    Models the memory-saving loop of every large-batch trainer (``loss / accumulation_steps``
    in hand-written loops, Hugging Face ``gradient_accumulation_steps``, Lightning's
    ``accumulate_grad_batches``): with a batch that splits evenly the share is
    ``1 / micro_batches``; weighting by the share keeps an uneven split exact too. The
    accumulated gradient is the large batch's, summed in another order. Only without batch
    norm (see the module docstring). Signature: relative errors at float32 rounding.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    return Candidate(
        name=f"gradient-accumulation-{micro_batches}",
        micro_batches=micro_batches,
        description=f"gradients accumulated over {micro_batches} micro-batches, each loss "
        "weighted by its share of the batch",
    )


LARGE_BATCH_WORKLOAD = Workload(
    name="large-batch-lenet5",
    model_factory=lenet5,
    batches=synthetic_classification((1, 28, 28), 10, batch_size=LARGE_BATCH),
    optimizer_factory=sgd(lr=LARGE_BATCH_LEARNING_RATE, momentum=0.9, weight_decay=5e-4),
    steps=8,
    description=f"large-batch-lenet5: LeNet-5, 8 SGD steps on synthetic {LARGE_BATCH}-sample "
    f"batches, lr {LARGE_BATCH_LEARNING_RATE:g} by the linear scaling rule",
)

MIXUP_WORKLOAD = Workload(
    name="mixup-lenet5",
    model_factory=lenet5,
    batches=mixup_classification((1, 28, 28), 10, batch_size=LARGE_BATCH, alpha=MIXUP_ALPHA),
    optimizer_factory=sgd(lr=LARGE_BATCH_LEARNING_RATE, momentum=0.9, weight_decay=5e-4),
    steps=8,
    description=f"mixup-lenet5: LeNet-5, 8 SGD steps on synthetic {LARGE_BATCH}-sample "
    f"batches mixed up with Beta({MIXUP_ALPHA:g}, {MIXUP_ALPHA:g}) weights, soft-target "
    "cross-entropy",
)
