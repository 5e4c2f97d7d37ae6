"""OpenMP's wait policy: idle threads sleep between parallel regions unless the user chose.

By default OpenMP threads spin for a while after each parallel region, waiting for the next.
On a busy or shared machine (a CI runner, pytest-xdist workers on as many cores) the spinning
threads take the cores the working ones need: a serial suite on a shared runner ran 360 s
against 61 s with one thread (issue 18). ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep, and
leaves every result unchanged. OpenMP reads the variable once, when torch loads it, so it
must be set before torch is first imported: the plugin does it when pytest imports it.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

__all__ = ["WAIT_POLICY_VARIABLE", "WaitPolicy", "prefer_passive"]

WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"


@dataclass(frozen=True)
class WaitPolicy:
    """What this process's OpenMP waits with, and why: ``"user"`` (the environment had it),
    ``"set"`` (set here before torch loaded OpenMP), ``"late"`` (set here, but torch had
    already loaded OpenMP: only processes started from now on, xdist workers and DDP ranks
    among them, sleep)."""

    value: str
    source: str

    def describe(self) -> str:
        if self.source == "user":
            return f"OpenMP wait policy {self.value} ({WAIT_POLICY_VARIABLE}, yours)"
        if self.source == "set":
            return f"OpenMP wait policy {self.value} (set by pytest-convergence)"
        return (
            "OpenMP wait policy: torch was imported before pytest-convergence, so this process "
            "keeps OpenMP's default (idle threads spin) and only processes it starts sleep; "
            f"set {WAIT_POLICY_VARIABLE}={PASSIVE} in the environment"
        )


def prefer_passive(environ: MutableMapping[str, str], *, torch_imported: bool) -> WaitPolicy:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` unless it holds a policy already."""
    chosen = environ.get(WAIT_POLICY_VARIABLE)
    if chosen:
        return WaitPolicy(chosen, "user")
    environ[WAIT_POLICY_VARIABLE] = PASSIVE
    return WaitPolicy(PASSIVE, "late" if torch_imported else "set")
