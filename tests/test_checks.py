from __future__ import annotations

from pathlib import Path

import pytest

from pytest_convergence.candidates import Candidate
from pytest_convergence.checks import ConvergenceChecker, MissingBaselineError
from pytest_convergence.config import ConvergenceConfig
from pytest_convergence.workloads import get_workload

KNOWN_GOOD = Candidate("int8", gradient_transform=lambda named, step: None)


@pytest.mark.parametrize(
    ("device", "known_good", "expected"),
    [
        ("cpu", None, "vgg16-mini.json"),
        ("cpu", KNOWN_GOOD, "vgg16-mini--int8.json"),
        ("cuda", None, "vgg16-mini-cuda.json"),
        ("cuda:1", KNOWN_GOOD, "vgg16-mini-cuda--int8.json"),
    ],
)
def test_baselines_are_kept_per_device_type_and_known_good_candidate(
    tmp_path: Path, device: str, known_good: Candidate | None, expected: str
) -> None:
    checker = ConvergenceChecker(ConvergenceConfig(tmp_path))
    workload = get_workload("vgg16-mini").with_options(device=device)
    name = known_good.name if known_good else None
    assert checker.baseline_for(workload, name).name == expected


def test_checking_without_a_baseline_fails_and_writes_nothing(tmp_path: Path) -> None:
    checker = ConvergenceChecker(ConvergenceConfig(tmp_path / "baselines"))
    with pytest.raises(MissingBaselineError, match="Create it:  pytest --convergence"):
        checker.check(KNOWN_GOOD, "mlp", steps=2)
    assert not (tmp_path / "baselines").exists()


def test_an_explicit_baseline_name_is_used_as_given(tmp_path: Path) -> None:
    checker = ConvergenceChecker(ConvergenceConfig(tmp_path))
    with pytest.raises(MissingBaselineError, match=r"custom\.json does not exist"):
        checker.check(KNOWN_GOOD, "mlp", steps=2, baseline="custom.json", known_good=KNOWN_GOOD)


@pytest.mark.parametrize(
    "name", ["../outside.json", "sub/../../outside.json", "{tmp}/outside.json"]
)
def test_a_baseline_outside_the_baselines_folder_is_refused_before_anything_runs(
    tmp_path: Path, name: str
) -> None:
    folder = tmp_path / "baselines"
    folder.mkdir()
    checker = ConvergenceChecker(ConvergenceConfig(folder, record=True))
    with pytest.raises(ValueError, match="outside the baselines folder") as caught:
        checker.check(KNOWN_GOOD, "mlp", steps=1, baseline=name.format(tmp=tmp_path))
    assert "convergence_allow_external_baselines = true" in str(caught.value)
    assert not (tmp_path / "outside.json").exists()
    assert checker.results == []


def test_a_baseline_that_links_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "baselines"
    folder.mkdir()
    (folder / "mlp.json").symlink_to(tmp_path / "elsewhere.json")
    checker = ConvergenceChecker(ConvergenceConfig(folder))
    with pytest.raises(ValueError, match=r"mlp\.json resolves to .*elsewhere\.json, outside"):
        checker.check(KNOWN_GOOD, "mlp", steps=1)


def test_a_link_inside_the_folder_and_an_opted_in_outside_path_are_accepted(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "baselines"
    folder.mkdir()
    (folder / "mlp.json").symlink_to(folder / "shared.json")
    checker = ConvergenceChecker(ConvergenceConfig(folder))
    assert checker.request("mlp", candidate="x").baseline == folder / "mlp.json"
    opted_in = ConvergenceChecker(ConvergenceConfig(folder, allow_external_baselines=True))
    outside = opted_in.request("mlp", candidate="x", baseline="../outside.json").baseline
    assert outside == folder / "../outside.json"


def test_the_fixture_and_the_checker_have_short_reprs_for_tracebacks(tmp_path: Path) -> None:
    from pytest_convergence.checks import BoundCheck

    checker = ConvergenceChecker(ConvergenceConfig(tmp_path))
    bound = BoundCheck(
        checker, {"workload": "mlp", "steps": 2}, "t.py::test_x", lambda name, value: None
    )
    assert repr(bound) == "<convergence fixture of t.py::test_x, workload='mlp', steps=2>"
    assert repr(checker) == f"<ConvergenceChecker of {tmp_path}, 0 checks>"
