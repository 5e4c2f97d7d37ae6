"""Report diagnostics: the loss-landscape slice, the norm evolution, and their report files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pytest_convergence.assertions import ConvergenceError
from pytest_convergence.candidates import Candidate, mean_exchange
from pytest_convergence.checks import ConvergenceChecker, Runner
from pytest_convergence.config import ConvergenceConfig
from pytest_convergence.cosim import cosimulate, train
from pytest_convergence.diagnostics import (
    ALPHAS,
    BETAS,
    DIRECTIONS,
    LandscapeSlice,
    NormEvolution,
    chosen_parameters,
    filter_normalized_direction,
    free_running_norms,
    loss_landscape_slice,
    norm_evolution,
    plot_landscape,
    plot_norm_evolution,
)
from pytest_convergence.regions import Region, calibrate, judge
from pytest_convergence.report_folder import write_report
from pytest_convergence.traces import ParameterStep, StepTrace, Trace
from pytest_convergence.workloads import Workload, get_workload, synthetic_classification
from pytest_convergence.zoo.candidates import (
    accumulation_without_division,
    scaled_layer_gradient,
    sum_instead_of_mean_exchange,
)
from tests.conftest import TINY_WORKLOAD_CONFTEST

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MLP = get_workload("mlp").with_options(steps=3)
IDENTICAL = Candidate("identical", gradient_transform=lambda named, step: None)
SCALED = scaled_layer_gradient("fc2.weight", 3.0)
SUMMED = sum_instead_of_mean_exchange()


def batch_loss(workload: Workload, model: torch.nn.Module, step: int, workers: int = 1) -> float:
    """The training loss on step ``step``'s batch, as a training step computes it."""
    inputs, targets = workload.make_batches()[step - 1]
    model.train()
    with torch.no_grad():
        losses = [
            workload.loss_fn(model(x), y)
            for x, y in zip(inputs.chunk(workers), targets.chunk(workers), strict=True)
        ]
    return float(torch.stack(losses).mean())


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100
    assert width > 100


# --- the loss-landscape slice ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "reference"),
    [
        (SCALED, Candidate("reference")),
        (SUMMED, Candidate("reference", exchange=mean_exchange, workers=SUMMED.workers)),
    ],
    ids=["one-worker", "virtual-workers"],
)
def test_the_line_starts_at_the_reference_loss_after_the_step(
    candidate: Candidate, reference: Candidate
) -> None:
    landscape = loss_landscape_slice(MLP, candidate, 3)
    _, model = train(MLP, reference)
    expected = batch_loss(MLP, model, 3, workers=reference.workers)
    assert landscape.line_losses[ALPHAS.index(0.0)] == pytest.approx(expected, rel=1e-6)
    for curve in landscape.reference_losses:
        assert curve[BETAS.index(0.0)] == pytest.approx(expected, rel=1e-6)


def test_the_line_ends_at_the_candidate_loss_after_the_step() -> None:
    """At step 1 the re-synced candidate step is its free-running first step."""
    landscape = loss_landscape_slice(MLP, SCALED, 1)
    _, model = train(MLP.with_options(steps=1), SCALED)
    expected = batch_loss(MLP, model, 1)
    assert landscape.line_losses[ALPHAS.index(1.0)] == pytest.approx(expected, rel=1e-6)
    for curve in landscape.candidate_losses:
        assert curve[BETAS.index(0.0)] == pytest.approx(expected, rel=1e-6)


def test_the_slice_records_the_loss_before_the_step() -> None:
    landscape = loss_landscape_slice(MLP, SCALED, 2)
    _, model = train(MLP.with_options(steps=1))
    assert landscape.loss_before == pytest.approx(batch_loss(MLP, model, 2), rel=1e-6)


def test_an_identical_candidate_sits_on_the_reference() -> None:
    landscape = loss_landscape_slice(MLP, IDENTICAL, 2)
    assert landscape.relative_distance == 0.0
    assert len(set(landscape.line_losses)) == 1
    assert landscape.candidate_losses == landscape.reference_losses
    assert len(landscape.reference_losses) == DIRECTIONS
    assert len(set(landscape.reference_losses)) == DIRECTIONS


