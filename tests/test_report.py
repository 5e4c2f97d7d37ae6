"""One test per fragment of the failure message and of the terminal summary.

Every input is built by hand (no training), so each number in an expected line can be traced to
the input that produced it. The tests pin today's text: a deliberate change of wording shows up
as the one test of the fragment it changed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from pytest_convergence.assertions import assert_within_region
from pytest_convergence.errors import ConvergenceError
from pytest_convergence.regions import Calibration, ParameterRegion, Region, Verdict, Violation
from pytest_convergence.replay import Divergence, ReplayFinding
from pytest_convergence.report import (
    FailureContext,
    format_failure,
    summary_lines,
    summary_rows,
    summary_section,
    triage_figures,
    triage_lines,
)
from pytest_convergence.traces import CoSimulation, ParameterComparison, StepComparison, Trace
from pytest_convergence.triage import SeedOutcome, Triage

CONV = "features.3.weight"
BIAS = "classifier.bias"
REPORT_DIR = Path("convergence-report/test_fused_sgd.py__test_matches_reference")
DESCRIPTION = (
    "reference with module outputs perturbed by relative Gaussian noise 0.000488 and "
    "gradients by 0.00391, 4 draws per seed"
)
PROVENANCE = (
    "12 runs (seeds 0, 1, 2), 3 steps, torch 2.5.1, float32 on cpu, 1 thread, "
    "pytest-convergence 0.1.0"
)


def parameter(
    name: str = CONV,
    count: int = 4608,
    *,
    logms: tuple[float | None, float | None] = (-2.31408, -2.30037),
    zeros: tuple[int, int] = (0, 0),
    bias: float | None = None,
    error_norm: float = 0.0,
    non_finite: bool = False,
    nan_count: int = 0,
    inf_count: int = 0,
) -> ParameterComparison:
    """One parameter's comparison; an update equal to the reference's unless told otherwise."""
    return ParameterComparison(
        name=name,
        count=count,
        reference_logm=logms[0],
        candidate_logm=logms[1],
        reference_zeros=zeros[0],
        candidate_zeros=zeros[1],
        reference_update_norm=1.0,
        error_norm=error_norm,
        bias=bias,
        noise=0.0,
        non_finite=non_finite,
        nan_count=nan_count,
        inf_count=inf_count,
    )


def step(number: int, *parameters: ParameterComparison) -> StepComparison:
    return StepComparison(
        step=number,
        reference_loss=1.0,
        candidate_loss=1.0,
        reference_global_logm=-2.0,
        candidate_global_logm=-2.0,
        previous_global_logm=-2.0,
        parameters=parameters,
    )


def cosimulation(
    comparisons: Sequence[StepComparison] | None = None,
    *,
    module_types: dict[str, str] | None = None,
) -> CoSimulation:
    """Three steps of 'fused-sgd' on 'vgg16-mini'; at step 3 the bias has 2 zeros, then 7."""
    if comparisons is None:
        comparisons = [
            step(1, parameter(), parameter(BIAS, 10, logms=(None, None))),
            step(2, parameter(), parameter(BIAS, 10, logms=(None, None))),
            step(3, parameter(), parameter(BIAS, 10, logms=(None, None), zeros=(2, 7))),
        ]
    return CoSimulation(
        workload="vgg16-mini",
        candidate="fused-sgd",
        seed=0,
        steps=3,
        dtype="float32",
        device="cpu",
        reference=Trace("reference"),
        comparisons=list(comparisons),
        module_types={CONV: "Conv2d", BIAS: "Linear"} if module_types is None else module_types,
    )


FIRST = Violation(2, CONV, "update bias (z-score)", 13.7, 2.1)
SECOND = Violation(3, CONV, "update bias over steps 1-3 (z-score)", 9.0, 2.1)
THIRD = Violation(3, BIAS, "zero count change", 5, 2)


def verdict(
    *violations: Violation,
    gap: float = 4.1e-05,
    gap_limit: float = 6.0e-05,
    undefined_from: int | None = None,
) -> Verdict:
    found = list(violations) or [FIRST, SECOND, THIRD]
    return Verdict(
        checks=84,
        violations=found,
        worst=max(found, key=lambda v: v.ratio),
        global_logm_gap=gap,
        global_logm_gap_limit=gap_limit,
        global_logm_undefined_from=undefined_from,
    )


def parameter_region(name: str, count: int, *, zero_change_limit: int = 2) -> ParameterRegion:
    """Bias centered on 0 with spread 1, no noise allowed, at most two zeros gained or lost."""
    steps = 3
    return ParameterRegion(
        name=name,
        count=count,
        bias_center=(0.0,) * steps,
        bias_spread=1.0,
        bias_z_limit=6.0,
        radial_center=(0.0,) * steps,
        radial_spread=1.0,
        radial_z_limit=6.0,
        error_scale=(1.0,) * steps,
        noise_scale=(1.0,) * steps,
        noise_limit=(1.0,) * steps,
        noise_log_spread=0.5,
        noise_z_limit=6.0,
        zero_change_limit=zero_change_limit,
        logm_gap_limit=1e-3,
        rounding_scale=(0.0,) * steps,
    )


def region() -> Region:
    return Region(
        calibration=Calibration(
            kind="reference-perturbation",
            description=DESCRIPTION,
            tolerance=2.0**-11,
            draws=4,
            candidate=None,
            seeds=(0, 1, 2),
            steps=3,
            gradient_tolerance=2.0**-8,
        ),
        parameters={CONV: parameter_region(CONV, 4608), BIAS: parameter_region(BIAS, 10)},
        global_logm_delta=(-1e-4, 1e-4),
        global_logm_gap_limit=6.0e-05,
    )


def context(report_dir: Path | None = None, report_files: Sequence[Path] = ()) -> FailureContext:
    return FailureContext(
        baseline_path=Path("baselines/vgg16-mini.json"),
        provenance=PROVENANCE,
        reproduce="pytest --convergence tests/test_fused_sgd.py::test_matches_reference",
        rerecord=(
            "pytest --convergence --convergence-record "
            "tests/test_fused_sgd.py::test_matches_reference"
        ),
        report_dir=report_dir,
        report_files=report_files,
    )


def message(
    run: CoSimulation | None = None,
    judged: Verdict | None = None,
    failure_context: FailureContext | None = None,
    replay: ReplayFinding | None = None,
) -> list[str]:
    """The failure message's lines for these inputs (the defaults for the rest)."""
    text = format_failure(
        cosimulation() if run is None else run,
        verdict() if judged is None else judged,
        region(),
        context() if failure_context is None else failure_context,
        replay,
    )
    return text.split("\n")


