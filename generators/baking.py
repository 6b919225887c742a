"""Turning numpy arrays into constants of the generated code."""

from __future__ import annotations

import itertools

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


def frame_offsets(taps: np.ndarray, spec: Conv3dSpec) -> np.ndarray:
    """Per quad or entry (``taps`` with kd in column 1), its input frame relative to output
    frame ``t``'s first: ``kd * dt - pad`` (int32), the frame read being ``t * st`` plus this."""
    return (taps[:, 1] * spec.dilation[0] - spec.pads_begin[0]).astype(np.int32)


def frame_taps_inside(spec: Conv3dSpec) -> np.ndarray:
    """(output frames, kernel frames) bool: whether output frame ``t``'s kernel frame reads an
    input frame inside the clip, not the temporal padding."""
    taps = np.arange(spec.kernel[0]) * spec.dilation[0] - spec.pads_begin[0]
    frames = np.arange(spec.out_size[0])[:, None] * spec.stride[0] + taps
    return (frames >= 0) & (frames < spec.in_size[0])


def frame_ranges(taps: np.ndarray, starts: np.ndarray, spec: Conv3dSpec) -> np.ndarray:
    """(lists, output frames, 2) int32: per list (``starts`` cuts the depth-major ``taps`` into
    lists, as :class:`~.conv3d_quads.QuadPlan` and :class:`~.conv3d_sparse.SparsePlan` do)
    and output frame ``t``, the first entry and the number of entries whose kernel frame reads
    inside the clip (:func:`frame_taps_inside`). The entries of a list are depth-major, so
    those are one run; the others would read zero padding."""
    inside = frame_taps_inside(spec)[:, taps[:, 1]]  # (output frames, entries)
    ranges = np.zeros((len(starts) - 1, spec.out_size[0], 2), np.int32)
    for i, (lo, hi) in enumerate(itertools.pairwise(starts)):
        if np.any(np.diff(taps[lo:hi, 1]) < 0):
            raise ValueError(f"{spec.name}: entries of list {i} are not depth-major")
        ranges[i, :, 0] = lo + inside[:, lo:hi].argmax(axis=1) if hi > lo else lo
        ranges[i, :, 1] = inside[:, lo:hi].sum(axis=1)
    return ranges


def shortened_frame_ranges(
    taps: np.ndarray, starts: np.ndarray, spec: Conv3dSpec
) -> np.ndarray | None:
    """:func:`frame_ranges` where some frame's run is shorter than its list, so that the
    entries reading the temporal padding are skipped rather than multiplied by its zeros; None
    where no entry reads it (the lists then run whole, without the table)."""
    ranges = frame_ranges(taps, starts, spec)
    if np.array_equal(ranges[..., 1], np.broadcast_to(np.diff(starts)[:, None], ranges.shape[:2])):
        return None
    return ranges


def frame_entry(
    ranges: np.ndarray, index: hl.Expr, t: hl.Expr, r: hl.RDom, name: str, entries: int
) -> hl.Expr:
    """Where the ``r``-th entry of list ``index`` that output frame ``t`` reads lies in flat
    tables of ``entries`` entries, ``ranges`` being :func:`frame_ranges` (baked as ``name``):
    ``r < count`` restricts the reduction, which no-op trimming turns into the loop bound, as in
    :func:`list_entry`. The promise holds wherever the loop runs: an empty run's first entry may
    lie one past the tables, but no entry of it is read."""
    rbuf = baked_buffer(ranges, name)
    r.where(r.x < rbuf[1, t, index])
    return hl.unsafe_promise_clamped(rbuf[0, t, index] + r.x, 0, entries - 1)


def reduction_entry(
    taps: np.ndarray,
    starts: np.ndarray,
    index: hl.Expr,
    t: hl.Expr,
    r: hl.RDom,
    spec: Conv3dSpec,
    skip_frame_padding: bool,
) -> hl.Expr:
    """The ``r``-th entry the reduction over list ``index`` runs for output frame ``t``: with
    ``skip_frame_padding`` only the run that reads inside the clip (:func:`frame_entry`, table
    ``<layer>_frame_ranges``) where some frame's run is shorter than its list, else the whole
    list (:func:`list_entry`, ``<layer>_starts``)."""
    ranges = shortened_frame_ranges(taps, starts, spec) if skip_frame_padding else None
    if ranges is None:
        return list_entry(starts, index, r, f"{spec.name}_starts")
    return frame_entry(ranges, index, t, r, f"{spec.name}_frame_ranges", int(starts[-1]))


def load_layer(
    spec_json: str, weights_path: str
) -> tuple[Conv3dSpec, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """A generator's inputs: layer spec, (M, N, Kd, Kh, Kw) weight, bias (None: zero), and every
    array, checked: these come from a command line as well as from the build."""
    spec = Conv3dSpec.from_json(spec_json)
    if not weights_path:
        raise ValueError("the generator needs its weights (GeneratorParam 'weights': an .npz)")
    try:
        loaded = np.load(weights_path, allow_pickle=False)
    except (OSError, ValueError) as exc:  # missing, unreadable, or no numpy file
        raise ValueError(f"weights {weights_path!r}: not a readable .npz ({exc})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy: one bare array
        raise ValueError(f"weights {weights_path!r}: a .npy array, not an .npz of named arrays")
    with loaded as npz:
        arrays = {name: npz[name] for name in npz.files}
    if "weight" not in arrays:
        raise ValueError(f"weights {weights_path!r} holds no 'weight' array: {sorted(arrays)}")
    weight = np.asarray(arrays["weight"], dtype=np.float32)
    if weight.shape != spec.weight_shape:
        raise ValueError(f"{spec.name}: weight shape {weight.shape} != {spec.weight_shape}")
    bias = arrays.get("bias")
    if bias is not None and not spec.has_bias:  # one of the two is wrong: which is not ours
        raise ValueError(f"{spec.name}: the weights file holds a bias; the spec: has_bias false")
    if bias is not None and np.shape(bias) != (spec.out_channels,):
        raise ValueError(f"{spec.name}: bias shape {np.shape(bias)} != ({spec.out_channels},)")
    for name, array in (("weight", weight), ("bias", bias)):
        if array is not None and not np.all(np.isfinite(array)):
            raise ValueError(f"{spec.name}: the {name} holds NaN or Inf values")
    return spec, weight, bias, arrays
