"""KGS / vanilla structured pruning of 3D CNNs (torch), and the ONNX export the build consumes.

Attributes are loaded lazily: ``rt3d_halide.pruning.patterns`` (numpy + onnx only) must stay
importable by the torch-free build driver, so this package does not import torch on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "check_onnx_sparsity": "patterns",
    "kept_units": "patterns",
    "validate_pattern": "patterns",
    "SPARSITY_METADATA_KEY": "patterns",
    "export_onnx": "export",
    "fold_batchnorm": "export",
    "deepcopy_model": "masks",
    "LayerSparsity": "groups",
    "Pruner": "pruner",
    "phase_step": "pruner",
    "PruningReport": "pruner",
    "count_macs": "flops",
    "conv_macs": "flops",
    "build_model": "models",
    "SyntheticMotionVideos": "data",
    "VideoFolder": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