def line(lines: Sequence[str], start: str) -> str:
    """The one line that starts with ``start``."""
    found = [text for text in lines if text.startswith(start)]
    assert len(found) == 1, f"{len(found)} lines start with {start!r}: {lines}"
    return found[0]


def table(lines: Sequence[str]) -> list[str]:
    """The violation table: its header and the lines after it up to the first unindented one."""
    start = next(i for i, text in enumerate(lines) if text.startswith("  step  parameter"))
    rows = [lines[start]]
    for text in lines[start + 1 :]:
        if not text.startswith("  "):
            break
        rows.append(text)
    return rows


# The failure message


def test_the_headline_names_the_candidate_the_workload_and_the_baseline() -> None:
    assert message()[0] == (
        "candidate 'fused-sgd' left the divergence region of 'vgg16-mini' "
        "(baselines/vgg16-mini.json)"
    )


def test_the_message_reads_verdict_where_how_widespread_calibration_then_next_actions() -> None:
    lines = message(
        failure_context=context(REPORT_DIR, [REPORT_DIR / "trace.json"]),
        replay=ReplayFinding(2, 3.5e-4, None, 12),
    )
    starts = [text.split(":")[0].split(" (")[0] for text in lines if not text.startswith("  ")]
    assert starts == [
        "candidate 'fused-sgd' left the divergence region of 'vgg16-mini'",
        "",
        "First violation",
        "",
        "Violations",
        "Replay of step 2",
        "Zero weights at step 3",
        "Region calibrated against",
        "Report",
        "Reproduce",
        "If intended",
    ]


def test_the_first_violation_gives_step_of_steps_parameter_module_type_and_weight_count() -> None:
    assert message()[2] == (
        "First violation: step 2 of 3, parameter 'features.3.weight' (Conv2d, 4,608 weights)"
    )


def test_the_first_violation_without_a_module_type_gives_the_weight_count_alone() -> None:
    lines = message(cosimulation(module_types={}))
    assert lines[2] == "First violation: step 2 of 3, parameter 'features.3.weight' (4,608 weights)"


def test_the_first_violation_without_a_comparison_gives_the_module_type_alone() -> None:
    run = cosimulation([step(1, parameter()), step(2, parameter(BIAS, 10)), step(3, parameter())])
    assert message(run)[2] == "First violation: step 2 of 3, parameter 'features.3.weight' (Conv2d)"


def test_the_first_violation_without_a_comparison_or_a_module_type_has_no_parentheses() -> None:
    run = cosimulation([step(1, parameter()), step(2, parameter(BIAS, 10))], module_types={})
    assert message(run)[2] == "First violation: step 2 of 3, parameter 'features.3.weight'"


def test_a_one_weight_parameter_is_counted_as_1_weight() -> None:
    run = cosimulation([step(2, parameter(count=1))])
    assert message(run)[2] == (
        "First violation: step 2 of 3, parameter 'features.3.weight' (Conv2d, 1 weight)"
    )


def test_the_value_stands_beside_its_limit_with_how_many_times_over() -> None:
    assert message()[3] == "  update bias (z-score) = 1.37e+01, limit 2.10e+00 (6.52x over)"


def test_a_ratio_just_over_one_reads_1_04x_over() -> None:
    judged = verdict(Violation(2, CONV, "update noise", 1.04, 1.0))
    assert message(judged=judged)[3] == "  update noise = 1.04e+00, limit 1.00e+00 (1.04x over)"


