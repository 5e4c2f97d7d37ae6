"""Triage of a failing check at further seeds: which seeds, what each found, and that it only
informs (the check still fails, nothing is written, only a judged failure is triaged)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_convergence.candidates import Candidate
from pytest_convergence.checks import BoundCheck, CheckRequest, ConvergenceChecker, Runner
from pytest_convergence.config import ConvergenceConfig
from pytest_convergence.cosim import cosimulate
from pytest_convergence.distributed import check as distributed_check
from pytest_convergence.distributed import fp16_compress_hook
from pytest_convergence.errors import ConvergenceError
from pytest_convergence.regions import Region, calibrate
from pytest_convergence.traces import CoSimulation
from pytest_convergence.triage import triage, triage_seeds
from pytest_convergence.workloads import Workload, get_workload
from pytest_convergence.zoo.candidates import scaled_layer_gradient

MLP = get_workload("mlp").with_options(steps=3)
IDENTICAL = Candidate("identical", gradient_transform=lambda named, step: None)
SCALED = scaled_layer_gradient("fc2.weight", 3.0)


def calibrated() -> Region:
    # Two seeds and two draws: a region in a tenth of a second, wide enough for IDENTICAL.
    return calibrate(MLP, seeds=[0, 1], draws=2)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding MLP's default region, mlp.json."""
    folder = tmp_path_factory.mktemp("baselines")
    checker = ConvergenceChecker(ConvergenceConfig(folder, record=True))
    checker.run(
        checker.request(MLP, candidate=IDENTICAL.name),
        Runner(run=lambda workload: cosimulate(workload, IDENTICAL), calibrate_region=calibrated),
    )
    return folder


class Seeds:
    """A runner's ``run`` that co-simulates ``SCALED`` at the seeds in ``failing`` (a candidate
    buggy at those seeds only), ``IDENTICAL`` elsewhere, and keeps every seed it ran."""

    def __init__(self, failing: set[int], raising: frozenset[int] = frozenset()) -> None:
        self.failing = failing
        self.raising = raising
        self.seen: list[int] = []

    def __call__(self, workload: Workload) -> CoSimulation:
        self.seen.append(workload.seed)
        if workload.seed in self.raising:
            raise ValueError(f"cannot run seed {workload.seed}\nsecond line")
        return cosimulate(workload, SCALED if workload.seed in self.failing else IDENTICAL)


def checked(
    baselines: Path,
    run: Seeds,
    request: Callable[[ConvergenceChecker], CheckRequest] | None = None,
    **config: Any,
) -> tuple[ConvergenceChecker, Exception | None]:
    """A check of ``run`` against ``baselines``: the checker, and what the check raised."""
    checker = ConvergenceChecker(ConvergenceConfig(baselines, **config))
    made = (
        request(checker)
        if request is not None
        else checker.request(MLP, candidate="seeded", label="t.py::test")
    )
    try:
        checker.run(made, Runner(run=run, calibrate_region=calibrated))
    except Exception as error:
        return checker, error
    return checker, None


def test_the_further_seeds_are_the_ones_right_after_the_failing_seed() -> None:
    assert triage_seeds(5, 3) == [6, 7, 8]
    assert triage_seeds(0, 1) == [1]


def test_a_triage_judges_each_further_seed_against_the_same_region() -> None:
    run = Seeds(failing={0, 2})
    found = triage(MLP, calibrated(), run, 2)
    assert run.seen == [1, 2]
    assert [(o.seed, o.failed) for o in found.outcomes] == [(1, False), (2, True)]
    assert found.outcomes[0].worst_ratio < 1 < found.outcomes[1].worst_ratio
    assert (found.seed, found.fraction, found.reproduced, found.judged) == (0, "1/2", 1, 2)
    assert found.seconds > 0


def test_a_seed_whose_co_simulation_raises_is_an_error_neither_failed_nor_passed() -> None:
    found = triage(MLP, calibrated(), Seeds(failing={0}, raising=frozenset({1})), 1)
    (outcome,) = found.outcomes
    assert (outcome.failed, outcome.error) == (False, "ValueError: cannot run seed 1")
    assert (found.reproduced, found.judged, found.fraction) == (0, 0, "0/1")


def test_a_triage_needs_a_further_seed() -> None:
    with pytest.raises(ValueError, match="at least 1 further seed, got 0"):
        triage(MLP, calibrated(), Seeds(failing=set()), 0)


