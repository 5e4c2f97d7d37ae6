"""The pytest-convergence command: every subcommand, its exit codes, and its refusals."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import shutil
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

import pytest_convergence as pc
from pytest_convergence import snapshots
from pytest_convergence.cli import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_OUTSIDE,
    CliError,
    ProgressBar,
    main,
    order_by_step,
    step_from_name,
)
from pytest_convergence.paper_regions import (
    PAPER_CITATION,
    PAPER_REGIONS,
    REGION_SCHEMA,
    RegionFileError,
    load_region,
    paper_region,
)
from tests.test_html_report import make_run

STEPS = 7
REPOSITORY = Path(__file__).resolve().parent.parent
PAPER_FILES = {key: REPOSITORY / "baselines" / f"paper-{key}.json" for key in PAPER_REGIONS}
SUFFIXES = [".pt", ".safetensors", ".npz", ".onnx"]


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained a few steps, one snapshot per step (stored steps 0..6)."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for step in range(STEPS):
        pc.save_snapshot(model, folder / f"step{step}.safetensors", step=step)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return folder


@pytest.fixture(scope="module")
def measured_region(healthy_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("region") / "region.json"
    assert main(["region", str(healthy_run), "--out", str(out)]) == EXIT_OK
    return out


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot_at(run: Path, step: int) -> Path:
    return run / f"step{step}.safetensors"


def global_logm(path: Path) -> float:
    return pc.logm(pc.load_snapshot(path))


def sample_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 5, generator=generator)
    weight[0, :2] = 0.0
    return {
        "conv.weight": weight,
        "conv.bias": torch.randn(5, generator=generator).to(torch.float16),
        "head.weight": torch.randn(3, 5, generator=generator, dtype=torch.float64),
    }


def assert_one_line_error(err: str, *needles: str) -> None:
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert err.startswith("pytest-convergence ")
    for needle in needles:
        assert needle in err


# --- logm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_logm_prints_global_and_per_parameter_figures_for_every_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    path = pc.save_snapshot(sample_weights(), tmp_path / f"model{suffix}", step=3)

    code, out, err = run_cli(capsys, "logm", path)

    assert code == EXIT_OK
    assert err == ""
    assert f"(step 3): global LoGM {global_logm(path):.6f} over 50 weights (2 zeros)" in out
    for line, name in zip(out.splitlines()[2:], sample_weights(), strict=True):
        assert line.split()[0] == name
    assert "[6, 5]  float32" in out
    assert "float16" in out


def test_logm_json_parses_and_agrees_with_the_library(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = pc.save_snapshot({**sample_weights(), "steps": torch.tensor(4)}, tmp_path / "m.pt")

    code, out, _ = run_cli(capsys, "logm", path, "--json")

    assert code == EXIT_OK
    (result,) = json.loads(out)["snapshots"]
    assert result["global_logm"] == pytest.approx(global_logm(path), abs=1e-12)
    assert result["count"] == 50
    assert result["zeros"] == 2
    assert result["skipped"] == ["steps"]
    expected = pc.parameter_stats(pc.load_snapshot(path))
    for row, stats in zip(result["parameters"], expected, strict=True):
        assert row["name"] == stats.name
        assert row["logm"] == pytest.approx(stats.logm, abs=1e-12)
        assert row["l2_norm"] == pytest.approx(stats.l2_norm)
        assert row["std"] == pytest.approx(stats.std)
        assert (row["count"], row["zeros"]) == (stats.count, stats.zeros)
    assert result["parameters"][0]["shape"] == [6, 5]


def test_logm_of_several_files_reports_each_in_the_order_given(
    healthy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [snapshot_at(healthy_run, 5), snapshot_at(healthy_run, 2)]

    code, out, err = run_cli(capsys, "logm", *files, "--json")

    assert code == EXIT_OK
    assert err == ""  # no progress bar: stderr is not a terminal
    assert [r["step"] for r in json.loads(out)["snapshots"]] == [5, 2]


def test_logm_holds_at_most_one_tensor_of_a_snapshot_at_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = {f"layer{i}.weight": torch.randn(64, 64) for i in range(6)}
    path = pc.save_snapshot(weights, tmp_path / "big.safetensors")
    alive: list[weakref.ref[torch.Tensor]] = []
    most_alive = 0
    original = snapshots.Snapshot.__getitem__

    def tracking(self: snapshots.Snapshot, name: str) -> torch.Tensor:
        nonlocal most_alive
        tensor = original(self, name)
        alive.append(weakref.ref(tensor))
        most_alive = max(most_alive, sum(ref() is not None for ref in alive))
        return tensor

    monkeypatch.setattr(snapshots.Snapshot, "__getitem__", tracking)

    code, _, _ = run_cli(capsys, "logm", path)

    assert code == EXIT_OK
    assert len(alive) == 6
    assert most_alive == 1


# --- region -----------------------------------------------------------------------------------


def test_region_from_a_healthy_run_is_min_to_max_of_consecutive_deltas_with_provenance(
    healthy_run: Path, measured_region: Path
) -> None:
    logms = [global_logm(snapshot_at(healthy_run, step)) for step in range(STEPS)]
    deltas = [after - before for before, after in itertools.pairwise(logms)]

    region = load_region(measured_region)

    assert region.granularity == "iteration"
    assert region.low == pytest.approx(min(deltas), abs=1e-12)
    assert region.high == pytest.approx(max(deltas), abs=1e-12)
    assert [d.delta for d in region.deltas] == pytest.approx(deltas, abs=1e-12)
    assert [s.step for s in region.snapshots] == list(range(STEPS))
    assert region.snapshots[0].path.endswith("step0.safetensors")
    assert region.provenance.source == "measured"
    assert region.provenance.plugin_version == pc.__version__
    assert "measured from 7 snapshots, steps 0..6" in region.provenance.description
    assert json.loads(measured_region.read_text())["schema"] == REGION_SCHEMA


def test_region_prints_each_step_and_the_region(
    healthy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "region", healthy_run)

    assert code == EXIT_OK
    assert out.splitlines()[0].split() == ["step", "global", "LoGM", "delta", "file"]
    assert "Per-iteration deltas (6, snapshots 1 step(s) apart)" in out
    assert "Region per iteration: [" in out


def test_check_of_two_consecutive_healthy_snapshots_is_inside_their_region(
    healthy_run: Path, measured_region: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "check",
        snapshot_at(healthy_run, 3),
        snapshot_at(healthy_run, 4),
        "--baseline",
        measured_region,
    )

    assert code == EXIT_OK
    delta = global_logm(snapshot_at(healthy_run, 4)) - global_logm(snapshot_at(healthy_run, 3))
    assert f"LoGM delta: {delta:+.6e}" in out
    assert "Verdict: inside the region" in out
    assert "per iteration (measured from 7 snapshots" in out


def test_check_of_a_snapshot_with_weights_scaled_by_1_5_is_outside(
    healthy_run: Path, measured_region: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = snapshot_at(healthy_run, STEPS - 1)
    tampered = {name: 1.5 * tensor for name, tensor in pc.load_snapshot(last).items()}
    bad = pc.save_snapshot(tampered, tmp_path / "tampered.safetensors", step=STEPS)

    code, out, _ = run_cli(capsys, "check", last, bad, "--baseline", measured_region)

    assert code == EXIT_OUTSIDE
    assert f"LoGM delta: {math.log10(1.5):+.3e}"[:16] in out
    assert "Verdict: OUTSIDE the region" in out
    assert "above its bound" in out


@pytest.mark.parametrize(
    ("option", "expected_steps"),
    [(("--iterations-per-epoch", "2"), [2, 4, 6]), (("--epoch-every", "3"), [3, 6])],
)
def test_region_per_epoch_takes_deltas_between_epoch_boundaries(
    healthy_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: tuple[str, str],
    expected_steps: list[int],
) -> None:
    out = tmp_path / "epoch.json"

    code, printed, _ = run_cli(capsys, "region", healthy_run, *option, "--out", out)

    assert code == EXIT_OK
    region = load_region(out)
    assert region.granularity == "epoch"
    assert [d.to_step for d in region.deltas] == expected_steps
    first = region.deltas[0]
    expected = global_logm(snapshot_at(healthy_run, first.to_step)) - global_logm(
        snapshot_at(healthy_run, first.from_step)
    )
    assert first.delta == pytest.approx(expected, abs=1e-12)
    assert "Per-epoch deltas" in printed


def test_region_per_epoch_refuses_a_missing_epoch_boundary(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for step in (0, 2, 6):
        shutil.copy(snapshot_at(healthy_run, step), tmp_path)

    code, _, err = run_cli(capsys, "region", tmp_path, "--iterations-per-epoch", "2")

    assert code == EXIT_ERROR
    assert_one_line_error(err, "no snapshot at epoch boundary step 4")


def test_region_margin_widens_both_ends_by_a_share_of_the_largest_delta(
    healthy_run: Path, measured_region: Path, tmp_path: Path
) -> None:
    plain = load_region(measured_region)
    out = tmp_path / "wide.json"

    assert main(["region", str(healthy_run), "--margin", "0.5", "--out", str(out)]) == EXIT_OK

    wide = load_region(out)
    pad = 0.5 * max(abs(plain.low), abs(plain.high))
    assert wide.low == pytest.approx(plain.low - pad)
    assert wide.high == pytest.approx(plain.high + pad)
    assert wide.margin == 0.5


def test_region_orders_by_the_number_in_the_file_name_when_no_step_is_stored(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for step in (0, 1, 2, 10):
        weights = pc.load_snapshot(snapshot_at(healthy_run, min(step, STEPS - 1)))
        pc.save_snapshot(dict(weights), tmp_path / f"ckpt-{step}.npz")
    names = ["ckpt-10.npz", "ckpt-2.npz", "ckpt-0.npz", "ckpt-1.npz"]

    code, out, _ = run_cli(capsys, "region", *(tmp_path / n for n in names), "--json")

    assert code == EXIT_OK
    assert [s["step"] for s in json.loads(out)["snapshots"]] == [0, 1, 2, 10]


def test_region_refuses_an_ambiguous_order(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = dict(pc.load_snapshot(snapshot_at(healthy_run, 0)))
    first = pc.save_snapshot(weights, tmp_path / "run3_a.pt")
    second = pc.save_snapshot(weights, tmp_path / "run3_b.pt")

    code, _, err = run_cli(capsys, "region", first, second)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "ambiguous order", "run3_a.pt", "run3_b.pt", "both have step 3")


def test_region_accepts_a_quoted_glob_and_records_sha256_when_asked(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "region.json"

    code, _, _ = run_cli(
        capsys, "region", f"{healthy_run}/step[0-2].safetensors", "--sha256", "--out", out
    )

    assert code == EXIT_OK
    region = load_region(out)
    assert [s.step for s in region.snapshots] == [0, 1, 2]
    expected = hashlib.sha256(snapshot_at(healthy_run, 0).read_bytes()).hexdigest()
    assert region.snapshots[0].sha256 == expected


def test_region_refuses_to_overwrite_its_output_without_force(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "region.json"
    out.write_text("keep me")

    code, _, err = run_cli(capsys, "region", healthy_run, "--out", out)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "region.json already exists; pass --force")
    assert out.read_text() == "keep me"

    assert run_cli(capsys, "region", healthy_run, "--out", out, "--force")[0] == EXIT_OK
    assert load_region(out).granularity == "iteration"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["region.json"]


def test_a_single_snapshot_is_not_enough_for_a_region(
    healthy_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "region", snapshot_at(healthy_run, 0))

    assert code == EXIT_ERROR
    assert_one_line_error(err, "step0.safetensors", "at least two")


# --- the paper's regions ----------------------------------------------------------------------


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


@pytest.mark.parametrize("key", PAPER_REGIONS)
def test_check_against_the_paper_regions_passes_healthy_steps_and_flags_scaled_weights(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    last = snapshot_at(healthy_run, STEPS - 1)
    tampered = {name: 1.5 * tensor for name, tensor in pc.load_snapshot(last).items()}
    bad = pc.save_snapshot(tampered, tmp_path / "tampered.pt", step=STEPS)
    before = snapshot_at(healthy_run, STEPS - 2)

    healthy = run_cli(capsys, "check", before, last, "--baseline", PAPER_FILES[key])
    scaled = run_cli(capsys, "check", last, bad, "--baseline", f"paper:{key}")

    assert healthy[0] == EXIT_OK
    assert "per epoch" in healthy[1]
    assert "Note: the region is per epoch" in healthy[1]
    assert scaled[0] == EXIT_OUTSIDE


def test_check_shows_a_capped_parameter_table_and_json(
    healthy_run: Path, measured_region: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = snapshot_at(healthy_run, 1), snapshot_at(healthy_run, 2)

    code, out, _ = run_cli(capsys, "check", a, b, "--baseline", measured_region, "--rows", "1")
    json_code, json_out, _ = run_cli(capsys, "check", a, b, "--baseline", measured_region, "--json")

    assert code == json_code == EXIT_OK
    assert "parameter     LoGM A     LoGM B       delta  zeros A  zeros B" in out
    assert "... 3 more parameters (--rows 0 shows all)" in out
    result = json.loads(json_out)
    assert result["inside"] is True
    assert result["delta"] == pytest.approx(global_logm(b) - global_logm(a), abs=1e-12)
    assert [p["name"] for p in result["parameters"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert result["region"]["granularity"] == "iteration"


def test_check_orders_two_snapshots_by_their_stored_steps(
    healthy_run: Path, measured_region: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "check",
        snapshot_at(healthy_run, 4),
        snapshot_at(healthy_run, 3),
        "--baseline",
        measured_region,
    )

    assert code == EXIT_OK
    assert "(ordered by their stored steps)" in out


def test_check_calls_non_finite_weights_a_divergence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = pc.save_snapshot({"w": torch.tensor([1.0, 2.0])}, tmp_path / "a.pt", step=1)
    nan = pc.save_snapshot({"w": torch.tensor([1.0, math.nan])}, tmp_path / "b.pt", step=2)

    code, out, _ = run_cli(capsys, "check", good, nan, "--baseline", "paper:vgg16")

    assert code == EXIT_OUTSIDE
    assert "training diverged" in out
    assert "b.pt: parameter 'w' holds non-finite weights (1 NaN, 0 Inf)" in out


def test_check_refuses_a_co_simulation_baseline_naming_both_kinds(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = tmp_path / "mlp.json"
    baseline.write_text(json.dumps({"schema": "pytest-convergence/baseline", "schema_version": 1}))
    a, b = snapshot_at(healthy_run, 0), snapshot_at(healthy_run, 1)

    code, _, err = run_cli(capsys, "check", a, b, "--baseline", baseline)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "mlp.json", "co-simulation baseline", REGION_SCHEMA)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"granularity": "week"}, "granularity: 'week' is not one of iteration, epoch"),
        ({"region": [0.1, -0.1]}, "region: low 0.1 is above high -0.1"),
        ({"region": [0.0, "nan"]}, "region[1]: nan is not allowed"),
        ({"schema_version": 99}, "written by a newer pytest-convergence"),
        ({"extra": 1, "more": 2}, "unexpected key 'extra', 'more'"),
    ],
)
def test_a_malformed_region_file_is_refused_naming_the_file_and_the_entry(
    healthy_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: dict[str, object],
    message: str,
) -> None:
    document = json.loads(PAPER_FILES["vgg16"].read_text())
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**document, **edit}))
    a, b = snapshot_at(healthy_run, 0), snapshot_at(healthy_run, 1)

    code, _, err = run_cli(capsys, "check", a, b, "--baseline", broken)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "broken.json", message)


def test_a_region_file_names_every_missing_and_unexpected_key_at_once(tmp_path: Path) -> None:
    document = json.loads(PAPER_FILES["vgg16"].read_text())
    del document["provenance"]["paper"], document["provenance"]["dataset"]
    document["provenance"]["extra"] = 1
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))

    with pytest.raises(RegionFileError) as caught:
        load_region(broken)

    assert str(caught.value) == (
        f"{broken}: provenance: missing key 'paper', 'dataset'; unexpected key 'extra'"
    )


def test_a_region_file_accepts_a_utc_timestamp_written_with_z(tmp_path: Path) -> None:
    document = json.loads(PAPER_FILES["vgg16"].read_text())
    document["provenance"]["created"] = "2026-11-23T17:43:36Z"
    region = tmp_path / "z.json"
    region.write_text(json.dumps(document))

    assert load_region(region).provenance.created == "2026-11-23T17:43:36Z"


def test_check_of_snapshots_of_different_architectures_is_a_usage_error(
    healthy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = pc.save_snapshot({"w": torch.ones(3)}, tmp_path / "other.pt", step=9)

    code, _, err = run_cli(
        capsys, "check", snapshot_at(healthy_run, 0), other, "--baseline", "paper:vgg16"
    )

    assert code == EXIT_ERROR
    assert_one_line_error(err, "do not hold the same parameters", "'0.weight' only in the first")


# --- diff -------------------------------------------------------------------------------------


def test_diff_compares_two_implementations_parameter_by_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = sample_weights()
    other = {name: tensor.clone() for name, tensor in reference.items()}
    other["conv.weight"][1] += 1e-3
    a = pc.save_snapshot(reference, tmp_path / "reference.safetensors", step=3)
    b = pc.save_snapshot(other, tmp_path / "candidate.npz", step=3)

    code, out, _ = run_cli(capsys, "diff", a, b)
    json_code, json_out, _ = run_cli(capsys, "diff", a, b, "--json")

    assert code == json_code == EXIT_OK
    assert "Largest relative L2 error: 'conv.weight'" in out
    assert out.splitlines()[5].split()[0] == "conv.weight"  # worst first
    rows = {row["name"]: row for row in json.loads(json_out)["parameters"]}
    weight = reference["conv.weight"].double()
    expected = float((other["conv.weight"].double() - weight).norm() / weight.norm())
    assert rows["conv.weight"]["relative_l2_error"] == pytest.approx(expected, rel=1e-9)
    assert rows["conv.weight"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert rows["conv.weight"]["zeros_a"] == 2
    assert rows["conv.bias"]["relative_l2_error"] == 0.0
    assert rows["conv.bias"]["dtype_b"] == "float16"
    assert rows["conv.weight"]["logm_abs_diff"] > 0


def test_diff_of_mismatched_names_lists_the_first_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = pc.save_snapshot(sample_weights(), tmp_path / "a.pt")
    renamed = {f"model.{name}": tensor for name, tensor in sample_weights().items()}
    b = pc.save_snapshot(renamed, tmp_path / "b.pt")

    code, out, err = run_cli(capsys, "diff", a, b)

    assert code == EXIT_ERROR
    assert out == ""
    assert_one_line_error(
        err, "a.pt and", "b.pt do not hold the same parameters (6 differences)",
        "'conv.weight' only in the first", "; and 1 more",
    )  # fmt: skip


def test_diff_of_mismatched_shapes_names_the_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = sample_weights()
    a = pc.save_snapshot(weights, tmp_path / "a.onnx")
    b = pc.save_snapshot({**weights, "conv.weight": torch.ones(5, 6)}, tmp_path / "b.pt")

    code, _, err = run_cli(capsys, "diff", a, b)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "'conv.weight' has shape [6, 5] vs [5, 6]")


# --- report -----------------------------------------------------------------------------------


def test_report_writes_a_page_beside_the_trace_and_refuses_to_overwrite_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], measured_region: Path
) -> None:
    trace = make_run().write(tmp_path / "trace.json")

    code, out, _ = run_cli(capsys, "report", trace, "--baseline", measured_region)
    again, _, err = run_cli(capsys, "report", trace)

    assert code == EXIT_OK
    page = tmp_path / "report.html"
    assert f"Wrote {page} with the region of {measured_region}" in out
    assert "fc.weight" in page.read_text()
    assert again == EXIT_ERROR
    assert_one_line_error(err, "report.html already exists; pass --force")
    assert run_cli(capsys, "report", trace, "--force", "--out", tmp_path / "r.html")[0] == EXIT_OK


def test_report_draws_the_region_of_a_co_simulation_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_convergence.baselines import Provenance, save_baseline
    from pytest_convergence.environment import current_environment
    from pytest_convergence.regions import Calibration, Region

    calibration = Calibration("reference-perturbation", "test", 2**-8, 1, None, (0,), 3)
    region = Region(calibration, {}, (-3e-3, 2e-3), 1e-5)
    provenance = Provenance.from_environment(
        current_environment("cpu", 0), workload="mlp", candidate=None, dtype="float32"
    )
    baseline = save_baseline(tmp_path / "mlp.json", region, provenance)
    trace = make_run().write(tmp_path / "trace.json")

    code, _, _ = run_cli(
        capsys, "report", trace, "--baseline", baseline, "--out", tmp_path / "p.html"
    )

    assert code == EXIT_OK
    assert "region [-3.0000e-03, +2.0000e-03]" in (tmp_path / "p.html").read_text()


def test_report_finds_the_workloads_baseline_and_survives_a_broken_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "baselines").mkdir()
    guessed = tmp_path / "baselines" / "mlp.json"  # make_run()'s workload
    shutil.copy(PAPER_FILES["resnet50"], guessed)
    trace = make_run().write(tmp_path / "trace.json")

    found = run_cli(capsys, "report", trace)
    guessed.write_text("{")
    broken = run_cli(capsys, "report", trace, "--out", "broken.html")

    assert found[0] == EXIT_OK
    assert "with the region of baselines/mlp.json" in found[1]
    assert broken[0] == EXIT_OK
    assert_one_line_error(broken[2], "warning: no region band", "baselines/mlp.json")
    assert "none given" in (tmp_path / "broken.html").read_text()


def test_report_of_a_file_that_is_not_a_trace_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.json"
    trace.write_text('{"schema": "something else"}')

    code, _, err = run_cli(capsys, "report", trace)

    assert code == EXIT_ERROR
    assert_one_line_error(err, "trace.json", "malformed co-simulation trace")
    assert not (tmp_path / "report.html").exists()


# --- damaged and unsafe input -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_truncated_snapshot_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    path = pc.save_snapshot(sample_weights(), tmp_path / f"damaged{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    code, _, err = run_cli(capsys, "logm", path)

    assert code == EXIT_ERROR
    assert_one_line_error(err, str(path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("weights.h5", b"\x89HDF", "unknown suffix '.h5'"),
        ("empty.pt", b"", "the file is empty"),
        ("garbage.safetensors", b"not a safetensors file at all", "cannot be read"),
    ],
)
def test_unknown_empty_and_corrupt_files_exit_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    code, _, err = run_cli(capsys, "logm", path)

    assert code == EXIT_ERROR
    assert_one_line_error(err, name, message)


def test_a_missing_snapshot_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "diff", tmp_path / "a.pt", tmp_path / "b.pt")

    assert code == EXIT_ERROR
    assert_one_line_error(err, "a.pt: no such file")


def test_onnx_external_data_outside_the_model_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "secret.bin").write_bytes(np.array([4.0, 2.0], dtype=np.float32).tobytes())
    (tmp_path / "model").mkdir()
    proto = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=(2,))
    proto.data_location = TensorProto.EXTERNAL
    proto.external_data.add(key="location", value="../secret.bin")
    graph = helper.make_graph([], "weights", [], [], initializer=[proto])
    model = tmp_path / "model" / "m.onnx"
    model.write_bytes(helper.make_model(graph).SerializeToString())

    code, out, err = run_cli(capsys, "logm", model)

    assert code == EXIT_ERROR
    assert out == ""
    assert_one_line_error(err, "m.onnx", "'../secret.bin'", "inside the model's folder")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["check", "a.pt", "b.pt"],  # --baseline is required
        ["region", "x", "--margin", "-1"],
        ["region", "x", "--epoch-every", "2", "--iterations-per-epoch", "3"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, _, err = run_cli(capsys, *args)

    assert code == EXIT_ERROR
    assert "usage: pytest-convergence" in err


def test_a_folder_without_snapshots_and_a_glob_matching_nothing_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("no weights here")

    folder = run_cli(capsys, "region", tmp_path)
    pattern = run_cli(capsys, "logm", f"{tmp_path}/*.pt")

    assert folder[0] == pattern[0] == EXIT_ERROR
    assert_one_line_error(folder[2], str(tmp_path), "no snapshot files")
    assert_one_line_error(pattern[2], "*.pt: no snapshot files match")


# --- ordering and progress --------------------------------------------------------------------


def test_step_from_name_takes_the_first_integer() -> None:
    assert step_from_name(Path("run/step12.pt")) == 12
    assert step_from_name(Path("epoch_3-iter_40.npz")) == 3
    assert step_from_name(Path("final.onnx")) is None


def test_order_by_step_refuses_mixing_stored_steps_with_file_names() -> None:
    with pytest.raises(CliError, match=r"a\.pt stores its step but b3\.pt does not"):
        order_by_step([Path("a.pt"), Path("b3.pt")], [1, None])
    with pytest.raises(CliError, match=r"final\.pt: no stored step and no number"):
        order_by_step([Path("step1.pt"), Path("final.pt")], [None, None])
    assert order_by_step([Path("x.pt"), Path("y.pt")], [5, 2]) == [
        (Path("y.pt"), 2),
        (Path("x.pt"), 5),
    ]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_is_silent_when_stderr_is_not_a_terminal() -> None:
    stream = io.StringIO()

    with ProgressBar(3, "region", stream=stream) as progress:
        for name in ("a", "b", "c"):
            progress.show(name)
            progress.advance()

    assert stream.getvalue() == ""


def test_the_progress_bar_draws_on_a_terminal_and_erases_itself(
    healthy_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    code = main(["region", str(healthy_run)])

    drawn = terminal.getvalue()
    assert code == EXIT_OK
    assert "region [" in drawn
    assert f"0/{STEPS} step0.safetensors" in drawn
    assert f"{STEPS - 1}/{STEPS} step{STEPS - 1}.safetensors" in drawn
    assert drawn.endswith("\r")
    assert "\r" not in capsys.readouterr().out


# --- the installed entry points ---------------------------------------------------------------


def console_script() -> str:
    beside = Path(sys.executable).with_name("pytest-convergence")
    found = str(beside) if beside.exists() else shutil.which("pytest-convergence")
    if found is None:
        pytest.fail("the pytest-convergence script is not installed; run pip install -e .")
    return found


def test_the_console_script_and_python_m_run_the_same_command(
    healthy_run: Path, tmp_path: Path
) -> None:
    last = snapshot_at(healthy_run, STEPS - 1)
    tampered = {name: 1.5 * tensor for name, tensor in pc.load_snapshot(last).items()}
    bad = pc.save_snapshot(tampered, tmp_path / "tampered.safetensors", step=STEPS)

    # Started together: each spends most of its time importing torch.
    script = subprocess.Popen(
        [console_script(), "logm", str(last), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    module = subprocess.Popen(
        [sys.executable, "-m", "pytest_convergence", "check", str(last), str(bad),
         "--baseline", str(PAPER_FILES["resnet50"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    script_out, script_err = script.communicate(timeout=120)
    module_out, module_err = module.communicate(timeout=120)

    assert script.returncode == EXIT_OK, script_err
    assert json.loads(script_out)["snapshots"][0]["step"] == STEPS - 1
    assert script_err == ""
    assert module.returncode == EXIT_OUTSIDE, module_err
    assert "Verdict: OUTSIDE the region" in module_out