def test_a_value_barely_over_its_limit_gets_the_digits_that_tell_them_apart() -> None:
    judged = verdict(Violation(2, CONV, "update noise", 1.0004, 1.0))
    assert message(judged=judged)[3] == (
        "  update noise = 1.0004e+00, limit 1.0000e+00 (1.0004x over)"
    )


def test_a_large_ratio_is_written_in_whole_times() -> None:
    judged = verdict(Violation(2, CONV, "update noise", 12345.0, 1.0))
    assert message(judged=judged)[3] == "  update noise = 1.23e+04, limit 1.00e+00 (12,345x over)"


def test_an_infinite_value_reads_inf_and_non_finite() -> None:
    judged = verdict(Violation(2, CONV, "update noise", math.inf, 2.0))
    assert message(judged=judged)[3] == "  update noise = inf, limit 2.00e+00 (non-finite)"


def test_non_finite_weights_give_their_nan_and_inf_counts() -> None:
    run = cosimulation([step(2, parameter(logms=(-2.31408, None), nan_count=3, inf_count=1))])
    judged = verdict(Violation(2, CONV, "non-finite weights", 4, 0))
    assert message(run, judged)[3] == (
        "  non-finite weights = 4 (3 NaN, 1 Inf), limit 0: the candidate's weights, and LoGM, "
        "are undefined from this step on"
    )


def test_a_finite_value_over_a_zero_limit_reads_over_a_zero_limit() -> None:
    judged = verdict(Violation(2, CONV, "update where the reference has none", 1e-3, 0.0))
    assert message(judged=judged)[3] == (
        "  update where the reference has none = 1.00e-03, limit 0.00e+00 (over a zero limit)"
    )


def test_integer_values_and_limits_are_written_as_integers() -> None:
    judged = verdict(Violation(2, CONV, "zero count change", 5, 2))
    assert message(judged=judged)[3] == "  zero count change = 5, limit 2 (2.5x over)"


def test_an_integral_float_is_written_in_exponent_notation() -> None:
    judged = verdict(Violation(2, CONV, "update noise", 5.0, 2.0))
    assert message(judged=judged)[3] == "  update noise = 5.00e+00, limit 2.00e+00 (2.5x over)"


def test_a_nan_value_reads_nan_and_not_a_number() -> None:
    judged = verdict(Violation(2, CONV, "update noise", math.nan, 2.0))
    assert message(judged=judged)[3] == "  update noise = nan, limit 2.00e+00 (not a number)"


def test_a_negative_value_keeps_its_sign_and_the_ratio_takes_its_magnitude() -> None:
    judged = verdict(Violation(2, CONV, "update bias (z-score)", -13.7, 2.1))
    assert message(judged=judged)[3] == (
        "  update bias (z-score) = -1.37e+01, limit 2.10e+00 (6.52x over)"
    )


def test_a_worst_violation_other_than_the_first_follows_it() -> None:
    judged = verdict(
        Violation(2, CONV, "update noise", 1.04, 1.0), Violation(3, BIAS, "zero count change", 8, 2)
    )
    lines = message(judged=judged)
    assert lines[5:7] == [
        "Worst violation: step 3 of 3, parameter 'classifier.bias' (Linear, 10 weights)",
        "  zero count change = 8, limit 2 (4x over)",
    ]


def test_there_is_no_worst_violation_line_when_the_first_is_the_worst() -> None:
    assert not [text for text in message() if text.startswith("Worst violation")]


def test_the_logm_line_gives_both_logms_and_their_gap() -> None:
    assert message()[4] == "  LoGM: reference -2.31408, candidate -2.30037, |diff| 1.37e-02"


@pytest.mark.parametrize("logms", [(None, -2.30037), (-2.31408, None)])
def test_there_is_no_logm_line_when_a_logm_is_missing(
    logms: tuple[float | None, float | None],
) -> None:
    run = cosimulation([step(2, parameter(logms=logms))])
    lines = message(run)
    assert not [text for text in lines if text.startswith("  LoGM")]
    assert lines[3:5] == ["  update bias (z-score) = 1.37e+01, limit 2.10e+00 (6.52x over)", ""]


def test_there_is_no_logm_line_without_a_comparison() -> None:
    run = cosimulation([step(2, parameter(BIAS, 10))])
    assert not [text for text in message(run) if text.startswith("  LoGM")]


def test_the_spread_line_counts_violations_out_of_checks_and_says_the_gap_stayed_inside() -> None:
    assert line(message(), "Violations:") == (
        "Violations: 3 of 84 checks, at 3 of 6 (step, parameter) pairs; "
        "global LoGM gap stayed inside (4.1e-05 <= 6.0e-05)"
    )


def test_the_spread_line_says_when_the_gap_left_its_calibration_range() -> None:
    judged = verdict(gap=7.5e-05)
    assert line(message(judged=judged), "Violations:") == (
        "Violations: 3 of 84 checks, at 3 of 6 (step, parameter) pairs; "
        "global LoGM gap left its calibration range (7.5e-05 > 6.0e-05)"
    )


