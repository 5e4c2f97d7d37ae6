"""Winograd F(2x2,3x3) and F(4x4,3x3) convolutions in differentiable torch ops, and candidates.

Winograd's minimal filtering algorithm (Lavin & Gray 2016, "Fast Algorithms for Convolutional
Neural Networks") computes an m x m output tile of a 3x3 convolution from an (m + 2) x (m + 2)
input tile with (m + 2)^2 multiplications instead of 9 m^2:

    Y = A^T [ (G g G^T) * (B^T d B) ] A

``g`` is the 3x3 filter, ``d`` the input tile, ``*`` the elementwise product (summed over input
channels, which turns it into (m + 2)^2 independent matrix products). The transforms trade
multiplications for additions and for *constants*: F(4x4,3x3) uses the interpolation points
0, 1, -1, 2, -2 and infinity, whose transforms hold 1/24, 1/6, 4, 5 and 8. Those constants are
what makes the algorithm fast, and what makes it less accurate than direct convolution (its
float32 error grows with the tile) and fragile to a single mistyped entry: the kind of bug the
LoGM paper caught in a production Winograd kernel within two iterations.

Everything here is written with ordinary differentiable torch operations (padding, ``unfold``,
``matmul``), so autograd derives the backward pass, and the candidates below plug the kernel
into a model by monkeypatching ``conv2d`` for the convolutions Winograd applies to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from pytest_convergence.candidates import Candidate

# Private in the zoo, reused on purpose: it patches every namespace nn.Conv2d reads conv2d from
# and restores the originals on errors, which a second patcher would have to get right again.
from pytest_convergence.zoo.candidates import _conv2d_patched

__all__ = [
    "F2X2_3X3",
    "F4X4_3X3",
    "TILES",
    "WinogradConstants",
    "winograd_applies",
    "winograd_candidate",
    "winograd_conv2d",
    "winograd_fp16_transforms",
    "winograd_wrong_constant",
]

Matrix = tuple[tuple[float, ...], ...]
Tile = Literal["F2x2_3x3", "F4x4_3x3"]
IntPair = int | Sequence[int]
Conv2d = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class WinogradConstants:
    """The three transform matrices of one Winograd algorithm F(m x m, 3 x 3).

    ``BT`` (alpha x alpha) transforms input tiles, ``G`` (alpha x 3) filters, ``AT`` (m x alpha)
    products back to outputs, with alpha = m + 2. Frozen and hashable, so transform tensors are
    built once per (constants, dtype, device).
    """

    name: str
    BT: Matrix
    G: Matrix
    AT: Matrix

    def __post_init__(self) -> None:
        alpha, output = len(self.BT), len(self.AT)
        shapes = {
            "BT": (self.BT, alpha, alpha),
            "G": (self.G, alpha, 3),
            "AT": (self.AT, output, alpha),
        }
        for label, (matrix, rows, columns) in shapes.items():
            if len(matrix) != rows or any(len(row) != columns for row in matrix):
                raise ValueError(
                    f"{self.name}: {label} must be {rows} x {columns} for a {output}x{output} "
                    f"output tile, got {[len(row) for row in matrix]}"
                )
        if alpha != output + 2:
            raise ValueError(
                f"{self.name}: a 3x3 filter needs alpha = m + 2, got {alpha}, {output}"
            )

    @property
    def output_tile(self) -> int:
        """m: the side of the output tile one input tile produces."""
        return len(self.AT)

    @property
    def input_tile(self) -> int:
        """alpha = m + 2: the side of an input tile (tiles overlap by 2)."""
        return len(self.BT)

    def with_entry(
        self, matrix: Literal["BT", "G", "AT"], row: int, column: int, value: float
    ) -> WinogradConstants:
        """A copy with one entry changed: how a buggy kernel's constant table is modelled."""
        rows = [list(r) for r in getattr(self, matrix)]
        rows[row][column] = value
        changed: Matrix = tuple(tuple(r) for r in rows)
        name = f"{self.name}, {matrix}[{row}][{column}]={value:g}"
        return replace(self, name=name, **{matrix: changed})


