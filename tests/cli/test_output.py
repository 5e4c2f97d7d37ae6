"""What the commands print: the progress bar, on a terminal only."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from pytest_convergence.cli import EXIT_OK, ProgressBar, main
from tests.cli.helpers import STEPS


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_is_silent_when_stderr_is_not_a_terminal() -> None:
    stream = io.StringIO()

    with ProgressBar(3, "region", stream=stream) as progress:
        for name in ("a", "b", "c"):
            progress.show(name)
            progress.advance()

    assert stream.getvalue() == ""


def test_the_progress_bar_draws_on_a_terminal_and_erases_itself(
    healthy_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    code = main(["region", str(healthy_run)])

    drawn = terminal.getvalue()
    assert code == EXIT_OK
    assert "region [" in drawn
    assert f"0/{STEPS} step0.safetensors" in drawn
    assert f"{STEPS - 1}/{STEPS} step{STEPS - 1}.safetensors" in drawn
    assert drawn.endswith("\r")
    assert "\r" not in capsys.readouterr().out