def test_a_gap_equal_to_its_limit_stayed_inside() -> None:
    judged = verdict(gap=6.0e-05)
    assert line(message(judged=judged), "Violations:").endswith(
        "global LoGM gap stayed inside (6.0e-05 <= 6.0e-05)"
    )


def test_a_gap_just_over_its_limit_gets_the_digits_that_tell_them_apart() -> None:
    judged = verdict(gap=6.04e-05)
    assert line(message(judged=judged), "Violations:").endswith(
        "global LoGM gap left its calibration range (6.04e-05 > 6.00e-05)"
    )


def test_the_spread_line_says_when_the_candidates_global_logm_became_undefined() -> None:
    judged = verdict(gap=0.0, undefined_from=2)
    assert line(message(judged=judged), "Violations:").endswith(
        "global LoGM gap undefined from step 2 (the candidate's global LoGM is undefined)"
    )


def test_the_table_header_names_and_aligns_its_columns() -> None:
    header = table(message())[0]
    assert header == (
        "  step  parameter                    check                                      "
        "     value      limit   ref LoGM  cand LoGM"
    )
    assert [header.index(name) + len(name) for name in ("step", "value", "limit")] == [6, 90, 101]
    assert header.index("parameter") == 8
    assert header.index("check") == 37


def test_a_table_row_gives_step_parameter_check_value_limit_and_both_logms() -> None:
    assert table(message())[1] == (
        "     2  features.3.weight            update bias (z-score)                      "
        "  1.37e+01   2.10e+00   -2.31408   -2.30037"
    )


def test_a_table_row_writes_a_dash_for_a_missing_logm_and_integers_as_integers() -> None:
    assert table(message())[3] == (
        "     3  classifier.bias              zero count change                          "
        "         5          2          -          -"
    )


def test_a_table_row_without_a_comparison_writes_dashes_for_both_logms() -> None:
    run = cosimulation([step(2, parameter(BIAS, 10))])
    assert table(message(run))[1].endswith("  1.37e+01   2.10e+00          -          -")


def test_a_table_row_cuts_long_parameter_and_check_names_to_their_columns() -> None:
    name = "encoder.layers.11.attention.out_proj.weight"
    check = "update bias over steps 1-3 (z-score), combined over every seed"
    run = cosimulation([step(2, parameter(name))])
    assert table(message(run, verdict(Violation(2, name, check, 9.0, 2.1))))[1] == (
        "     2  encoder.layers.11.attention. update bias over steps 1-3 (z-score), comb "
        "  9.00e+00   2.10e+00   -2.31408   -2.30037"
    )


def test_the_table_lists_the_violations_in_their_order() -> None:
    rows = table(message())
    assert [row.split()[:2] for row in rows[1:]] == [["2", CONV], ["3", CONV], ["3", BIAS]]


def test_a_table_of_exactly_ten_violations_has_no_more_line() -> None:
    violations = [Violation(2, CONV, f"check {i}", 9.0, 2.1) for i in range(10)]
    rows = table(message(judged=verdict(*violations)))
    assert len(rows) == 11
    assert not [row for row in rows if "more violations" in row]


def test_a_longer_table_is_capped_at_ten_rows_and_says_how_many_more() -> None:
    violations = [Violation(2, CONV, f"check {i}", 9.0, 2.1) for i in range(12)]
    written = context(REPORT_DIR, [REPORT_DIR / "trace.json"])
    rows = table(message(judged=verdict(*violations), failure_context=written))
    assert len(rows) == 12
    assert rows[-1] == "  ... 2 more violations (full list in the report's trace.json)"


def test_without_a_report_the_more_line_says_how_to_get_the_full_list() -> None:
    violations = [Violation(2, CONV, f"check {i}", 9.0, 2.1) for i in range(11)]
    lines = message(judged=verdict(*violations), failure_context=context(report_dir=None))
    assert (
        "  ... 1 more violation (no report was written; --convergence-report-dir DIR keeps the "
        "full list in a trace.json)"
    ) in lines
    assert not [text for text in lines if text.startswith("Report:")]


def test_the_replay_line_names_the_first_module_whose_forward_output_diverged() -> None:
    finding = ReplayFinding(
        2, 3.5e-4, Divergence("forward output", "features.3", "Conv2d", 1.5e-3, 4.2e-2), 12
    )
    assert line(message(replay=finding), "First module") == (
        "First module whose output diverged at step 2: features.3 (Conv2d), "
        "max abs. error 1.50e-03, max rel. error 4.20e-02 (threshold 3.5e-04)"
    )


def test_the_replay_line_names_the_first_gradient_that_diverged() -> None:
    finding = ReplayFinding(
        2, 3.5e-4, Divergence("gradient", "classifier.bias", "Linear", 2.5e-2, 1.25), 12
    )
    assert line(message(replay=finding), "First gradient") == (
        "First gradient that diverged at step 2: classifier.bias (Linear), "
        "max abs. error 2.50e-02, max rel. error 1.25e+00 (threshold 3.5e-04)"
    )


