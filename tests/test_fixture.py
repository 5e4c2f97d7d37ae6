"""The ``convergence`` fixture end to end, through pytester: record, check, fail, report."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from pytest_convergence.power import FAULTS
from tests.conftest import TINY_WORKLOAD_CONFTEST

TESTS = """
import pytest
import torch
from pytest_convergence.candidates import Candidate

def fp16(named, step):
    for _, gradient in named:
        gradient.copy_(gradient.half().float())

def halve_last_layer(named, step):
    for name, gradient in named:
        if name == "2.weight":
            gradient.mul_(0.5)

@pytest.mark.convergence(workload="tiny")
def test_fp16_gradients(convergence):
    convergence.check(Candidate("fp16-gradients", gradient_transform=fp16))

@pytest.mark.convergence(workload="tiny")
def test_halved_layer(convergence):
    convergence.check(Candidate("halved-last-layer", gradient_transform=halve_last_layer))
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # CI sets CI=true, which turns report folders off; these tests choose it themselves.
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(TINY_WORKLOAD_CONFTEST)
    pytester.makepyfile(test_candidates=TESTS)
    return pytester


def test_a_missing_baseline_fails_with_the_command_that_creates_it(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest("--convergence", "-k", "fp16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*no baseline for workload 'tiny': *baselines/tiny.json does not exist.",
            "*Create it:  pytest --convergence --convergence-record "
            "test_candidates.py::test_fp16_gradients*",
        ]
    )
    assert not (project.path / "baselines").exists()


TEXT_WORKLOAD_CONFTEST = """
from torch import nn
from pytest_convergence.workloads import Workload, register_workload

def text_batches(seed, steps, dtype, device):
    return [{"input_ids": "the cat sat"} for _ in range(steps)]

register_workload(
    Workload(name="text", model_factory=lambda: nn.Linear(4, 2), batches=text_batches, steps=2),
    replace_existing=True,
)
"""


def test_batches_the_workload_cannot_use_are_named_before_a_missing_baseline(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(TEXT_WORKLOAD_CONFTEST)
    pytester.makepyfile(
        test_text="""
import pytest
from pytest_convergence.candidates import Candidate

@pytest.mark.convergence(workload="text")
def test_text(convergence):
    convergence.check(Candidate("same"))
"""
    )
    result = pytester.runpytest("--convergence")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*BatchError: workload 'text': batch 0 holds a str*"])
    result.stdout.no_fnmatch_line("*no baseline for workload*")


def test_recording_writes_the_baseline_and_later_runs_check_against_it(
    project: pytest.Pytester,
) -> None:
    project.runpytest("--convergence", "--convergence-record", "-k", "fp16").assert_outcomes(
        passed=1
    )
    stored = json.loads((project.path / "baselines" / "tiny.json").read_text())
    assert stored["calibration"]["kind"] == "reference-perturbation"
    assert stored["provenance"]["workload"] == "tiny"
    result = project.runpytest("--convergence", "-k", "fp16")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*convergence*", "passed * tiny * fp16-gradients * 3 *"])


def test_a_divergent_candidate_fails_with_a_co_simulation_diff_and_a_report(
    project: pytest.Pytester,
) -> None:
    project.runpytest("--convergence", "--convergence-record", "-k", "fp16")
    result = project.runpytest("--convergence", "-k", "halved")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*ConvergenceError: candidate 'halved-last-layer' left the divergence region of "
            "'tiny' (*baselines/tiny.json)",
            "*First violation: step 1 of 3, parameter '2.weight' (Linear, 64 weights)",
            "*update bias (z-score) = *, limit 7.94e+00 (*x over)",
            "*Violations: * of * checks, at * of * (step, parameter) pairs*",
            "*Replay of step 1: forward outputs of * modules and all gradients agree*",
            "*Region calibrated against: reference with module outputs perturbed by relative*",
            "*Reproduce:   pytest --convergence test_candidates.py::test_halved_layer",
            "*If intended: pytest --convergence --convergence-record "
            "test_candidates.py::test_halved_layer*",
        ]
    )
    reports = list((project.path / "convergence-report").iterdir())
    assert len(reports) == 1
    assert {p.name for p in reports[0].iterdir()} == {
        "heatmap.png",
        "trace.json",
        "logm.png",
        "landscape.json",
        "landscape.png",
        "norms.json",
        "norms.png",
    }


