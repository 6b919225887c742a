"""Schedules of the sparse Conv3d (vanilla / KGS) for x86, ARM64 and OpenCL.

CPU: vectors run along the output plane, not along output channels. The padded input copy
(:class:`~.layout.FlatLayout`) puts every input plane x-innermost and split into stride phases, so
that output position ``o = x + Wq * y`` reads, for every entry, ``o`` plus a constant: a task of
``task_rows`` output rows is one flat range of plane positions, cut into blocks of ``x_vectors``
vectors whatever the row width (only the padding columns between rows are computed and dropped).
The accumulator block is ``lanes`` output channels (a divisor of the group's gM) by those
vectors. Per entry of the group's list the loop loads one input vector per x vector, broadcasts
each channel's weight once and issues ``lanes * x_vectors`` FMAs. Each task streams the whole
weight table once, so deep layers take tasks of whole frames and split their channel groups into
``slices``, each a parallel task of its own that also writes its channels of the output.

Why the flat plane: blocks of whole vectors per row rounded 28-wide rows up to 32 and capped the
block at 2 vectors (a 3-vector 24-wide tile wastes 20 of 48 positions); the flat range of a
4-row task of C3D conv3b is 115 positions (118 before rows shared a padding column), 5 blocks
of 3 vectors, and the block gets 12 accumulators instead of 8. Measured, one interleaved run,
shapes of the sparse benchmark at 26 % kept against the row-tiled kernel: C3D conv3b 58.2 ->
45.4 ms, conv2 56.9 -> 50.4 ms, conv4b 33.0 -> 31.7 ms; R(2+1)D 3x1x1 7.4 -> 6.6 ms, 1x3x3
unchanged (10.0 ms).

Where a task's rows are a whole small plane, the blocks still round up once per frame: C3D
conv4b's 14x14 frames compute 224 positions for 196 (87.5 %). The ``padding`` knob's "masked"
copy (:class:`~.layout.MaskedLayout`, stride-1 convs with a same-size plane) leaves the spatial
padding out: positions run across rows and frames, tasks are runs of blocks over the whole
output (98 % useful on conv4b), the reads that fall on the padding are masked to zero (a mask
test per input vector per entry, ``PADDING``), and the output leaves through an update over
the flattened positions. But masked code cannot skip the entries that read the temporal padding
(its tasks run across frames; see :mod:`.conv3d_sparse`), which "auto" weighs: conv4b, on 4
frames, stays copied.

Why not channels as vector lanes (the layout of the team's Halide 21 notes,
``shared/reference/halide21-notes.md`` beside this repository, with a broadcast input per FMA)? On
this AVX2 Zen 3 the broadcasts, not the FMAs, set the pace: in C with every input in L1
(``bench/inner_loop_ceiling.py``), 14 x (broadcast + FMA) per weight vector ran at 71 % of the
register-only FMA rate, while 4 channels x 3 x vectors (4 broadcasts, 3 loads, 12 FMAs) ran at
92 % (61 and 83 % in the first, slower run). The notes' 95 % was AVX-512,
whose FMA takes a broadcast memory operand for free. On C3D conv3b at 26 % kept the change
(x-innermost copy, chunked reduction) took the layer from 64-68 ms to 41-50 ms against torch's
110-130 ms dense.

Temporal-only kernels (Kx1x1, spatial stride 1, no spatial padding: R(2+1)D's temporal convs) read
input (x, y) for output (x, y), so they skip the transposing copy: the input is read in place,
channels innermost (:func:`~.layout.interleaved_fits`), four input channels at a time
(:mod:`.conv3d_quads`). A block is 3 consecutive positions of the flattened output plane (AVX2),
whatever the row width, by a group's gM output channels; per quad it loads each position's four
inputs once into both halves of a vector and issues ``gM / 2`` FMAs per position, with no broadcast
of a single float. Blocks run outside groups, so a block's inputs (every channel of its positions
and frames) stay in L1 while every group's weights stream past. History: the first in-place kernel
broadcast one input float per FMA over blocks of up to 14 positions, output channels as the lanes
(71 % of the FMA rate in L1, broadcast-bound); it had already beaten the planar copy on these
layers (R(2+1)D-18's 288 -> 128 3x1x1 conv at a third kept: 5.1 -> 4.4 ms, with no copy to
transpose and no output transpose). The quads took 0.72-0.81 of its time on that conv over seven
patterns (a sixth to two thirds kept, balanced, unbalanced, vanilla). On AVX-512 (Zen 5) the
planar copy took 1.43 and 1.94 of the quads' time on R(2+1)D-18's 288 -> 128 3x1x1 conv at half
and a sixth kept (KGS unbalanced, per-round ratio over 11 rounds), so pruned layers keep the
quads there, though unpruned they lose to dense code (``rt3d_halide.kernel_choice``'s
``TEMPORAL_QUADS_OFF_FAMILIES``).

Other kernels with spatial taps and short reductions (input channels x taps <= the knob
``quad_copy_max_entries``: on AVX2 C3D conv2 and R(2+1)D's 1x3x3 convs up to 256 channels; none
on AVX-512) take the same quads over a zero-padded copy that keeps channels innermost: the copy
pads without transposing, each group runs its quads over every block of the task's rows with
its weights in L1, and the output takes the lane sums directly, with no accumulator in memory.
Longer reductions keep the planar copy: a quad reads 16 bytes of a window of every channel per
position, and once a group's weights and a block's window outgrow the caches the planar kernel,
which chunks input channels, wins (measurements beside ``QUAD_COPY_MAX_ENTRIES`` in
:mod:`.sparse_knobs`).

OpenCL keeps channels as vector lanes: one work-item writes a group's gM channels x ``x_tile``,
and neighbouring work-items take neighbouring x tiles of the same group (``SPARSE_OPENCL``).
Kernels of one spatial tap without spatial padding read their input in place there, with no
padded copy (:func:`~.sparse_choice.gpu_reads_in_place`); others may be forced to (slower on an
H100).

The knobs and their per-family values are in :mod:`.sparse_knobs`, the chooser that resolves them
per layer in :mod:`.sparse_choice`; a JSON object of overrides may set any knob
(``{"task_rows": 1}``).
"""