@pytest.mark.parametrize("candidate", [SCALED, SUMMED], ids=lambda c: c.name)
def test_a_bugged_candidate_gives_another_landscape_than_an_identical_one(
    candidate: Candidate,
) -> None:
    identical = loss_landscape_slice(MLP, IDENTICAL, 2)
    bugged = loss_landscape_slice(MLP, candidate, 2)
    assert bugged.relative_distance > 1e-3
    assert bugged.line_losses[ALPHAS.index(0.0)] != bugged.line_losses[ALPHAS.index(1.0)]
    assert bugged.candidate_losses != bugged.reference_losses
    if candidate.workers == 1:  # the same reference: the same line start and random curves
        assert bugged.reference_losses == identical.reference_losses
        assert bugged.line_losses != identical.line_losses


def test_the_slice_is_deterministic_and_leaves_the_rng_alone() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = loss_landscape_slice(MLP, SCALED, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert loss_landscape_slice(MLP, SCALED, 2, seed=7) == first
    other_seed = loss_landscape_slice(MLP, SCALED, 2, seed=8)
    assert other_seed.line_losses == first.line_losses
    assert other_seed.reference_losses != first.reference_losses


def test_every_point_sees_the_dropout_masks_of_the_step() -> None:
    """Fresh masks per forward pass would make even an identical candidate's line noisy."""
    workload = Workload(
        name="dropout",
        model_factory=lambda: torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 4)
        ),
        batches=synthetic_classification((8,), 4, batch_size=8),
        steps=2,
    )
    landscape = loss_landscape_slice(workload, IDENTICAL, 2)
    assert len(set(landscape.line_losses)) == 1
    assert landscape.line_losses[0] == landscape.reference_losses[0][BETAS.index(0.0)]


def test_a_step_outside_the_workload_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match=r"step=4: workload 'mlp' runs steps 1 to 3"):
        loss_landscape_slice(MLP, SCALED, 4)


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    zero_filter=st.booleans(),
)
def test_a_filter_normalized_direction_has_the_norms_of_the_weights_filters(
    shape: list[int], seed: int, zero_filter: bool
) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if zero_filter:
        weight[0] = 0.0
    (direction,) = filter_normalized_direction([weight], torch.Generator().manual_seed(seed))
    assert direction.shape == weight.shape
    assert direction.dtype == weight.dtype
    if weight.dim() == 1:  # biases and batch-norm parameters stay put
        assert not direction.any()
        return
    torch.testing.assert_close(
        direction.flatten(1).norm(dim=1), weight.flatten(1).norm(dim=1), rtol=1e-12, atol=0.0
    )
    (again,) = filter_normalized_direction([weight], torch.Generator().manual_seed(seed))
    assert torch.equal(direction, again)


def test_a_filter_normalized_direction_keeps_the_weights_dtype() -> None:
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float16)
    (direction,) = filter_normalized_direction([weight], torch.Generator().manual_seed(0))
    assert direction.dtype == torch.float16
    torch.testing.assert_close(
        direction.float().flatten(1).norm(dim=1),
        weight.float().flatten(1).norm(dim=1),
        rtol=2e-3,
        atol=0.0,
    )


def test_a_slice_round_trips_through_json_with_its_non_finite_losses() -> None:
    landscape = LandscapeSlice(
        workload="mlp",
        candidate="c",
        step=2,
        seed=0,
        loss_before=2.3,
        relative_distance=0.01,
        alphas=(0.0, 0.5, 1.0),
        line_losses=(2.2, math.inf, math.nan),
        betas=(-1.0, 0.0, 1.0),
        reference_losses=((3.0, 2.2, 3.1),),
        candidate_losses=((math.nan, math.nan, 4.0),),
    )
    restored = LandscapeSlice.from_json(landscape.to_json())
    assert restored.line_losses[:2] == (2.2, math.inf)
    assert math.isnan(restored.line_losses[2])
    assert restored.reference_losses == landscape.reference_losses
    assert restored.alphas == landscape.alphas
    with pytest.raises(ValueError, match=r"landscape\.json: malformed landscape slice"):
        LandscapeSlice.from_json('{"schema": "other"}', source="landscape.json")


def test_the_landscape_plot_is_a_png_with_gaps_for_non_finite_losses(tmp_path: Path) -> None:
    landscape = loss_landscape_slice(MLP, SCALED, 2)
    assert_png(plot_landscape(landscape, tmp_path / "landscape.png"))
    broken = dataclasses.replace(
        landscape,
        line_losses=(math.nan, *landscape.line_losses[1:-1], math.inf),
        candidate_losses=tuple((math.nan,) * len(BETAS) for _ in range(DIRECTIONS)),
    )
    assert_png(plot_landscape(broken, tmp_path / "broken.png"))