def test_the_replay_line_says_when_forward_and_backward_agree() -> None:
    finding = ReplayFinding(2, 3.5e-4, None, 12)
    assert line(message(replay=finding), "Replay of step") == (
        "Replay of step 2: forward outputs of 12 modules and all gradients agree within "
        "3.5e-04; the divergence arises after backward "
        "(gradient transform, exchange or optimizer step)"
    )


def test_the_replay_line_counts_one_module_as_one_module() -> None:
    assert (
        ReplayFinding(2, 3.5e-4, None, 1)
        .describe()
        .startswith("Replay of step 2: forward outputs of 1 module and all gradients agree")
    )


def test_the_replay_line_says_when_gradients_were_not_compared() -> None:
    finding = ReplayFinding(2, 3.5e-4, None, 12, gradients_compared=False)
    assert line(message(replay=finding), "Replay of step") == (
        "Replay of step 2: forward outputs of 12 modules agree within 3.5e-04; gradients not "
        "compared (the candidate's step_fn computes its own); the divergence arises after the "
        "forward pass"
    )


def test_the_replay_line_follows_the_table() -> None:
    lines = message(replay=ReplayFinding(2, 3.5e-4, None, 12))
    assert lines[lines.index(table(lines)[-1]) + 1].startswith("Replay of step 2:")


def test_there_is_no_replay_line_without_a_replay() -> None:
    lines = message(replay=None)
    assert lines[lines.index(table(lines)[-1]) + 1].startswith("Zero weights")
    assert not [text for text in lines if "Replay" in text or "diverged at" in text]


def test_the_zero_weights_line_gives_the_violating_parameters_that_have_zeros() -> None:
    assert line(message(), "Zero weights") == (
        "Zero weights at step 3 (reference/candidate): classifier.bias 2/7"
    )


def test_the_zero_weights_line_leaves_out_parameters_that_did_not_violate() -> None:
    lines = message(judged=verdict(THIRD))
    assert line(lines, "Zero weights") == (
        "Zero weights at step 3 (reference/candidate): classifier.bias 2/7"
    )


def test_there_is_no_zero_weights_line_when_no_violating_parameter_has_zeros() -> None:
    run = cosimulation([step(2, parameter()), step(3, parameter("other.weight"))])
    assert not [text for text in message(run) if text.startswith("Zero weights")]
    assert not [text for text in message(judged=verdict(FIRST)) if text.startswith("Zero")]


def test_the_zero_weights_line_says_when_no_step_ran() -> None:
    assert line(message(cosimulation([])), "Zero weights") == "Zero weights: no step ran"


def test_the_calibration_line_gives_the_regions_calibration_and_provenance() -> None:
    assert line(message(), "Region calibrated against") == (
        f"Region calibrated against: {DESCRIPTION}; {PROVENANCE}"
    )


def test_the_report_line_lists_the_files_written() -> None:
    files = [REPORT_DIR / "trace.json", REPORT_DIR / "logm.png"]
    assert line(message(failure_context=context(REPORT_DIR, files)), "Report:") == (
        "Report: convergence-report/test_fused_sgd.py__test_matches_reference "
        "(trace.json, logm.png)"
    )


def test_the_report_line_says_what_notes_txt_holds() -> None:
    files = [REPORT_DIR / "trace.json", REPORT_DIR / "notes.txt"]
    assert line(message(failure_context=context(REPORT_DIR, files)), "Report:") == (
        "Report: convergence-report/test_fused_sgd.py__test_matches_reference "
        "(trace.json, notes.txt); notes.txt says which diagnostics could not be computed"
    )


def test_the_report_line_without_files_gives_the_folder_alone() -> None:
    assert line(message(failure_context=context(REPORT_DIR)), "Report:") == (
        "Report: convergence-report/test_fused_sgd.py__test_matches_reference"
    )


def test_there_is_no_report_line_without_a_report_folder() -> None:
    assert not [text for text in message() if text.startswith("Report")]


def test_the_reproduce_line_gives_the_command_aligned_with_the_if_intended_one() -> None:
    lines = message()
    assert lines[-2] == (
        "Reproduce:   pytest --convergence tests/test_fused_sgd.py::test_matches_reference"
    )
    assert lines[-2].index("pytest") == lines[-1].index("pytest")


def test_the_if_intended_line_gives_the_rerecord_command_and_what_to_do_after() -> None:
    assert message()[-1] == (
        "If intended: pytest --convergence --convergence-record "
        "tests/test_fused_sgd.py::test_matches_reference  (review the diff, commit)"
    )


def test_format_failure_refuses_a_passing_verdict() -> None:
    with pytest.raises(AssertionError, match="format_failure needs a failing verdict"):
        format_failure(cosimulation(), Verdict(checks=84), region(), context())


# The terminal summary

