"""``torch.compile`` inside a co-simulation: compiled code or an error, never a silent eager run.

Dynamo compiles a frame (a model's ``forward``) again whenever a guard of its cached code fails,
and after ``torch._dynamo.config.recompile_limit`` (8) compilations of one frame it runs that
frame eagerly from then on, with nothing but a logged warning. In a test session this is met
quickly: a backend object created for every ``torch.compile`` call fails the backend guard
every time, and every check builds its candidate at least twice (the compile-ahead warm-up,
the check). A compiled candidate then trains as the eager model does and its check passes
without testing the compiled code. Measured on ``transformer-lm``: a wrong GELU lowering ran
eagerly, identical to the reference, on 3 of 5 seeds of one benchmark process.

So each check of a compiled candidate starts from empty caches (:func:`reset_compiled_code`,
as PyTorch's own tests reset Dynamo between tests), and every step runs under
:func:`compiled_code_required`, where the limit raises :class:`CompileFallbackError`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from pytest_convergence.errors import CompileFallbackError

__all__ = ["StepPosition", "compiled_code_required", "reset_compiled_code"]


def reset_compiled_code() -> None:
    """Drop every frame Dynamo compiled in this process (nothing to do when nothing did)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


@dataclass
class StepPosition:
    """Where a run is, for the error: updated every step, formatted only if it is raised."""

    step: int = 0
    side: str = ""

    def at(self, step: int, side: str) -> None:
        self.step, self.side = step, side

    def __str__(self) -> str:
        return f"step {self.step}, {self.side}"


@contextlib.contextmanager
def compiled_code_required(where: StepPosition | str) -> Iterator[None]:
    """Run training steps where reaching Dynamo's recompile limit raises, naming ``where``
    (the step and side), instead of falling back to eager code. Entered once per run: the
    configuration patch costs more than a small model's step."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:  # nothing was compiled: torch.compile (and torch.optim) import Dynamo
        yield
        return
    with dynamo.config.patch(fail_on_recompile_limit_hit=True):
        try:
            yield
        except dynamo.exc.FailOnRecompileLimitHit as error:
            limit = dynamo.config.recompile_limit
            raise CompileFallbackError(
                f"{where}: torch.compile reached its recompile limit on a frame of the model "
                f"(torch._dynamo.config.recompile_limit = {limit}) and would run it eagerly "
                "from here, so the check would not test the compiled code. Dynamo's warnings "
                "above name the frame and the guard that failed; most often a new backend "
                "object is created for every torch.compile call (create it once and reuse "
                "it). Checks reset torch.compile's caches before each compiled candidate; a "
                "direct caller of cosimulate can call torch._dynamo.reset() between runs"
            ) from error