# --- the norm evolution ----------------------------------------------------------------------


def test_the_norm_evolution_has_one_point_per_step_per_parameter() -> None:
    run = cosimulate(MLP, SCALED)
    evolution = free_running_norms(run, MLP, SCALED)
    names = [name for name, _ in MLP.build_model().named_parameters()]
    assert evolution.parameters == tuple(names)
    assert evolution.steps == (0, 1, 2, 3)
    assert [(p.step, p.parameter) for p in evolution.points] == [
        (step, name) for step in range(4) for name in names
    ]
    by_key = {(p.step, p.parameter): p for p in evolution.points}
    for step in run.reference.steps:
        for parameter in step.parameters:
            point = by_key[step.step, parameter.name]
            assert point.reference_weight_norm == parameter.weight_norm
            assert point.reference_grad_norm == parameter.grad_norm
    assert all(p.candidate_grad_norm is None for p in evolution.points if p.step == 0)
    assert all(p.candidate_grad_norm is not None for p in evolution.points if p.step > 0)
    assert evolution.candidate_gradients
    scaled = by_key[1, "fc2.weight"]
    assert scaled.candidate_grad_norm == pytest.approx(3 * scaled.reference_grad_norm, rel=1e-5)
    assert (
        by_key[3, "fc2.weight"].candidate_weight_norm
        != by_key[3, "fc2.weight"].reference_weight_norm
    )
    assert NormEvolution.from_json(evolution.to_json()) == evolution


def test_a_step_fn_candidate_reports_the_gradients_its_optimizer_saw(tmp_path: Path) -> None:
    """Read right before its optimizer step: four undivided micro-batch losses, four times the
    reference's gradient at step 1 (where both start from the same weights)."""
    candidate = accumulation_without_division()
    evolution = free_running_norms(cosimulate(MLP, candidate), MLP, candidate)
    assert evolution.candidate_gradients
    first = next(p for p in evolution.points if p.step == 1 and p.parameter == "fc3.weight")
    assert first.candidate_grad_norm is not None
    assert first.reference_grad_norm is not None
    assert first.candidate_grad_norm == pytest.approx(4 * first.reference_grad_norm, rel=1e-4)
    assert_png(plot_norm_evolution(evolution, tmp_path / "norms.png"))


def test_the_norm_plot_is_a_png(tmp_path: Path) -> None:
    evolution = free_running_norms(cosimulate(MLP, SCALED), MLP, SCALED)
    assert_png(plot_norm_evolution(evolution, tmp_path / "norms.png", highlight="fc2.weight"))


def synthetic_trace(label: str, names: list[str], growth: dict[str, float]) -> Trace:
    """Weight norms 1 + growth * step: a candidate whose layers drift apart at chosen rates."""
    return Trace(
        label=label,
        steps=[
            StepTrace(
                step=step,
                loss=None,
                global_logm=None,
                parameters=tuple(
                    ParameterStep(name, 4, 0, None, 1.0 + growth.get(name, 0.0) * step, 0.0, None)
                    for name in names
                ),
            )
            for step in range(3)
        ],
    )


def test_the_norm_plot_shows_first_last_the_violation_and_the_largest_differences() -> None:
    names = [f"layer{i}.{kind}" for i in range(8) for kind in ("weight", "bias")] + ["bn.weight"]
    types = dict.fromkeys(names, "Linear") | {"bn.weight": "BatchNorm2d"}
    reference = synthetic_trace("reference", names, {})
    candidate = synthetic_trace(
        "candidate",
        names,
        {"layer3.weight": 0.5, "layer5.weight": 0.2, "layer4.bias": 9.0, "bn.weight": 9.0},
    )
    evolution = norm_evolution(reference, candidate, module_types=types)
    chosen = chosen_parameters(evolution, highlight="layer2.weight", max_lines=4)
    assert chosen == ["layer0.weight", "layer2.weight", "layer3.weight", "layer7.weight"]
    assert chosen_parameters(evolution, max_lines=2) == ["layer0.weight", "layer7.weight"]
    assert chosen_parameters(evolution, highlight="layer4.bias", max_lines=1) == ["layer4.bias"]
    with pytest.raises(ValueError, match="max_lines=0"):
        chosen_parameters(evolution, max_lines=0)


