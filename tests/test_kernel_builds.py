"""The compiled kernel without its vector loops gives the same answers as with them.

Compilers other than GCC and Clang, and other architectures, build the kernel's scalar loops
only (``LOGM_SCALAR_ONLY`` forces it here). Those loops also take every block the vector loops
give up on, so they are tested there too, but a build that never vectorizes runs code of its
own: the stubs that route every block, and its widening copy, through them.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from pytest_convergence import _logm_kernel as vectorized

SOURCE = Path(__file__).parents[1] / "pytest_convergence" / "_logm_kernel.c"


@pytest.fixture(scope="module")
def scalar_only(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    compiler = shutil.which(str(sysconfig.get_config_var("CC") or "cc").split()[0])
    if compiler is None or not SOURCE.exists():
        pytest.skip("no C compiler, or no kernel source beside the tests")
    target = (
        tmp_path_factory.mktemp("scalar") / f"_logm_kernel{sysconfig.get_config_var('EXT_SUFFIX')}"
    )
    command = [
        compiler,
        "-O2",
        "-shared",
        "-fPIC",
        "-DLOGM_SCALAR_ONLY",
        f"-I{sysconfig.get_paths()['include']}",
        str(SOURCE),
        "-o",
        str(target),
        "-lm",
    ]
    subprocess.run(command, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("_logm_kernel", target)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VECTORIZED == 0
    return module


def _weights(seed: int, size: int, dtype: type[np.floating[Any]]) -> np.ndarray:
    """Normal weights with zeros, and (in float32) a subnormal: every branch of both builds."""
    generator = np.random.default_rng(seed)
    weights = (generator.standard_normal(size) * 0.05).astype(dtype)
    weights[generator.random(size) < 0.2] = 0
    if size > 700 and dtype is np.float32:
        weights[700] = np.float32(1e-40)
    return weights


@pytest.mark.parametrize("size", [1, 15, 16, 300, 1024, 1040, 5000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log2_sums_agree(scalar_only: ModuleType, size: int, dtype: type[np.floating[Any]]) -> None:
    weights = _weights(size, size, dtype)
    exponent, mantissa, *counts = vectorized.log2_sum(weights, weights.itemsize)
    other_exponent, other_mantissa, *other_counts = scalar_only.log2_sum(weights, weights.itemsize)
    assert counts == other_counts
    assert exponent + mantissa == pytest.approx(other_exponent + other_mantissa, rel=1e-14)


def test_step_traces_agree(scalar_only: ModuleType) -> None:
    sizes = [(1040, np.float32), (16, np.float32), (5, np.float32), (300, np.float64)]
    weights = [_weights(seed, size, dtype) for seed, (size, dtype) in enumerate(sizes)]
    gradients = [_weights(seed + 10, size, dtype) for seed, (size, dtype) in enumerate(sizes)]
    assert vectorized.sums_of_squares(gradients) == pytest.approx(
        scalar_only.sums_of_squares(gradients), rel=1e-13
    )
    total = sum(size for size, _ in sizes)
    previous = np.random.default_rng(0).standard_normal(total)
    results = []
    for kernel in (vectorized, scalar_only):
        out = np.empty(total)
        results.append((kernel.trace_parameters(weights, previous, out), out))
    (sums, out), (other_sums, other_out) = results
    assert np.array_equal(out, other_out)
    assert np.array_equal(out, np.concatenate(weights).astype(np.float64))
    assert sums[1] == other_sums[1]  # zero counts
    for column, other in zip(sums, other_sums, strict=True):
        assert column == pytest.approx(other, rel=1e-13)
