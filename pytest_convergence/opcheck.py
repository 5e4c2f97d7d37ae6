"""Kernel checks whose tolerance comes from the reference implementation's own error.

A hand-written kernel (a Winograd convolution, a fused optimizer step, a custom attention) is
usually unit-tested with ``torch.testing.assert_close`` and a hand-tuned ``atol``: too tight and
a correct but differently rounded kernel fails on the next input size, too loose and a wrong
constant passes. :func:`assert_op_matches` derives the limit instead. It runs the reference op in
float64 (the "true" result) and in the inputs' own dtype, and measures how far the reference
itself lands from the truth: that error is what the dtype costs *that* computation, at *that*
size and scale. A candidate may be ``rtol_factor`` times as far off, where the reference's error
counts as at least one unit roundoff of the result's scale: a reference that happens to round
exactly on a tiny input must not demand exactness of the candidate. Forward outputs and the
gradients of every floating input (for a seeded random upstream gradient) are checked alike, so
a kernel with a wrong backward is caught too.

A convergence check (:mod:`pytest_convergence.checks`) then asks the next question: whether a
kernel that passes here still trains like the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pytest_convergence.errors import OpMismatchError

__all__ = [
    "DEFAULT_RTOL_FACTOR",
    "Comparison",
    "OpMismatchError",
    "assert_op_matches",
]

# How many times the reference's own error (floored at eps x scale) a candidate may make.
# Measured on 3x3 convolutions of about 2,000 hypothesis configurations (docs/winograd.md), as
# the worst quantity of each configuration: another summation order (unfold + matmul) and
# Winograd F(2x2,3x3) stay within 10x, F(4x4,3x3), whose transform constants amplify rounding,
# within 45x; float16 transforms are off by 2,600x or more, a mistyped constant by 3e4x or more.
# 256 leaves a factor of 5 on the correct side and 10 on the buggy side.
DEFAULT_RTOL_FACTOR = 256.0

_MORE_FAILURES_SHOWN = 5


@dataclass(frozen=True)
class Comparison:
    """One output or gradient: both implementations' errors against float64 and the limit.

    ``reference_error`` and ``candidate_error`` are the greatest absolute differences from the
    float64 result, ``scale`` its largest magnitude, ``limit`` what the candidate was allowed.
    """

    quantity: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    candidate_error: float
    reference_error: float
    scale: float
    limit: float
    rtol_factor: float
    mismatched: int
    worst_index: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return self.candidate_error <= self.limit

    @property
    def ratio(self) -> float:
        """Candidate error over the reference's own error (inf when the reference is exact)."""
        if self.reference_error == 0:
            return 0.0 if self.candidate_error == 0 else math.inf
        return self.candidate_error / self.reference_error

    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        """The failure text, in the style of ``torch.testing``: each figure beside its limit."""
        eps = torch.finfo(self.dtype).eps
        over = self.candidate_error / self.limit if self.limit > 0 else math.inf
        total = self.numel()
        share = 100.0 * self.mismatched / total if total else 0.0
        index = ", ".join(map(str, self.worst_index))
        lines = [
            f"Mismatched elements: {self.mismatched} / {total} ({share:.1f}%)",
            f"Greatest absolute difference: {self.candidate_error:.3g} at index ({index}) "
            f"(up to {self.limit:.3g} allowed, {over:.3g}x over)",
        ]
        if self.scale > 0:
            lines.append(
                f"Greatest difference relative to the largest expected magnitude "
                f"{self.scale:.3g}: {self.candidate_error / self.scale:.3g} "
                f"(up to {self.limit / self.scale:.3g} allowed)"
            )
        lines += [
            f"Limit = rtol_factor x max(reference error, eps x scale) = "
            f"{self.rtol_factor:g} x max({self.reference_error:.3g}, {eps:.3g} x "
            f"{self.scale:.3g}) = {self.limit:.3g}, where",
            f"  reference error {self.reference_error:.3g}: the reference op in "
            f"{_dtype_name(self.dtype)} against the reference op in float64",
            f"  candidate error {self.candidate_error:.3g}: the candidate op in "
            f"{_dtype_name(self.dtype)} against the same float64 result "
            f"({_ratio_text(self.ratio)} the reference's)",
        ]
        return "\n".join(lines)