def test_nothing_is_written_in_ci_unless_recording_is_asked_for(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    project.runpytest("--convergence").assert_outcomes(failed=2)
    assert not (project.path / "baselines").exists()
    assert not (project.path / "convergence-report").exists()


def test_junit_xml_carries_the_figures(project: pytest.Pytester) -> None:
    project.runpytest("--convergence", "--convergence-record", "-k", "fp16")
    project.runpytest("--convergence", "--junitxml=out.xml")
    xml = (project.path / "out.xml").read_text()
    assert 'name="convergence_workload" value="tiny"' in xml
    assert 'name="convergence_verdict" value="failed"' in xml
    assert 'name="convergence_worst_ratio"' in xml


def test_a_check_that_errors_is_reported_as_an_error_not_a_pass(
    project: pytest.Pytester,
) -> None:
    project.runpytest("--convergence", "--convergence-record", "-k", "fp16")
    path = project.path / "baselines" / "tiny.json"
    stored = json.loads(path.read_text())
    del stored["parameters"]["2.bias"]
    path.write_text(json.dumps(stored))
    result = project.runpytest("--convergence", "-k", "fp16", "--junitxml=out.xml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["error * - * tiny * fp16-gradients * 3 *", "* error: *2.bias*"])
    xml = (project.path / "out.xml").read_text()
    assert 'name="convergence_verdict" value="error"' in xml
    assert 'name="convergence_worst_ratio"' not in xml


def _widened(stored: dict[str, Any]) -> None:
    stored["parameters"]["2.weight"]["count"] = 32


def _with_a_removed_layer(stored: dict[str, Any]) -> None:
    stored["parameters"]["3.weight"] = stored["parameters"]["2.weight"]


def _of_another_workload(stored: dict[str, Any]) -> None:
    stored["provenance"]["workload"] = "other"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_widened, "parameter '2.weight' has 64 weights in the model, 32 in the baseline"),
        (_with_a_removed_layer, "baseline parameters the model no longer has: '3.weight'"),
        (_of_another_workload, "recorded for workload 'other', not 'tiny'"),
    ],
)
def test_a_stale_baseline_fails_the_check_with_the_re_record_command(
    project: pytest.Pytester, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    project.runpytest("--convergence", "--convergence-record", "-k", "fp16")
    path = project.path / "baselines" / "tiny.json"
    stored = json.loads(path.read_text())
    edit(stored)
    path.write_text(json.dumps(stored))
    result = project.runpytest("--convergence", "-k", "fp16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"E *BaselineError: *tiny.json: stale baseline: *{expected}*; re-record it: "
            "pytest --convergence --convergence-record test_candidates.py::test_fp16_gradients"
        ]
    )


def test_recording_onto_a_folder_fails_before_calibrating_naming_it(
    project: pytest.Pytester,
) -> None:
    (project.path / "baselines" / "tiny.json").mkdir(parents=True)
    result = project.runpytest("--convergence", "--convergence-record", "-k", "fp16")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["E *BaselineError: *tiny.json: is a folder, not a baseline file; remove it*"]
    )


BASELINE_OUTSIDE = """
import pytest
from pytest_convergence.candidates import Candidate

@pytest.mark.convergence(workload="tiny", baseline="../outside.json")
def test_outside(convergence):
    convergence.check(Candidate("id", gradient_transform=lambda n, s: None))
"""


def test_recording_never_writes_outside_the_baselines_folder_unless_opted_in(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(test_outside=BASELINE_OUTSIDE)
    result = project.runpytest("--convergence", "--convergence-record", "test_outside.py")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["E *ValueError: baseline='../outside.json' *outside the baselines*"]
    )
    assert not (project.path / "outside.json").exists()
    project.makeini("[pytest]\nconvergence_allow_external_baselines = true\n")
    result = project.runpytest("--convergence", "--convergence-record", "test_outside.py")
    result.assert_outcomes(passed=1)
    assert (project.path / "outside.json").exists()


