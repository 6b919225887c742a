"""rt3d-halide: KGS-pruned 3D CNNs compiled with Halide to static libraries for phones.

``python -m rt3d_halide.build`` makes the libraries; :func:`load` calls a host build from Python.
The runtime is imported on first use: the pruning subpackage trains on a GPU machine without
loading Halide's compiler (about 165 MB of shared library).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BuiltModel", "HalideCallError", "load"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".runtime", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