def test_a_failure_that_does_not_reproduce_is_triaged_and_the_check_still_fails(
    baselines: Path,
) -> None:
    run = Seeds(failing={0})
    checker, caught = checked(baselines, run, triage=2)
    assert isinstance(caught, ConvergenceError)
    assert run.seen[:3] == [0, 1, 2]
    result = checker.results[-1]
    assert result.verdict == "failed"
    assert result.triage is not None
    assert result.triage.fraction == "0/2"
    assert "Triage: reproduces on 0 of 2 further seeds (seed 1 passes" in str(caught)
    assert "the check still fails" in str(caught)
    assert "  Rerun seed 1: pytest --convergence --convergence-seed 1 t.py::test\n" in str(caught)


def test_a_persistent_failure_reproduces_on_every_further_seed(baselines: Path) -> None:
    checker, caught = checked(baselines, Seeds(failing={0, 1, 2, 3}), triage=3)
    assert isinstance(caught, ConvergenceError)
    assert "reproduces on 3 of 3 further seeds" in str(caught)
    assert "a persistent failure, not an unlucky seed 0" in str(caught)
    assert checker.results[-1].triage is not None


def test_triage_0_runs_no_further_seed(baselines: Path) -> None:
    run = Seeds(failing={0})
    checker, caught = checked(baselines, run, triage=0)
    assert isinstance(caught, ConvergenceError)
    assert set(run.seen) == {0}
    assert checker.results[-1].triage is None
    assert "Triage" not in str(caught)


def test_a_plain_configuration_does_not_triage(baselines: Path) -> None:
    """Outside pytest the checker triages when asked; the plugin's default is its own."""
    assert ConvergenceConfig(baselines).triage == 0


def test_a_negative_triage_is_refused() -> None:
    with pytest.raises(ValueError, match=r"convergence triage -1: use 0 \(off\) or a positive int"):
        ConvergenceConfig(Path("baselines"), triage=-1)


def test_recording_never_triages(tmp_path: Path) -> None:
    run = Seeds(failing={0})
    checker, caught = checked(tmp_path, run, triage=2, record=True)
    assert isinstance(caught, ConvergenceError)
    assert set(run.seen) == {0}
    assert checker.results[-1].triage is None


def test_a_check_that_errors_before_its_verdict_is_not_triaged(baselines: Path) -> None:
    run = Seeds(failing=set(), raising=frozenset({0}))
    checker, caught = checked(baselines, run, triage=2)
    assert isinstance(caught, ValueError)
    assert set(run.seen) == {0}
    assert (checker.results[-1].verdict, checker.results[-1].triage) == ("error", None)


def test_a_passing_check_is_not_triaged(baselines: Path) -> None:
    run = Seeds(failing=set())
    checker, caught = checked(baselines, run, triage=2)
    assert caught is None
    assert run.seen == [0]
    assert checker.results[-1].verdict == "passed"


def test_triage_writes_no_report_folder_and_no_baseline(baselines: Path, tmp_path: Path) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in baselines.iterdir()}
    _, caught = checked(baselines, Seeds(failing={0, 1}), triage=2, report_dir=tmp_path)
    assert isinstance(caught, ConvergenceError)
    assert [path.name for path in tmp_path.iterdir()] == ["t.py__test"]
    assert {path.name: path.stat().st_mtime_ns for path in baselines.iterdir()} == before


def test_a_check_that_fixes_its_seed_is_rerun_through_its_seed_argument(baselines: Path) -> None:
    run = Seeds(failing={5})
    _, caught = checked(
        baselines,
        run,
        lambda checker: checker.request(MLP, candidate="seeded", seed=5, label="t.py::test"),
        triage=2,
    )
    assert isinstance(caught, ConvergenceError)
    assert run.seen[-2:] == [6, 7]
    assert "  Rerun seed 6: seed=6 in the check or its marker (it fixes the seed)\n" in str(caught)


def test_a_ddp_check_is_triaged_through_its_own_runner(
    baselines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check_distributed`` co-simulates each further seed on its ranks, the same path as
    the fixture's (the ranks stand in here for the DDP run, which the distributed tests cover)."""
    seen: list[int] = []

    def ranks(workload: Workload, hook: object, **options: object) -> CoSimulation:
        seen.append(workload.seed)
        return cosimulate(workload, SCALED)

    monkeypatch.setattr(distributed_check, "cosimulate_distributed", ranks)
    properties: list[tuple[str, object]] = []
    bound = BoundCheck(
        checker=ConvergenceChecker(ConvergenceConfig(baselines, triage=2)),
        defaults={},
        label="t.py::test_ddp",
        record_property=lambda name, value: properties.append((name, value)),
    )
    with pytest.raises(ConvergenceError, match="reproduces on 2 of 2 further seeds"):
        distributed_check.check_distributed(bound, fp16_compress_hook(), workload=MLP)
    assert seen == [0, 1, 2]
    assert ("convergence_triage", "2/2") in properties