def test_a_baseline_recorded_with_another_thread_count_warns(project: pytest.Pytester) -> None:
    record = ("--convergence", "--convergence-record", "-k", "fp16", "--convergence-threads", "1")
    project.runpytest_subprocess(*record).assert_outcomes(passed=1)
    result = project.runpytest_subprocess(
        "--convergence", "-k", "fp16", "--convergence-threads", "2"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*BaselineMismatchWarning: *tiny.json: *threads 1 (baseline) vs 2 (this run)*"]
    )


def test_every_check_of_a_test_has_its_own_summary_row(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_two="""
        import pytest
        from pytest_convergence.candidates import Candidate

        @pytest.mark.convergence(workload="tiny")
        def test_two_checks(convergence):
            convergence.check(Candidate("first", gradient_transform=lambda n, s: None))
            convergence.check(Candidate("second", gradient_transform=lambda n, s: None))
        """
    )
    result = project.runpytest("--convergence", "--convergence-record", "test_two.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["passed * tiny * first * 3 *", "passed * tiny * second * 3 *"], consecutive=False
    )


def test_recording_under_xdist_writes_one_complete_baseline(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_more="""
        import pytest
        from pytest_convergence.candidates import Candidate

        @pytest.mark.parametrize("index", range(4))
        @pytest.mark.convergence(workload="tiny")
        def test_same_workload(convergence, index):
            convergence.check(Candidate(f"identity-{index}", gradient_transform=lambda n, s: None))
        """
    )
    result = project.runpytest_subprocess(
        "--convergence", "--convergence-record", "-n", "2", "-p", "xdist", "test_more.py"
    )
    result.assert_outcomes(passed=4)
    folder = project.path / "baselines"
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["tiny.json"]
    json.loads((folder / "tiny.json").read_text())
    result = project.runpytest_subprocess("--convergence", "-n", "2", "-p", "xdist", "test_more.py")
    result.assert_outcomes(passed=4)


def test_recording_prints_what_the_baseline_can_catch(project: pytest.Pytester) -> None:
    result = project.runpytest("--convergence", "--convergence-record", "-k", "fp16")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*recorded *baselines/tiny.json:",
            "  new baseline: 4 parameters, 3 steps",
            "  power (faults injected at seed 0, 3 steps):",
            "    gradient-scale  caught on * of 4 layers*",
            "    learning-rate   caught from *",
            "    momentum *",
            "    weight-decay *",
            "    steps: *",
        ]
    )
    stored = json.loads((project.path / "baselines" / "tiny.json").read_text())
    assert list(stored["power"]["faults"]) == [fault.name for fault in FAULTS]