FAILED_ROW: dict[str, object] = {
    "workload": "tiny",
    "candidate": "halved-last-layer",
    "steps": 3,
    "verdict": "failed",
    "worst_ratio": 6.5238,
    "baseline": "baselines/tiny.json",
    "first_violation": "step 1 2.weight: update bias (z-score)",
    "nodeid": "test_candidates.py::test_halved_layer",
}
PASSED_ROW: dict[str, object] = {
    "workload": "tiny",
    "candidate": "fp16",
    "steps": 3,
    "verdict": "passed",
    "worst_ratio": 0.4213,
    "baseline": "baselines/tiny.json",
    "first_violation": "",
    "nodeid": "test_candidates.py::test_fp16",
}


def test_the_summary_header_names_and_aligns_its_columns() -> None:
    assert summary_lines([])[0] == (
        "verdict   worst/limit  workload           candidate                  steps  test"
    )


def test_a_summary_row_gives_verdict_worst_ratio_workload_candidate_steps_and_test() -> None:
    assert summary_lines([PASSED_ROW])[1] == (
        "passed          0.421  tiny               fp16                           3  "
        "test_candidates.py::test_fp16"
    )


def test_a_summary_row_cuts_long_workload_and_candidate_names_to_their_columns() -> None:
    row = dict(
        PASSED_ROW,
        workload="resnet18-cifar10-large-batch",
        candidate="int8-gradients-with-error-feedback",
        nodeid="tests/test_compression.py::test_int8_error_feedback[resnet18-cifar10-large-batch]",
    )
    assert summary_lines([row])[1] == (
        "passed          0.421  resnet18-cifar10-l int8-gradients-with-error-     3  "
        "tests/test_compression.py::test_int8_error_feedback[resnet18-cifar10-large-batch]"
    )


def test_a_summary_ratio_has_three_significant_digits() -> None:
    ratios = [12345.0, 6.5238, math.inf, 0.0]
    rows = [dict(PASSED_ROW, worst_ratio=ratio) for ratio in ratios]
    assert [text[:21] for text in summary_lines(rows)[1:]] == [
        "passed            inf",
        "passed       1.23e+04",
        "passed           6.52",
        "passed              0",
    ]


def test_the_summary_puts_the_worst_check_first() -> None:
    rows = [PASSED_ROW, FAILED_ROW, dict(PASSED_ROW, nodeid="b.py::test", worst_ratio=0.9)]
    lines = summary_lines(rows)
    assert [text.split()[-1] for text in lines if not text.startswith(" ")][1:] == [
        "test_candidates.py::test_halved_layer",
        "b.py::test",
        "test_candidates.py::test_fp16",
    ]


def test_summary_rows_of_equal_ratio_keep_their_order() -> None:
    rows = [dict(PASSED_ROW, nodeid=f"t.py::test_{i}") for i in (3, 1, 2)]
    assert [text.split()[-1] for text in summary_lines(rows)[1:]] == [
        "t.py::test_3",
        "t.py::test_1",
        "t.py::test_2",
    ]


def test_a_failed_row_is_followed_by_its_first_violation_under_the_workload_column() -> None:
    lines = summary_lines([FAILED_ROW])
    assert lines[1:] == [
        "failed           6.52  tiny               halved-last-layer              3  "
        "test_candidates.py::test_halved_layer",
        "                       first violation: step 1 2.weight: update bias (z-score)",
    ]
    assert lines[2].index("first") == lines[0].index("workload")


def test_a_row_without_a_first_violation_has_no_sub_line() -> None:
    assert len(summary_lines([PASSED_ROW])) == 2


def test_a_row_without_figures_shows_a_question_mark_and_a_dash_not_a_clean_pass() -> None:
    assert summary_lines([{"nodeid": "t.py::test_unchecked"}])[1] == (
        "?                   -                                                       "
        "t.py::test_unchecked"
    )


def test_a_row_whose_ratio_is_not_a_number_shows_a_dash_and_sorts_first() -> None:
    rows = [PASSED_ROW, dict(PASSED_ROW, worst_ratio="6.5", nodeid="t.py::text")]
    assert [text[:21] for text in summary_lines(rows)[1:]] == [
        "passed              -",
        "passed          0.421",
    ]


def test_an_errored_row_shows_a_dash_first_and_is_followed_by_the_error() -> None:
    errored: dict[str, object] = {
        "workload": "tiny",
        "candidate": "fp16",
        "steps": 3,
        "verdict": "error",
        "baseline": "baselines/tiny.json",
        "first_violation": "",
        "error": "ZeroDivisionError: float division by zero",
        "nodeid": "t.py::test_errored",
    }
    assert summary_lines([FAILED_ROW, errored])[1:4] == [
        "error               -  tiny               fp16                           3  "
        "t.py::test_errored",
        "                       error: ZeroDivisionError: float division by zero",
        "failed           6.52  tiny               halved-last-layer              3  "
        "test_candidates.py::test_halved_layer",
    ]


def test_summary_rows_keep_the_checks_figures_without_their_prefix_and_add_the_node_id() -> None:
    properties = [
        ("convergence_workload", "tiny"),
        ("owner", "kernels-team"),
        ("convergence_verdict", "passed"),
        ("convergence_worst_ratio", 0.4213),
    ]
    assert summary_rows(properties, "t.py::test") == [
        {"workload": "tiny", "verdict": "passed", "worst_ratio": 0.4213, "nodeid": "t.py::test"}
    ]


