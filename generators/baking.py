"""Turning numpy arrays into constants of the generated code."""

from __future__ import annotations

import halide as hl
import numpy as np
from rt3d_halide.pruning.patterns import check_group, kept_units

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


def filters_by_group(weight: np.ndarray, g_m: int) -> np.ndarray:
    """(M, N, Kd, Kh, Kw) -> (P, gM, N, Kd, Kh, Kw): the filters in groups of ``g_m``, zero
    filters past the last one (the generated code computes whole groups)."""
    m = weight.shape[0]
    padded = np.zeros((-(-m // g_m) * g_m, *weight.shape[1:]), dtype=np.float32)
    padded[:m] = weight
    return padded.reshape(-1, g_m, *weight.shape[1:])


def kept_entries(weight: np.ndarray, group: tuple[int, int]) -> np.ndarray:
    """(P, N, Kd, Kh, Kw) bool: per output-channel group, whether its (input channel, kernel
    location) entry survives, that is, its KGS unit (p, ci // gN, location) is kept, the
    contract of :func:`rt3d_halide.pruning.patterns.kept_units`."""
    g_m, g_n = check_group(group)
    return np.repeat(kept_units(weight, (g_m, g_n)), g_n, axis=1)[:, : weight.shape[1]]


def list_entry(starts: np.ndarray, index: hl.Expr, r: hl.RDom, name: str) -> hl.Expr:
    """Where the ``r``-th entry of list ``index`` lies in flat tables that ``starts`` cuts into
    lists (list ``i`` owns ``[starts[i], starts[i + 1])``), promised inside the tables.

    Lists of one length need no table: entry ``index * length + r``, a loop of constant trip
    count. Otherwise ``starts`` is baked (as ``name``) and ``r < length(index)`` restricts the
    reduction; Halide's no-op trimming turns that predicate into the loop bound, so each list
    runs its own length with no padding to the longest.
    """
    lengths = np.diff(starts)
    if np.all(lengths == lengths[0]):
        entry = index * int(lengths[0]) + r.x
    else:
        sbuf = baked_buffer(starts, name)
        r.where(r.x < sbuf[index + 1] - sbuf[index])
        entry = sbuf[index] + r.x
    return hl.unsafe_promise_clamped(entry, 0, int(starts[-1]) - 1)


def frame_entry(
    ranges: np.ndarray, index: hl.Expr, t: hl.Expr, r: hl.RDom, name: str, entries: int
) -> hl.Expr:
    """Where the ``r``-th entry of list ``index`` that output frame ``t`` reads lies, ``ranges``
    being :func:`~.conv3d_quads.frame_ranges` (first entry and count per list and frame, baked
    as ``name``): ``r < count`` restricts the reduction, which no-op trimming turns into the
    loop bound, as in :func:`list_entry`."""
    rbuf = baked_buffer(ranges, name)
    r.where(r.x < rbuf[1, t, index])
    return hl.unsafe_promise_clamped(rbuf[0, t, index] + r.x, 0, entries - 1)


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