def assert_op_matches(
    candidate_op: Callable[..., Any],
    reference_op: Callable[..., Any],
    inputs: Sequence[torch.Tensor | None],
    *,
    kwargs: Mapping[str, Any] | None = None,
    rtol_factor: float = DEFAULT_RTOL_FACTOR,
    backward: bool = True,
    seed: int = 0,
    input_names: Sequence[str] | None = None,
) -> tuple[Comparison, ...]:
    """Assert that ``candidate_op(*inputs, **kwargs)`` computes ``reference_op``'s function.

    Both ops run on copies of ``inputs`` (``None`` entries, say an absent bias, pass through;
    non-floating tensors are shared). Every output, and with ``backward`` the gradient of every
    floating input for an upstream gradient drawn from ``seed``, is compared with the reference
    op run in float64. A quantity fails when the candidate's greatest absolute difference from
    float64 exceeds ``rtol_factor * max(e_ref, eps * scale)``: ``e_ref`` is the reference op's
    own greatest difference in the inputs' dtype, ``scale`` the float64 result's largest
    magnitude. Raises :class:`OpMismatchError` naming the output or gradient; returns the
    figures of every quantity otherwise. Misuse (no floating input, float64 inputs, mixed
    floating dtypes) raises ``TypeError`` or ``ValueError``.
    """
    __tracebackhide__ = True
    if not rtol_factor > 0:
        raise ValueError(f"rtol_factor must be positive, got {rtol_factor!r}")
    values = _checked_inputs(inputs)
    dtype = _floating_dtype(values)
    names = _input_names(values, input_names)
    options = dict(kwargs or {})
    exact_inputs = _copies(values, torch.float64, backward)
    reference_inputs = _copies(values, None, backward)
    candidate_inputs = _copies(values, None, backward)
    exact = _outputs(reference_op, exact_inputs, options, "reference op")
    reference = _outputs(reference_op, reference_inputs, options, "reference op")
    candidate = _outputs(candidate_op, candidate_inputs, options, "candidate op")
    _check_structure(candidate, reference)
    labels = ["output"] if len(exact) == 1 else [f"output {i}" for i in range(len(exact))]
    quantities: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = list(
        zip(labels, exact, reference, candidate, strict=True)
    )
    if backward:
        runs = (exact, reference, candidate)
        quantities += _gradients(
            runs, (exact_inputs, reference_inputs, candidate_inputs), names=names, seed=seed
        )
    comparisons = tuple(
        _compare(label, e, r, c, dtype=dtype, rtol_factor=rtol_factor)
        for label, e, r, c in quantities
    )
    failures = [c for c in comparisons if not c.passed]
    if failures:
        raise OpMismatchError(_failure_message(failures, len(comparisons)), comparisons)
    return comparisons


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


def _checked_inputs(inputs: object) -> list[torch.Tensor | None]:
    # Typed as object: callers without a type checker pass a bare tensor or a float.
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Sequence):
        raise TypeError(
            "inputs must be a sequence of tensors (use (x,) for a single tensor), got "
            f"{type(inputs).__name__}"
        )
    checked: list[torch.Tensor | None] = []
    for index, value in enumerate(inputs):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"inputs[{index}] is a {type(value).__name__}; pass tensors (or None) as inputs "
                "and other arguments through kwargs="
            )
        checked.append(value)
    return checked


