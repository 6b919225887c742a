"""Sparse Conv3d on quads: the surviving pattern as runs of four input channels, channels innermost.

The CPU schedule's second kernel (the first runs vectors along the output plane, see
:mod:`.conv3d_sparse`). A group's entries are taken four input channels at a time: a *quad* is
a kernel location and a run of four consecutive input channels, with the ``gM x 4`` weights of
its group, zero where an entry is pruned (a KGS unit of 4 or 8 channels fills whole quads). Per
quad and output position the kernel loads the four inputs once (16 bytes, repeated into every
4-float part of a vector) and multiplies them by ``H`` output channels' four weights per vector,
so a vector lane holds (output channel, input channel) and no float is broadcast on its own.
After the list, the four input-channel partials of each output channel are added across lanes
(a transpose of shuffles and adds, about 45 instructions per block of 3 positions and group).
Summed instead by ``vhaddps`` (an RDom over the lanes, vectorized atomically: 9 horizontal adds
and 9 permutes), R(2+1)D-18's 3x1x1 and 1x3x3 convs and C3D conv2 ran 1.01-1.05 of the time
(per-round ratio in one process, two runs): on Zen 3 a horizontal add costs about two shuffles.

Why: with output channels as the lanes and one broadcast input float per FMA, the broadcasts set
the pace on Zen 3. Alone in C on one core (``bench/inner_loop_ceiling.py``: 16 groups over one
block's inputs in L1, 144 KiB of weights from L2), the quad loop (3 positions x 4 accumulators;
per quad 3 loads of 16 bytes, 4 weight vectors, 12 FMAs) ran at 88 % of the core's FMA peak
against 71 % for 14 broadcasts and FMAs per entry, in the same run (75 against 56 % in a slower
hour). On R(2+1)D-18's 288 -> 128 3x1x1 conv the quads took 0.72-0.81 of the broadcast kernel's
time over seven patterns (a sixth to two thirds kept, balanced, unbalanced and vanilla 8x4).
On AVX-512 (Zen 5) the same C loop in 16-float vectors, 10 positions x 2 vectors, ran at 85-87 %
(``--isa avx512``): each 4-float broadcast feeds only two FMAs, a cost a group of 16 channels
halves.

Two inputs. A temporal-only kernel (Kx1x1, spatial stride 1, no spatial padding: R(2+1)D's
temporal convs) reads input (x, y) for output (x, y), so it reads the input as it is, with no
copy; its tables are ``channels(j)`` (a quad's first channel), ``frame_offsets(j)`` and, per
(group, output frame), ``frame_ranges``: quads are depth-major within a group, so the quads
that read inside the clip for output frame ``t`` are one run, and the ones that would read the
temporal padding are skipped, not multiplied by zeros. Any other kernel reads a zero-padded
copy that keeps channels innermost (:class:`PaddedChannels`: it pads, it does not transpose),
one baked offset per quad, and skips those quads too unless ``skip_frame_padding`` is off; the
schedule takes it for short reductions only (``QUAD_COPY_MAX_ENTRIES`` in :mod:`.sparse_knobs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import halide as hl
import numpy as np
from rt3d_halide.pruning.patterns import check_group

from .baking import (
    baked_buffer,
    filters_by_group,
    frame_entry,
    frame_offsets,
    frame_ranges,
    kept_entries,
    reduction_entry,
)
from .layout import ConvVars, check_interleaved, zero_outside
from .spec import Conv3dSpec

QUAD = 4  # input channels per quad: one 16-byte load, an AVX2 half or a NEON vector


@dataclasses.dataclass(frozen=True)
class QuadPlan:
    """A layer's pattern as quads (see the module docstring), group by group, depth-major."""

    group: tuple[int, int]
    taps: np.ndarray  # (J, 4) int32: first input channel, kd, kh, kw per quad
    weights: np.ndarray  # (J, gM, 4) float32: the quad's weights, zero where pruned
    starts: np.ndarray  # (P + 1,) int32: group p owns quads [starts[p], starts[p + 1])

    @property
    def quads(self) -> int:
        return int(self.starts[-1])


