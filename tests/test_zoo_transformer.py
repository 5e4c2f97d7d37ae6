"""The zoo's transformer LM and AdamW LeNet-5, their kernels, recipe and candidates."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from pytest_convergence.candidates import Candidate
from pytest_convergence.cosim import cosimulate
from pytest_convergence.engine import Implementation
from pytest_convergence.regions import calibrate, judge
from pytest_convergence.workloads import get_workload
from pytest_convergence.zoo import transformer
from pytest_convergence.zoo.candidates import tf32_matmuls


def qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, 16, 8, generator=generator) for _ in range(3))  # type: ignore[return-value]


def test_the_attention_kernels_that_are_legitimate_agree_with_the_explicit_one() -> None:
    query, key, value = qkv()
    expected = transformer.attention(query, key, value)
    for candidate in (transformer.sdpa_attention(), transformer.blockwise_attention(4)):
        with candidate.forward_context():
            actual = transformer._Kernels.attention(query, key, value)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_the_attention_bugs_change_what_attention_computes() -> None:
    query, key, value = qkv()
    expected = transformer.attention(query, key, value)
    for candidate in (transformer.attention_scale_bug(), transformer.causal_mask_off_by_one()):
        with candidate.forward_context():
            actual = transformer._Kernels.attention(query, key, value)
        assert float((actual - expected).abs().max()) > 1e-3


def test_the_causal_mask_bug_lets_a_position_see_the_next_token() -> None:
    query, key, value = qkv()
    changed = value.clone()
    changed[..., 5, :] += 1.0  # only position 5's value: positions 0-4 must not see it
    with transformer.causal_mask_off_by_one().forward_context():
        before = transformer._Kernels.attention(query, key, value)
        after = transformer._Kernels.attention(query, key, changed)
    assert float((after - before)[..., 4, :].abs().max()) > 0  # position 4 saw position 5
    assert float((after - before)[..., :4, :].abs().max()) == 0


def test_layer_norm_by_formula_agrees_and_without_the_mean_does_not() -> None:
    x = torch.randn(3, 7, 32) + 2.0
    weight, bias = torch.rand(32) + 0.5, torch.randn(32)
    expected = transformer.layer_norm(x, weight, bias, 1e-5)
    with transformer.layer_norm_by_formula().forward_context():
        torch.testing.assert_close(
            transformer._Kernels.layer_norm(x, weight, bias, 1e-5), expected, rtol=1e-5, atol=1e-5
        )
    with transformer.layer_norm_without_mean().forward_context():
        assert (
            float((transformer._Kernels.layer_norm(x, weight, bias, 1e-5) - expected).abs().max())
            > 0.1
        )


def test_the_model_computes_its_own_next_token_loss_from_dict_batches() -> None:
    workload = get_workload("transformer-lm")
    batch = workload.make_batches()[0]
    assert set(batch) == {"input_ids", "labels"}
    output = workload.build_model()(**batch)
    assert output.loss is not None
    assert output.logits.shape == (transformer.BATCH, transformer.CONTEXT, transformer.VOCABULARY)
    assert float(output.loss.detach()) == pytest.approx(math.log(transformer.VOCABULARY), rel=0.05)


@pytest.mark.parametrize("name", ["transformer-lm", "adamw-lenet5"])
def test_weight_decay_falls_on_linear_and_conv_weights_only(name: str) -> None:
    implementation = Implementation.build(get_workload(name), Candidate("reference"))
    decayed, undecayed = implementation.optimizer.param_groups
    owners = dict(implementation.model.named_modules())
    names = {id(p): n for n, p in implementation.model.named_parameters()}
    for parameter in decayed["params"]:
        owner = owners[names[id(parameter)].rpartition(".")[0]]
        assert isinstance(owner, nn.Linear | nn.Conv2d)
        assert names[id(parameter)].endswith("weight")
    assert undecayed["weight_decay"] == 0.0
    assert decayed["weight_decay"] == transformer.WEIGHT_DECAY


def test_the_schedule_warms_up_then_decays_to_a_tenth() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = transformer.warmup_cosine(optimizer)
    rates = []
    for _ in range(transformer.STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:2] == [0.5, 1.0]
    assert rates[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert all(a >= b for a, b in itertools.pairwise(rates[1:]))


def test_the_scheduler_bug_advances_the_schedule_twice_per_step() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    candidate = transformer.scheduler_stepped_twice()
    assert candidate.scheduler_factory is not None
    scheduler = candidate.scheduler_factory(optimizer)
    optimizer.step()
    scheduler.step()
    assert scheduler.last_epoch == 2


def test_the_tf32_emulation_rounds_matmul_inputs_to_ten_bit_mantissas() -> None:
    layer = nn.Linear(64, 64)
    x = torch.randn(8, 64)
    with torch.no_grad():
        exact = layer(x)
        with tf32_matmuls().forward_context():
            rounded = layer(x)
    relative = float((rounded - exact).abs().max() / exact.abs().max())
    assert 1e-5 < relative < 2.0**-9


@pytest.fixture(scope="module")
def lm_region() -> object:
    return calibrate(get_workload("transformer-lm").with_options(steps=3), seeds=[0, 1], draws=2)


@pytest.mark.parametrize(
    "make", [transformer.sdpa_attention, transformer.fused_adamw, transformer.layer_norm_by_formula]
)
def test_a_legitimate_variant_stays_in_the_transformers_region(make, lm_region) -> None:  # type: ignore[no-untyped-def]
    run = cosimulate(get_workload("transformer-lm").with_options(steps=3, seed=100), make())
    assert judge(run, lm_region).passed


@pytest.mark.parametrize(
    "make",
    [
        transformer.scheduler_stepped_twice,
        transformer.adamw_without_bias_correction,
        transformer.decay_on_all_parameters,
    ],
)
def test_a_transformer_bug_leaves_the_region(make, lm_region) -> None:  # type: ignore[no-untyped-def]
    run = cosimulate(get_workload("transformer-lm").with_options(steps=3, seed=100), make())
    assert not judge(run, lm_region).passed