# Lavin & Gray 2016: F(2x2,3x3) from the interpolation points 0, 1, -1, infinity.
F2X2_3X3 = WinogradConstants(
    name="F(2x2,3x3)",
    BT=(
        (1.0, 0.0, -1.0, 0.0),
        (0.0, 1.0, 1.0, 0.0),
        (0.0, -1.0, 1.0, 0.0),
        (0.0, 1.0, 0.0, -1.0),
    ),
    G=(
        (1.0, 0.0, 0.0),
        (0.5, 0.5, 0.5),
        (0.5, -0.5, 0.5),
        (0.0, 0.0, 1.0),
    ),
    AT=(
        (1.0, 1.0, 1.0, 0.0),
        (0.0, 1.0, -1.0, -1.0),
    ),
)

# Lavin & Gray 2016: F(4x4,3x3) from the interpolation points 0, 1, -1, 2, -2,
# infinity, the usual choice (points +-1/2 instead of +-2 turn A^T's 2, 4, 8 into 1/2, 1/4, 1/8
# and move the large constants into G and B^T).
F4X4_3X3 = WinogradConstants(
    name="F(4x4,3x3)",
    BT=(
        (4.0, 0.0, -5.0, 0.0, 1.0, 0.0),
        (0.0, -4.0, -4.0, 1.0, 1.0, 0.0),
        (0.0, 4.0, -4.0, -1.0, 1.0, 0.0),
        (0.0, -2.0, -1.0, 2.0, 1.0, 0.0),
        (0.0, 2.0, -1.0, -2.0, 1.0, 0.0),
        (0.0, 4.0, 0.0, -5.0, 0.0, 1.0),
    ),
    G=(
        (1 / 4, 0.0, 0.0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0.0, 0.0, 1.0),
    ),
    AT=(
        (1.0, 1.0, 1.0, 1.0, 1.0, 0.0),
        (0.0, 1.0, -1.0, 2.0, -2.0, 0.0),
        (0.0, 1.0, 1.0, 4.0, 4.0, 0.0),
        (0.0, 1.0, -1.0, 8.0, -8.0, 1.0),
    ),
)

TILES: dict[str, WinogradConstants] = {"F2x2_3x3": F2X2_3X3, "F4x4_3x3": F4X4_3X3}


