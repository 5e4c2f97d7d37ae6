"""Weight snapshots from any framework, behind one lazy mapping type.

Convergence checks compare weights that were written by many tools: PyTorch checkpoints,
Hugging Face safetensors, NumPy archives from JAX or TensorFlow code, ONNX exports. Reading them
all into one ``Snapshot`` lets LoGM code stay format-blind, and reading tensors lazily lets it
stream a multi-gigabyte checkpoint one tensor at a time instead of holding all of it in memory.

Snapshot files are often downloaded, so reading never executes code: ``.pt`` files are loaded
weights-only, ``.npz`` files without pickle, and ONNX external data only from the model's folder.

One module per concern: ``snapshot`` (the ``Snapshot`` mapping), ``files`` (``load_snapshot`` and
``save_snapshot``, which pick the format from the suffix), one module per format
(``torch_format``, ``safetensors_format``, ``npz_format``, ``onnx_format``), ``common`` (what the
formats share), ``measure`` (a file's LoGM table, one tensor at a time) and ``pairing`` (which
tensor of one snapshot is which of another's, where an exporter renamed, transposed or
de-duplicated them).
"""

from __future__ import annotations

from pytest_convergence.snapshots.files import load_snapshot, save_snapshot
from pytest_convergence.snapshots.measure import (
    ParameterRow,
    SnapshotLogm,
    measure_snapshot,
    measure_tensor,
)
from pytest_convergence.snapshots.pairing import (
    DuplicateTensor,
    SnapshotPairing,
    TensorPair,
    UnpairedTensors,
    pair_tensors,
)
from pytest_convergence.snapshots.snapshot import Snapshot

__all__ = [
    "DuplicateTensor",
    "ParameterRow",
    "Snapshot",
    "SnapshotLogm",
    "SnapshotPairing",
    "TensorPair",
    "UnpairedTensors",
    "load_snapshot",
    "measure_snapshot",
    "measure_tensor",
    "pair_tensors",
    "save_snapshot",
]
