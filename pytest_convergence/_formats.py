"""The snapshot file formats, named once so every error message lists the same set."""

from __future__ import annotations

SUPPORTED_SUFFIXES: dict[str, str] = {
    ".pt": "torch",
    ".pth": "torch",
    ".safetensors": "safetensors",
    ".npz": "npz",
    ".onnx": "onnx",
}

SUPPORTED_FORMATS_TEXT = (
    "PyTorch state dict (.pt, .pth, loaded weights-only), safetensors (.safetensors), "
    "NumPy archive (.npz), ONNX initializers (.onnx, with external data)"
)
