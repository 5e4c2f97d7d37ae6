"""LoGM-delta regions: the paper's published ones, and building one from a healthy run's step
LoGMs."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_convergence import __version__
from pytest_convergence.paper_regions import (
    PAPER_CITATION,
    PAPER_REGIONS,
    StepLogm,
    load_region,
    measured_region,
    paper_region,
)

REPOSITORY = Path(__file__).resolve().parent.parent
PAPER_FILES = {key: REPOSITORY / "baselines" / f"paper-{key}.json" for key in PAPER_REGIONS}
MOMENT = datetime(2026, 11, 23, 17, 43, 36, tzinfo=timezone.utc)


def run(*logms: float) -> list[StepLogm]:
    return [StepLogm(step, value, f"step{step}.pt") for step, value in enumerate(logms)]


@given(st.lists(st.floats(-3.0, 0.0), min_size=2, max_size=20))
def test_a_per_iteration_region_spans_min_to_max_of_neighbouring_deltas(
    logms: list[float],
) -> None:
    region = measured_region(run(*logms))

    deltas = [after - before for before, after in itertools.pairwise(logms)]
    assert (region.low, region.high) == (min(deltas), max(deltas))
    assert [d.delta for d in region.deltas] == deltas
    assert region.granularity == "iteration"


def test_it_records_where_the_numbers_came_from() -> None:
    region = measured_region(
        run(-1.0, -1.1, -1.05), model="mlp", sha256=["a" * 64, None, "b" * 64], created=MOMENT
    )

    assert region.model == "mlp"
    assert region.provenance.source == "measured"
    assert region.provenance.description == "measured from 3 snapshots, steps 0..2"
    assert region.provenance.created == "2026-11-23T17:43:36+00:00"
    assert region.provenance.plugin_version == __version__
    assert [(s.path, s.step, s.sha256) for s in region.snapshots] == [
        ("step0.pt", 0, "a" * 64),
        ("step1.pt", 1, None),
        ("step2.pt", 2, "b" * 64),
    ]


@pytest.mark.parametrize(
    ("option", "expected_ends"),
    [({"iterations_per_epoch": 2}, [2, 4]), ({"epoch_every": 3}, [3])],
)
def test_a_per_epoch_region_takes_deltas_between_epoch_boundaries(
    option: dict[str, int], expected_ends: list[int]
) -> None:
    region = measured_region(run(-1.0, -1.1, -1.2, -1.3, -1.5), **option)

    assert region.granularity == "epoch"
    assert [d.to_step for d in region.deltas] == expected_ends
    assert region.provenance.iterations_per_epoch == option.get("iterations_per_epoch")
    assert region.provenance.epoch_every == option.get("epoch_every")
    assert len(region.snapshots) == 5


def test_the_margin_widens_both_ends_by_a_share_of_the_largest_delta() -> None:
    region = measured_region(run(-1.0, -1.5, -1.25), margin=0.1)

    assert region.low == pytest.approx(-0.5 - 0.05)
    assert region.high == pytest.approx(0.25 + 0.05)
    assert region.margin == 0.1


def test_too_few_snapshots_or_epoch_boundaries_are_value_errors() -> None:
    with pytest.raises(ValueError, match="at least one delta"):
        measured_region(run(-1.0))
    with pytest.raises(ValueError, match="no snapshot at epoch boundary step 2"):
        measured_region(
            [StepLogm(0, -1.0, "a.pt"), StepLogm(4, -1.1, "b.pt")], iterations_per_epoch=2
        )


@pytest.mark.parametrize("key", PAPER_REGIONS)
def test_the_shipped_paper_region_files_hold_table_1_with_provenance(key: str) -> None:
    region = load_region(PAPER_FILES[key])

    published = PAPER_REGIONS[key]
    assert (region.low, region.high) == (published.low, published.high)
    assert region.model == published.model
    assert region.granularity == "epoch"
    assert region.provenance.source == "paper"
    assert region.provenance.paper == PAPER_CITATION
    assert region.provenance.dataset == "ImageNet (full size)"
    assert region.provenance.framework == "Intel Caffe"
    assert region == replace(paper_region(key), provenance=region.provenance)


def test_the_paper_regions_are_the_published_numbers() -> None:
    assert {key: (r.low, r.high) for key, r in PAPER_REGIONS.items()} == {
        "googlenet-v1": (-0.09817, 0.09665),
        "vgg16": (-0.13456, 0.01279),
        "resnet50": (-0.03719, 0.03691),
    }
