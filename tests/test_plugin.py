from __future__ import annotations

import os
import subprocess
import sys

import pytest

CONVERGENCE_TEST = """
import pytest

@pytest.mark.convergence(workload="mlp", steps=4)
def test_converges():
    assert True

def test_plain():
    assert True
"""


def test_convergence_tests_are_skipped_with_a_reason_that_says_how_to_enable_them(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(CONVERGENCE_TEST)
    result = pytester.runpytest("-rs", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*convergence test: run with --convergence*"])


def test_the_flag_runs_convergence_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CONVERGENCE_TEST)
    result = pytester.runpytest("--convergence", "--strict-markers")
    result.assert_outcomes(passed=2)


def test_an_ini_option_enables_convergence_tests_by_default(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconvergence_enabled = true\n")
    pytester.makepyfile(CONVERGENCE_TEST)
    pytester.runpytest().assert_outcomes(passed=2)


def test_a_failing_convergence_test_fails_rather_than_passing_silently(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.convergence
        def test_diverges():
            assert False, "diverged"
        """
    )
    pytester.runpytest("--convergence").assert_outcomes(failed=1)


def test_the_marker_is_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.convergence(workload=..., *"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (
            'convergence(wokload="mlp")',
            "unknown argument(s) wokload (did you mean 'workload'?); known arguments: workload*",
        ),
        ('convergence("mlp")', "takes keyword arguments only*"),
        ("convergence(steps=0)", "steps must be a positive int"),
        ('convergence(device="gpu")', "*'gpu' is not a device*"),
    ],
)
def test_bad_marker_arguments_error_that_test_alone_naming_it(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(
        f"import pytest\n\n@pytest.mark.{marker}\ndef test_x():\n    pass\n\n"
        "def test_plain():\n    pass\n"
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_x*",
            f"test_bad_marker_arguments*::test_x: @pytest.mark.convergence*{message}",
        ]
    )


def test_the_header_gives_what_reproduces_a_run(pytester: pytest.Pytester) -> None:
    import torch

    pytester.makepyfile(CONVERGENCE_TEST)
    result = pytester.runpytest("--convergence", "--convergence-seed", "7")
    result.stdout.fnmatch_lines(
        [
            f"convergence: pytest-convergence *, torch {torch.__version__}, device cpu (cpu), "
            f"threads {torch.get_num_threads()}, seed 7, baselines *baselines"
        ]
    )


def test_the_header_says_how_to_enable_when_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CONVERGENCE_TEST)
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        ["convergence: pytest-convergence *, disabled (run with --convergence*"]
    )


def test_the_baselines_folder_comes_from_the_ini_relative_to_the_rootdir(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nconvergence_baselines = ci/regions\n")
    pytester.makepyfile(CONVERGENCE_TEST)
    result = pytester.runpytest("--convergence")
    result.stdout.fnmatch_lines([f"*baselines {pytester.path / 'ci' / 'regions'}"])


def test_recording_in_ci_is_refused_unless_explicitly_asked_for(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(CONVERGENCE_TEST)
    result = pytester.runpytest("--convergence", "--convergence-record")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--convergence-record in CI (CI is set)*pass --convergence-record-in-ci*"]
    )
    result = pytester.runpytest(
        "--convergence", "--convergence-record", "--convergence-record-in-ci"
    )
    result.assert_outcomes(passed=2)


def test_a_non_integer_seed_in_the_ini_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nconvergence_seed = abc\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*convergence_seed = 'abc' is not an integer*"])


def test_asking_for_cuda_without_it_is_a_usage_error(pytester: pytest.Pytester) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pytester.makepyfile(CONVERGENCE_TEST)
    result = pytester.runpytest("--convergence", "--convergence-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--convergence-device=cuda but torch.cuda.is_available() is False*"]
    )


def test_settings_live_in_the_config_stash(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pytest_convergence.plugin import config_key

        def test_reads_settings(request):
            settings = request.config.stash[config_key]
            assert (settings.enabled, settings.seed, settings.device) == (False, 3, "cpu")
        """
    )
    pytester.runpytest("--convergence-seed", "3").assert_outcomes(passed=1)


TRIAGE_SETTING = """
from pytest_convergence.plugin import config_key

def test_reads_triage(request):
    print("triage =", request.config.stash[config_key].triage)
"""


@pytest.mark.parametrize(
    ("ci", "ini", "arguments", "expected"),
    [
        (None, None, [], 2),
        ("true", None, [], 0),
        ("true", "3", [], 3),
        (None, "0", [], 0),
        ("true", "auto", ["--convergence-triage", "4"], 4),
        (None, "1", ["--convergence-triage", "0"], 0),
    ],
)
def test_triage_is_two_further_seeds_outside_ci_none_in_ci_and_the_option_wins(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    *,
    ci: str | None,
    ini: str | None,
    arguments: list[str],
    expected: int,
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    if ini is not None:
        pytester.makeini(f"[pytest]\nconvergence_triage = {ini}\n")
    pytester.makepyfile(TRIAGE_SETTING)
    result = pytester.runpytest("-s", *arguments)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*triage = {expected}"])


@pytest.mark.parametrize(
    ("ini", "arguments", "expected"),
    [
        (
            None,
            ["--convergence-triage", "-1"],
            "*--convergence-triage -1: use 0 (off) or a positive*",
        ),
        ("many", [], "*convergence_triage = 'many': use auto, 0 (off) or a positive int*"),
        ("-2", [], "*convergence_triage = '-2': use auto, 0 (off) or a positive int*"),
    ],
)
def test_a_bad_triage_count_is_a_usage_error(
    pytester: pytest.Pytester, ini: str | None, arguments: list[str], expected: str
) -> None:
    if ini is not None:
        pytester.makeini(f"[pytest]\nconvergence_triage = {ini}\n")
    result = pytester.runpytest(*arguments)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = "import sys, pytest_convergence.plugin; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _wait_policy_after_import(environ: dict[str, str], code: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


def _environ_without_wait_policy() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != "OMP_WAIT_POLICY"}


PRINT_POLICY = (
    "import os, pytest_convergence.plugin as plugin; "
    "print(os.environ.get('OMP_WAIT_POLICY'), '|', plugin.WAIT_POLICY.describe())"
)


def test_importing_the_plugin_makes_idle_openmp_threads_sleep() -> None:
    shown = _wait_policy_after_import(_environ_without_wait_policy(), PRINT_POLICY)
    assert shown == "PASSIVE | OpenMP wait policy PASSIVE (set by pytest-convergence)"


def test_the_users_own_wait_policy_is_kept() -> None:
    environ = {**_environ_without_wait_policy(), "OMP_WAIT_POLICY": "active"}
    shown = _wait_policy_after_import(environ, PRINT_POLICY)
    assert shown == "active | OpenMP wait policy active (OMP_WAIT_POLICY, yours)"


def test_the_wait_policy_says_when_torch_was_imported_first() -> None:
    shown = _wait_policy_after_import(
        _environ_without_wait_policy(), "import torch; " + PRINT_POLICY
    )
    assert shown == (
        "PASSIVE | OpenMP wait policy: torch was imported before pytest-convergence, so this "
        "process keeps OpenMP's default (idle threads spin) and only processes it starts sleep; "
        "set OMP_WAIT_POLICY=PASSIVE in the environment"
    )


def test_the_header_gives_the_wait_policy(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(CONVERGENCE_TEST)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    result = pytester.runpytest_subprocess("--convergence")
    result.stdout.fnmatch_lines(
        ["convergence: OpenMP wait policy PASSIVE (set by pytest-convergence)"]
    )


def test_the_plugin_is_registered_through_the_pytest11_entry_point() -> None:
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("convergence") == "pytest_convergence.plugin"


THREADS_TEST = """
import os
import pytest
import torch

@pytest.mark.convergence
def test_threads():
    expected = int(os.environ["EXPECTED_THREADS"])
    assert torch.get_num_threads() == expected
"""


def test_a_thread_count_option_sets_torch_threads(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(THREADS_TEST)
    monkeypatch.setenv("EXPECTED_THREADS", "1")
    result = pytester.runpytest_subprocess("--convergence", "--convergence-threads", "1")
    result.assert_outcomes(passed=1)


def test_xdist_workers_share_the_cores_instead_of_oversubscribing_them(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    pytester.makepyfile(THREADS_TEST)
    monkeypatch.setenv("EXPECTED_THREADS", str(max(1, len(os.sched_getaffinity(0)) // 2)))
    result = pytester.runpytest_subprocess("--convergence", "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("text", "workers", "expected"),
    [("auto", None, None), ("auto", 2, 4), ("auto", 16, 1), ("3", 2, 3), (" AUTO ", 4, 2)],
)
def test_thread_counts_resolve_per_worker(text: str, workers: int | None, expected: int) -> None:
    from pytest_convergence.config import resolve_threads

    assert resolve_threads(text, cpu_count=8, workers=workers) == expected


@pytest.mark.parametrize("text", ["0", "-1", "many"])
def test_bad_thread_counts_are_refused(text: str) -> None:
    from pytest_convergence.config import resolve_threads

    with pytest.raises(ValueError, match="use 'auto' or a positive int"):
        resolve_threads(text, cpu_count=8, workers=None)


def test_every_public_name_resolves_and_importing_the_package_stays_light() -> None:
    code = (
        "import sys, pytest_convergence as pc; "
        "light = 'torch' not in sys.modules; "
        "[getattr(pc, name) for name in pc.__all__]; "
        "sys.exit(0 if light else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