def _floating_dtype(inputs: Sequence[torch.Tensor | None]) -> torch.dtype:
    dtypes = {v.dtype for v in inputs if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not dtypes:
        raise ValueError("assert_op_matches needs at least one floating-point input tensor")
    if len(dtypes) > 1:
        listed = ", ".join(sorted(_dtype_name(d) for d in dtypes))
        raise ValueError(f"floating inputs must share one dtype, got {listed}")
    (dtype,) = dtypes
    if dtype == torch.float64:
        raise ValueError(
            "float64 inputs leave no wider dtype to measure the reference op's own error "
            "against; check the kernel in float32, float16 or bfloat16"
        )
    return dtype


def _input_names(
    inputs: Sequence[torch.Tensor | None], input_names: Sequence[str] | None
) -> list[str]:
    if input_names is None:
        return [f"input {i}" for i in range(len(inputs))]
    if isinstance(input_names, str) or len(input_names) != len(inputs):
        raise ValueError(
            f"input_names must name each of the {len(inputs)} inputs, got {input_names!r}"
        )
    return [f"{name!r} (input {i})" for i, name in enumerate(input_names)]


def _copies(
    inputs: Sequence[torch.Tensor | None], dtype: torch.dtype | None, differentiable: bool
) -> list[torch.Tensor | None]:
    """Fresh leaves, so no op sees another's autograd graph or in-place changes."""
    copies: list[torch.Tensor | None] = []
    for value in inputs:
        if value is None or not value.is_floating_point():
            copies.append(value)
            continue
        copy = value.detach().to(dtype or value.dtype, copy=True)
        copies.append(copy.requires_grad_(differentiable))
    return copies


def _outputs(
    op: Callable[..., Any],
    inputs: Sequence[torch.Tensor | None],
    kwargs: Mapping[str, Any],
    role: str,
) -> list[torch.Tensor]:
    result = op(*inputs, **kwargs)
    if isinstance(result, torch.Tensor):
        return [result]
    if (
        isinstance(result, (tuple, list))
        and result
        and all(isinstance(r, torch.Tensor) for r in result)
    ):
        return list(result)
    raise TypeError(
        f"the {role} must return a tensor or a tuple of tensors, got {type(result).__name__}"
    )


def _check_structure(candidate: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> None:
    __tracebackhide__ = True
    if len(candidate) != len(reference):
        raise OpMismatchError(
            f"the candidate op returned {len(candidate)} outputs, the reference op {len(reference)}"
        )
    for index, (actual, expected) in enumerate(zip(candidate, reference, strict=True)):
        label = "output" if len(reference) == 1 else f"output {index}"
        if actual.shape != expected.shape:
            raise OpMismatchError(
                f"The values for attribute 'shape' do not match: {label} has shape "
                f"{tuple(actual.shape)} from the candidate op, {tuple(expected.shape)} from the "
                "reference op."
            )
        if actual.dtype != expected.dtype:
            raise OpMismatchError(
                f"The values for attribute 'dtype' do not match: {label} is "
                f"{_dtype_name(actual.dtype)} from the candidate op, "
                f"{_dtype_name(expected.dtype)} from the reference op."
            )


def _gradients(
    runs: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor]],
    inputs: tuple[
        Sequence[torch.Tensor | None],
        Sequence[torch.Tensor | None],
        Sequence[torch.Tensor | None],
    ],
    *,
    names: Sequence[str],
    seed: int,
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Gradients of the floating inputs for one seeded upstream gradient, shared by the float64
    reference, the reference and the candidate runs (drawn in the inputs' dtype, so float64
    sees exactly the same values)."""
    __tracebackhide__ = True
    exact, reference, _ = runs
    differentiable = [i for i, e in enumerate(exact) if e.requires_grad]
    wrt = [i for i, v in enumerate(inputs[0]) if v is not None and v.requires_grad]
    if not differentiable or not wrt:
        return []
    generator = torch.Generator().manual_seed(seed)
    upstream = [
        torch.randn(reference[i].shape, generator=generator, dtype=torch.float64).to(
            reference[i].dtype
        )
        for i in differentiable
    ]
    per_run: list[list[torch.Tensor]] = []
    for role, outputs, run_inputs in zip(
        ("reference op", "reference op", "candidate op"), runs, inputs, strict=True
    ):
        chosen = [outputs[i] for i in differentiable]
        if not all(o.requires_grad for o in chosen):
            raise OpMismatchError(
                f"the {role}'s outputs do not require grad where the reference op's do: its "
                "result is detached from its inputs, so no gradient flows through it"
            )
        leaves = [run_inputs[i] for i in wrt]
        grads = torch.autograd.grad(
            chosen,
            [leaf for leaf in leaves if leaf is not None],
            [g.to(chosen[k].dtype) for k, g in enumerate(upstream)],
            allow_unused=True,
        )
        per_run.append(
            [
                torch.zeros_like(leaf) if grad is None else grad
                for grad, leaf in zip(grads, leaves, strict=True)
                if leaf is not None
            ]
        )
    return [(f"gradient of {names[i]}", e, r, c) for i, e, r, c in zip(wrt, *per_run, strict=True)]


# --------------------------------------------------------------------------------------------
# Comparison and message
# --------------------------------------------------------------------------------------------


def _compare(
    label: str,
    exact: torch.Tensor,
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    dtype: torch.dtype,
    rtol_factor: float,
) -> Comparison:
    __tracebackhide__ = True
    if candidate.shape != exact.shape:
        raise OpMismatchError(
            f"The values for attribute 'shape' do not match: {label} has shape "
            f"{tuple(candidate.shape)} from the candidate op, {tuple(exact.shape)} from the "
            "reference op."
        )
    truth = exact.detach().to(torch.float64)
    reference_difference = _difference(reference.detach().to(torch.float64), truth)
    candidate_difference = _difference(candidate.detach().to(torch.float64), truth)
    finite = truth[torch.isfinite(truth)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    reference_error = float(reference_difference.max()) if truth.numel() else 0.0
    candidate_error = float(candidate_difference.max()) if truth.numel() else 0.0
    eps = torch.finfo(dtype).eps
    limit = rtol_factor * max(reference_error, eps * scale)
    worst: tuple[int, ...] = ()
    if truth.numel():
        flat_index = int(candidate_difference.reshape(-1).argmax())
        worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), truth.shape))
    return Comparison(
        quantity=label,
        shape=tuple(truth.shape),
        dtype=dtype,
        candidate_error=candidate_error,
        reference_error=reference_error,
        scale=scale,
        limit=limit,
        rtol_factor=rtol_factor,
        mismatched=int((candidate_difference > limit).sum()),
        worst_index=worst,
    )


def _difference(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected|, with NaN or a wrong infinity counted as an infinite difference and
    matching non-finite values (inf where inf is expected) as none."""
    difference = (actual - expected).abs()
    same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
    difference = torch.where(same, torch.zeros_like(difference), difference)
    return torch.nan_to_num(difference, nan=math.inf, posinf=math.inf)


def _failure_message(failures: Sequence[Comparison], compared: int) -> str:
    first = failures[0]
    what = f"{first.quantity} ({_dtype_name(first.dtype)}, shape {first.shape})"
    lines = [f"candidate op does not match the reference op: {what}", "", first.describe()]
    if len(failures) > 1:
        lines += ["", f"{len(failures)} of {compared} quantities beyond their limits; the others:"]
        for other in failures[1 : 1 + _MORE_FAILURES_SHOWN]:
            lines.append(
                f"  {other.quantity}: greatest absolute difference {other.candidate_error:.3g} "
                f"(up to {other.limit:.3g} allowed; reference error {other.reference_error:.3g})"
            )
        hidden = len(failures) - 1 - _MORE_FAILURES_SHOWN
        if hidden > 0:
            lines.append(f"  ... {hidden} more")
    return "\n".join(lines)


def _ratio_text(ratio: float) -> str:
    return "infinitely many times" if math.isinf(ratio) else f"{ratio:.3g} times"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