def test_exploding_and_missing_norms_still_plot(tmp_path: Path) -> None:
    names = ["a.weight", "b.weight"]
    reference = synthetic_trace("reference", names, {})
    exploding = synthetic_trace("candidate", names, {"a.weight": 1e6})
    steps = [*exploding.steps[:2], StepTrace(2, None, None, (exploding.steps[2].parameters[0],))]
    evolution = norm_evolution(reference, Trace("candidate", steps=steps))
    assert not evolution.candidate_gradients
    assert_png(plot_norm_evolution(evolution, tmp_path / "norms.png", highlight="b.weight"))


def test_a_candidate_that_stops_early_has_no_norms_after_it() -> None:
    names = ["fc.weight"]
    reference = synthetic_trace("reference", names, {})
    candidate = Trace("candidate", steps=reference.steps[:2])
    evolution = norm_evolution(reference, candidate)
    assert [p.candidate_weight_norm for p in evolution.points] == [1.0, 1.0, None]
    assert evolution.candidate_steps == 1


# --- the report folder -----------------------------------------------------------------------


def poison(named: list[tuple[str, torch.Tensor]], step: int) -> None:
    for _, gradient in named:
        gradient.fill_(math.nan)


def test_a_report_lists_the_diagnostics_files(tmp_path: Path) -> None:
    run = cosimulate(MLP, SCALED)
    written = write_report(run, None, None, tmp_path, workload=MLP, candidate=SCALED)
    names = [path.name for path in written]
    assert names == [
        "trace.json",
        "logm.png",
        "landscape.json",
        "landscape.png",
        "norms.json",
        "norms.png",
    ]
    for path in written:
        assert path.parent == tmp_path
        if path.suffix == ".png":
            assert_png(path)
    assert LandscapeSlice.from_json((tmp_path / "landscape.json").read_text()).step == 3


def test_a_report_without_the_candidate_has_no_diagnostics(tmp_path: Path) -> None:
    written = write_report(cosimulate(MLP, SCALED), None, None, tmp_path)
    assert [path.name for path in written] == ["trace.json", "logm.png"]
    with pytest.raises(ValueError, match="both workload= and candidate="):
        write_report(cosimulate(MLP, SCALED), None, None, tmp_path, workload=MLP)


@pytest.fixture(scope="module")
def mlp_region() -> Region:
    return calibrate(MLP, seeds=[0], draws=2)


def test_a_report_against_a_region_leads_with_the_map_of_ratios_to_limits(
    tmp_path: Path, mlp_region: Region
) -> None:
    import matplotlib.image

    run = cosimulate(MLP, SCALED)

    written = write_report(run, mlp_region, judge(run, mlp_region), tmp_path)

    assert [path.name for path in written] == ["heatmap.png", "trace.json", "logm.png"]
    assert_png(tmp_path / "heatmap.png")
    pixels = matplotlib.image.imread(tmp_path / "heatmap.png")[:, :, :3] * 255
    outside = pixels[:, :, 0] - pixels[:, :, 1:].max(axis=2) > 90  # the reds above the limit
    assert outside.sum() > 1000


def test_a_map_that_cannot_be_drawn_leaves_a_note_and_the_rest_of_the_report(
    tmp_path: Path, mlp_region: Region
) -> None:
    run = cosimulate(MLP, SCALED)
    other_model = dataclasses.replace(
        mlp_region, parameters={"fc1.weight": mlp_region.parameters["fc1.weight"]}
    )

    written = write_report(run, other_model, None, tmp_path)

    assert [path.name for path in written] == ["trace.json", "logm.png", "notes.txt"]
    notes = (tmp_path / "notes.txt").read_text()
    assert "heatmap.png: not written, ValueError: parameter 'fc1.bias'" in notes


def test_a_report_without_a_region_removes_an_earlier_map(
    tmp_path: Path, mlp_region: Region
) -> None:
    run = cosimulate(MLP, SCALED)
    write_report(run, mlp_region, None, tmp_path)

    write_report(run, None, None, tmp_path)

    assert not (tmp_path / "heatmap.png").exists()