@functools.lru_cache(maxsize=64)
def _matrices(
    constants: WinogradConstants, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Built in float64 and rounded once, so 1/6 and 1/24 are the nearest values of ``dtype``.
    def tensor(matrix: Matrix) -> torch.Tensor:
        return torch.tensor(matrix, dtype=torch.float64).to(device=device, dtype=dtype)

    return tensor(constants.BT), tensor(constants.G), tensor(constants.AT)


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (pair[0], pair[1])


def _padding(padding: IntPair | str) -> tuple[int, int]:
    # For a 3x3 filter at stride 1, "same" is one pixel on every side.
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return (1, 1)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    return _pair(padding, "padding")


def winograd_applies(  # noqa: PLR0917  (F.conv2d's own signature)
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> bool:
    """Whether :func:`winograd_conv2d` computes this convolution (else use another kernel).

    Winograd F(m x m, 3 x 3) is a stride-1, undilated, ungrouped 3x3 algorithm; frameworks route
    everything else (1x1 projections, strided downsampling) to other kernels, as the candidates do.
    """
    try:
        paddings = _padding(padding)
        unit = _pair(stride, "stride") == (1, 1) and _pair(dilation, "dilation") == (1, 1)
    except (TypeError, ValueError):
        return False
    return (
        unit
        and groups == 1
        and input.dim() == 4
        and weight.dim() == 4
        and tuple(weight.shape[2:]) == (3, 3)
        and min(paddings) >= 0
        and input.is_floating_point()
    )


def winograd_conv2d(  # noqa: PLR0917  (F.conv2d's own signature)
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    tile: Tile = "F2x2_3x3",
    transform_dtype: torch.dtype | None = None,
    constants: WinogradConstants | None = None,
) -> torch.Tensor:
    """``F.conv2d`` for 3x3 filters at stride 1 by Winograd's F(m x m, 3 x 3) algorithm.

    Same arguments and result as ``F.conv2d`` (N, C, H, W input, K, C, 3, 3 weight, any batch,
    channels and spatial size; the output is padded to whole tiles and cropped). ``tile`` picks
    F(2x2,3x3) or F(4x4,3x3). Two knobs exist to build *buggy* variants on purpose:
    ``transform_dtype`` computes the three transforms in that (reduced) precision, as a kernel
    that stores transformed tiles in fp16 does; ``constants`` replaces the transform matrices,
    e.g. by :meth:`WinogradConstants.with_entry` to model a mistyped constant.
    """
    if not winograd_applies(input, weight, stride, padding, dilation, groups):
        raise ValueError(
            "winograd_conv2d computes 3x3, stride-1, undilated, ungrouped convolutions of 4-D "
            f"inputs; got input {tuple(input.shape)}, weight {tuple(weight.shape)}, "
            f"stride={stride!r}, padding={padding!r}, dilation={dilation!r}, groups={groups}"
        )
    if input.shape[1] != weight.shape[1]:
        raise ValueError(
            f"input has {input.shape[1]} channels, weight expects {weight.shape[1]}: "
            f"input {tuple(input.shape)}, weight {tuple(weight.shape)}"
        )
    chosen = constants if constants is not None else TILES[tile]
    m, alpha = chosen.output_tile, chosen.input_tile
    batch, channels, height, width = input.shape
    filters = weight.shape[0]
    pad_h, pad_w = _padding(padding)
    out_h, out_w = height + 2 * pad_h - 2, width + 2 * pad_w - 2
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"input {height}x{width} with padding {(pad_h, pad_w)} is smaller than the 3x3 filter"
        )
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    # Zero-pad to whole tiles on the bottom and right; those outputs are cropped below.
    padded = F.pad(
        input,
        (pad_w, tiles_w * m + 2 - width - pad_w, pad_h, tiles_h * m + 2 - height - pad_h),
    )
    # (N, C, tiles_h, tiles_w, alpha, alpha): overlapping tiles as a view, no copy.
    tiles = padded.unfold(2, alpha, m).unfold(3, alpha, m)

    compute = transform_dtype if transform_dtype is not None else input.dtype
    BT, G, AT = _matrices(chosen, compute, input.device)

    def transform(left: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """left @ x @ left^T over the last two dimensions, as two right-multiplications of a
        contiguous tensor by a 2-D matrix: torch folds each into one large matrix product,
        where ``left @ x`` would be a batch of thousands of tiny ones.
        (x L^T)^T L^T = L x^T L^T = (L x L^T)^T."""
        right = left.T
        once = x.to(compute).contiguous() @ right
        return (once.mT.contiguous() @ right).mT.to(input.dtype)

    filters_t = transform(G, weight)  # (K, C, alpha, alpha)
    tiles_t = transform(BT, tiles)  # (N, C, tiles_h, tiles_w, alpha, alpha)
    # The elementwise product summed over channels: alpha^2 independent matrix products.
    positions = alpha * alpha
    left = filters_t.permute(2, 3, 0, 1).reshape(positions, filters, channels)
    right = tiles_t.permute(4, 5, 1, 0, 2, 3).reshape(positions, channels, -1)
    products = torch.bmm(left, right).reshape(alpha, alpha, filters, batch, tiles_h, tiles_w)
    products = products.permute(3, 2, 4, 5, 0, 1)  # (N, K, tiles_h, tiles_w, alpha, alpha)
    outputs = transform(AT, products)  # (N, K, tiles_h, tiles_w, m, m)
    output = outputs.permute(0, 1, 2, 4, 3, 5).reshape(batch, filters, tiles_h * m, tiles_w * m)
    output = output[:, :, :out_h, :out_w]
    if bias is not None:
        output = output + bias.reshape(1, -1, 1, 1)
    return output


def _dispatching_kernel(**options: Any) -> Callable[[Conv2d], Conv2d]:
    """A ``conv2d`` that sends what Winograd applies to :func:`winograd_conv2d` with
    ``options``, and everything else to the original kernel."""

    def make(original: Conv2d) -> Conv2d:
        def conv2d(  # noqa: PLR0917  (F.conv2d's own signature)
            input: torch.Tensor,
            weight: torch.Tensor,
            bias: torch.Tensor | None = None,
            stride: IntPair = 1,
            padding: IntPair | str = 0,
            dilation: IntPair = 1,
            groups: int = 1,
        ) -> torch.Tensor:
            if winograd_applies(input, weight, stride, padding, dilation, groups):
                return winograd_conv2d(input, weight, bias, stride, padding, **options)
            return original(input, weight, bias, stride, padding, dilation, groups)

        return conv2d

    return make


def winograd_candidate(tile: Tile = "F2x2_3x3") -> Candidate:
    """Correct Winograd convolution for every 3x3, stride-1 convolution of the model.

    What a framework's Winograd path does (cuDNN's WINOGRAD algorithms, oneDNN's
    ``convolution_winograd``): the same convolution by another algorithm, with a somewhat larger
    rounding error that grows with the tile. A convergence check must pass it.
    """
    if tile not in TILES:
        raise ValueError(f"tile must be one of {sorted(TILES)}, got {tile!r}")
    return Candidate(
        name=f"winograd-{tile}",
        context=lambda: _conv2d_patched(_dispatching_kernel(tile=tile)),
        description=f"3x3 stride-1 convolutions by Winograd {TILES[tile].name}",
    )


def winograd_wrong_constant(
    tile: Tile = "F2x2_3x3",
    matrix: Literal["BT", "G", "AT"] = "G",
    row: int = 1,
    column: int = 0,
    value: float = 0.45,
) -> Candidate:
    """BUG: Winograd with one mistyped transform constant (by default G[1][0] = 0.45, not 0.5).

    Hand-written Winograd kernels hard-code their transform tables (often generated once and
    pasted, sometimes rounded by hand); one wrong entry still gives a plausible, smoothly
    trainable convolution, just not the right one, so unit tests with loose tolerances and a
    loss curve both miss it.
    """
    constants = TILES[tile].with_entry(matrix, row, column, value)
    return Candidate(
        name="winograd-wrong-constant",
        context=lambda: _conv2d_patched(_dispatching_kernel(constants=constants)),
        description=f"BUG: Winograd {constants.name}",
    )


def winograd_fp16_transforms(tile: Tile = "F4x4_3x3") -> Candidate:
    """GRAY ZONE: Winograd whose input, filter and output transforms run in float16.

    Models a kernel that stores transformed tiles in half precision to halve its memory traffic
    while accumulating the products in float32. The transforms' large constants (F(4x4) has 4s,
    5s and 8s) amplify fp16's rounding; whether the result is precise enough for training is
    what a convergence region's tolerance decides (``docs/winograd.md`` says what was measured).
    """
    if tile not in TILES:
        raise ValueError(f"tile must be one of {sorted(TILES)}, got {tile!r}")
    return Candidate(
        name=f"winograd-{tile}-fp16-transforms",
        context=lambda: _conv2d_patched(
            _dispatching_kernel(tile=tile, transform_dtype=torch.float16)
        ),
        description=f"Winograd {TILES[tile].name} with float16 transforms",
    )
