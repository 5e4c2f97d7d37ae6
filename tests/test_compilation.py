"""torch.compile candidates: Dynamo's recompile limit is an error, never a silent eager run."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn

from pytest_convergence.candidates import Candidate
from pytest_convergence.compilation import reset_compiled_code
from pytest_convergence.cosim import cosimulate
from pytest_convergence.errors import CompileFallbackError
from pytest_convergence.workloads import Workload


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(seed: int, count: int, dtype: torch.dtype, device: torch.device) -> list[Any]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
        for _ in range(count)
    ]


WORKLOAD = Workload(name="tiny-compiled", model_factory=tiny, batches=batches, steps=2)


def compiled_with_a_new_backend_each_time() -> Candidate:
    """Each build compiles through a backend object of its own: Dynamo recompiles every time."""

    def transform(model: nn.Module) -> Any:
        return torch.compile(model, backend=lambda graph, inputs: graph.forward)

    return Candidate("new-backend", model_transform=transform)


@pytest.fixture
def recompile_limit_1() -> Iterator[None]:
    reset_compiled_code()
    with torch._dynamo.config.patch(recompile_limit=1):
        yield
    reset_compiled_code()


@pytest.mark.usefixtures("recompile_limit_1")
def test_a_candidate_past_the_recompile_limit_is_an_error_naming_step_and_candidate() -> None:
    cosimulate(WORKLOAD, compiled_with_a_new_backend_each_time())
    with pytest.raises(CompileFallbackError, match=r"^step 1, candidate 'new-backend': torch"):
        cosimulate(WORKLOAD, compiled_with_a_new_backend_each_time())


@pytest.mark.usefixtures("recompile_limit_1")
def test_the_error_says_which_limit_and_how_to_stay_under_it() -> None:
    cosimulate(WORKLOAD, compiled_with_a_new_backend_each_time())
    with pytest.raises(CompileFallbackError) as caught:
        cosimulate(WORKLOAD, compiled_with_a_new_backend_each_time())
    message = str(caught.value)
    assert "torch._dynamo.config.recompile_limit = 1" in message
    assert "would run it eagerly" in message
    assert "torch._dynamo.reset()" in message


@pytest.mark.usefixtures("recompile_limit_1")
def test_emptied_caches_let_the_next_run_compile_again() -> None:
    cosimulate(WORKLOAD, compiled_with_a_new_backend_each_time())
    reset_compiled_code()
    run = cosimulate(WORKLOAD, compiled_with_a_new_backend_each_time())
    assert len(run.comparisons) == 2


def test_checks_of_compiled_candidates_one_after_another_each_compile(tmp_path: Path) -> None:
    """Each check empties the caches before its warm-up, so earlier checks' compilations do not
    count toward the limit: with a limit of 2, the warm-up and the check compile once each."""
    from pytest_convergence.checks import ConvergenceChecker
    from pytest_convergence.config import ConvergenceConfig

    checker = ConvergenceChecker(ConvergenceConfig(tmp_path, record=True))
    reset_compiled_code()
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            result = checker.check(compiled_with_a_new_backend_each_time(), WORKLOAD)
            assert result.verdict == "passed"
            assert result.compile_seconds is not None
    reset_compiled_code()


def test_the_guard_does_not_import_dynamo_where_nothing_was_compiled() -> None:
    """Importing Dynamo costs a second; a run that compiles nothing must not pay it."""
    code = (
        "import sys, torch\n"
        "from pytest_convergence.compilation import compiled_code_required\n"
        "with compiled_code_required('step 1, the reference'):\n"
        "    torch.ones(2).sum()\n"
        "assert 'torch._dynamo' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