def test_a_diagnostic_that_fails_leaves_a_note_and_the_rest_of_the_report(
    tmp_path: Path,
) -> None:
    candidate = Candidate("nan-gradients", gradient_transform=poison)
    (tmp_path / "landscape.png").write_bytes(b"from an earlier run")
    written = write_report(
        cosimulate(MLP, candidate), None, None, tmp_path, workload=MLP, candidate=candidate
    )
    names = [path.name for path in written]
    assert names == ["trace.json", "logm.png", "norms.json", "norms.png", "notes.txt"]
    assert not (tmp_path / "landscape.png").exists()
    notes = (tmp_path / "notes.txt").read_text()
    assert "landscape.png, landscape.json: not written, NonFiniteWeightError" in notes
    assert "'fc1.weight (candidate)' at step 1 holds non-finite weights" in notes
    evolution = NormEvolution.from_json((tmp_path / "norms.json").read_text())
    assert evolution.candidate_steps == 0


def test_a_check_without_a_candidate_to_re_run_reports_the_trace_only(tmp_path: Path) -> None:
    """The DDP path: its hooks run only in worker processes, so there is nothing to re-run."""
    checker = ConvergenceChecker(
        ConvergenceConfig(tmp_path / "baselines", record=True, report_dir=tmp_path / "reports")
    )
    with pytest.raises(ConvergenceError) as caught:
        checker.run(
            checker.request(MLP, candidate=SCALED.name, label="ddp-like"),
            Runner(
                run=lambda workload: cosimulate(workload, SCALED),
                calibrate_region=lambda: calibrate(MLP, seeds=[0], draws=2),
            ),
        )
    folder = tmp_path / "reports" / "ddp-like"
    assert f"Report: {folder} (heatmap.png, trace.json, logm.png)\n" in str(caught.value)
    assert {p.name for p in folder.iterdir()} == {"heatmap.png", "trace.json", "logm.png"}


def test_the_failure_message_points_at_the_note_of_a_missing_diagnostic(tmp_path: Path) -> None:
    checker = ConvergenceChecker(
        ConvergenceConfig(tmp_path / "baselines", record=True, report_dir=tmp_path / "reports")
    )
    candidate = Candidate("nan-gradients", gradient_transform=poison)
    with pytest.raises(ConvergenceError) as caught:
        checker.check(candidate, MLP, label="nan")
    assert (
        f"Report: {tmp_path / 'reports' / 'nan'} (heatmap.png, trace.json, logm.png, norms.json, "
        "norms.png, notes.txt); notes.txt says which diagnostics could not be computed\n"
    ) in str(caught.value)


# --- the plugin ------------------------------------------------------------------------------


TESTS = """
import pytest
from pytest_convergence.candidates import Candidate

def halve_last_layer(named, step):
    for name, gradient in named:
        if name == "2.weight":
            gradient.mul_(0.5)

@pytest.mark.convergence(workload="tiny")
def test_identical(convergence):
    convergence.check(Candidate("identical", gradient_transform=lambda named, step: None))

@pytest.mark.convergence(workload="tiny")
def test_halved(convergence):
    convergence.check(Candidate("halved-last-layer", gradient_transform=halve_last_layer))
"""

DIAGNOSTICS = {"landscape.png", "landscape.json", "norms.png", "norms.json"}


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(TINY_WORKLOAD_CONFTEST)
    pytester.makepyfile(test_candidates=TESTS)
    pytester.runpytest("--convergence", "--convergence-record", "-k", "identical").assert_outcomes(
        passed=1
    )
    return pytester


def report_files(project: pytest.Pytester) -> dict[str, set[str]]:
    folder = project.path / "convergence-report"
    if not folder.exists():
        return {}
    return {report.name: {p.name for p in report.iterdir()} for report in folder.iterdir()}


def test_a_failing_check_gets_the_diagnostics_in_its_report(project: pytest.Pytester) -> None:
    result = project.runpytest("--convergence", "-k", "halved")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Report: *test_candidates.py__test_halved (heatmap.png, trace.json, logm.png, "
            "landscape.json, landscape.png, norms.json, norms.png)"
        ]
    )
    assert report_files(project) == {
        "test_candidates.py__test_halved": {"heatmap.png", "trace.json", "logm.png", *DIAGNOSTICS}
    }


def test_a_passing_check_gets_no_report_unless_asked(project: pytest.Pytester) -> None:
    project.runpytest("--convergence", "-k", "identical").assert_outcomes(passed=1)
    assert report_files(project) == {}
    result = project.runpytest("--convergence", "--convergence-report", "always", "-k", "identical")
    result.assert_outcomes(passed=1)
    assert report_files(project) == {
        "test_candidates.py__test_identical": {
            "heatmap.png",
            "trace.json",
            "logm.png",
            *DIAGNOSTICS,
        }
    }
