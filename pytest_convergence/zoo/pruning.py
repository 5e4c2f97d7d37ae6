"""Filter pruning (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), trained with masks.

Li et al. rank a convolution's filters by the L1 norm of their weights, remove the smallest ones
together with their feature maps and the kernels of the next layer that read those maps, and
retrain. Removing whole filters shrinks the dense convolutions themselves, which is what makes
the pruned network faster without sparse kernels. Their VGG-16-pruned-A removes half of the
filters of conv1 and of conv8 to conv13.

Two ways to train such a network compute the same thing:

- **masking** (the reference): the full-shape model, with the pruned filters and the connected
  kernels held at zero by masks re-applied after every optimizer step
  (:func:`apply_filter_masks`);
- **a physically smaller model** (Li et al.'s "copy the remaining weights to a new model"):
  :func:`physically_smaller_model` builds the small model from the kept filters, runs forward
  and backward on it and scatters its gradients back into the full-shape parameters.

Workload ``pruned-vgg16-mini`` (registered on import): :class:`FilterPrunedVGG16Mini`, the zoo's
VGG-16 with Li et al.'s pruned-A layers (``features.0`` and ``features.17`` to ``features.28``)
at half their filters, chosen by smallest L1 norm of the initial weights (ties: lower index
first), 8 SGD steps (lr 0.05, momentum 0.9, weight decay 5e-4) on synthetic 16-sample batches.
Of its 256,690 parameters 151,948 are pruned (59%; Li et al. report 64% at full width), and
they are the zero count a verdict checks.

Candidates: :func:`physically_smaller_model` (legitimate) and :func:`mask_not_reapplied` (BUG:
pruned weights grow back).

Why the masks cover the weights only, and the biases are drawn nonzero: the masks are those of
``torch.nn.utils.prune.ln_structured(conv, "weight", amount=0.5, n=1, dim=0)`` plus the connected
kernels, and leave the bias. A pruned filter's feature map is then the constant ``relu(bias)``,
which the masked connected kernels ignore, so masking and the smaller model compute the same
function. A positive constant is also what gives the connected kernels a gradient: were the
bias masked (or zero, as the zoo's He initialization leaves it), the pruned feature map would
be exactly zero, ReLU's gradient at zero is zero, and no pruned weight would ever receive a
gradient. A forgotten mask would then be harmless, and no test could see it. PyTorch's default
bias initialization (uniform in +-1/sqrt(fan-in)) is kept for that reason.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pytest_convergence.batches import Batch
from pytest_convergence.candidates import Candidate
from pytest_convergence.training_step import StepContext
from pytest_convergence.workloads import Workload, sgd, synthetic_classification
from pytest_convergence.zoo.models import VGG16Mini

__all__ = [
    "PRUNED_A",
    "PRUNED_VGG16_MINI",
    "FilterPrunedVGG16Mini",
    "apply_filter_masks",
    "filter_pruned_vgg16_mini",
    "kept_indices",
    "mask_not_reapplied",
    "physically_smaller_model",
    "prune_filters",
    "pruned_weight_count",
    "smaller_model",
]

# Li et al.'s VGG-16-pruned-A: conv1 and conv8 to conv13, in torchvision's ``features`` indices.
PRUNED_A = (
    "features.0",
    "features.17",
    "features.19",
    "features.21",
    "features.24",
    "features.26",
    "features.28",
)

# Buffers a pruned model carries, since post-step code receives only the model: on a pruned
# layer, which of its filters (output channels) are pruned; on the layer reading its output,
# which of its input features are.
_PRUNED_FILTERS = "pruned_filters"
_PRUNED_INPUTS = "pruned_inputs"

_Prunable = nn.Conv2d | nn.Linear


def _prunable_layers(model: nn.Module) -> list[tuple[str, _Prunable]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _filter_l1_norms(layer: nn.Conv2d) -> Tensor:
    return layer.weight.detach().abs().flatten(start_dim=1).sum(dim=1)


def _smallest(norms: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` smallest norms; a stable sort breaks ties by index."""
    order = torch.sort(norms, stable=True).indices
    pruned = torch.zeros(norms.shape, dtype=torch.bool, device=norms.device)
    pruned[order[:count]] = True
    return pruned


