"""rt3d-halide: KGS-pruned 3D CNNs compiled with Halide to static libraries for phones.

``python -m rt3d_halide.build`` makes the libraries; :func:`load` calls a host build from Python.
"""

from .runtime import BuiltModel, HalideCallError, load

__all__ = ["BuiltModel", "HalideCallError", "load"]
