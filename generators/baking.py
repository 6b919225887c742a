"""Turning numpy arrays into constants of the generated code."""

from __future__ import annotations

import halide as hl
import numpy as np


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
