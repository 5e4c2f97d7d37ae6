"""The power report as a reader meets it: its summary lines, the steps it suggests, the gaps
against a required power, and its place in a baseline file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_convergence import jsonfile
from pytest_convergence.power import (
    CATCH_MARGIN,
    FAULT_SIZES,
    FAULTS,
    MODEL,
    RATIO_CAP,
    Catch,
    FaultPower,
    PowerReport,
    parse_requirement,
    power_document,
    power_lines,
    read_power,
    required_power_gaps,
    suggest_steps,
)

SIZES = FAULT_SIZES
EARLY = Catch(0.02, 1, 30.0)


def report(
    *,
    scale: dict[str, Catch | None] | None = None,
    learning_rate: Catch | None = EARLY,
    steps: int = 8,
) -> PowerReport:
    layers = scale if scale is not None else {"fc1.weight": Catch(0.05, 3, 2.5)}
    return PowerReport(
        seed=0,
        steps=steps,
        faults=(
            FaultPower("gradient-scale", SIZES, layers),
            FaultPower("learning-rate", SIZES, {MODEL: learning_rate}),
            FaultPower("momentum", SIZES, skipped="SGD has no momentum or betas"),
        ),
    )


def test_the_summary_gives_each_fault_class_a_line_then_the_steps() -> None:
    lines = power_lines(report())
    assert lines[0] == "power (faults injected at seed 0, 8 steps):"
    assert len(lines) == 5
    assert lines[-1].startswith("  steps:")


def test_a_layer_fault_line_counts_the_layers_caught_and_gives_their_sizes() -> None:
    scale = {"a": Catch(0.05, 3, 2.0), "b": Catch(0.2, 5, 2.5), "c": Catch(0.5, 2, 9.0)}
    line = power_lines(report(scale=scale))[1]
    assert "caught on 3 of 3 layers from 5.0% to 50% (median 20%), by step 5" in line


def test_a_size_at_the_bottom_of_the_ladder_may_be_smaller_still() -> None:
    line = power_lines(report(scale={"a": Catch(0.02, 1, 4.0)}))[1]
    assert "from <=2.0%" in line


def test_a_layer_fault_line_names_the_blind_layers_then_counts_the_rest() -> None:
    scale: dict[str, Catch | None] = dict.fromkeys("abcde")
    line = power_lines(report(scale=scale))[1]
    assert "blind on a, b, c and 2 more up to 100%" in line


def test_a_model_fault_line_gives_the_size_the_step_and_the_ratio() -> None:
    line = power_lines(report(learning_rate=Catch(0.1, 2, 3.25)))[2]
    assert line.endswith("caught from 10% at step 2 (3.25x its limit)")


def test_a_model_fault_caught_at_no_size_is_blind() -> None:
    line = power_lines(report(learning_rate=None))[2]
    assert line.endswith("blind: not caught at twice a limit up to 100%")


def test_a_skipped_fault_says_why() -> None:
    assert power_lines(report())[3].endswith("not injected: SGD has no momentum or betas")


def test_steps_are_suggested_down_to_the_last_step_any_catch_needs() -> None:
    suggestion = suggest_steps(report(scale={"a": Catch(0.05, 3, 2.0)}))
    assert suggestion.steps == 3
    assert "steps=3 keeps this power at 38% of the check's time" in suggestion.text


def test_no_fewer_steps_are_suggested_when_a_catch_needs_the_last_step() -> None:
    suggestion = suggest_steps(report(scale={"a": Catch(0.05, 8, 2.0)}))
    assert suggestion.steps is None
    assert "all 8 used" in suggestion.text


def test_a_blind_class_is_named_in_the_steps_suggestion() -> None:
    suggestion = suggest_steps(report(scale={"a": None}))
    assert "gradient-scale blind on some target at every size: more steps" in suggestion.text


@pytest.mark.parametrize(
    ("text", "expected"),
    [("gradient-scale 0.1", ("gradient-scale", 0.1)), ("  momentum   1  ", ("momentum", 1.0))],
)
def test_a_requirement_is_a_fault_class_and_a_size(text: str, expected: tuple) -> None:
    assert parse_requirement(text, "ini") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gradient-scale", "is not 'FAULT SIZE'"),
        ("gradient-scal 0.1", "unknown fault class 'gradient-scal'; known: gradient-scale"),
        ("momentum much", "size 'much' of momentum is not a number"),
        ("momentum 1.5", "size 1.5 of momentum must be in (0, 1]"),
        ("momentum nan", "must be in (0, 1]"),
    ],
)
def test_a_bad_requirement_is_a_value_error_naming_where(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^ini option x: ") as caught:
        parse_requirement(text, "ini option x")
    assert message in str(caught.value)


def test_a_required_size_a_layer_is_caught_later_than_is_a_gap_naming_the_layer() -> None:
    scale = {"fc1.weight": Catch(0.2, 4, 2.0), "fc2.weight": Catch(0.05, 2, 3.0), "b": None}
    gaps = required_power_gaps(report(scale=scale), [("gradient-scale", 0.1)])
    assert gaps == [
        "gradient-scale required at 10%, caught later on fc1.weight (from 20%), b (blind)"
    ]


def test_a_requirement_the_report_meets_leaves_no_gap() -> None:
    assert required_power_gaps(report(), [("gradient-scale", 0.05), ("learning-rate", 0.1)]) == []


def test_a_required_fault_that_was_not_injected_is_a_gap_saying_why() -> None:
    gaps = required_power_gaps(report(), [("momentum", 0.5)])
    assert gaps == ["momentum not injected (SGD has no momentum or betas)"]


def test_a_requirement_against_a_baseline_without_a_report_is_one_gap() -> None:
    assert required_power_gaps(None, [("momentum", 0.5)]) == [
        "the baseline has no power report (recorded before it existed, or by a DDP check)"
    ]
    assert required_power_gaps(None, []) == []


catches = st.one_of(
    st.none(),
    st.builds(
        Catch,
        size=st.sampled_from(SIZES),
        step=st.integers(1, 50),
        ratio=st.floats(CATCH_MARGIN, RATIO_CAP),
    ),
)


@given(st.dictionaries(st.text(min_size=1, max_size=12), catches, min_size=1, max_size=6))
def test_a_report_reads_back_from_its_document_as_it_was(layers: dict) -> None:
    written = report(scale=layers)
    text = json.dumps(power_document(written), allow_nan=False)
    assert read_power(jsonfile.decode(text), "power") == written


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["faults"].update(bogus={"sizes": [1.0], "caught": {}}), "unknown fault"),
        (lambda d: d["faults"]["gradient-scale"].pop("caught"), "exactly one of"),
        (lambda d: d["faults"]["momentum"].update(caught={}), "exactly one of"),
        (lambda d: d["faults"]["momentum"].update(sizes=[0.5, 0.1]), "increasing sizes"),
        (
            lambda d: d["faults"]["gradient-scale"]["caught"]["fc1.weight"].update(ratio=0.5),
            'power.faults["gradient-scale"].caught["fc1.weight"].ratio: a catch is at least 2x '
            "its limit, found ratio 0.5",
        ),
        (
            lambda d: d["faults"]["gradient-scale"]["caught"]["fc1.weight"].update(step=0),
            "step: must be at least 1",
        ),
    ],
)
def test_a_damaged_report_is_refused_at_its_place(edit, message: str) -> None:
    document = json.loads(json.dumps(power_document(report())))
    edit(document)
    with pytest.raises(jsonfile.DocumentError) as caught:
        read_power(document, "power")
    assert message in str(caught.value)


def test_every_fault_class_has_a_known_scope() -> None:
    assert {fault.scope for fault in FAULTS} == {"layer", "model"}
    assert len({fault.name for fault in FAULTS}) == len(FAULTS)


def test_a_baseline_keeps_its_power_report(tmp_path: Path) -> None:
    from dataclasses import replace

    from pytest_convergence.baselines import load_baseline, save_baseline
    from tests.test_baselines import PROVENANCE, small_region

    region = replace(small_region(), power=report())
    path = save_baseline(tmp_path / "b.json", region, PROVENANCE)
    assert load_baseline(path).region.power == report()
    assert json.loads(path.read_text())["schema_version"] == 6


def test_a_version_5_baseline_reads_as_one_without_a_power_report(tmp_path: Path) -> None:
    from pytest_convergence.baselines import load_baseline, save_baseline
    from tests.test_baselines import PROVENANCE, small_region

    path = save_baseline(tmp_path / "b.json", small_region(), PROVENANCE)
    document = json.loads(path.read_text())
    assert "power" not in document
    document["schema_version"] = 5
    path.write_text(json.dumps(document))
    assert load_baseline(path).region.power is None
