"""The Winograd example: its kernels, its candidates, and a caught bug seen through pytest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.winograd import winograd
from examples.winograd.winograd import (
    F2X2_3X3,
    TILES,
    Tile,
    WinogradConstants,
    winograd_applies,
    winograd_candidate,
    winograd_conv2d,
    winograd_fp16_transforms,
    winograd_wrong_constant,
)

EXAMPLE = Path(winograd.__file__)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", sorted(TILES))
def test_each_tile_computes_a_1d_correlation_exactly(tile: str) -> None:
    constants = TILES[tile]
    BT, G, AT = (
        torch.tensor(m, dtype=torch.float64) for m in (constants.BT, constants.G, constants.AT)
    )
    generator = torch.Generator().manual_seed(0)
    d = torch.randn(constants.input_tile, generator=generator, dtype=torch.float64)
    g = torch.randn(3, generator=generator, dtype=torch.float64)
    expected = torch.stack([d[i : i + 3] @ g for i in range(constants.output_tile)])
    torch.testing.assert_close(AT @ ((G @ g) * (BT @ d)), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("tile", sorted(TILES))
@pytest.mark.parametrize(
    ("shape", "padding", "bias"),
    [
        ((1, 1, 1, 3, 3), 0, False),
        ((2, 3, 5, 7, 9), 0, True),
        ((3, 2, 4, 1, 1), 1, True),
        ((1, 4, 2, 5, 6), 2, False),
        ((2, 3, 3, 6, 5), (1, 0), True),
        ((1, 2, 2, 8, 8), "same", False),
        ((1, 2, 2, 8, 8), "valid", True),
    ],
)
def test_winograd_conv2d_equals_conv2d_in_float64(
    tile: str,
    shape: tuple[int, int, int, int, int],
    padding: int | tuple[int, int] | str,
    bias: bool,
) -> None:
    batch, channels, filters, height, width = shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
    w = torch.randn(filters, channels, 3, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(filters, generator=generator, dtype=torch.float64) if bias else None
    actual = winograd_conv2d(x, w, b, 1, padding, tile=tile)  # type: ignore[arg-type]
    torch.testing.assert_close(actual, F.conv2d(x, w, b, 1, padding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("weight_shape", "options", "message"),
    [
        ((2, 3, 3, 3), {"stride": 2}, "stride=2"),
        ((2, 3, 5, 5), {}, r"weight \(2, 3, 5, 5\)"),
        ((2, 3, 3, 3), {"dilation": 2}, "dilation=2"),
        ((4, 1, 3, 3), {"groups": 3}, "groups=3"),
        ((2, 4, 3, 3), {}, "input has 3 channels, weight expects 4"),
    ],
)
def test_what_winograd_does_not_compute_is_refused(
    weight_shape: tuple[int, ...], options: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        winograd_conv2d(torch.randn(1, 3, 6, 6), torch.randn(weight_shape), **options)  # type: ignore[arg-type]


def test_transforms_in_reduced_precision_cost_accuracy_but_keep_the_dtype() -> None:
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    full = winograd_conv2d(x, w, padding=1)
    half = winograd_conv2d(x, w, padding=1, transform_dtype=torch.float16)
    assert half.dtype == torch.float32
    assert (half.double() - exact).abs().max() > 100 * (full.double() - exact).abs().max()


def test_a_wrong_constant_is_a_copy_with_one_entry_changed() -> None:
    wrong = F2X2_3X3.with_entry("G", 1, 0, 0.45)
    assert wrong.G[1] == (0.45, 0.5, 0.5)
    assert F2X2_3X3.G[1] == (0.5, 0.5, 0.5)
    assert (wrong.BT, wrong.AT) == (F2X2_3X3.BT, F2X2_3X3.AT)
    assert wrong.name == "F(2x2,3x3), G[1][0]=0.45"
    with pytest.raises(ValueError, match=r"G must be 4 x 3"):
        WinogradConstants("broken", F2X2_3X3.BT, F2X2_3X3.G[:3], F2X2_3X3.AT)


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # Winograd
        nn.Conv2d(4, 4, 1),  # 1x1: falls through
        nn.Conv2d(4, 4, 3, stride=2, padding=1),  # strided: falls through
    )


def test_candidates_route_3x3_stride_1_convolutions_only_and_restore_conv2d() -> None:
    model, x = _model(), torch.randn(2, 3, 8, 8)
    original = F.conv2d
    with winograd_wrong_constant().forward_context():
        assert F.conv2d is not original
        assert torch.nn.modules.conv.F.conv2d is F.conv2d  # type: ignore[attr-defined]
        first = model[0](x)
        later = model[2](model[1](first))
    assert F.conv2d is original
    assert (first - model[0](x)).abs().max() > 1e-2
    torch.testing.assert_close(later, model[2](model[1](first)), rtol=0, atol=0)


@pytest.mark.parametrize("tile", sorted(TILES))
def test_a_correct_candidate_gives_the_model_s_output_and_gradients(tile: Tile) -> None:
    model, x = _model(), torch.randn(2, 3, 9, 7)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    with winograd_candidate(tile).forward_context():
        actual = model(x)
        actual.sum().backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(
        [p.grad for p in model.parameters()], expected_grads, strict=True
    ):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_candidates_have_names_and_descriptions() -> None:
    candidates = [
        winograd_candidate("F2x2_3x3"),
        winograd_candidate("F4x4_3x3"),
        winograd_wrong_constant(),
        winograd_fp16_transforms(),
    ]
    assert [c.name for c in candidates] == [
        "winograd-F2x2_3x3",
        "winograd-F4x4_3x3",
        "winograd-wrong-constant",
        "winograd-F4x4_3x3-fp16-transforms",
    ]
    assert all(c.description for c in candidates)
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd_candidate("F6x6_3x3")  # type: ignore[arg-type]


def test_applies_exactly_where_winograd_is_defined() -> None:
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    assert winograd_applies(x, w, 1, 1)
    assert winograd_applies(x, w, (1, 1), "same", (1, 1))
    assert not winograd_applies(x, w, 2)
    assert not winograd_applies(x, w, padding="circular")
    assert not winograd_applies(x, torch.randn(2, 1, 3, 3), groups=2)
    assert not winograd_applies(x[0], w)


# --------------------------------------------------------------------------------------------
# Through pytest: the caught bug names the convolution where it starts
# --------------------------------------------------------------------------------------------

# A VGG-shaped network small enough to record a region in seconds: module names as in
# torchvision's VGG, so the replay line reads as it does on vgg16-mini.
CONFTEST = """
from torch import nn
from pytest_convergence.workloads import Workload, register_workload, sgd, synthetic_classification

class SmallVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

    def forward(self, x):
        return self.classifier(self.features(x))

register_workload(
    Workload(
        name="small-vgg",
        model_factory=SmallVGG,
        batches=synthetic_classification((3, 16, 16), 10, batch_size=8),
        optimizer_factory=sgd(lr=0.05),
        steps=2,
    ),
    replace_existing=True,
)
"""

TESTS = """
import pytest
from winograd import winograd_wrong_constant

@pytest.mark.convergence(workload="small-vgg")
def test_wrong_constant(convergence):
    convergence.check(winograd_wrong_constant())
"""


def test_the_wrong_constant_fails_and_its_replay_names_the_first_convolution(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)  # CI refuses to record
    shutil.copy(EXAMPLE, pytester.path / "winograd.py")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_winograd=TESTS)
    result = pytester.runpytest("--convergence", "--convergence-record")
    result.assert_outcomes(failed=1)
    assert (pytester.path / "baselines" / "small-vgg.json").exists()
    result.stdout.fnmatch_lines(
        [
            "*ConvergenceError: candidate 'winograd-wrong-constant' left the divergence region "
            "of 'small-vgg'*",
            # The verdict may first name a later layer, where the error has grown; the replay is
            # what points at the convolution that computes it.
            "*First violation: step 1 of 2, parameter *",
            "*First module whose output diverged at step 1: features.0 (Conv2d), max abs. error*",
        ]
    )
