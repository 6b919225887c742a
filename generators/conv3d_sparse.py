"""Sparse Conv3d (vanilla and KGS): the surviving pattern baked into code, one algorithm for both.

Vanilla pruning is KGS whose groups keep all or none of their kernel locations, so one algorithm
serves both. Per output-channel group ``p`` (``gM`` filters) the layer keeps a list of *entries*:
(input channel, kernel location) pairs whose ``gM``-weight column survived. The generated code holds

- ``weights(lane, e)``: float32, the ``gM`` surviving weights of entry ``e``, contiguous;
- ``offsets(e)``: int32, where the entry's input lies in the flat zero-padded input, relative
  to the output position (input channel and dilated kernel location folded into one number), so
  the inner loop finds its input with one load and one add; for unbalanced layers ``starts(i)``:
  where list ``i`` begins in the flat tables.

Each group's list is split by input channel into ``K`` chunks (list ``i = p * K + k``), so that a
schedule can run every group over one chunk of the input while that chunk is in cache; the sum
over chunks is a second, short reduction (``accum += partial(k)``). With several chunks, a list
left empty (vanilla prunes whole channel blocks of a group) skips that pass: C3D conv2 vanilla
at a sixth kept, whose chunks are one channel block, took 0.90-0.94 of the time on Zen 5
(conv3b and R(2+1)D's 1x3x3, with wider chunks, unchanged).

A pruned entry is simply absent: no zero is loaded or multiplied. Lists have different lengths
(unbalanced KGS): the tables are flat, with no padding to the longest list, and the reduction
runs over ``[0, max length)`` with the predicate ``r < length(i)``. Halide's no-op trimming turns
that predicate into the loop bound (checked in the lowered code, for both kernels), so a list
runs exactly its own length. A balanced layer (every list the same length) drops the ``starts``
table and takes a straight loop of constant trip count, unless it skips the temporal padding
(below).

The schedule's other kernel, quads (:mod:`.conv3d_quads`), takes entries four input channels at a
time: temporal-only kernels (:func:`~.layout.interleaved_fits`) read the input in place, short
reductions a padded copy that keeps channels innermost.

Filters the group size does not divide are padded with zero lanes in ``weights`` and computed
(whole blocks), and the output store is guarded. A list runs kernel frame by kernel frame, and
within a frame in the knob ``entry_order``: one input channel's kernel locations together (CPUs,
measured faster: successive entries read the same lines of one input plane), or one kernel
location's channels together (OpenCL).

So the entries of a list that read one kernel frame are one run, and those that output frame
``t`` reads inside the clip are one run too: per (list, frame) the code takes that run from a
baked ``frame_ranges`` table (knob ``skip_frame_padding``), where it would multiply the copy's
zero frames of temporal padding. That padding is 4, 8, 17 and 33 % of C3D's 3x3x3 convs' MACs
on 16, 8, 4 and 2 frames. At a sixth kept (KGS 8x4 unbalanced, Zen 5, per-round ratio over 15
rounds) conv2 took 0.98 of the time, conv3b 0.92, and conv4b 0.885 of its masked code's (which
cannot skip: its tasks run across frames, see ``PADDING``); on an H200 through OpenCL, C3D
conv2 to conv5b took 0.60-0.98 (bench/results/opencl_gpu_skip_frames.md).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import halide as hl
import numpy as np
from rt3d_halide.pruning.patterns import DEFAULT_GROUP, check_group, kept_units

from rt3d_halide.targets import TARGET_FAMILIES, family_of

from .baking import (
    baked_buffer,
    filters_by_group,
    frame_offsets,
    kept_entries,
    load_layer,
    reduction_entry,
)
from .conv3d_dense import generate_dense, pack_bias
from .conv3d_quads import QuadConvFuncs, plan_quads, quad_conv3d, quad_fill
from .layout import (
    ConvVars,
    FlatLayout,
    MaskedLayout,
    constrain_activation,
    output_from_blocks,
    zero_outside,
)
from .schedules import choose_schedule
from .sparse_choice import SparseSchedule, choose_sparse_schedule
from .sparse_knobs import QUAD_LAYOUTS, check_entry_order
from .sparse_schedules import apply_sparse_schedule
from .spec import Conv3dSpec


@dataclasses.dataclass(frozen=True)
class SparsePlan:
    """A layer's pattern as the generated code stores it (see the module docstring)."""

    group: tuple[int, int]
    chunks: int  # input-channel chunks each group's list is split into
    taps: np.ndarray  # (E, 4) int32: ci, kd, kh, kw (undilated) per entry
    weights: np.ndarray  # (E, gM) float32, zero lanes past the last filter
    # (P * K + 1,) int32: list p * K + k, of group p and chunk k, is [starts[that], starts[next])
    starts: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Entries per (group, chunk), group-major."""
        return np.diff(self.starts)

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.size else 0

    @property
    def balanced(self) -> bool:
        return bool(np.all(self.lengths == self.max_length))

    @property
    def entries(self) -> int:
        return int(self.starts[-1])


def plan_sparse(
    weight: np.ndarray, group: tuple[int, int], chunk: int = 0, order: str = "channel"
) -> SparsePlan:
    """Derives the entry lists from the zeros of ``weight`` (M, N, Kd, Kh, Kw).

    An entry (p, ci, location) is kept when its KGS unit (p, ci // gN, location) is kept, which is
    the contract of :func:`rt3d_halide.pruning.patterns.kept_units`. Each group's list is split
    by input channel into chunks of ``chunk`` channels (0: one chunk), so that a schedule can
    run every group over one chunk's input while it sits in cache.

    The lists are stored group-major (a group's chunks consecutive), although the CPU schedule
    reads them chunk by chunk. Chunk-major tables, read front to back, measured per-round in one
    process on the C3D stack's pruned weights: conv3b 0.96, conv3a 0.99, conv4b 1.06-1.09 (three
    runs; the committed build against itself 0.99-1.03), conv5a 1.05 of the time.

    Within a list, entries run kernel frame by kernel frame; within a frame, ``order``
    (:data:`~.sparse_knobs.ENTRY_ORDERS`) "channel" takes one input channel's kernel locations
    together (row-major), "location" one kernel location's channels together.
    """
    g_m, g_n = check_group(group)
    n = weight.shape[1]
    chunk = min(chunk or n, n)
    bounds = [*range(0, n, chunk), n]
    per_block = filters_by_group(weight, g_m)
    check_entry_order(order, "plan_sparse's")
    # kept[p, d, ...]: the entries of a frame in list order, the channel axis at ``axis``.
    axis = 1 if order == "channel" else 3
    kept = np.moveaxis(kept_entries(weight, (g_m, g_n)), 1, axis + 1)
    taps, weights, starts = [], [], [0]
    for p in range(len(per_block)):
        for lo, hi in itertools.pairwise(bounds):
            found = list(np.nonzero(np.take(kept[p], range(lo, hi), axis=axis)))
            ci = found.pop(axis) + lo
            loc_d, loc_h, loc_w = found
            taps.append(np.stack([ci, loc_d, loc_h, loc_w], axis=1))
            weights.append(per_block[p][:, ci, loc_d, loc_h, loc_w].T)
            starts.append(starts[-1] + len(ci))
    return SparsePlan(
        group=(g_m, g_n),
        chunks=len(bounds) - 1,
        taps=np.concatenate(taps).astype(np.int32).reshape(-1, 4),
        weights=np.concatenate(weights).astype(np.float32).reshape(-1, g_m),
        starts=np.asarray(starts, dtype=np.int32),
    )


def kept_share(weight: np.ndarray, group: tuple[int, int]) -> float:
    """Kept share of the KGS units of ``weight``: what the schedule's cost model weighs, the same
    number for the build's manifest and the generator."""
    units = kept_units(weight, check_group(group))
    return float(units.mean()) if units.size else 0.0


def pattern_shares(weight: np.ndarray, group: tuple[int, int]) -> tuple[float, float]:
    """(kept share, quad fill): what the schedule chooser weighs (:func:`kept_share`,
    :func:`~.conv3d_quads.quad_fill`), the same numbers for the build's manifest and the
    generator."""
    return kept_share(weight, group), quad_fill(weight, group)


@dataclasses.dataclass
class SparseConvFuncs:
    """The Funcs a sparse schedule needs to see.

    ``accum`` starts at the bias and adds ``partial`` chunk by chunk (``chunk_reduction``);
    ``partial`` sums one chunk of a group's list (``reduction``). A layer whose every entry is
    pruned has neither: its output is the bias.
    """

    vars: ConvVars
    o: hl.Var  # the flattened output plane position (FlatLayout.position)
    accum: hl.Func
    partial: hl.Func | None
    reduction: hl.RDom | None
    chunk_reduction: hl.RDom | None
    chunk: hl.Var
    output: hl.Func
    flat: hl.Func | None  # the zero-padded input, flat(i, band, t, n); None in place
    flat_index: hl.Var
    layout: FlatLayout | MaskedLayout
    blocks: hl.Func  # accum at output positions (x, y), or o (MaskedLayout), for the output
    band: hl.Var  # the band of output rows whose copy ``flat`` holds (FlatLayout.band)
    plane: hl.RDom | None = None  # MaskedLayout: the output positions ``output``'s update runs


def entry_offsets(
    plan: SparsePlan, spec: Conv3dSpec, layout: FlatLayout | MaskedLayout
) -> np.ndarray:
    """Per entry, its input's offset in ``flat`` relative to the output position's base.

    One int per entry: the inner loop finds its input with one load and one add, where four
    separate (ci, kd, kh, kw) indices cost a dozen integer ops per entry (measured: a third of
    the loop's instructions).
    """
    dt, dh, dw = spec.dilation
    ci, kd, kh, kw = (plan.taps[:, k].astype(np.int64) for k in range(4))
    return layout.index(ci, kw * dw, kh * dh, kd * dt).astype(np.int32)


def sparse_conv3d(
    inp: hl.ImageParam,
    plan: SparsePlan,
    bias: hl.Buffer,
    spec: Conv3dSpec,
    output: hl.Func,
    lanes: int,
    layout: FlatLayout | MaskedLayout,
    in_place: bool = False,
    skip_frame_padding: bool = False,
) -> SparseConvFuncs:
    """Defines ``output(c, x, y, t, n)``; ``accum(lane, block, o, band, t, n)`` runs over one
    group's list, ``o`` the output plane flattened (:meth:`FlatLayout.position`), from the band's
    first row where the layout has bands (else ``band`` is 0).

    ``lanes`` (a divisor of gM) is the accumulator block's channel count: a group of gM filters is
    ``gM / lanes`` blocks sharing one entry list, so a schedule can hold fewer channels than the
    group in registers. ``bias`` is packed by ``lanes``.

    The input is first copied into ``flat(i, band, t, n)`` (see :class:`FlatLayout`): O(input)
    copying buys an inner loop with no boundary selects, a single baked offset per entry and
    contiguous inputs for consecutive output positions. A banded layout
    (:meth:`FlatLayout.banded`) holds one copy per band of output rows and output frame, each
    of the rows and the one frame they read (halo rows copied for both bands that read them),
    which a schedule can make inside the task that reads it; the whole input's copy, once per
    sample, uses band and frame 0 only. A :class:`MaskedLayout` copy leaves the spatial padding
    out and masks the reads that fall on it; ``o`` then runs over every output frame (``t`` is
    0) and ``output`` is written by an update over the flattened positions (``plane``).
    ``in_place`` (GPU schedules; "auto" takes it where
    :func:`~.sparse_choice.gpu_reads_in_place` holds) reads the input as it is instead, by
    baked input channel and offsets per entry, zero outside the input: no copy and no buffer
    for it on the device. ``skip_frame_padding``: each list runs, per output frame, only its
    entries that read inside the clip (:func:`~.baking.reduction_entry`); not with a
    :class:`MaskedLayout` (:attr:`~.sparse_choice.SparseSchedule.skips_frame_padding`).
    """
    v = ConvVars()
    g_m = plan.group[0]
    if g_m % lanes:
        raise ValueError(f"{spec.name}: block of {lanes} lanes does not divide the group's {g_m}")
    if skip_frame_padding and isinstance(layout, MaskedLayout):
        raise ValueError(f"{spec.name}: masked tasks run across frames and cannot skip any")
    passes = g_m // lanes
    o = hl.Var("o")
    band = hl.Var("band")
    # Zero outside the input even without padding: x tiles past the row's end read (and then
    # discard) positions beyond the last one, which must not leave the buffer.
    src = zero_outside(inp, spec)
    i = hl.Var("i")
    flat = None
    if not in_place:
        ci, col, row, frame = layout.decompose(i)
        if isinstance(layout, FlatLayout) and layout.band:  # one band's rows, per output frame
            row += band * layout.band * spec.stride[1]
            frame += v.t * spec.stride[0]
        flat = hl.Func(f"{spec.name}_flat")
        pads = spec.pads_begin
        flat[i, band, v.t, v.n] = src[ci, col - pads[2], row - pads[1], frame - pads[0], v.n]

    accum = hl.Func(f"{spec.name}_accum")
    accum[v.lane, v.block, o, band, v.t, v.n] = bias[v.lane, v.block]
    k = hl.Var("k")
    partial = r = rk = None
    if plan.max_length > 0:
        wbuf = baked_buffer(plan.weights, f"{spec.name}_wsparse")
        r = hl.RDom([hl.Range(0, plan.max_length)], f"{spec.name}_r")
        rk = hl.RDom([hl.Range(0, plan.chunks)], f"{spec.name}_rk")
        if plan.chunks > 1 and not np.all(plan.lengths):
            # An empty (group, chunk) list adds nothing: skip its pass over the accumulator.
            nonempty = baked_buffer((plan.lengths > 0).astype(np.uint8), f"{spec.name}_nonempty")
            rk.where(nonempty[(v.block // passes) * plan.chunks + rk.x] != 0)
        group_chunk = (v.block // passes) * plan.chunks + k
        entry = reduction_entry(
            plan.taps, plan.starts, group_chunk, v.t, r, spec, skip_frame_padding
        )
        if flat is None:
            read = _in_place_read(src, plan, spec, layout, v, o, entry)
        else:
            read = _flat_read(flat, plan, spec, layout, v, o, band, entry)
        lane = (v.block % passes) * lanes + v.lane
        partial = hl.Func(f"{spec.name}_partial")
        avars = [v.lane, v.block, o, band, v.t, v.n]
        partial[*avars, k] = hl.f32(0)
        partial[*avars, k] += wbuf[lane, entry] * read
        accum[avars] += partial[*avars, rk.x]
    blocks = hl.Func(f"{spec.name}_blocks")
    if isinstance(layout, MaskedLayout):
        plane = _masked_output(output, blocks, accum, spec, layout, lanes, v, o)
        return SparseConvFuncs(
            v, o, accum, partial, r, rk, k, output, flat, i, layout, blocks, band, plane
        )
    if layout.band:
        at = [layout.position(v.x, v.y % layout.band), v.y // layout.band]
    else:
        at = [layout.position(v.x, v.y), 0]
    blocks[v.lane, v.block, v.x, v.y, v.t, v.n] = accum[v.lane, v.block, *at, v.t, v.n]
    output_from_blocks(output, blocks, lanes, spec.relu, v)
    return SparseConvFuncs(v, o, accum, partial, r, rk, k, output, flat, i, layout, blocks, band)


def _flat_read(
    flat: hl.Func,
    plan: SparsePlan,
    spec: Conv3dSpec,
    layout: FlatLayout | MaskedLayout,
    v: ConvVars,
    o: hl.Var,
    band: hl.Var,
    entry: hl.Expr,
) -> hl.Expr:
    """Entry ``entry``'s input value from the padded copy: one baked offset per entry. A copy
    per band holds one frame (``o`` counts from the band's first row); the whole input's copy
    has no band or frame of its own; a :class:`MaskedLayout` read is zero where the entry's
    baked mask bits meet the position's (the padding it left out)."""
    offsets = entry_offsets(plan, spec, layout)
    obuf = baked_buffer(offsets, f"{spec.name}_offsets")
    offset = hl.unsafe_promise_clamped(obuf[entry], int(offsets.min()), int(offsets.max()))
    if isinstance(layout, MaskedLayout):
        value = flat[o + offset, 0, 0, v.n]
        if not layout.masks_reads(spec):
            return value
        positions = layout.outside_bits(spec)
        bits = layout.entry_bits(plan.taps[:, 2], plan.taps[:, 3], spec)
        bbuf = baked_buffer(bits, f"{spec.name}_mask_bits")
        pbuf = baked_buffer(positions, f"{spec.name}_outside_bits")
        # Positions past the last (the last task's rounded-up ones) take the last one's bits.
        outside = pbuf[hl.min(o, positions.size - 1)] & bbuf[entry]
        return hl.select(outside == 0, value, hl.f32(0))
    if layout.band:
        return flat[o + offset, band, v.t, v.n]
    return flat[layout.base(o, v.t * spec.stride[0]) + offset, 0, 0, v.n]


def _masked_output(
    output: hl.Func,
    blocks: hl.Func,
    accum: hl.Func,
    spec: Conv3dSpec,
    layout: MaskedLayout,
    lanes: int,
    v: ConvVars,
    o: hl.Var,
) -> hl.RDom:
    """``output`` written by an update over the flattened output positions, which the schedule
    splits into tasks: a task's positions run across rows and frames, which the pure Vars (x,
    y, t) cannot follow (bounds inference would widen each task to whole frames). ``blocks``
    is ``accum`` at position ``o``, as the output stage reads it."""
    plane = hl.RDom([hl.Range(0, layout.position(0, 0, spec.out_size[0]))], f"{spec.name}_plane")
    blocks[v.lane, v.block, o, v.n] = accum[v.lane, v.block, o, 0, 0, v.n]
    value = blocks[v.c % lanes, v.c // lanes, plane.x, v.n]
    if spec.relu:
        value = hl.max(value, 0.0)
    x, y = plane.x % layout.width, plane.x // layout.width % layout.height
    output[v.c, v.x, v.y, v.t, v.n] = hl.undef(hl.Float(32))
    output[v.c, x, y, plane.x // layout.plane, v.n] = value
    return plane


def _in_place_read(
    src: hl.Func,
    plan: SparsePlan,
    spec: Conv3dSpec,
    layout: FlatLayout,
    v: ConvVars,
    o: hl.Var,
    entry: hl.Expr,
) -> hl.Expr:
    """Entry ``entry``'s input value from the input itself: per entry a baked input channel and
    frame offset, and where any entry reads another row or column (spatial taps or spatial
    padding) a row and column offset too (the others read the output position's own x and y:
    the shorter code measured in bench/results/opencl_gpu_in_place.md). ``src`` is zero
    outside the input, which is what the padding reads."""
    channels = baked_buffer(plan.taps[:, 0].copy(), f"{spec.name}_channels")
    frames = baked_buffer(frame_offsets(plan.taps, spec), f"{spec.name}_frames")
    ci = hl.unsafe_promise_clamped(channels[entry], 0, spec.in_channels - 1)
    x, y = o % layout.columns, o // layout.columns
    st, sy, sx = spec.stride
    col, row = x * sx, y * sy
    _, dh, dw = spec.dilation
    _, pad_h, pad_w = spec.pads_begin
    rows = (plan.taps[:, 2] * dh - pad_h).astype(np.int32)
    cols = (plan.taps[:, 3] * dw - pad_w).astype(np.int32)
    if rows.any() or cols.any():
        col += baked_buffer(cols, f"{spec.name}_columns")[entry]
        row += baked_buffer(rows, f"{spec.name}_rows")[entry]
    return src[ci, col, row, v.t * st + frames[entry], v.n]


def parse_group(text: str) -> tuple[int, int]:
    """``"8,4"`` -> (8, 4): a GeneratorParam string, since list params do not exist."""
    try:
        return check_group([int(part) for part in text.split(",")])
    except ValueError as exc:
        raise ValueError(f"group must be 'gM,gN' (two positive integers), got {text!r}") from exc


def layer_group(param: str, arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """The group from the GeneratorParam, else from the ``group`` array of the weights file.

    The build's per-layer compile job carries only spec, weights and schedule, so it passes the
    group inside the ``.npz`` (which also puts it in the compile cache key).
    """
    from_file = None
    if "group" in arrays:
        from_file = check_group([int(v) for v in np.asarray(arrays["group"]).ravel()])
    if not param:
        return from_file or DEFAULT_GROUP
    group = parse_group(param)
    if from_file is not None and from_file != group:
        raise ValueError(f"group={param} contradicts the weights file's group {from_file}")
    return group


SPARSE_PARAMS = ("spec", "weights", "group", "schedule", "dense_families", "dense_schedule")


class SparseInputs(NamedTuple):
    """A sparse layer's checked inputs for one target; ``schedule`` None: the target's family
    takes dense code (``dense_families``), whose schedule the dense generator chooses."""

    spec: Conv3dSpec
    weight: np.ndarray
    bias: np.ndarray | None
    group: tuple[int, int]
    schedule: SparseSchedule | None


def sparse_inputs(params: dict[str, str], target: hl.Target) -> SparseInputs:
    """The sparse generator's parameters (:data:`SPARSE_PARAMS`, missing ones empty) read and
    checked for ``target``: what :meth:`SparseConv3dGenerator.generate` starts from, and what
    the command line checks before Halide runs it, so that bad input is one error line."""
    spec, weight, bias, arrays = load_layer(params.get("spec", ""), params.get("weights", ""))
    dense_families = [f for f in params.get("dense_families", "").split(",") if f]
    unknown = sorted(set(dense_families) - set(TARGET_FAMILIES))
    if unknown:
        raise ValueError(f"dense_families {unknown}: the families are {list(TARGET_FAMILIES)}")
    group = layer_group(params.get("group", ""), arrays)
    if family_of(target) in dense_families:
        choose_schedule(target, spec, params.get("dense_schedule", ""))
        return SparseInputs(spec, weight, bias, group, None)
    shares = pattern_shares(weight, group)
    sched = choose_sparse_schedule(target, spec, group, params.get("schedule", ""), *shares)
    return SparseInputs(spec, weight, bias, group, sched)


@hl.generator(name="rt3d_conv3d_sparse")
class SparseConv3dGenerator(hl.Generator):
    """One vanilla or KGS Conv3d layer with its surviving pattern and weights baked in.

    ``spec`` is the layer's JSON (:class:`Conv3dSpec`), ``weights`` an ``.npz`` holding ``weight``
    (M, N, Kd, Kh, Kw) *with* its zeros (the pattern is read from them) and optionally ``bias``,
    ``group`` the kernel group ``"gM,gN"`` (default: the file's ``group`` array, else 8x4),
    ``schedule`` an optional JSON of sparse knob overrides
    (see :mod:`rt3d_halide.generators.sparse_knobs`). ``dense_families`` (a comma list of
    :func:`rt3d_halide.targets.family_of` names) gives the targets of those families the dense
    kernel instead, with ``dense_schedule`` as its overrides: one multi-target library whose
    targets run different kernels (the build's per-target choice).
    """

    spec = hl.GeneratorParam("")
    weights = hl.GeneratorParam("")
    group = hl.GeneratorParam("")
    schedule = hl.GeneratorParam("")
    dense_families = hl.GeneratorParam("")
    dense_schedule = hl.GeneratorParam("")

    input = hl.InputBuffer(hl.Float(32), 5)
    output = hl.OutputBuffer(hl.Float(32), 5)

    def generate(self) -> None:
        params = {name: str(getattr(self, name)) for name in SPARSE_PARAMS}
        spec, weight, bias, group, sched = sparse_inputs(params, self.target())
        if sched is None:
            generate_dense(self, spec, weight, bias, params["dense_schedule"])
            return
        # The schedule computes every block of every group, the padded lanes past the last
        # filter included (zero weights): the bias covers them too.
        padded = -(-spec.out_channels // group[0]) * group[0]
        if bias is not None:
            bias = np.pad(np.asarray(bias, np.float32), (0, padded - spec.out_channels))
        constrain_activation(self.input, spec.input_shape())
        funcs: SparseConvFuncs | QuadConvFuncs
        if sched.input_layout in QUAD_LAYOUTS:
            bbuf = baked_buffer(pack_bias(bias, padded, group[0]), f"{spec.name}_bias")
            quads = plan_quads(weight, group)
            copied = sched.input_layout == "interleaved_copy"
            checked = self.target().has_feature(hl.TargetFeature.CheckUnsafePromises)
            funcs = quad_conv3d(
                self.input,
                quads,
                bbuf,
                spec,
                self.output,
                sched.lanes,
                copied,
                sched.x_tile,
                checked_promises=checked,
                skip_frame_padding=sched.skips_frame_padding,
            )
        else:
            bbuf = baked_buffer(pack_bias(bias, padded, sched.lanes), f"{spec.name}_bias")
            plan = plan_sparse(weight, group, sched.chunk, sched.knobs.entry_order)
            assert sched.layout is not None
            in_place = sched.input_layout == "in_place"
            funcs = sparse_conv3d(
                self.input,
                plan,
                bbuf,
                spec,
                self.output,
                sched.lanes,
                sched.layout,
                in_place,
                sched.skips_frame_padding,
            )
        constrain_activation(self.output, spec.output_shape(), batch_of=self.input)
        if self.using_autoscheduler():
            return
        apply_sparse_schedule(sched, funcs, spec)