def test_recording_under_xdist_prints_the_power_report_on_the_controller(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest_subprocess(
        "--convergence", "--convergence-record", "-n", "2", "-p", "xdist", "-k", "fp16"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*recorded *tiny.json:", "  power (faults injected at seed 0*"])


def test_recording_without_a_power_report_when_the_ini_says_so(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\nconvergence_power = false\n")
    project.runpytest("--convergence", "--convergence-record", "-k", "fp16").assert_outcomes(
        passed=1
    )
    assert "power" not in json.loads((project.path / "baselines" / "tiny.json").read_text())


def test_a_baseline_blind_to_a_required_fault_size_warns_naming_it(
    project: pytest.Pytester,
) -> None:
    project.runpytest("--convergence", "--convergence-record", "-k", "fp16")
    project.makeini("[pytest]\nconvergence_required_power =\n    weight-decay 0.5\n")
    # In a subprocess: this session's filterwarnings = error would turn the warning into a
    # failure in an in-process run.
    result = project.runpytest_subprocess("--convergence", "-k", "fp16")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_candidates.py:*: InsufficientPowerWarning: *baselines/tiny.json: this baseline "
            "may miss bugs the run "
            "requires it to catch (convergence_required_power): weight-decay required at "
            "50%, caught later on (whole model) (*). More steps accumulate more "
            "evidence: raise steps= and re-record it (pytest --convergence "
            "--convergence-record test_candidates.py::test_fp16_gradients)",
        ]
    )


def test_a_malformed_required_power_is_a_usage_error(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\nconvergence_required_power = gradient-scale lots\n")
    result = project.runpytest("--convergence")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*ini option convergence_required_power: size 'lots' of gradient-scale is not a number*"]
    )


def test_the_marker_defaults_can_be_overridden_in_the_call(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_steps="""
        import pytest
        from pytest_convergence.candidates import Candidate

        @pytest.mark.convergence(workload="tiny", steps=2)
        def test_two_steps(convergence):
            result = convergence.check(Candidate("id", gradient_transform=lambda n, s: None))
            assert result.steps == 2
            assert convergence.check(
                Candidate("id2", gradient_transform=lambda n, s: None), steps=1
            ).steps == 1
        """
    )
    project.runpytest("--convergence", "--convergence-record", "test_steps.py").assert_outcomes(
        passed=1
    )


def test_misuse_is_an_error_not_a_divergence(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_misuse="""
        import pytest
        from pytest_convergence.candidates import Candidate

        @pytest.mark.convergence(workload="no-such-workload")
        def test_unknown(convergence):
            convergence.check(Candidate("x", gradient_transform=lambda n, s: None))
        """
    )
    result = project.runpytest("--convergence", "test_misuse.py")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ValueError: unknown workload 'no-such-workload'; registered*"])


def test_a_known_good_candidate_has_its_own_region_that_judges_later_versions(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_lossy="""
        import pytest
        from pytest_convergence.candidates import Candidate

        def shrinking(name, factor):
            def transform(named, step):
                for _, gradient in named:
                    gradient.mul_(factor)
            return Candidate(name, gradient_transform=transform)

        GOOD = shrinking("shrink", 0.9)

        @pytest.mark.convergence(workload="tiny")
        def test_good(convergence):
            convergence.check(GOOD, own_region=True)

        @pytest.mark.convergence(workload="tiny")
        def test_next_version(convergence):
            # Overshoots where the good version shrinks.
            convergence.check(shrinking("shrink-v2", 1.2), known_good=GOOD)
        """
    )
    project.runpytest(
        "--convergence", "--convergence-record", "test_lossy.py::test_good"
    ).assert_outcomes(passed=1)
    stored = json.loads((project.path / "baselines" / "tiny--shrink.json").read_text())
    assert stored["calibration"]["kind"] == "candidate"
    assert stored["calibration"]["candidate"] == "shrink"
    result = project.runpytest("--convergence", "test_lossy.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*candidate 'shrink-v2' left the divergence region*"])


def test_a_cuda_check_is_skipped_with_a_reason_on_a_machine_without_cuda(
    project: pytest.Pytester,
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    project.makepyfile(
        test_gpu="""
        import pytest
        from pytest_convergence.candidates import Candidate

        @pytest.mark.convergence(workload="tiny", device="cuda")
        def test_on_gpu(convergence):
            convergence.check(Candidate("id", gradient_transform=lambda n, s: None))
        """
    )
    result = project.runpytest("--convergence", "-rs", "test_gpu.py")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs CUDA (device='cuda')*"])


# A workload that says which seed it runs at, and a candidate buggy at seed 0 only: the case
# of a failure that a triage at further seeds finds not to reproduce.
SEEDED_CONFTEST = (
    TINY_WORKLOAD_CONFTEST
    + """
from pytest_convergence.candidates import Candidate, register_candidate

SEED = {"now": None}
_batches = synthetic_classification((8,), 4, batch_size=8)

def seeded_batches(seed, steps, dtype, device):
    SEED["now"] = seed
    return _batches(seed, steps, dtype, device)

register_workload(
    Workload(
        name="tiny-seeded",
        model_factory=tiny,
        batches=seeded_batches,
        optimizer_factory=sgd(lr=0.1),
        steps=3,
    ),
    replace_existing=True,
)

def halve_last_layer_at_seed_0(named, step):
    for name, gradient in named:
        if name == "2.weight" and SEED["now"] == 0:
            gradient.mul_(0.5)

def halve_last_layer(named, step):
    for name, gradient in named:
        if name == "2.weight":
            gradient.mul_(0.5)

register_candidate(
    Candidate("halved-at-seed-0", gradient_transform=halve_last_layer_at_seed_0),
    replace_existing=True,
)
register_candidate(
    Candidate("halved", gradient_transform=halve_last_layer), replace_existing=True
)
register_candidate(
    Candidate("identical", gradient_transform=lambda named, step: None), replace_existing=True
)
"""
)
SEEDED_TESTS = """
import pytest

@pytest.mark.convergence(workload="tiny-seeded", candidate="identical")
def test_identical(convergence):
    convergence.check()

@pytest.mark.convergence(workload="tiny-seeded", candidate="halved")
def test_halved(convergence):
    convergence.check()

@pytest.mark.convergence(workload="tiny-seeded", candidate="halved-at-seed-0")
def test_halved_at_seed_0(convergence):
    convergence.check()
"""


@pytest.fixture
def seeded(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A project with tiny-seeded's baseline recorded, outside CI (where triage is on)."""
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(SEEDED_CONFTEST)
    pytester.makepyfile(test_seeded=SEEDED_TESTS)
    pytester.runpytest("--convergence", "--convergence-record", "-k", "identical").assert_outcomes(
        passed=1
    )
    return pytester


def test_a_failure_is_triaged_in_the_message_the_summary_and_junit(
    seeded: pytest.Pytester,
) -> None:
    result = seeded.runpytest("--convergence", "-k", "test_halved", "--junitxml=out.xml")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*Triage: reproduces on 2 of 2 further seeds (seed 1 fails, worst *x its limit; "
            "seed 2 fails, *), in * s: a persistent failure, not an unlucky seed 0",
            "*  Rerun seed 1: pytest --convergence --convergence-seed 1 "
            "test_seeded.py::test_halved",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*= convergence =*",
            "failed * tiny-seeded * halved * test_seeded.py::test_halved",
            "* triage: reproduces on 2 of 2 further seeds (seed: worst/limit 1: *, 2: *)",
        ]
    )
    xml = (seeded.path / "out.xml").read_text()
    assert 'name="convergence_triage" value="2/2"' in xml
    assert 'name="convergence_triage" value="0/2"' in xml
    assert 'name="convergence_triage_ratios" value="1: ' in xml
    assert 'name="convergence_triage_seconds"' in xml


def test_a_failure_that_does_not_reproduce_says_so_and_the_test_still_fails(
    seeded: pytest.Pytester,
) -> None:
    result = seeded.runpytest("--convergence", "-k", "at_seed_0")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*ConvergenceError: candidate 'halved-at-seed-0' left the divergence region*",
            "*Triage: reproduces on 0 of 2 further seeds (seed 1 passes, *; seed 2 passes, *), "
            "in * s: does not reproduce, possibly an unlucky seed 0 or a marginal candidate; "
            "the check still fails",
            "*  Rerun seed 1: pytest --convergence --convergence-seed 1 "
            "test_seeded.py::test_halved_at_seed_0",
        ]
    )
    # The command it gives runs the passing seed.
    seeded.runpytest(
        "--convergence", "--convergence-seed", "1", "test_seeded.py::test_halved_at_seed_0"
    ).assert_outcomes(passed=1)