from __future__ import annotations

import itertools
from typing import Any

import halide as hl

from .conv3d_quads import QUAD
from .layout import MaskedLayout
from .schedules import (
    tile_output_for_gpu,
)
from .sparse_choice import SparseSchedule, task_blocks
from .sparse_knobs import (
    OPENCL_VECTOR_WIDTHS,
    OUTPUT_TILE_MIN_LANES,
    QUAD_LAYOUTS,
    SparseCpuKnobs,
    SparseGpuKnobs,
)
from .spec import Conv3dSpec


def apply_sparse_schedule(sched: SparseSchedule, funcs: Any, spec: Conv3dSpec) -> None:
    if isinstance(sched.knobs, SparseGpuKnobs):
        _schedule_gpu(sched, sched.knobs, funcs)
    elif sched.input_layout in QUAD_LAYOUTS:
        _schedule_quads_cpu(sched, sched.knobs, funcs)
    else:
        _schedule_cpu(sched, sched.knobs, funcs, spec)


def _block_in_registers(func: hl.Func, level: hl.LoopLevel, f: Any, lanes: int, x: int) -> None:
    """Constant extents put a block in registers (see the Halide 21 notes). Every dimension is
    bounded; the batch stays out of the parallel Var (fused with it, bounds inference widened
    the block to every row and it went to memory, indexed dynamically)."""
    v = f.vars
    func.compute_at(level).store_in(hl.MemoryType.Register)
    func.bound_extent(v.lane, lanes).bound_extent(v.block, 1).bound_extent(f.o, x)
    func.bound_extent(v.t, 1).bound_extent(v.n, 1).bound_extent(f.band, 1)
    if func is f.partial:
        func.bound_extent(f.chunk, 1)


def _vector_o(stage: Any, f: Any, sched: SparseSchedule, o: Any, *outer: Any) -> None:
    """``o`` (a block's plane positions) as unrolled vectors, then the lanes unrolled, then
    ``outer``."""
    lane = f.vars.lane
    ov, ow = hl.Var("ov"), hl.Var("ow")
    stage.split(o, ov, ow, sched.vector).reorder(ow, ov, lane, *outer)
    stage.vectorize(ow).unroll(ov).unroll(lane)


