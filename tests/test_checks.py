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
