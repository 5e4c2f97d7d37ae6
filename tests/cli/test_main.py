"""The parser and the installed entry points: usage errors, the console script, python -m."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_convergence as pc
from pytest_convergence.cli import EXIT_ERROR, EXIT_OK, EXIT_OUTSIDE
from tests.cli.helpers import PAPER_FILES, STEPS, run_cli, snapshot_at


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["check", "a.pt", "b.pt"],  # --baseline is required
        ["region", "x", "--margin", "-1"],
        ["region", "x", "--epoch-every", "2", "--iterations-per-epoch", "3"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, _, err = run_cli(capsys, *args)

    assert code == EXIT_ERROR
    assert "usage: pytest-convergence" in err


def console_script() -> str:
    beside = Path(sys.executable).with_name("pytest-convergence")
    found = str(beside) if beside.exists() else shutil.which("pytest-convergence")
    if found is None:
        pytest.fail("the pytest-convergence script is not installed; run pip install -e .")
    return found


def test_the_console_script_and_python_m_run_the_same_command(
    healthy_run: Path, tmp_path: Path
) -> None:
    last = snapshot_at(healthy_run, STEPS - 1)
    tampered = {name: 1.5 * tensor for name, tensor in pc.load_snapshot(last).items()}
    bad = pc.save_snapshot(tampered, tmp_path / "tampered.safetensors", step=STEPS)

    # Started together: each spends most of its time importing torch.
    script = subprocess.Popen(
        [console_script(), "logm", str(last), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    module = subprocess.Popen(
        [sys.executable, "-m", "pytest_convergence", "check", str(last), str(bad),
         "--baseline", str(PAPER_FILES["resnet50"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    script_out, script_err = script.communicate(timeout=120)
    module_out, module_err = module.communicate(timeout=120)

    assert script.returncode == EXIT_OK, script_err
    assert json.loads(script_out)["snapshots"][0]["step"] == STEPS - 1
    assert script_err == ""
    assert module.returncode == EXIT_OUTSIDE, module_err
    assert "Verdict: OUTSIDE the region" in module_out


def test_help_answers_without_importing_torch() -> None:
    code = (
        "import sys; from pytest_convergence.cli import main; "
        "codes = [main(['--help']), *(main([name, '--help']) for name in "
        "('logm', 'region', 'check', 'diff', 'report'))]; "
        "sys.exit(0 if codes == [0] * 6 and 'torch' not in sys.modules else 1)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)

    assert done.returncode == 0, done.stderr
    assert "usage: pytest-convergence [-h] [--version] COMMAND" in done.stdout