def test_triage_is_off_with_0_and_by_default_in_ci_unless_asked_for(
    seeded: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = seeded.runpytest("--convergence", "-k", "at_seed_0", "--convergence-triage", "0")
    off.assert_outcomes(failed=1)
    assert "Triage" not in off.stdout.str()
    monkeypatch.setenv("CI", "true")
    in_ci = seeded.runpytest("--convergence", "-k", "at_seed_0")
    in_ci.assert_outcomes(failed=1)
    assert "Triage" not in in_ci.stdout.str()
    asked = seeded.runpytest("--convergence", "-k", "at_seed_0", "--convergence-triage", "1")
    asked.assert_outcomes(failed=1)
    asked.stdout.fnmatch_lines(["*Triage: reproduces on 0 of 1 further seed (seed 1 passes*"])


def test_recording_and_a_check_that_errors_are_never_triaged(seeded: pytest.Pytester) -> None:
    recording = seeded.runpytest("--convergence", "--convergence-record", "-k", "test_halved")
    recording.assert_outcomes(failed=2)
    assert "Triage" not in recording.stdout.str()
    (seeded.path / "baselines" / "tiny-seeded.json").unlink()
    missing = seeded.runpytest("--convergence", "-k", "test_halved")
    missing.assert_outcomes(failed=2)
    missing.stdout.fnmatch_lines(["*no baseline for workload 'tiny-seeded'*"])
    assert "Triage" not in missing.stdout.str()
