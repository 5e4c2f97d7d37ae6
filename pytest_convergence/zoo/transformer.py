"""A small causal transformer language model trained as users train theirs, and an AdamW LeNet-5.

``transformer-lm`` is the training code a transformer user ships, at CPU size: token and
position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU MLP, dropout,
dict batches (``{"input_ids", "labels"}``) into a model that computes its own loss and returns
an output object (``model(**batch).loss``, as Hugging Face models do), AdamW without weight
decay on biases, norms and embeddings (chosen by module type, as minGPT does), a warm-up and
cosine learning-rate schedule and global-norm gradient clipping. ``adamw-lenet5`` is a second
Adam-family recipe on a convolutional model with (inputs, targets) batches.

The kernels a candidate swaps are module-level functions (:func:`attention`,
:func:`layer_norm`), looked up at every call, so a candidate's context patches them the way a
kernel library is patched in (``with sdpa_attention(): ...``). The candidates below are the
suite of legitimate variants and realistic bugs the detection benchmark runs on these two
workloads; each bug's docstring says where it ships.

Length: one model with its kernels, two workloads and the suite of a dozen candidates that
swap exactly those kernels; apart, each half would import the other's private kernels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func  # type: ignore[attr-defined]

from pytest_convergence.batches import Batch
from pytest_convergence.candidates import Candidate
from pytest_convergence.training_step import NamedParameters, StepContext
from pytest_convergence.workloads import Workload, synthetic_classification
from pytest_convergence.zoo.models import lenet5

__all__ = [
    "ADAMW_LENET5",
    "TRANSFORMER_LM",
    "CausalLM",
    "LMOutput",
    "adamw_without_bias_correction",
    "attention",
    "attention_scale_bug",
    "blockwise_attention",
    "causal_mask_off_by_one",
    "clip_per_parameter",
    "decay_on_all_parameters",
    "for_loop_adamw",
    "fused_adamw",
    "inductor_compiled",
    "layer_norm",
    "layer_norm_by_formula",
    "layer_norm_without_mean",
    "minimal_gpt",
    "scheduler_stepped_twice",
    "sdpa_attention",
    "token_batches",
    "warmup_cosine",
    "wrong_gelu_lowering",
]

VOCABULARY = 64
CONTEXT = 16
WIDTH = 32
HEADS = 4
LAYERS = 2
DROPOUT = 0.1
BATCH = 8
STEPS = 8
LEARNING_RATE = 3e-3
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
CLIP = 1.0
WARMUP = 2


# --- the kernels candidates swap -------------------------------------------------------------


def attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Causal scaled dot-product attention, (batch, heads, time, head width) in and out."""
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    time = scores.shape[-1]
    future = torch.ones(time, time, dtype=torch.bool, device=scores.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ value


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class _Kernels:
    """Where the model looks its kernels up at every call (a candidate's context swaps them)."""

    attention: Callable[[Tensor, Tensor, Tensor], Tensor] = staticmethod(attention)
    layer_norm: Callable[[Tensor, Tensor, Tensor, float], Tensor] = staticmethod(layer_norm)


@contextlib.contextmanager
def _kernel(name: str, kernel: Callable[..., Tensor]) -> Iterator[None]:
    original = getattr(_Kernels, name)
    setattr(_Kernels, name, staticmethod(kernel))
    try:
        yield
    finally:
        setattr(_Kernels, name, original)


# --- the model -------------------------------------------------------------------------------


@dataclass
class LMOutput:
    """What the model returns, as a Hugging Face causal LM does: the loss and the logits."""

    loss: Tensor | None
    logits: Tensor


class LayerNorm(nn.Module):
    """LayerNorm through the swappable kernel."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _Kernels.layer_norm(x, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.output = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, width = x.shape

        def heads(projection: nn.Linear) -> Tensor:
            projected: Tensor = projection(x)
            return projected.view(batch, time, self.heads, -1).transpose(1, 2)

        mixed = _Kernels.attention(heads(self.query), heads(self.key), heads(self.value))
        merged = mixed.transpose(1, 2).reshape(batch, time, width)
        output: Tensor = self.dropout(self.output(merged))
        return output


class Block(nn.Module):
    """A pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.mlp_norm = LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        mixed: Tensor = x + self.mlp(self.mlp_norm(x))
        return mixed


class CausalLM(nn.Module):
    """A GPT-style language model that computes its own next-token loss from ``labels``."""

    def __init__(
        self,
        *,
        vocabulary: int = VOCABULARY,
        context: int = CONTEXT,
        width: int = WIDTH,
        heads: int = HEADS,
        layers: int = LAYERS,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.final_norm = LayerNorm(width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> LMOutput:
        time = input_ids.shape[1]
        positions = torch.arange(time, device=input_ids.device)
        x = self.dropout(self.tokens(input_ids) + self.positions(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.final_norm(x))
        loss = None
        if labels is not None:  # next-token prediction: labels are the inputs, shifted here
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1))
        return LMOutput(loss, logits)


def minimal_gpt() -> CausalLM:
    return CausalLM()


# --- the training recipe ---------------------------------------------------------------------


def token_batches(
    seed: int, steps: int, dtype: torch.dtype, device: torch.device
) -> list[dict[str, Tensor]]:
    """Sequences of a noisy affine token process (t' = 5t + 3 + noise mod V): structure to
    learn, from a seed, no data set to ship. Labels are the inputs (the model shifts them)."""
    generator = torch.Generator().manual_seed(seed + 2_000_003)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(BATCH, CONTEXT, dtype=torch.int64)
        tokens[:, 0] = torch.randint(0, VOCABULARY, (BATCH,), generator=generator)
        for position in range(1, CONTEXT):
            noise = torch.randint(0, 3, (BATCH,), generator=generator)
            tokens[:, position] = (5 * tokens[:, position - 1] + 3 + noise) % VOCABULARY
        batches.append({"input_ids": tokens.to(device), "labels": tokens.to(device)})
    return batches


def _decays(module: nn.Module, name: str) -> bool:
    """minGPT's rule: weight decay on the weights of linear layers only, never on biases,
    norms or embeddings."""
    return name.endswith("weight") and isinstance(module, nn.Linear | nn.Conv2d)


def _groups(parameters: NamedParameters) -> list[dict[str, object]]:
    owners = dict(parameters.model.named_modules())
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, parameter in parameters.named():
        owner = owners[name.rpartition(".")[0]] if "." in name else parameters.model
        (decay if _decays(owner, name) else rest).append(parameter)
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def adamw(
    parameters: NamedParameters, *, fused: bool | None = None, foreach: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW with decay on linear weights only."""
    return torch.optim.AdamW(
        _groups(parameters),
        lr=LEARNING_RATE,
        betas=BETAS,
        weight_decay=WEIGHT_DECAY,
        fused=fused,
        foreach=foreach,
    )


def warmup_cosine(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over the first WARMUP steps, then cosine decay to a tenth by the last."""

    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        progress = min(1.0, (step - WARMUP) / max(1, STEPS - WARMUP))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


TRANSFORMER_LM = Workload(
    name="transformer-lm",
    model_factory=minimal_gpt,
    batches=token_batches,
    optimizer_factory=adamw,
    scheduler_factory=warmup_cosine,
    clip_grad_norm=CLIP,
    steps=STEPS,
    description="transformer-lm: a 2-block causal LM, AdamW without decay on norms, biases and "
    "embeddings, warm-up + cosine schedule, global-norm clipping, dict batches of 8 x 16 tokens",
)

ADAMW_LENET5 = Workload(
    name="adamw-lenet5",
    model_factory=lenet5,
    batches=synthetic_classification((1, 28, 28), 10, batch_size=16),
    optimizer_factory=adamw,
    scheduler_factory=warmup_cosine,
    clip_grad_norm=CLIP,
    steps=STEPS,
    description="adamw-lenet5: LeNet-5, AdamW without decay on biases, warm-up + cosine "
    "schedule, global-norm clipping, 8 steps on synthetic 16-sample batches",
)


# --- legitimate variants ---------------------------------------------------------------------


def _sdpa(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(query, key, value, is_causal=True)


def sdpa_attention() -> Candidate:
    """torch's fused ``scaled_dot_product_attention`` kernel in place of the explicit one."""
    return Candidate(
        name="sdpa-attention",
        context=lambda: _kernel("attention", _sdpa),
        description="F.scaled_dot_product_attention(is_causal=True)",
    )


def _blockwise(block: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def kernel(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Online softmax over key blocks (FlashAttention's recurrence): a running maximum and
        normalizer per query, earlier partial sums rescaled as each block arrives."""
        scale = 1.0 / math.sqrt(query.shape[-1])
        time = query.shape[-2]
        rows = torch.arange(time, device=query.device)[:, None]
        maximum = torch.full((*query.shape[:-1], 1), float("-inf"), device=query.device)
        total = torch.zeros_like(maximum)
        out = torch.zeros_like(query)
        for start in range(0, time, block):
            keys, values = key[..., start : start + block, :], value[..., start : start + block, :]
            scores = query @ keys.transpose(-2, -1) * scale
            columns = torch.arange(start, start + keys.shape[-2], device=query.device)[None, :]
            scores = scores.masked_fill(columns > rows, float("-inf"))
            new_maximum = torch.maximum(maximum, scores.amax(dim=-1, keepdim=True))
            correction = torch.exp(maximum - new_maximum)
            weights = torch.exp(scores - new_maximum)
            total = total * correction + weights.sum(dim=-1, keepdim=True)
            out = out * correction + weights @ values
            maximum = new_maximum
        return out / total

    return kernel


def blockwise_attention(block: int = 4) -> Candidate:
    """A FlashAttention-style kernel: keys and values in blocks of ``block``, online softmax."""
    return Candidate(
        name=f"blockwise-attention-{block}",
        context=lambda: _kernel("attention", _blockwise(block)),
        description=f"attention over key blocks of {block} with an online softmax",
    )


def _formula_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    variance = (x - mean).square().mean(dim=-1, keepdim=True)
    return (x - mean) * torch.rsqrt(variance + eps) * weight + bias


def layer_norm_by_formula() -> Candidate:
    """LayerNorm written out (mean, biased variance, rsqrt), as a hand-fused kernel does."""
    return Candidate(
        name="layer-norm-by-formula",
        context=lambda: _kernel("layer_norm", _formula_layer_norm),
        description="LayerNorm from its formula instead of F.layer_norm",
    )


def fused_adamw() -> Candidate:
    """torch's fused AdamW implementation, the same groups and hyper-parameters."""
    return Candidate(
        name="adamw-fused",
        optimizer_factory=lambda parameters: adamw(parameters, fused=True),
        description="torch.optim.AdamW(fused=True)",
    )


def for_loop_adamw() -> Candidate:
    """torch's single-tensor AdamW (``foreach=False``)."""
    return Candidate(
        name="adamw-for-loop",
        optimizer_factory=lambda parameters: adamw(parameters, foreach=False),
        description="torch.optim.AdamW(foreach=False)",
    )


# --- bugs --------------------------------------------------------------------------------------


def _scaled_by_width(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    scores = query @ key.transpose(-2, -1) / query.shape[-1]  # BUG: 1/d, not 1/sqrt(d)
    time = scores.shape[-1]
    future = torch.ones(time, time, dtype=torch.bool, device=scores.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ value


def attention_scale_bug() -> Candidate:
    """BUG: attention scores scaled by 1/d instead of 1/sqrt(d).

    Ships in hand-written attention kernels that take the scale as a parameter and are passed
    ``1 / head_dim``, and in ports between libraries that pre-scale the query differently.
    The softmax is flatter than it should be: attention and everything after it change.
    """
    return Candidate(
        name="attention-scale-1/d",
        context=lambda: _kernel("attention", _scaled_by_width),
        description="attention scores scaled by 1/d instead of 1/sqrt(d)",
    )


def _sees_next_token(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    time = scores.shape[-1]
    # BUG: triu(2) leaves the diagonal above the main one unmasked: each position sees the next.
    future = torch.ones(time, time, dtype=torch.bool, device=scores.device).triu(2)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ value


def causal_mask_off_by_one() -> Candidate:
    """BUG: the causal mask is off by one: every position attends to the next token too.

    Ships in masks built with ``triu(diagonal=...)`` from a changed convention, and in kernels
    whose block-skipping logic is off by one at the diagonal. The model can read its own
    labels: the loss falls fast, and training learns to cheat.
    """
    return Candidate(
        name="causal-mask-off-by-one",
        context=lambda: _kernel("attention", _sees_next_token),
        description="causal mask off by one: each position sees the next token",
    )


def _without_mean(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    # BUG: the mean is not subtracted (RMSNorm's formula in a LayerNorm kernel).
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight + bias


def layer_norm_without_mean() -> Candidate:
    """BUG: a fused LayerNorm kernel that does not subtract the mean (RMSNorm's formula).

    Ships when one kernel serves both normalizations behind a flag set the wrong way, or in a
    kernel ported from an RMSNorm one. Forward outputs change wherever activations have a mean.
    """
    return Candidate(
        name="layer-norm-without-mean",
        context=lambda: _kernel("layer_norm", _without_mean),
        description="LayerNorm kernel that does not subtract the mean",
    )


def decay_on_all_parameters() -> Candidate:
    """BUG: weight decay on every parameter: one parameter group, norms and biases decayed.

    The natural form of the decay bug: the no-decay group is lost when an optimizer is built
    from ``model.parameters()`` (a refactor, a wrapper that flattens groups). Norm weights and
    biases shrink towards zero every step.
    """
    return Candidate(
        name="decay-on-all-parameters",
        optimizer_factory=lambda parameters: torch.optim.AdamW(
            parameters, lr=LEARNING_RATE, betas=BETAS, weight_decay=WEIGHT_DECAY
        ),
        description="AdamW with weight decay on every parameter (one group)",
    )


class _AdamWWithoutBiasCorrection(torch.optim.Optimizer):
    """AdamW as a hand-fused kernel writes it, keeping AdamW's state layout (``step``,
    ``exp_avg``, ``exp_avg_sq``), without Adam's bias correction (the BUG)."""

    def __init__(self, groups: list[dict[str, object]]) -> None:
        defaults = {"lr": LEARNING_RATE, "betas": BETAS, "eps": 1e-8, "weight_decay": WEIGHT_DECAY}
        super().__init__(groups, defaults)

    @torch.no_grad()  # type: ignore[untyped-decorator,unused-ignore]
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(parameter)
                    state["exp_avg_sq"] = torch.zeros_like(parameter)
                state["step"] += 1
                parameter.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(parameter.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(
                    parameter.grad, parameter.grad, value=1 - beta2
                )
                # BUG: no division by (1 - beta^t): the first steps are far too small.
                denominator = state["exp_avg_sq"].sqrt().add_(group["eps"])
                parameter.addcdiv_(state["exp_avg"], denominator, value=-group["lr"])
        return None


def adamw_without_bias_correction() -> Candidate:
    """BUG: a fused AdamW kernel without Adam's bias correction.

    Ships in hand-written optimizers (and ports of old TensorFlow code) that drop the
    ``1 / (1 - beta^t)`` factors: the first steps' updates are much smaller (at step 1 by
    1 - beta1 over sqrt(1 - beta2)), warm-up is silently doubled.
    """
    return Candidate(
        name="adamw-without-bias-correction",
        optimizer_factory=lambda parameters: _AdamWWithoutBiasCorrection(_groups(parameters)),
        description="hand-written AdamW without bias correction",
    )


def _twice(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    scheduler = warmup_cosine(optimizer)
    step = scheduler.step

    def step_twice(*args: object, **kwargs: object) -> None:
        step()
        step()  # BUG: stepped again, as a scheduler stepped per micro-batch and per step is

    scheduler.step = step_twice  # type: ignore[method-assign]
    return scheduler


def scheduler_stepped_twice() -> Candidate:
    """BUG: the learning-rate scheduler advances twice per optimizer step.

    Ships when a scheduler is stepped both in the training loop and in a callback, or per
    micro-batch under gradient accumulation: warm-up ends early and the decay runs twice as
    fast.
    """
    return Candidate(
        name="scheduler-stepped-twice",
        scheduler_factory=_twice,
        description="learning-rate scheduler stepped twice per optimizer step",
    )


def _clip_each(context: StepContext, batch: Batch) -> Tensor:
    loss = context.loss(batch)
    context.backward(loss)
    context.unscale()
    for parameter in context.model.parameters():  # BUG: per tensor, not the global norm
        if parameter.grad is not None:
            torch.nn.utils.clip_grad_norm_([parameter], CLIP)
    context.optimizer_step()
    context.scheduler_step()
    return loss.detach()


def clip_per_parameter() -> Candidate:
    """BUG: gradients clipped tensor by tensor to the threshold, not by their global norm.

    Ships in hand-fused clipping (a per-tensor norm is what a single-tensor kernel can compute
    without a reduction across tensors) and in sharded optimizers that clip each shard alone:
    every large tensor is cut to the threshold on its own, the update's direction changes.
    """
    return Candidate(
        name="clip-per-parameter",
        step_fn=_clip_each,
        description="gradient clipping per tensor instead of by the global norm",
    )


# --- torch.compile -------------------------------------------------------------------------------


def _inductor(fallback_random: bool) -> Callable[[nn.Module], nn.Module]:
    def transform(model: nn.Module) -> nn.Module:
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            {"fallback_random": True} if fallback_random else None
        )
        compiled: nn.Module = torch.compile(model, options=options)  # type: ignore[assignment]
        return compiled

    return transform


def inductor_compiled(*, own_random_stream: bool = False) -> Candidate:
    """``torch.compile(model)`` with the default Inductor backend: generated C++ (CPU) or Triton
    (GPU) kernels for the whole forward and backward. Legitimate: fused kernels that sum in
    another order.

    Inductor draws dropout masks from a generator of its own; by default it is compiled with
    ``fallback_random``, so that it draws them from torch's, as eager does, and the check
    compares the same masks against the default region. ``own_random_stream=True`` keeps
    Inductor's own stream, a candidate judged against a region that admits another one.
    """
    return Candidate(
        name="inductor-compiled" + ("-own-random-stream" if own_random_stream else ""),
        model_transform=_inductor(fallback_random=not own_random_stream),
        random_stream=own_random_stream,
        description="torch.compile(model), the Inductor backend"
        + ("" if own_random_stream else ", fallback_random"),
    )


def _quick_gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return x * torch.sigmoid(1.702 * x)  # BUG: the sigmoid approximation, not GELU


def _lowered_with(decompositions: dict[Any, Callable[..., Tensor]]) -> Callable[[nn.Module], Any]:
    """``torch.compile`` through AOT autograd with ``decompositions`` and no code generation: a
    compiler pipeline whose lowering rules are under test, compiled in a second or two."""

    # One backend for every model this candidate compiles: Dynamo recompiles for a new one.
    backend = aot_autograd(fw_compiler=_run_graph, decompositions=decompositions)

    def transform(model: nn.Module) -> Any:
        return torch.compile(model, backend=backend)

    return transform


def _run_graph(graph: torch.fx.GraphModule, inputs: Any) -> Callable[..., Any]:
    return make_boxed_func(graph.forward)


def wrong_gelu_lowering() -> Candidate:
    """BUG: a compiler lowering that decomposes GELU as the sigmoid approximation.

    Ships in backend decomposition tables (a custom ``register_decomposition``, a vendor
    lowering) that pick ``x * sigmoid(1.702 x)`` for speed: every op-level unit test of the
    compiled model within a loose tolerance passes, the MLP blocks compute another function.
    """
    return Candidate(
        name="wrong-gelu-lowering",
        model_transform=_lowered_with({torch.ops.aten.gelu.default: _quick_gelu}),
        description="torch.compile with GELU lowered to x * sigmoid(1.702 x)",
    )
