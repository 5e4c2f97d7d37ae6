"""pytest_convergence.snapshots.measure: a snapshot file's LoGM table, one tensor at a time."""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import pytest
import torch

import pytest_convergence as pc
from pytest_convergence.errors import NonFiniteWeightError
from pytest_convergence.snapshots import Snapshot, measure_snapshot, measure_tensor

SUFFIXES = [".pt", ".safetensors", ".npz", ".onnx"]


def sample_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 5, generator=generator)
    weight[0, :2] = 0.0
    return {
        "conv.weight": weight,
        "conv.bias": torch.randn(5, generator=generator).to(torch.float16),
        "head.weight": torch.randn(3, 5, generator=generator, dtype=torch.float64),
        "steps": torch.tensor(4),
    }


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_it_agrees_with_the_library_for_every_format(tmp_path: Path, suffix: str) -> None:
    path = pc.save_snapshot(sample_weights(), tmp_path / f"model{suffix}", step=3)

    measured = measure_snapshot(path)

    snapshot = pc.load_snapshot(path)
    assert (measured.path, measured.step, measured.skipped) == (str(path), 3, ("steps",))
    assert measured.global_logm == pytest.approx(pc.logm(snapshot), abs=1e-12)
    assert (measured.count, measured.zeros) == (50, 2)
    expected = pc.parameter_logms(snapshot)
    assert [(r.name, r.count, r.zeros) for r in measured.parameters] == [
        (p.name, p.count, p.zeros) for p in expected
    ]
    assert [r.logm for r in measured.parameters] == [p.logm for p in expected]
    assert [(r.shape, r.dtype) for r in measured.parameters] == [
        ((6, 5), "float32"),
        ((5,), "float16"),
        ((3, 5), "float64"),
    ]


def test_magnitudes_are_measured_only_when_asked_for(tmp_path: Path) -> None:
    path = pc.save_snapshot(sample_weights(), tmp_path / "model.safetensors")

    plain = measure_snapshot(path)
    with_stats = measure_snapshot(path, with_stats=True)

    assert all(row.l2_norm is None and row.std is None for row in plain.parameters)
    stats = pc.parameter_stats(pc.load_snapshot(path))
    assert [row.l2_norm for row in with_stats.parameters] == [s.l2_norm for s in stats]
    assert [row.std for row in with_stats.parameters] == [s.std for s in stats]
    assert with_stats.global_logm == plain.global_logm


def test_it_holds_at_most_one_tensor_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pc.save_snapshot({f"w{i}": torch.randn(32, 32) for i in range(5)}, tmp_path / "m.npz")
    alive: list[weakref.ref[torch.Tensor]] = []
    most_alive = 0
    original = Snapshot.__getitem__

    def tracking(self: Snapshot, name: str) -> torch.Tensor:
        nonlocal most_alive
        tensor = original(self, name)
        alive.append(weakref.ref(tensor))
        most_alive = max(most_alive, sum(ref() is not None for ref in alive))
        return tensor

    monkeypatch.setattr(Snapshot, "__getitem__", tracking)

    measure_snapshot(path, with_stats=True)

    assert (len(alive), most_alive) == (5, 1)


def test_a_snapshot_without_a_nonzero_weight_has_no_global_logm(tmp_path: Path) -> None:
    path = pc.save_snapshot({"dead": torch.zeros(3), "empty": torch.empty(0)}, tmp_path / "z.pt")

    measured = measure_snapshot(path)

    assert (measured.global_logm, measured.count, measured.zeros) == (None, 3, 3)
    assert [row.logm for row in measured.parameters] == [None, None]


def test_non_finite_weights_raise_naming_the_parameter() -> None:
    with pytest.raises(NonFiniteWeightError, match=r"parameter 'w' holds non-finite weights"):
        measure_tensor("w", torch.tensor([1.0, math.inf]))