def test_summary_rows_are_empty_for_a_test_that_made_no_check() -> None:
    assert summary_rows([("owner", "kernels-team")], "t.py::test") == []


def test_summary_rows_of_a_test_with_two_checks_are_one_row_per_check() -> None:
    properties = [
        ("convergence_candidate", "fp16"),
        ("convergence_worst_ratio", 0.4),
        ("convergence_candidate", "bf16"),
        ("convergence_worst_ratio", 0.7),
    ]
    assert summary_rows(properties, "t.py::test") == [
        {"candidate": "fp16", "worst_ratio": 0.4, "nodeid": "t.py::test"},
        {"candidate": "bf16", "worst_ratio": 0.7, "nodeid": "t.py::test"},
    ]


def test_summary_section_lists_the_checks_then_each_recorded_baseline() -> None:
    changes = {
        Path("baselines/tiny.json"): ["new baseline: 4 parameters, 3 steps"],
        Path("baselines/mlp.json"): ["no changes"],
    }
    assert summary_section([PASSED_ROW], changes) == [
        *summary_lines([PASSED_ROW]),
        "recorded baselines/tiny.json:",
        "  new baseline: 4 parameters, 3 steps",
        "re-recorded baselines/mlp.json:",
        "  no changes",
    ]


def test_summary_section_without_checks_has_no_header() -> None:
    changes = {Path("baselines/tiny.json"): ["no changes"]}
    assert summary_section([], changes) == ["re-recorded baselines/tiny.json:", "  no changes"]


def test_summary_section_of_a_baseline_without_changes_listed_gives_its_line_alone() -> None:
    assert summary_section([], {Path("baselines/tiny.json"): []}) == [
        "re-recorded baselines/tiny.json:"
    ]


def test_summary_section_without_checks_or_changes_is_empty() -> None:
    assert summary_section([], {}) == []


# assert_within_region


def judged_run(bias_zeros: tuple[int, int]) -> CoSimulation:
    """Three steps, updates equal to the reference's; the bias's zeros at steps 2 and 3 as
    given."""
    return cosimulation(
        [
            step(1, parameter(bias=0.0), parameter(BIAS, 10, bias=0.0)),
            step(2, parameter(bias=0.0), parameter(BIAS, 10, bias=0.0, zeros=bias_zeros)),
            step(3, parameter(bias=0.0), parameter(BIAS, 10, bias=0.0, zeros=bias_zeros)),
        ]
    )


