"""Turning numpy arrays into constants of the generated code."""

from __future__ import annotations

import halide as hl
import numpy as np

from .spec import Conv3dSpec


def baked_buffer(array: np.ndarray, name: str) -> hl.Buffer:
    """A Halide-owned copy of ``array`` under a unique ``name``.

    ``hl.Buffer(ndarray)`` only wraps numpy's memory, so a temporary (a freshly packed weight
    table) would be freed under the pipeline; and two buffers sharing a name silently alias each
    other in the compiled code. Axis order is reversed as usual: numpy (A, B, C) is
    Halide (c, b, a).
    """
    buf = hl.Buffer(np.ascontiguousarray(array)).copy()
    buf.set_name(name)
    return buf


def load_layer(
    spec_json: str, weights_path: str
) -> tuple[Conv3dSpec, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """A generator's inputs: layer spec, (M, N, Kd, Kh, Kw) weight, bias, and every array."""
    spec = Conv3dSpec.from_json(spec_json)
    with np.load(weights_path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    weight = np.asarray(arrays["weight"], dtype=np.float32)
    if weight.shape != spec.weight_shape:
        raise ValueError(f"{spec.name}: weight shape {weight.shape} != {spec.weight_shape}")
    return spec, weight, arrays.get("bias"), arrays
