"""The detection benchmark's candidates: which are bugs, which are clean, which region judges them.

Every row is declared here, before any run: its kind (``bug``, ``clean`` or ``gray``), the
region it is judged against (``default``: the reference under arithmetic perturbations;
``int8``: a known-good int8 gradient exchange) and, where a bug cannot exist in some model, the
structural reason it does not apply there (decided from the model, never from a result).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from pytest_convergence.candidates import Candidate
from pytest_convergence.workloads import Workload
from pytest_convergence.zoo import candidates as zoo

Kind = Literal["bug", "clean", "gray"]
RegionName = Literal["default", "int8"]

# One mid-network weight per workload for the scaled-gradient bug: a layer whose gradient is
# neither the largest (the classifier) nor the smallest (the first convolution).
SCALED_LAYER = {
    "vgg16-mini": "features.10.weight",
    "resnet50-mini": "layer2.0.conv2.weight",
    "lenet5": "conv2.weight",
    "googlenet-v1-mini": "inception4a.branch2.1.conv.weight",
    "wide-resnet-mini": "layer2.0.conv1.weight",
    "mlp": "fc2.weight",
}


def scaled_layer(workload: Workload) -> str:
    """The parameter :func:`scaled_layer_gradient` halves in ``workload``."""
    if workload.name in SCALED_LAYER:
        return SCALED_LAYER[workload.name]
    weights = [name for name, p in workload.build_model().named_parameters() if p.dim() > 1]
    return weights[len(weights) // 2]


def always(model: nn.Module) -> str | None:
    return None


def has_conv_bias(model: nn.Module) -> str | None:
    """``None`` when some convolution has a bias; otherwise why the bug cannot exist."""
    if any(isinstance(m, nn.Conv2d) and m.bias is not None for m in model.modules()):
        return None
    return "no convolution in this model has a bias: the candidate is the reference"


def has_conv(model: nn.Module) -> str | None:
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    return "no convolution in this model: the candidate is the reference"


def last_partition(workload: Workload) -> list[str]:
    """Parameters (partly) in the last of the int8 exchange's 4 partitions."""
    return zoo.last_partition_parameters(workload.build_model().named_parameters(), 4)


@dataclass(frozen=True)
class Spec:
    """One row of the benchmark: how to build a fresh candidate for a workload.

    ``affected``: the parameters a bug acts on directly, where a verdict should point; ``None``
    when it acts on every parameter (or, through the forward pass, on all of them).
    """

    label: str
    kind: Kind
    region: RegionName
    build: Callable[[Workload], Candidate]
    applies: Callable[[nn.Module], str | None] = always
    affected: Callable[[Workload], list[str]] | None = None


def _fixed(factory: Callable[[], Candidate]) -> Callable[[Workload], Candidate]:
    return lambda workload: factory()


SPECS: tuple[Spec, ...] = (
    # Legitimate variants.
    Spec("unfold-conv2d", "clean", "default", _fixed(zoo.unfold_conv2d), has_conv),
    Spec("onednn-disabled", "clean", "default", _fixed(zoo.onednn_disabled)),
    Spec("channels-last", "clean", "default", _fixed(zoo.channels_last), has_conv),
    Spec("threads-1", "clean", "default", _fixed(lambda: zoo.thread_count(1))),
    Spec("sgd-foreach", "clean", "default", _fixed(zoo.foreach_sgd)),
    Spec("sgd-for-loop", "clean", "default", _fixed(zoo.for_loop_sgd)),
    Spec("fp16-exchange-4", "clean", "default", _fixed(zoo.fp16_exchange)),
    Spec("bf16-exchange-4", "clean", "default", _fixed(zoo.bf16_exchange)),
    Spec("int8-exchange-4x4", "clean", "int8", _fixed(zoo.int8_exchange)),
    Spec("error-feedback-int8-4x4", "clean", "int8", _fixed(zoo.error_feedback_int8_exchange)),
    # Gray zone: a reduced-precision kernel, reported apart from both counts.
    Spec("fp16-conv", "gray", "default", _fixed(zoo.fp16_conv_accumulation), has_conv),
    # Bugs.
    Spec(
        "layer-gradient-x0.5",
        "bug",
        "default",
        lambda workload: zoo.scaled_layer_gradient(scaled_layer(workload), 0.5),
        affected=lambda workload: [scaled_layer(workload)],
    ),
    Spec(
        "accumulation-without-division-4",
        "bug",
        "default",
        _fixed(zoo.accumulation_without_division),
    ),
    Spec("sum-instead-of-mean-4", "bug", "default", _fixed(zoo.sum_instead_of_mean_exchange)),
    Spec("dropped-worker-4", "bug", "default", _fixed(zoo.dropped_worker_exchange)),
    Spec("stale-gradient", "bug", "default", _fixed(zoo.stale_gradient)),
    Spec("conv-without-bias", "bug", "default", _fixed(zoo.conv_without_bias), has_conv_bias),
    Spec("weight-decay-doubled", "bug", "default", _fixed(zoo.weight_decay_doubled)),
    Spec("wrong-momentum-0.99", "bug", "default", _fixed(zoo.wrong_momentum)),
    Spec("loss-scale-1024/512", "bug", "default", _fixed(zoo.loss_scale_mismatch)),
    Spec(
        "int8-last-x1.05",
        "bug",
        "int8",
        _fixed(lambda: zoo.int8_exchange(last_partition_scale=1.05)),
        affected=last_partition,
    ),
    Spec(
        "int8-last-x1.25",
        "bug",
        "int8",
        _fixed(lambda: zoo.int8_exchange(last_partition_scale=1.25)),
        affected=last_partition,
    ),
    Spec(
        "int8-last-x2",
        "bug",
        "int8",
        _fixed(lambda: zoo.int8_exchange(last_partition_scale=2.0)),
        affected=last_partition,
    ),
)

QUICK_LABELS = (
    "unfold-conv2d",
    "bf16-exchange-4",
    "int8-exchange-4x4",
    "fp16-conv",
    "layer-gradient-x0.5",
    "stale-gradient",
    "weight-decay-doubled",
    "int8-last-x1.05",
)
