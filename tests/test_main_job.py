"""scripts/expected_outcomes.py: CI's main job refuses outcomes pytest itself accepts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "expected_outcomes.py"
CUDA_SKIP = "needs CUDA (device=&apos;cuda&apos;); torch.cuda.is_available() is False"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("expected_outcomes", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def junit(tmp_path: Path, *cases: str) -> str:
    path = tmp_path / "report.xml"
    body = "".join(
        f'<testcase classname="examples.test_x" name="test_{i}">{case}</testcase>'
        for i, case in enumerate(cases)
    )
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return str(path)


def test_passes_xfails_and_cuda_skips_are_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = junit(
        tmp_path,
        "",
        '<skipped type="pytest.xfail" message="caught bug" />',
        f'<skipped type="pytest.skip" message="{CUDA_SKIP}" />',
    )
    assert load_script().main(report) == 0
    assert "3 tests, every outcome expected" in capsys.readouterr().out


def test_a_skip_for_another_reason_fails_the_main_job_naming_the_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = junit(tmp_path, "", '<skipped type="pytest.skip" message="no baseline" />')
    assert load_script().main(report) == 1
    assert "examples.test_x::test_1: skipped, no baseline" in capsys.readouterr().err


def test_a_run_that_ran_nothing_fails_the_main_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_script().main(junit(tmp_path)) == 1
    assert "no test ran" in capsys.readouterr().err


def test_the_script_is_run_by_ci() -> None:
    root = SCRIPT.parent.parent
    assert "./scripts/main-job" in (root / ".ci" / "run").read_text()
    assert "expected_outcomes.py" in (root / "scripts" / "main-job").read_text()