def _input_mask(consumer: _Prunable, pruned_channels: Tensor) -> Tensor:
    """The consumer's pruned input features: its input channels, or for a linear layer after a
    flatten, every feature of a pruned channel (flattening keeps a channel's features together)."""
    features = consumer.in_channels if isinstance(consumer, nn.Conv2d) else consumer.in_features
    channels = pruned_channels.numel()
    if features % channels != 0:
        raise ValueError(
            f"a layer with {features} input features cannot read {channels} channels; "
            "prune_filters supports plain chains of layers (VGG-style) only"
        )
    return pruned_channels.repeat_interleave(features // channels)


def prune_filters(model: nn.Module, layers: Sequence[str], fraction: float = 0.5) -> None:
    """Prune ``fraction`` of the filters of each named convolution, smallest L1 norm first.

    Decided once, from the model's current weights; the next convolution or linear layer in
    module order is taken to read the pruned layer's output (a plain VGG-style chain), and its
    kernels for the pruned channels are pruned too. Registers the masks as buffers and applies
    them. Raises ``ValueError`` for an unknown or non-convolution layer name.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    chain = _prunable_layers(model)
    for name in layers:
        layer, consumer = _layer_and_consumer(chain, name)
        pruned = _smallest(_filter_l1_norms(layer), math.floor(fraction * layer.out_channels))
        layer.register_buffer(_PRUNED_FILTERS, pruned)
        consumer.register_buffer(_PRUNED_INPUTS, _input_mask(consumer, pruned))
    with torch.no_grad():
        apply_filter_masks(model)


def _layer_and_consumer(
    chain: Sequence[tuple[str, _Prunable]], name: str
) -> tuple[nn.Conv2d, _Prunable]:
    """The convolution ``name`` and the layer after it in the chain, which reads its output."""
    names = [n for n, _ in chain]
    index = names.index(name) if name in names else None
    layer = chain[index][1] if index is not None else None
    if index is None or not isinstance(layer, nn.Conv2d):
        convolutions = [n for n, m in chain if isinstance(m, nn.Conv2d)]
        raise ValueError(f"no convolution named {name!r}; convolutions: {convolutions}")
    if index + 1 == len(chain):
        raise ValueError(f"{name!r} is the last layer: its outputs are the model's outputs")
    return layer, chain[index + 1][1]


def _mask(layer: nn.Module, buffer: str) -> Tensor | None:
    mask = getattr(layer, buffer, None)
    return mask if isinstance(mask, Tensor) else None


def apply_filter_masks(model: nn.Module) -> None:
    """The masked training loop's post-step code: pruned filters and the kernels reading their
    feature maps set back to zero."""
    for _, layer in _prunable_layers(model):
        filters, inputs = _mask(layer, _PRUNED_FILTERS), _mask(layer, _PRUNED_INPUTS)
        trailing = (1,) * (layer.weight.dim() - 2)
        if filters is not None:
            layer.weight.masked_fill_(filters.view(-1, 1, *trailing), 0.0)
        if inputs is not None:
            layer.weight.masked_fill_(inputs.view(1, -1, *trailing), 0.0)


def pruned_weight_count(model: nn.Module) -> int:
    """How many weights the masks hold at zero."""
    total = 0
    for _, layer in _prunable_layers(model):
        kept = torch.ones(layer.weight.shape[:2], dtype=torch.bool, device=layer.weight.device)
        filters, inputs = _mask(layer, _PRUNED_FILTERS), _mask(layer, _PRUNED_INPUTS)
        if filters is not None:
            kept[filters] = False
        if inputs is not None:
            kept[:, inputs] = False
        total += int((~kept).sum()) * math.prod(layer.weight.shape[2:])
    return total


def kept_indices(layer: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """Indices of a layer's kept filters and kept inputs; None where nothing is pruned."""
    filters, inputs = _mask(layer, _PRUNED_FILTERS), _mask(layer, _PRUNED_INPUTS)
    return (
        None if filters is None else (~filters).nonzero().flatten(),
        None if inputs is None else (~inputs).nonzero().flatten(),
    )


def _shrunk(tensor: Tensor, outputs: Tensor | None, inputs: Tensor | None) -> Tensor:
    if outputs is not None:
        tensor = tensor.index_select(0, outputs)
    if inputs is not None and tensor.dim() > 1:
        tensor = tensor.index_select(1, inputs)
    return tensor.detach().clone()


def smaller_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` holding only the kept filters and kept kernels: Li et al.'s new,
    physically smaller model. Its parameters keep their names; shapes shrink."""
    small = copy.deepcopy(model)
    for _, layer in _prunable_layers(small):
        outputs, inputs = kept_indices(layer)
        if outputs is None and inputs is None:
            continue
        layer.weight = nn.Parameter(_shrunk(layer.weight, outputs, inputs))
        if layer.bias is not None:
            layer.bias = nn.Parameter(_shrunk(layer.bias, outputs, None))
        _resize(layer)
    return small


def _resize(layer: _Prunable) -> None:
    """Keep the layer's size attributes true to its new weight (``extra_repr``, checks)."""
    if isinstance(layer, nn.Conv2d):
        layer.out_channels, layer.in_channels = layer.weight.shape[:2]
    else:
        layer.out_features, layer.in_features = layer.weight.shape


def _scattered(full: Tensor, small: Tensor, layer: nn.Module) -> Tensor:
    """``small`` written into zeros of ``full``'s shape at the layer's kept positions."""
    outputs, inputs = kept_indices(layer)
    if outputs is None and inputs is None:
        return small
    scattered = torch.zeros_like(full)
    rows = outputs if outputs is not None else torch.arange(full.shape[0], device=full.device)
    if full.dim() == 1:
        return scattered.index_copy_(0, rows, small)
    columns = inputs if inputs is not None else torch.arange(full.shape[1], device=full.device)
    return scattered.index_put_((rows[:, None], columns[None, :]), small)


def _smaller_model_step(context: StepContext, batch: Batch) -> Tensor:
    model = context.model
    small = smaller_model(model)
    loss = context.loss(batch, model=small)
    context.backward(loss)
    for module_name, layer in small.named_modules():
        for name, parameter in layer.named_parameters(recurse=False):
            if parameter.grad is not None:
                full = model.get_parameter(f"{module_name}.{name}" if module_name else name)
                full.grad = _scattered(full, parameter.grad, layer)
    context.optimizer_step()
    return loss


def physically_smaller_model() -> Candidate:
    """Training on a physically smaller model built from the kept filters, not on masks.

    Models Li et al.'s own procedure (copy the kept filters and kernels into a new, narrower
    model and train it) in a trainer that keeps full-shape checkpoints: each step builds the
    small model from the full-shape weights (:func:`smaller_model`), runs forward and backward
    on it, and scatters its gradients into the full-shape parameters, zero at every pruned
    position; the optimizer steps the full-shape parameters. Legitimate: the same function and
    the same gradients at the kept positions, with convolutions summing over fewer channels.
    Replaces the whole step (``step_fn``) and keeps the workload's post-step masks: in a
    co-simulation every step starts from the reference's optimizer state, whose momentum holds
    the gradients the masked connected kernels received (their input, a pruned filter's
    constant map, is not zero), and without the masks that momentum would move them off zero.
    """
    return Candidate(
        name="physically-smaller-model",
        step_fn=_smaller_model_step,
        description="forward and backward on the model built from the kept filters, gradients "
        "scattered into the full-shape parameters",
    )


def _masks_left_alone(model: nn.Module) -> None:
    """Post-step code that forgot the masks."""


def mask_not_reapplied() -> Candidate:
    """BUG: the pruning masks are applied once and never re-applied after an optimizer step.

    Occurs when masks are applied at pruning time only (``weight.data.mul_(mask)`` before
    fine-tuning), when the re-masking hook is registered on a model that was later wrapped or
    copied, or when a trainer's post-step callback is dropped. The kernels that read a pruned
    filter's feature map get a gradient (that map is the constant ``relu(bias)``), so pruned
    weights grow back and the network is no longer the pruned one. Signature: at step 1 the zero
    count of every layer reading a pruned layer drops, by hundreds to thousands where the
    region allows about 1% of the tensor, and those layers gain update noise where the
    reference's update is zero.
    """
    return Candidate(
        name="mask-not-reapplied",
        after_step=_masks_left_alone,
        description="pruning masks not re-applied after the optimizer step",
    )


# --------------------------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------------------------


def _default_biases(model: nn.Module) -> None:
    """Biases as ``nn.Conv2d`` and ``nn.Linear`` draw them: uniform in +-1/sqrt(fan-in)."""
    for _, layer in _prunable_layers(model):
        if layer.bias is not None:
            fan_in = layer.weight[0].numel()
            nn.init.uniform_(layer.bias, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))


class FilterPrunedVGG16Mini(VGG16Mini):
    """:class:`~pytest_convergence.zoo.models.VGG16Mini` with half the filters of ``layers``
    pruned by L1 norm from its initial weights, the masks kept as buffers.

    He-normal weights as the zoo's VGG, but PyTorch's default nonzero biases (see the module
    docstring for why).
    """

    def __init__(
        self, layers: Sequence[str] = PRUNED_A, fraction: float = 0.5, num_classes: int = 10
    ) -> None:
        super().__init__(num_classes=num_classes)
        with torch.no_grad():
            _default_biases(self)
        prune_filters(self, layers, fraction)


def filter_pruned_vgg16_mini() -> FilterPrunedVGG16Mini:
    """A fresh :class:`FilterPrunedVGG16Mini` (pruned-A, half the filters)."""
    return FilterPrunedVGG16Mini()


PRUNED_VGG16_MINI = Workload(
    name="pruned-vgg16-mini",
    model_factory=filter_pruned_vgg16_mini,
    batches=synthetic_classification((3, 32, 32), 10, batch_size=16),
    optimizer_factory=sgd(lr=0.05, momentum=0.9, weight_decay=5e-4),
    steps=8,
    description="VGG16-mini with half the filters of conv1 and conv8-13 pruned by L1 norm, "
    "masks re-applied after each step; 8 SGD steps on synthetic 16-sample batches",
    after_step=apply_filter_masks,
)