def _schedule_cpu(sched: SparseSchedule, knobs: SparseCpuKnobs, f: Any, spec: Conv3dSpec) -> None:
    """Tasks of ``task_rows`` output rows (:func:`_row_tasks`) or, masked, runs of blocks over
    the flattened output (:func:`_masked_tasks`), in parallel. Per task, chunk by chunk of input
    channels: every group, every block of plane positions, every block of ``lanes`` channels
    sums the chunk's entries in registers and adds them to the task's accumulator (in memory).
    The chunk's input rows stay in cache (L1 on AVX2, L2 on AVX-512: ``CHUNK_BYTES``) while all
    groups pass over them; without chunks each group swept the whole input window from L2 (C3D
    conv3b at 26 % kept on Zen 3: 66 against 50 ms).

    The accumulator passes cost most where chunks are short. Before ``CHUNK_BYTES`` gave AVX-512
    L2-sized chunks, C3D conv2 at a sixth kept (8-row tasks, 16 chunks of 4 channels, 20
    entries per list) spent about a tenth of its samples there, streaming the task's 245 KiB
    accumulator through L2 once per chunk. Alternatives measured then on Zen 5 (AVX-512) on
    that layer, time against that schedule in one process (7-9 rounds): the accumulators loaded
    into registers before each list and stored after it, with no partial sum (LLVM keeps them in
    registers across the entry loop), 1.05-1.06, the loads' latency now ahead of the FMAs;
    groups taken 1, 2 or 4 at a time through every chunk, so that their accumulator stays in L1
    (each chunk's input read again per turn), 1.05-1.10 (on the 14-row tasks of 8-channel
    chunks the chooser now gives it, 1.04 one group at a time and 1.01 four); more
    ``slices`` 1.04 (2) to 1.67 (16); blocks outside groups and chunks 1.06, and with one chunk
    1.14; 48 or 64 KiB chunks 0.97-1.01 (KGS balanced and vanilla)."""
    v, o, accum = f.vars, f.o, f.accum
    passes = sched.group_lanes // sched.lanes
    groups = -(-spec.out_channels // sched.group_lanes)
    # A slice's accumulator spans whole groups (a partial last slice would run past the last
    # group): the chooser takes slices that divide them.
    assert groups % sched.slices == 0, (groups, sched.slices)
    slice_groups = groups // sched.slices
    if f.plane is None:
        task_level = _row_tasks(sched, knobs, f, spec, slice_groups)
    else:
        task_level = _masked_tasks(sched, knobs, f, spec, slice_groups)
    accum.compute_at(task_level)
    accum.bound(v.lane, 0, sched.lanes)
    if sched.slices > 1:
        accum.bound_extent(v.block, slice_groups * passes)
    else:
        accum.bound(v.block, 0, groups * passes)
    # Stored as the block computes it: positions contiguous.
    accum.reorder_storage(o, v.lane, v.block, f.band, v.t, v.n)
    _vector_o(accum, f, sched, o, v.block)
    if f.partial is None:
        return
    gco, gcb, oo, oi = hl.Var("gco"), hl.Var("gcb"), hl.Var("oo"), hl.Var("oi")
    upd = accum.update()
    upd.split(v.block, gco, gcb, passes)
    upd.split(o, oo, oi, sched.x_tile, hl.TailStrategy.RoundUp)
    # Per chunk, each group's list runs over every block of the task (the chunk's input rows fit
    # L1; every group over one block before the next ran C3D conv2 and conv3b 8-10 % slower).
    # On an Intel Xeon (AVX-512), where the groups' sweeps read the chunk from L2, that order
    # took 0.95-1.04 of the time (per-round ratio in one process, 7-9 rounds, KGS 8x4
    # unbalanced at a sixth, a quarter and half kept; C3D conv2, conv3b, conv4b and R(2+1)D-18's
    # 28x28 1x3x3): no steady gain there either. Retried there after the "channel" entry order,
    # both ways with rounds rotated (11 rounds, a sixth kept; geometric mean of the two ratios):
    # conv2 0.975, conv3b 1.015, conv4b 0.975, the 128 -> 288 1x3x3 0.98 and the 64 -> 144 one
    # 0.98. A gain of about 2 % on four layers and a loss on conv3b, where Zen 5 had measured this
    # order 8-10 % slower on conv2 and conv3b: no rule the few points would back. Groups outside
    # the chunks there (each group, or 2 or 4 at a time, through every chunk, its accumulator
    # rows hot; the task's input read from L2 once per group), one group at a time, both ways,
    # 11 rounds: at a sixth kept the 28x28 1x3x3 0.95 but conv2 1.03; at half kept the 28x28
    # 1x3x3 0.965, the 56x56 one 1.00, the 14x14 one 1.03, conv3b 1.26 and conv4b 1.10.
    _vector_o(upd, f, sched, oi, gcb, oo, gco, f.chunk_reduction.x)

    partial = f.partial
    _block_in_registers(partial, hl.LoopLevel(accum, gcb), f, sched.lanes, sched.x_tile)
    partial.reorder_storage(o, v.lane, v.block, f.band, v.t, v.n, f.chunk)
    _vector_o(partial, f, sched, o)
    _vector_o(partial.update(), f, sched, o, f.reduction.x)


def _masked_tasks(
    sched: SparseSchedule, knobs: SparseCpuKnobs, f: Any, spec: Conv3dSpec, slice_groups: int
) -> hl.LoopLevel:
    """Tasks of ``task_blocks`` blocks of the flattened positions (:class:`~.layout.MaskedLayout`;
    the last one guarded) times a slice of the channel groups, in parallel, writing their
    positions' channels in tiles as :func:`_transposed_output` does (or, without tiles, each
    channel vector gathered); the copy is made once per sample, before the tasks."""
    v, out, plane = f.vars, f.output, f.plane
    stage = out.update()
    channels, slice_at = _slices(stage, v.c, sched, slice_groups)
    task, p = hl.RVar("task"), hl.RVar("p")
    positions = sched.task_blocks * sched.x_tile
    stage.split(plane.x, task, p, positions, hl.TailStrategy.GuardWithIf)
    co, ci = hl.Var("co"), hl.Var("ci")
    # In slices, a task's short last tile (positions past the plane's end cut off) wrote its
    # first position from a register tile that no task had filled: 3 -> 12, 3x3x3 on 5x6x6
    # (180 positions in tasks of 96), KGS 4x4 in three slices, inf at one position in every
    # channel. Sliced masked tasks take the gather.
    if tiles_output(knobs, sched.lanes) and sched.slices == 1:
        po, pi = hl.RVar("po"), hl.RVar("pi")
        stage.split(channels, co, ci, sched.lanes, hl.TailStrategy.GuardWithIf).vectorize(ci)
        stage.split(p, po, pi, knobs.output_tile, hl.TailStrategy.GuardWithIf).unroll(pi)
        # A task's last tile is cut short where the tile does not divide the task's positions:
        # its registers keep the whole tile's size.
        _tile_in_registers(f, out, co, f.o, [v.block, v.n], knobs.output_tile)
        inner = [ci, pi, co, po]
    else:
        stage.split(channels, co, ci, knobs.vector_lanes, hl.TailStrategy.GuardWithIf)
        stage.vectorize(ci)
        inner = [ci, co, p]
    stage.reorder(*inner, task, *slice_at, v.n)
    if slice_at:
        stage.fuse(task, slice_at[0], task)
    # Halide cannot prove that the tasks' positions (div and mod of the flat position) differ.
    stage.allow_race_conditions()
    if knobs.parallel:
        stage.parallel(task)
    _schedule_masked_copy(f, spec, out, knobs, sched)
    return hl.LoopLevel(out, task)


def _slices(stage: Any, c: hl.Var, sched: SparseSchedule, slice_groups: int) -> tuple[Any, list]:
    """The output channels ``c`` split into ``sched.slices`` slices of ``slice_groups`` groups:
    (the channel Var within a slice, [the slice Var]), or (``c``, []) with one slice.

    A slice of groups is a task of its own, which writes its channels of the output: parallel
    work without a parallel loop nested in each task, the output stage included. Slices
    outermost: the tasks running at once read the same slice of the weight table (C3D conv4b,
    21 rounds: 0.99 of the time with the two slices of a frame side by side). Against the
    nested loop, on the C3D stack's pruned weights, median per-round time ratio over 21
    interleaved rounds: conv4a 0.98, conv4b 0.98, conv5a 0.98, conv5b 0.99; on the balanced
    26 % pattern of the sparse benchmark, conv4b 0.96 and conv4a 0.95."""
    if sched.slices == 1:
        return c, []
    channels, cs = hl.Var("cw"), hl.Var("cs")
    stage.split(c, cs, channels, slice_groups * sched.group_lanes, hl.TailStrategy.GuardWithIf)
    return channels, [cs]


def _row_tasks(
    sched: SparseSchedule, knobs: SparseCpuKnobs, f: Any, spec: Conv3dSpec, slice_groups: int
) -> hl.LoopLevel:
    """Tasks of ``task_rows`` output rows of one frame times a slice of the channel groups, in
    parallel, writing the output row by row; the copy before them or in each."""
    v, out = f.vars, f.output
    task, yo, yi = hl.Var("task"), hl.Var("yo"), hl.Var("yi")
    channels, slice_at = _slices(out, v.c, sched, slice_groups)
    # A band's copy holds its own rows: the tasks of a banded layout take whole bands (the last
    # one guarded), not a last band shifted inwards over its neighbour's rows.
    tail = hl.TailStrategy.GuardWithIf if f.layout.band else hl.TailStrategy.ShiftInwards
    out.split(v.y, yo, yi, sched.task_rows, tail)
    if tiles_output(knobs, sched.lanes):
        tile = min(knobs.output_tile, spec.out_size[2])
        inner = _transposed_output(f, out, channels, sched.lanes, tile)
    else:
        # Each channel vector gathers its floats one by one from the accumulator, whose
        # positions are contiguous (vectorizing x too made every load and store scalar).
        co, ci = hl.Var("co"), hl.Var("ci")
        out.split(channels, co, ci, knobs.vector_lanes, hl.TailStrategy.GuardWithIf)
        out.vectorize(ci)
        inner = [ci, co, v.x]
    # Every channel of a position (or of a tile's positions) before the next: the output is
    # written as one contiguous run per row (C3D conv1, 64 channels: 16.9 -> 15.7 ms, x outside
    # the channel vectors wrote 32 bytes at a time into 112 lines 256 bytes apart).
    out.reorder(*inner, yi, yo, v.t, *slice_at, v.n).fuse(yo, v.t, task)
    if slice_at:
        out.fuse(task, slice_at[0], task)
    if knobs.parallel:
        out.parallel(task)
    _schedule_flat_cpu(f, spec, out, knobs, sched, task)
    return hl.LoopLevel(out, task)


def tiles_output(knobs: SparseCpuKnobs, lanes: int) -> bool:
    """Whether the planar kernel's output stage runs in transposed tiles
    (:data:`~.sparse_knobs.OUTPUT_TILE`) for accumulator blocks of ``lanes`` channels, rather
    than the gather."""
    return bool(knobs.output_tile) and lanes >= OUTPUT_TILE_MIN_LANES and lanes & (lanes - 1) == 0


def _transposed_output(
    f: Any, out: hl.Func, channels: hl.Var, lanes: int, tile: int
) -> list[hl.Var]:
    """The output in tiles of one accumulator block's ``lanes`` channels x ``tile`` positions
    of a row, transposed in registers: the block's rows of positions are loaded as vectors
    (``blocks``), stored lane by lane into a register tile whose channels are innermost (its
    wrapper), and each position's channels leave as one vector; LLVM turns the strided register
    accesses into shuffles. Returns the output's loop Vars, innermost first, up to the row."""
    v = f.vars
    co, ci, xo, xi = hl.Var("co"), hl.Var("ci"), hl.Var("xo"), hl.Var("xi")
    out.split(channels, co, ci, lanes, hl.TailStrategy.GuardWithIf).vectorize(ci)
    out.split(v.x, xo, xi, tile, hl.TailStrategy.ShiftInwards).unroll(xi)
    _tile_in_registers(f, out, co, v.x, [v.block, v.y, v.t, v.n])
    return [ci, xi, co, xo]


def _tile_in_registers(
    f: Any, out: hl.Func, co: hl.Var, position: hl.Var, rest: list, extent: int = 0
) -> None:
    """``blocks``, positions innermost, and its wrapper, channels innermost, in registers at the
    output's ``co``: the transpose of an output tile (:func:`_transposed_output`); ``extent``
    positions whatever the tile's own (0: the tile's, constant)."""
    lane = f.vars.lane
    wrapper = f.blocks.in_(out)
    for func, storage in ((f.blocks, [position, lane]), (wrapper, [lane, position])):
        func.compute_at(out, co).store_in(hl.MemoryType.Register)
        if extent:
            func.bound_extent(position, extent)
        func.reorder_storage(*storage, *rest)
        func.vectorize(position).unroll(lane)


def _schedule_quads_cpu(sched: SparseSchedule, knobs: SparseCpuKnobs, f: Any) -> None:
    """Tasks of ``task_frames`` output frames (one when copied) in parallel: copied, of
    ``task_rows`` rows; read in place, of ``task_blocks`` blocks of the flattened plane (about
    ``task_rows`` rows' positions). Read in place, a task runs its frames one after the other and
    the tasks run frame range by frame range over the same positions, so that each frame finds
    two of its three input frames of those positions (a 3x1x1 kernel) still in cache
    (``QUAD_TASK_FRAMES``). One-frame tasks against rows within frames, per-round time ratio in
    one process at a third kept, R(2+1)D-18's 3x1x1 convs took 0.91 (layer1, 56x56 rows),
    0.95-0.97 (layer2.1, three patterns, two runs), 0.98 (layer3, layer4) and 1.00 (layer2.0's
    temporal stride 2). The copied quads keep rows within frames (C3D conv2 and R(2+1)D's 1x3x3:
    1.00-1.02 with frames inside). Per task, block by block of ``x_tile`` positions and group by
    group, the block's accumulators sum the group's quads in registers; then the output adds
    each channel's four input-channel lanes and its bias and stores the group's channels.

    Copied, the last block of a row shifts inwards, recomputing a few positions. Read in place,
    blocks run over the flattened plane (the input and output of a 1x1 spatial kernel are
    contiguous across rows), and the plane's last block shifts inwards: a 28-wide row computed
    30 positions, a 7-wide one 9. Per-round time ratio in one process against blocks within
    rows (41 rounds, two runs each; the old build against itself 0.96-1.04), R(2+1)D-18's 3x1x1
    convs at a third (vanilla, balanced) and a sixth (unbalanced) kept: layer2.1 (28x28)
    0.92-0.98, layer3.1 (14x14) 0.94-0.99, layer4.1 (7x7) 0.85-0.90; layer1.0 (56x56, a third
    balanced) 0.98-0.99, layer2.0 (temporal stride 2) 0.97-0.98.

    Read in place, blocks run outside groups: a block's inputs (every channel of its positions
    and frames, 10 KiB on R(2+1)D-18's 288-channel 3x1x1) stay in L1 while the groups' weights
    stream from L2; groups outside blocks ran that conv at 1.07-1.2 of the time, and chunks of 2
    or 4 groups over a row's blocks (a chunk's weights in L1, each block's inputs read once per
    chunk) at 1.04-1.10 with a third or a sixth kept, 0.98-0.99 with two thirds. From the padded
    copy (kernels with spatial taps, whose blocks read a window of rows) groups run outside
    blocks, over the task's rows, so a group's weights are read from L1 by every block
    (blocks outside groups: R(2+1)D 1x3x3 0.96 against 0.91 of the planar kernel's time). In
    the quad loop the positions are innermost, so one weight vector and a block's input vectors
    are live at once (weights innermost spilled an accumulator per quad)."""
    v, out, dot = f.vars, f.output, f.dot
    go, mi = hl.Var("go"), hl.Var("mi")
    positions = sched.x_tile
    stage = out
    if f.plane is not None:
        # An update's reduction Vars start innermost: channels first, as the pure stage's are.
        stage = out.update().reorder(v.c, f.plane.x, f.plane.y, v.t, v.n)
    stage.split(v.c, go, mi, sched.group_lanes, hl.TailStrategy.GuardWithIf)
    vector = 1 << (min(knobs.vector_lanes, sched.group_lanes).bit_length() - 1)
    if vector > 1:
        stage.vectorize(mi, vector, hl.TailStrategy.GuardWithIf)
    if f.plane is None:
        xo, xi, yo, yi, task = (hl.Var(name) for name in ("xo", "xi", "yo", "yi", "task"))
        out.split(v.x, xo, xi, positions, hl.TailStrategy.ShiftInwards).unroll(xi)
        out.split(v.y, yo, yi, sched.task_rows, hl.TailStrategy.ShiftInwards)
        out.reorder(mi, xi, xo, yi, go, yo, v.t, v.n).fuse(yo, v.t, task)
        block = xo
        _schedule_padded_copy(f, out, knobs)
    else:
        # Blocks over the flattened plane: a 28-wide row no longer rounds up to 30 positions.
        # Frames inside blocks of the plane: a task's consecutive frames, and consecutive
        # tasks, read the same input positions, two of their three frames in common, while
        # those are still in cache (see the docstring).
        bo, bi, task = hl.RVar("bo"), hl.RVar("bi"), hl.RVar("task")
        to, ti = hl.Var("to"), hl.Var("ti")
        stage.unroll(f.plane.x)
        stage.split(f.plane.y, bo, bi, sched.task_blocks, hl.TailStrategy.GuardWithIf)
        stage.split(v.t, to, ti, sched.task_frames, hl.TailStrategy.GuardWithIf)
        stage.reorder(mi, f.plane.x, go, bi, ti, to, bo, v.n).fuse(to, bo, task)
        # Halide cannot prove that tasks write apart: the plane's last block shifts inwards
        # and rewrites positions of the one before it, with the same values.
        stage.allow_race_conditions()
        block = go
    if knobs.parallel:
        stage.parallel(task)
    if dot is None:
        return
    dot.compute_at(out, block).store_in(hl.MemoryType.Register)
    inner, *rest = f.position
    extents = [(f.c4, QUAD), (f.half, f.halves), (f.k, f.per_half), (f.group, 1)]
    extents += [(inner, positions), *((var, 1) for var in rest), (v.t, 1), (v.n, 1)]
    for var, extent in extents:
        dot.bound_extent(var, extent)
    for dot_stage, order in ((dot, [f.k, inner]), (dot.update(), [inner, f.k, f.reduction.x])):
        dot_stage.reorder(f.c4, f.half, *order, f.group, *rest, v.t, v.n).vectorize(f.c4)
        if f.halves > 1:
            dot_stage.vectorize(f.half)
        dot_stage.unroll(f.k).unroll(inner)


def _schedule_padded_copy(f: Any, out: hl.Func, knobs: SparseCpuKnobs) -> None:
    """The quads' padded copy, once per sample: frames in parallel, each row of channels as
    vectors. Splitting the flat index by the copy's own extents turns its divisions back into
    the split's Vars."""
    flat, i, padded = f.flat, f.flat_index, f.padded
    pos, chan, col, plane, row, frame = (hl.Var(n) for n in ("pos", "ch", "col", "pl", "row", "fr"))
    flat.bound(i, 0, padded.size).compute_at(out, f.vars.n)
    flat.split(i, pos, chan, padded.channels).split(pos, plane, col, padded.columns)
    flat.split(plane, frame, row, padded.rows)
    _vectorize_within(flat, chan, knobs.vector_lanes, padded.channels)
    if knobs.parallel:
        flat.parallel(frame)


def flat_extent(spec: Conv3dSpec, sched: SparseSchedule) -> int:
    """Floats of the padded copy the CPU schedule reads, in whole planes (of every stride
    phase): the last task's last block reaches past the last row (rounded up to whole blocks)
    and must read zeros, not leave the buffer."""
    layout = sched.layout
    assert layout is not None  # the planar kernel's
    out_t, out_h, _ = spec.out_size
    rows = sched.task_rows
    blocks = task_blocks(spec, layout, rows, sched.x_tile)
    last_o = layout.position(0, out_h - rows) + blocks * sched.x_tile - 1
    dt, dh, dw = spec.dilation
    last_offset = max(
        layout.index(spec.in_channels - 1, kx * dw, ky * dh, kz * dt)
        for kz, ky, kx in itertools.product(*(range(k) for k in spec.kernel))
    )
    last = layout.base(last_o, (out_t - 1) * spec.stride[0]) + last_offset
    # Whole planes of every stride phase: the copy's loops split the index by them.
    unit = layout.columns * layout.rows * layout.stride[0] * layout.stride[1]
    return max(layout.size, -(-(last + 1) // unit) * unit)


# The widest padded row the planar copy writes as one vector (see _schedule_flat_cpu): C3D's
# 112-wide RGB stem takes 113 columns.
COPY_ROW_VECTOR_MAX = 128
NEON_LANES = 4  # float32 lanes of a NEON vector


def _schedule_flat_cpu(
    f: Any,
    spec: Conv3dSpec,
    out: hl.Func,
    knobs: SparseCpuKnobs,
    sched: SparseSchedule,
    task: hl.Var,
) -> None:
    """The padded copy, once per sample: frames in parallel; per frame, row by row, every
    channel's (and stride phase's) row as one vector of x. A banded layout's copy is made in
    each ``task``, of the band's rows of the task's frame, in the same loops (``TASK_COPY_BYTES``).

    Splitting the flat index by the layout's own extents lets the simplifier turn the divisions
    back into the split's Vars. Reading channels-innermost input along x is a strided gather;
    with the channels inside the row loop, one input row (every channel) stays in L1 while all
    channel planes take their row from it (plane by plane, each input line was fetched once
    per channel it holds: C3D conv2 53 -> 51 ms, R(2+1)D 1x3x3 11.3 -> 10.4 ms).

    A row of up to ``COPY_ROW_VECTOR_MAX`` columns is one vector of its ``columns`` lanes,
    whatever the ISA's width (LLVM splits it), so that every lane's flat index divides exactly by
    the layout's extents. Rows in vectors of the ISA's width, the last one shifted inwards, left
    the simplifier a ``min`` it could not see through: every lane divided its flat index to find
    its channel. Wider rows keep those vectors: LLVM's compile time grows faster than the row
    (a 16-channel 3x3x3 layer for AVX-512: 2.3 s at 113 columns, 8.0 s at 225, 38 s at 449).
    In perf samples at 22-26 % kept (Zen 5, AVX-512) the copy fell from 15-16 to 4.5-6 % of
    R(2+1)D-18's 1x3x3 conv (29-float rows), 3.2-4.9 to 1.2-1.4 % of C3D conv4b (15) and 6.9
    to 3.1-3.8 % of conv1 (113); C3D conv2 (57) gave 7.4 before and 4.7 and 8.2 % after,
    within its run-to-run spread (later profiles, output tiles in: 6.5-6.8 % of the 1x3x3,
    4.1-4.2 % of conv1). Paired in one process (25 rounds), the 1x3x3 conv took 0.85-0.90 of
    the time, conv2 0.97, and the 1x3x3 built for AVX2 0.92-0.96.

    What is left of the copy waits on memory, not on the transpose. Measured on Zen 5 (AVX-512),
    KGS 8x4 unbalanced at a sixth kept, per-round time ratio in one process (11 rounds) against
    this schedule:
    - The copy as 16 x 16 register tiles, each position's 16 channels loaded as one vector and
      transposed by shuffles (a scatter over an RDom, the tiles in registers): C3D conv2
      1.08-1.11 (two loop orders, three runs). perf put its samples on the input loads.
    - The input read and the output written NCDHW, so that the copy only pads rows, with no
      transpose, and the output leaves the accumulator as rows: conv2 1.01.
    - No copy at all, with the input handed over in this layout already: conv2 0.87-0.90 (two
      runs), R(2+1)D-18's 1x3x3 conv 0.90. This is the most that a previous layer writing this
      layout could gain; in that run it would have lifted those rows from 72-73 % to 81-82 % of
      the FLOPs rate.
    - A copy per task over the whole input's flat index (its region found by bounds inference,
      aligned to whole frames): the copy recovered each row's number from the flat index by
      a modulo it could not see through, so every row vector took a per-lane mask. R(2+1)D-18's
      128-channel 1x3x3 conv at a sixth kept 1.13-1.14 over four runs, 1.00-1.09 at a quarter
      to half; in perf samples the copies, passes and output took 1.5 times as long per call,
      while the entry loop ran 3 % faster. A banded layout (``TASK_COPY_BYTES``: each band and
      output frame its own copy, indexed from 0) writes its rows like the whole input's copy.
      C3D conv2's output frame reads three input frames, so its tasks ran 16, 8 or 4 frames in
      turn, each copying one new frame (Halide's sliding window over the first variant's flat
      index): 0.96-1.00 over three runs, 0.99 and 1.03; bands of 4-8 rows instead of 14,
      0.99-1.12. The banded layout with a frame index of its own gained nothing either (each
      task a band of rows over 4 or 8 output frames in turn, the sliding window copying one
      new frame per output frame into a ring of 4; KGS 8x4 unbalanced at a sixth kept, 9
      rounds, 2026-11-27): conv2 1.00 at both, conv3b 1.05 and 1.01. In conv2's perf
      samples the copy inside the tasks cost 6.6 % against the whole input's 7.5 %: writing
      the copy out and reading it back costs little; reading the channels-innermost input is
      what remains. 3x3x3 kernels keep the copy of the whole input.
    - The copy per task as 8 x 8 register tiles (a scatter over an RDom of 8 columns, channels,
      column blocks and rows; each position's 8 channels loaded as one vector, transposed by
      shuffles): R(2+1)D-18's 28x28 1x3x3 conv at a sixth kept 0.98 and 1.02 (31 rounds each),
      though perf had put 7.7 % of its samples on this copy's per-float inserts. Its two slices
      each copy the frame: one slice of 14-row tasks, which copies it about once, took 1.005.

    The copy already runs at the speed of memory. In standalone pipelines of conv2's copy
    (2 threads, the input 12.8 MB, the copy 15 MB), this schedule took 0.75-0.83 ms over three
    runs and a plain contiguous copy of the same bytes 0.83 ms. The copy as a scatter of
    register tiles, each tile loaded channels-innermost and stored x-innermost, took 1.40 ms
    with 16 x 16 tiles (LLVM built the transpose from two-source permutes), 0.78 ms with 8 x 8
    and 0.75 ms with 4 x 4. On an Intel Xeon, whose one shuffle port takes every per-float
    insert of this schedule, a standalone copy of that shape (2 threads, 2026-11-28) took 1.45
    ms against 1.02 ms as 8 x 8 register tiles with the input in cache, but 1.8-2.3 ms either
    way with the caches flushed before each copy; inside conv2 at a sixth kept, perf put 12.4 %
    of a 20.7 ms call (2.6 ms) on the copy. In a later session there the same standalone copy
    took 1.50 against 1.12 ms flushed or not, so the tiles went into the layer (a scatter of
    8 x 8 tiles over an RDom of the whole input's copy, stride-1 layouts, a scratch knob): KGS
    8x4 unbalanced at a quarter kept, both ways, 11 rounds, C3D conv2 1.01, conv3b 1.00 and
    conv4b 1.01 of the time. Inside the layer the copy waits on memory either way.
    """
    flat, i, layout = f.flat, f.flat_index, f.layout
    pos, col, plane, row = hl.Var("pos"), hl.Var("col"), hl.Var("plane"), hl.Var("row")
    rest, phase, frame, chan = hl.Var("rest"), hl.Var("phase"), hl.Var("frame"), hl.Var("chan")
    if layout.band:
        flat.bound(i, 0, layout.size).compute_at(out, task)
    else:
        flat.bound(i, 0, flat_extent(spec, sched)).compute_at(out, f.vars.n)
    flat.split(i, pos, col, layout.columns).split(pos, plane, row, layout.rows)
    phases = layout.stride[0] * layout.stride[1]
    # The extent holds whole planes, at least every channel's: the last frame of channels
    # shifts inwards over the extra planes past the layout's end.
    flat.split(plane, rest, phase, phases)
    flat.split(rest, frame, chan, layout.channels, hl.TailStrategy.ShiftInwards)
    flat.reorder(col, phase, chan, row, frame)
    _vectorize_rows(flat, col, layout.columns, knobs)
    if knobs.parallel and not layout.band:
        flat.parallel(frame)


def masked_extent(spec: Conv3dSpec, layout: MaskedLayout, task_positions: int) -> tuple[int, int]:
    """(first, end): the flat indices the masked copy covers, in whole planes. Reads of the
    first positions' left and top padding fall before index 0, and the last task's rounded-up
    positions read past the last plane."""
    dt, dh, dw = spec.dilation
    kd, kh, kw = spec.kernel
    first = min(0, layout.index(0, 0, 0, 0))
    last_o = -(-layout.position(0, 0, spec.out_size[0]) // task_positions) * task_positions - 1
    channel = spec.in_channels - 1
    last = last_o + layout.index(channel, (kw - 1) * dw, (kh - 1) * dh, (kd - 1) * dt)
    plane = layout.plane
    return first // plane * plane, max(layout.size, -(-(last + 1) // plane) * plane)


def _schedule_masked_copy(
    f: Any, spec: Conv3dSpec, out: hl.Func, knobs: SparseCpuKnobs, sched: SparseSchedule
) -> None:
    """The masked layout's copy, once per sample, in the loops of :func:`_schedule_flat_cpu`
    (frames in parallel, each input row's channels while it is in L1, each channel's row one
    vector), over :func:`masked_extent`: the planes before the first hold whatever the
    decomposition gives (only masked reads land there)."""
    flat, i, layout = f.flat, f.flat_index, f.layout
    col, pos, row, plane = hl.Var("col"), hl.Var("pos"), hl.Var("row"), hl.Var("plane")
    frame, chan = hl.Var("frame"), hl.Var("chan")
    first, end = masked_extent(spec, layout, sched.task_blocks * sched.x_tile)
    flat.bound(i, first, end - first).compute_at(out, f.vars.n)
    flat.split(i, pos, col, layout.width).split(pos, plane, row, layout.height)
    flat.split(plane, chan, frame, layout.frames, hl.TailStrategy.ShiftInwards)
    flat.reorder(col, chan, row, frame)
    _vectorize_rows(flat, col, layout.width, knobs)
    if knobs.parallel:
        flat.parallel(frame)


def _vectorize_rows(flat: hl.Func, col: hl.Var, columns: int, knobs: SparseCpuKnobs) -> None:
    """A copied row of up to ``COPY_ROW_VECTOR_MAX`` columns as one vector (see
    :func:`_schedule_flat_cpu`), a wider one in vectors of the ISA's width. On NEON a row
    narrower than a vector stays scalar: 3 columns of an x stride of 3 (a 3-lane load of
    every third float) stopped Halide 21's ARM code generator ("Should be dense vector load")."""
    if knobs.family == "arm64-neon" and columns < NEON_LANES:
        return
    if columns <= COPY_ROW_VECTOR_MAX:
        flat.vectorize(col)
    else:
        _vectorize_within(flat, col, knobs.vector_lanes, columns)


def _vectorize_within(func: hl.Func, var: hl.Var, lanes: int, extent: int) -> None:
    """Vectors of ``lanes`` halved until they fit ``extent``; the last one shifts inwards."""
    while lanes > extent:
        lanes //= 2
    if lanes > 1:
        func.vectorize(var, lanes, hl.TailStrategy.ShiftInwards)


def _schedule_gpu(sched: SparseSchedule, knobs: SparseGpuKnobs, f: Any) -> None:
    """One work-item per group x ``x_tile`` block, channels as the vector lanes; one chunk."""
    v = f.vars
    out, accum = f.output, f.accum
    g_m = sched.lanes
    thread = tile_output_for_gpu(out, v, g_m, sched.x_tile, knobs)

    if f.flat is not None:
        # The padded copy runs on the device too (a compute_root Func without a GPU schedule
        # would silently run on the host).
        bi, ti = hl.Var("bi"), hl.Var("ti")
        copy = f.flat.compute_root()
        copy.split(f.flat_index, bi, ti, knobs.copy_threads, hl.TailStrategy.GuardWithIf)
        copy.gpu_blocks(bi, v.n).gpu_threads(ti)

    # OpenCL vectors have 2, 3, 4, 8 or 16 lanes, and a 3-vector occupies 4 floats in memory
    # (vload3 aside), which gave wrong results here: other group sizes stay scalar.
    lanes_as_vector = g_m in OPENCL_VECTOR_WIDTHS
    at = hl.LoopLevel(out, thread)
    stages: list[Any] = [accum]
    if f.partial is not None:
        stages += [accum.update().reorder(v.lane, f.o, f.chunk_reduction.x), f.partial]
        stages.append(f.partial.update().reorder(v.lane, f.o, f.reduction.x))
        _block_in_registers(f.partial, at, f, g_m, sched.x_tile)
    _block_in_registers(accum, at, f, g_m, sched.x_tile)
    for stage in stages:
        (stage.vectorize(v.lane) if lanes_as_vector else stage.unroll(v.lane)).unroll(f.o)