def quad_start(channel: np.ndarray, in_channels: int) -> np.ndarray:
    """The first channel of the quad holding ``channel``: its aligned run of four, the last run
    moved down to end at the last channel (never read past it) when four do not divide them."""
    return np.minimum(channel // QUAD * QUAD, in_channels - QUAD)


def plan_quads(weight: np.ndarray, group: tuple[int, int]) -> QuadPlan:
    """Quads of ``weight`` (M, N, Kd, Kh, Kw) with its zeros: an entry (p, ci, location) is kept
    when its KGS unit is (:func:`rt3d_halide.pruning.patterns.kept_units`)."""
    g_m, g_n = check_group(group)
    n = weight.shape[1]
    if n < QUAD:
        raise ValueError(f"quads need at least {QUAD} input channels, the layer has {n}")
    per_block = filters_by_group(weight, g_m)
    kept = kept_entries(weight, (g_m, g_n))
    taps, weights, starts = [], [], [0]
    for p in range(len(per_block)):
        ci, kd, kh, kw = np.nonzero(kept[p])
        first = quad_start(ci, n)
        keys, quad = np.unique(np.stack([kd, kh, kw, first], axis=1), axis=0, return_inverse=True)
        quad = quad.ravel()
        w = np.zeros((len(keys), g_m, QUAD), np.float32)
        w[quad, :, ci - first] = per_block[p][:, ci, kd, kh, kw].T
        taps.append(keys[:, [3, 0, 1, 2]])
        weights.append(w)
        starts.append(starts[-1] + len(keys))
    return QuadPlan(
        group=(g_m, g_n),
        taps=np.concatenate(taps).astype(np.int32).reshape(-1, 4),
        weights=np.concatenate(weights).reshape(-1, g_m, QUAD),
        starts=np.asarray(starts, dtype=np.int32),
    )


def quad_fill(weight: np.ndarray, group: tuple[int, int]) -> float:
    """Kept entries over the entries of the quads holding them: the share of the quad kernel's
    multiplies that are not by a pruned zero (1 when units span whole quads, as 4 and 8 input
    channels do)."""
    n = weight.shape[1]
    if n < QUAD:
        return 0.0
    kept = kept_entries(weight, group)
    entries = int(kept.sum())
    if entries == 0:
        return 1.0
    first = quad_start(np.arange(n), n)
    occupied = np.zeros((kept.shape[0], n, *kept.shape[2:]), bool)
    for start in np.unique(first):
        occupied[:, start] = kept[:, first == start].any(axis=1)
    return entries / (QUAD * int(occupied.sum()))


@dataclasses.dataclass(frozen=True)
class PaddedChannels:
    """The zero-padded copy quads read when the kernel has spatial taps (or spatial strides or
    padding): channels innermost, as the input is, with the padding added. Padded (c, col, row,
    frame) lies at ``c + C * (col + Wp * (row + Hp * frame))``; output (x, y, t) reads every
    quad at its base (:meth:`base`) plus the quad's baked offset (:func:`quad_offsets`), so one
    table load finds a quad's input and a block's positions lie ``C * sx`` floats apart. Unlike
    the planar copy it transposes nothing: each row of the input is copied as it is."""

    channels: int
    columns: int  # Wp
    rows: int  # Hp
    frames: int  # Tp

    @classmethod
    def of(cls, spec: Conv3dSpec) -> PaddedChannels:
        tp, hp, wp = (spec.in_size[i] + spec.pads_begin[i] + spec.pads_end[i] for i in range(3))
        return cls(spec.in_channels, wp, hp, tp)

    @property
    def size(self) -> int:
        return self.channels * self.columns * self.rows * self.frames

    def index(self, c: Any, col: Any, row: Any, frame: Any) -> Any:
        return c + self.channels * (col + self.columns * (row + self.rows * frame))

    def decompose(self, i: Any) -> tuple[Any, Any, Any, Any]:
        """(c, col, row, frame) of flat index ``i``: the inverse of :meth:`index`."""
        rest = i // self.channels
        col, rest = rest % self.columns, rest // self.columns
        return i % self.channels, col, rest % self.rows, rest // self.rows

    def base(self, spec: Conv3dSpec, x: Any, y: Any, t: Any) -> Any:
        """Flat index of channel 0 of the padded input under output (x, y, t)'s first tap."""
        st, sy, sx = spec.stride
        return self.index(0, x * sx, y * sy, t * st)


def quad_offsets(plan: QuadPlan, spec: Conv3dSpec, padded: PaddedChannels) -> np.ndarray:
    """Per quad, its first input's offset in the padded copy from the output position's base:
    first channel and dilated kernel location folded into one number (int32)."""
    dt, dh, dw = spec.dilation
    ci, kd, kh, kw = (plan.taps[:, k].astype(np.int64) for k in range(4))
    return padded.index(ci, kw * dw, kh * dh, kd * dt).astype(np.int32)


@dataclasses.dataclass
class QuadConvFuncs:
    """``dot(c4, h, k, g, *position, t, n)``: for output channel ``k + K * h`` of group ``g``
    (``K = gM / H``), the partial sum over the group's quads of their input channel ``c4``;
    ``output`` adds the four partials and the bias.

    From the padded copy a position is (x, y). Read in place it is a position of a block of the
    output plane flattened (``o = x + W * y``), and ``output`` is written by an update over
    ``plane``, every block's positions, so that blocks need not end with their row."""

    vars: ConvVars
    c4: hl.Var
    half: hl.Var
    k: hl.Var
    group: hl.Var
    dot: hl.Func | None  # None when every entry is pruned: the output is the bias
    reduction: hl.RDom | None
    output: hl.Func
    halves: int  # H: output channels per vector
    per_half: int  # K: gM / H, accumulators per position
    flat: hl.Func | None  # the padded copy; None: read in place
    flat_index: hl.Var
    padded: PaddedChannels | None
    plane: hl.RDom | None  # read in place: (position in block, block), which ``output`` updates
    position: list[hl.Var]  # dot's position Vars: [x, y] copied, [position in block, block]


def quad_conv3d(
    inp: hl.ImageParam,
    plan: QuadPlan,
    bias: hl.Buffer,
    spec: Conv3dSpec,
    output: hl.Func,
    halves: int,
    copied: bool = False,
    block: int = 1,
    checked_promises: bool = False,
    skip_frame_padding: bool = False,
) -> QuadConvFuncs:
    """Defines ``output(c, x, y, t, n)`` from the quads; ``halves`` (H, a divisor of gM) is how
    many output channels share one vector of ``4 * H`` lanes. ``bias`` is packed by gM.

    ``copied``: read a zero-padded copy (:class:`PaddedChannels`), whatever the kernel, rather
    than the input in place (temporal-only kernels, see the module docstring). Read in place,
    ``block`` consecutive positions of the flattened plane are a block; the last block shifts
    inwards to end with the plane, rewriting a few positions. ``checked_promises``: the target
    checks ``unsafe_promise_clamped`` at run time, so the in-place read keeps its promises (see
    :func:`_in_place_read`). ``skip_frame_padding``: copied, each group runs, per output frame,
    only its quads that read inside the clip (:func:`~.baking.reduction_entry`); read in place
    it always does."""
    v = ConvVars()
    g_m = plan.group[0]
    if g_m % halves:
        raise ValueError(f"{spec.name}: {halves} channels per vector do not divide gM {g_m}")
    per_half = g_m // halves
    if not copied:
        check_interleaved(spec)
    c4, half, k, g = hl.Var("c4"), hl.Var("h"), hl.Var("k"), hl.Var("g")
    m = v.c % g_m
    value = bias[m, v.c // g_m]
    i = hl.Var("i")
    padded = PaddedChannels.of(spec) if copied else None
    flat = _padded_copy(inp, spec, padded, i, v) if padded else None
    _, out_h, out_w = spec.out_size
    positions = out_h * out_w
    block = min(block, positions)

    def block_start(b: hl.Expr) -> hl.Expr:
        return hl.min(b * block, positions - block)

    plane = start = None
    position = out_position = [v.x, v.y]
    if not copied:
        blocks = -(-positions // block)
        plane = hl.RDom([hl.Range(0, block), hl.Range(0, blocks)], f"{spec.name}_plane")
        position, out_position = [hl.Var("p"), hl.Var("b")], [plane.x, plane.y]
        start = block_start(position[1])
    dot = r = None
    if plan.quads:
        if flat is not None:
            j, r, read = _copied_read(flat, padded, plan, spec, v, g, c4, skip_frame_padding)
        else:
            j, r, read = _in_place_read(
                inp, plan, spec, v, g, c4, start, position[0], checked_promises
            )
        # numpy (J, K, H, 4) is Halide (c4, h, k, j): one vector of (c4, h) per (k, quad).
        table = plan.weights.reshape(-1, halves, per_half, QUAD).transpose(0, 2, 1, 3)
        wbuf = baked_buffer(table, f"{spec.name}_wquads")
        dot = hl.Func(f"{spec.name}_dot")
        dvars = [c4, half, k, g, *position, v.t, v.n]
        dot[dvars] = hl.f32(0)
        dot[dvars] += wbuf[c4, half, k, j] * read
        for lane in range(QUAD):
            at = [lane, m // per_half, m % per_half, v.c // g_m, *out_position, v.t, v.n]
            value += dot[at]
    if spec.relu:
        value = hl.max(value, 0.0)
    if plane is None:
        output[v.c, v.x, v.y, v.t, v.n] = value
    else:
        o = block_start(plane.y) + plane.x
        output[v.c, v.x, v.y, v.t, v.n] = hl.undef(hl.Float(32))
        output[v.c, o % out_w, o // out_w, v.t, v.n] = value
    return QuadConvFuncs(
        v, c4, half, k, g, dot, r, output, halves, per_half, flat, i, padded, plane, position
    )


def _padded_copy(
    inp: hl.ImageParam, spec: Conv3dSpec, padded: PaddedChannels, i: hl.Var, v: ConvVars
) -> hl.Func:
    """``flat(i, n)``: the input zero-padded (:class:`PaddedChannels`)."""
    src = zero_outside(inp, spec)
    ci, col, row, frame = padded.decompose(i)
    pt, ph, pw = spec.pads_begin
    flat = hl.Func(f"{spec.name}_padded")
    flat[i, v.n] = src[ci, col - pw, row - ph, frame - pt, v.n]
    return flat


def _copied_read(
    flat: hl.Func,
    padded: PaddedChannels,
    plan: QuadPlan,
    spec: Conv3dSpec,
    v: ConvVars,
    g: hl.Var,
    c4: hl.Var,
    skip_frame_padding: bool,
) -> tuple[hl.Expr, hl.RDom, hl.Expr]:
    """(quad, reduction, input) from the padded copy: the quads of group ``g`` that output frame
    ``t`` runs (:func:`~.baking.reduction_entry`), one baked offset each."""
    offsets = quad_offsets(plan, spec, padded)
    obuf = baked_buffer(offsets, f"{spec.name}_offsets")
    r = hl.RDom([hl.Range(0, int(np.diff(plan.starts).max()))], f"{spec.name}_r")
    j = reduction_entry(plan.taps, plan.starts, g, v.t, r, spec, skip_frame_padding)
    offset = hl.unsafe_promise_clamped(obuf[j], 0, int(offsets.max()))
    return j, r, flat[padded.base(spec, v.x, v.y, v.t) + offset + c4, v.n]


def _in_place_read(
    inp: hl.ImageParam,
    plan: QuadPlan,
    spec: Conv3dSpec,
    v: ConvVars,
    g: hl.Var,
    c4: hl.Var,
    start: hl.Expr,
    p: hl.Var,
    checked_promises: bool = False,
) -> tuple[hl.Expr, hl.RDom, hl.Expr]:
    """(quad, reduction, input) of a temporal-only kernel read in place at position ``p`` of the
    block that starts at flattened plane position ``start``: for output frame ``t`` the run of
    quads that read inside the clip (:func:`~.baking.frame_ranges`), which the clamps state.

    A block may run past the end of its row. Its column then passes the row's last one, which
    in the dense input (rows contiguous, channels innermost) is the next row's first position:
    the flattened plane's next one. So every position of a block lies a constant distance from
    its first, one address computation per block rather than a division per position
    (R(2+1)D-18's layer1 3x1x1 conv ran 1.09 of the blocks-within-rows time with the division,
    for 1.02 of the positions). Such a column breaks the promise on purpose: the promise only
    keeps Halide's bounds inference and buffer checks to the real row, while the address it
    yields lies inside the input. A target with ``check_unsafe_promises`` would refuse it at
    run time, so there each position takes its own column and row, by division."""
    chans = baked_buffer(plan.taps[:, 0].copy(), f"{spec.name}_channels")
    dbuf = baked_buffer(frame_offsets(plan.taps, spec), f"{spec.name}_frame_offsets")
    ranges = frame_ranges(plan.taps, plan.starts, spec)
    r = hl.RDom([hl.Range(0, max(1, int(ranges[..., 1].max())))], f"{spec.name}_r")
    j = frame_entry(ranges, g, v.t, r, f"{spec.name}_frame_ranges", plan.quads)
    channel = hl.unsafe_promise_clamped(chans[j], 0, spec.in_channels - QUAD)
    frames = spec.in_size[0]
    frame = hl.unsafe_promise_clamped(v.t * spec.stride[0] + dbuf[j], 0, frames - 1)
    width = spec.out_size[2]
    if checked_promises:
        o = start + p
        column, row = o % width, o // width
    else:
        column, row = hl.unsafe_promise_clamped(start % width + p, 0, width - 1), start // width
    return j, r, inp[channel + c4, column, row, frame, v.n]