class Replays:
    """A replay that records the steps it was asked for."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def __call__(self, step: int) -> ReplayFinding:
        self.steps.append(step)
        return ReplayFinding(step, 3.5e-4, None, 12)


def test_assert_within_region_returns_the_verdict_of_a_run_inside_the_region() -> None:
    replays = Replays()
    judged = assert_within_region(judged_run((0, 2)), region(), context(), replay=replays)
    assert judged.passed
    # 3 steps x 2 parameters x 5 checks (zero count, noise, noise over steps, bias, bias over
    # steps).
    assert judged.checks == 30
    assert replays.steps == []


def test_assert_within_region_raises_with_the_run_the_verdict_and_one_replay_of_the_step() -> None:
    run = judged_run((0, 5))
    replays = Replays()
    with pytest.raises(ConvergenceError) as raised:
        assert_within_region(run, region(), context(), replay=replays)
    assert replays.steps == [2]
    assert raised.value.run is run
    assert raised.value.verdict.violations == [
        Violation(2, BIAS, "zero count change", 5, 2),
        Violation(3, BIAS, "zero count change", 5, 2),
    ]
    assert str(raised.value) == format_failure(
        run, raised.value.verdict, region(), context(), ReplayFinding(2, 3.5e-4, None, 12)
    )
    assert "Replay of step 2: forward outputs of 12 modules" in str(raised.value)


def test_assert_within_region_without_a_replay_raises_a_message_without_a_replay_line() -> None:
    with pytest.raises(ConvergenceError) as raised:
        assert_within_region(judged_run((0, 5)), region(), context())
    assert "Replay" not in str(raised.value)
    assert str(raised.value).splitlines()[3] == "  zero count change = 5, limit 2 (2.5x over)"


def test_a_convergence_error_is_an_assertion_error() -> None:
    assert issubclass(ConvergenceError, AssertionError)


# Triage: a failure at seed 0 re-run at seeds 1 and 2.
FAILS_AT_1 = SeedOutcome(1, failed=True, worst_ratio=6.5238)
FAILS_AT_2 = SeedOutcome(2, failed=True, worst_ratio=5.91)
PASSES_AT_1 = SeedOutcome(1, worst_ratio=0.4213)
PASSES_AT_2 = SeedOutcome(2, worst_ratio=0.38)
RERUN = "pytest --convergence --convergence-seed 1 tests/test_fused_sgd.py::test_matches_reference"


def triaged(*outcomes: SeedOutcome, seconds: float = 1.234) -> Triage:
    return Triage(seed=0, outcomes=outcomes, seconds=seconds)


def test_a_triage_counts_the_further_seeds_at_which_the_failure_reproduces() -> None:
    head = triage_lines(triaged(FAILS_AT_1, PASSES_AT_2))[0]
    assert head.startswith("Triage: reproduces on 1 of 2 further seeds (")


def test_a_triage_gives_each_seeds_verdict_beside_its_worst_ratio() -> None:
    head = triage_lines(triaged(FAILS_AT_1, PASSES_AT_2))[0]
    assert "(seed 1 fails, worst 6.52x its limit; seed 2 passes, worst 0.38x its limit)" in head


def test_a_triage_says_how_long_it_took() -> None:
    assert ", in 1.2 s: " in triage_lines(triaged(FAILS_AT_1))[0]
    assert ", in 0.04 s: " in triage_lines(triaged(FAILS_AT_1, seconds=0.041))[0]


def test_a_single_further_seed_is_not_plural() -> None:
    assert "reproduces on 1 of 1 further seed (" in triage_lines(triaged(FAILS_AT_1))[0]


def test_a_failure_at_every_further_seed_reads_as_persistent() -> None:
    head = triage_lines(triaged(FAILS_AT_1, FAILS_AT_2))[0]
    assert head.endswith(": a persistent failure, not an unlucky seed 0")


def test_a_failure_that_does_not_reproduce_says_so_and_that_the_check_still_fails() -> None:
    head = triage_lines(triaged(PASSES_AT_1, PASSES_AT_2))[0]
    assert head.startswith("Triage: reproduces on 0 of 2 further seeds")
    assert head.endswith(
        ": does not reproduce, possibly an unlucky seed 0 or a marginal candidate; "
        "the check still fails"
    )


def test_a_failure_at_some_further_seeds_reads_as_seed_dependent_and_still_fails() -> None:
    head = triage_lines(triaged(PASSES_AT_1, FAILS_AT_2))[0]
    assert head.endswith(
        ": seed-dependent, a marginal candidate or a bug some seeds hide; the check still fails"
    )


def test_a_seed_that_could_not_run_is_shown_with_its_error_and_not_counted() -> None:
    errored = SeedOutcome(2, error="ValueError: batches must split evenly")
    head = triage_lines(triaged(FAILS_AT_1, errored))[0]
    assert "seed 2 could not run: ValueError: batches must split evenly)" in head
    assert head.startswith("Triage: reproduces on 1 of 2 further seeds")
    assert head.endswith(": a persistent failure, not an unlucky seed 0")


def test_a_triage_whose_seeds_all_errored_still_fails() -> None:
    head = triage_lines(triaged(SeedOutcome(1, error="RuntimeError: rank 1 died")))[0]
    assert head.endswith(": no further seed ran to a verdict; the check still fails")


def test_a_non_finite_worst_ratio_is_named() -> None:
    head = triage_lines(triaged(SeedOutcome(1, failed=True, worst_ratio=math.inf)))[0]
    assert "seed 1 fails, worst non-finite its limit" in head


def test_a_triage_says_how_to_rerun_the_first_seed_that_reproduces() -> None:
    lines = triage_lines(triaged(PASSES_AT_1, FAILS_AT_2), RERUN.replace("seed 1", "seed 2"))
    assert lines[1] == f"  Rerun seed 2: {RERUN.replace('seed 1', 'seed 2')}"


def test_a_triage_that_never_reproduces_offers_the_first_further_seed() -> None:
    assert triaged(PASSES_AT_1, PASSES_AT_2).example_seed == 1


def test_the_failure_message_gives_the_triage_before_the_region() -> None:
    text = format_failure(
        cosimulation(),
        verdict(),
        region(),
        dataclasses.replace(context(), rerun_seed=RERUN),
        triage=triaged(FAILS_AT_1, FAILS_AT_2),
    )
    lines = text.split("\n")
    start = line(lines, "Triage: ")
    assert lines[lines.index(start) + 1] == f"  Rerun seed 1: {RERUN}"
    assert lines[lines.index(start) + 2].startswith("Region calibrated against: ")


def test_a_message_without_triage_has_no_triage_line() -> None:
    assert not [text for text in message() if text.startswith("Triage")]


def test_triage_figures_give_the_fraction_each_seeds_ratio_and_the_seconds() -> None:
    errored = SeedOutcome(2, error="ValueError: x")
    assert triage_figures(triaged(FAILS_AT_1, errored)) == [
        ("triage", "1/2"),
        ("triage_ratios", "1: 6.524, 2: error"),
        ("triage_seconds", 1.23),
    ]


def test_a_triaged_row_is_followed_by_its_triage_under_the_workload_column() -> None:
    row = dict(FAILED_ROW, triage="2/2", triage_ratios="1: 6.524, 2: 5.91")
    lines = summary_lines([row])
    assert lines[3] == (
        "                       triage: reproduces on 2 of 2 further seeds "
        "(seed: worst/limit 1: 6.524, 2: 5.91)"
    )
    assert lines[3].index("triage") == lines[0].index("workload")
