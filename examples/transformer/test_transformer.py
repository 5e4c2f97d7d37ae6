"""A causal transformer LM trained as users train theirs: the training step is the user's.

The ``transformer-lm`` workload (``pytest_convergence.zoo.transformer``) brings its own recipe:
dict batches (``{"input_ids", "labels"}``) into a model that returns its own loss, AdamW
without decay on biases, norms and embeddings (parameter groups by name), a warm-up and cosine
schedule on both sides, global-norm clipping and dropout. Each test co-simulates 8 steps of it
against ``baselines/transformer-lm.json``; the precision and random-stream checks against the
regions of their own (``transformer-lm.bf16-autocast.json``,
``transformer-lm.random-stream.json``). Run ``pytest --convergence -rx examples/transformer/``.
"""

from __future__ import annotations

import pytest

from pytest_convergence.candidates import Candidate
from pytest_convergence.errors import ConvergenceError
from pytest_convergence.zoo import transformer
from pytest_convergence.zoo.candidates import accumulation_without_division

pytestmark = pytest.mark.convergence(workload="transformer-lm")


VARIANTS = [
    transformer.sdpa_attention(),
    transformer.blockwise_attention(),
    transformer.layer_norm_by_formula(),
    transformer.fused_adamw(),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant.name for variant in VARIANTS])
def test_a_kernel_or_optimizer_implementation_that_computes_the_same_step_passes(
    convergence, variant
):
    convergence.check(variant)


def test_bf16_autocast_trains_like_float32_under_its_precision_policy(convergence):
    convergence.check(Candidate("bf16-autocast", precision="bf16-autocast"))


def test_micro_batches_through_dropout_pass_a_region_that_admits_another_random_stream(
    convergence,
):
    convergence.check(Candidate("micro-batches-2", micro_batches=2, random_stream=True))


def test_undeclared_micro_batches_through_dropout_are_told_the_random_stream_differs(
    convergence,
):
    """Judged by the default region they fail, and the message says why, not the optimizer."""
    with pytest.raises(ConvergenceError, match="the random stream differs"):
        convergence.check(Candidate("micro-batches-2", micro_batches=2))


def test_inductor_trains_like_eager(convergence):
    """torch.compile with Inductor; its compilation is timed apart from the check."""
    result = convergence.check(transformer.inductor_compiled())
    assert result.compile_seconds is not None


BUGS = [
    transformer.attention_scale_bug(),
    transformer.causal_mask_off_by_one(),
    transformer.layer_norm_without_mean(),
    transformer.decay_on_all_parameters(),
    transformer.adamw_without_bias_correction(),
    transformer.scheduler_stepped_twice(),
    transformer.clip_per_parameter(),
    transformer.wrong_gelu_lowering(),
    accumulation_without_division(2),
]


@pytest.mark.xfail(
    raises=ConvergenceError, strict=True, reason="caught bug: see its docstring in the zoo"
)
@pytest.mark.parametrize("bug", BUGS, ids=[bug.name for bug in BUGS])
def test_a_transformer_training_bug_is_caught(convergence, bug):
    convergence.check(bug)
