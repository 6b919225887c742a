"""Schedules of the sparse Conv3d (vanilla / KGS) for x86, ARM64 and OpenCL.

CPU: vectors run along output x, not along output channels. The accumulator block is ``lanes``
output channels (a divisor of the group's gM) by ``x_vectors`` vectors of consecutive x positions by
``y_rows`` output rows. Per entry of the group's list the loop loads one input vector per (x
vector, row) from the x-innermost padded copy (:class:`~.layout.FlatLayout`), broadcasts
each channel's weight once and issues ``lanes * x_vectors * y_rows`` FMAs.

Why not channels as vector lanes (the Halide notes' layout, with a broadcast input per FMA)? On
this AVX2 Zen 3 the broadcasts, not the FMAs, set the pace: a C microbenchmark of 14 x (broadcast
+ FMA) per weight vector ran at 61 % of the register-only FMA rate with every input in L1, while 4
channels x 3 x vectors (4 broadcasts, 3 loads, 12 FMAs) ran at 83 %. The notes' 95 % was AVX-512,
whose FMA takes a broadcast memory operand for free. On C3D conv3b at 26 % kept the whole change
(this layout, the x-innermost copy and the chunked reduction) took the layer from 64-68 ms to
41-50 ms against torch's 110-130 ms dense.

OpenCL keeps channels as vector lanes: one work-item writes a group's gM channels x ``x_tile``.

A JSON object of overrides may set any field of the family's sparse knobs (``{"y_rows": 1}``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import halide as hl

from .layout import FlatLayout
from .schedules import (
    CpuConvKnobs,
    GpuConvKnobs,
    target_family_knobs,
    tile_output_for_gpu,
    with_overrides,
)
from .spec import Conv3dSpec

OPENCL_VECTOR_WIDTHS = (2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class SparseCpuKnobs:
    """``registers``: the family's vector registers; a block of ``tiles = x_vectors * y_rows``
    needs ``lanes * tiles`` accumulators, ``tiles`` input vectors and one broadcast weight.

    ``lanes``: channels per accumulator block (the largest divisor of gM up to it is used).
    ``x_vectors`` / ``y_rows``: the block's vectors of x positions and output rows (one input
    vector load per pair per entry); 0 means chosen per layer (:func:`choose_tile`).
    ``chunk_bytes``: input bytes one reduction chunk may span (the input rows a block of output
    rows reads, for a chunk of input channels); every group runs over a chunk while it is in L1.
    0: one chunk.
    """

    family: str
    vector_lanes: int
    registers: int
    lanes: int
    x_vectors: int = 0
    y_rows: int = 0
    chunk_bytes: int = 16384
    parallel: bool = True

    def __post_init__(self) -> None:
        for name in ("vector_lanes", "registers", "lanes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sparse knob {name} must be a positive integer, got {value!r}")
        for name in ("x_vectors", "y_rows", "chunk_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"sparse knob {name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.parallel, bool):
            raise ValueError(f"sparse knob parallel must be true or false, not {self.parallel!r}")


SparseKnobs = SparseCpuKnobs | GpuConvKnobs


@dataclasses.dataclass(frozen=True)
class SparseSchedule:
    knobs: SparseKnobs
    group_lanes: int  # gM: output channels sharing one entry list
    lanes: int  # output channels per accumulator block (divides gM)
    vector: int  # CPU: x positions per vector; GPU: x positions per work-item
    layout: FlatLayout  # of the padded input copy
    x_vectors: int = 1
    y_rows: int = 1
    chunk: int = 0  # input channels per reduction chunk; 0: all

    @property
    def x_tile(self) -> int:
        return self.vector * self.x_vectors

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.knobs.family,
            "lanes": self.lanes,
            "x_tile": self.x_tile,
            "y_rows": self.y_rows,
            "chunk_channels": self.chunk,
        }


# Channels per block: 4 on AVX2 fills 8-12 of 16 ymm registers with 2-3 vectors; AVX-512's 32
# registers hold 8 x 3. NEON's 4-float vectors take 4 x 6.
VECTOR_REGISTERS = {"x86-avx2": 16, "x86-avx512": 32, "arm64-neon": 32}
BLOCK_LANES = {"x86-avx2": 4, "x86-avx512": 8, "arm64-neon": 4}


def sparse_family_knobs(target: hl.Target) -> SparseKnobs:
    dense = target_family_knobs(target)
    if isinstance(dense, GpuConvKnobs):
        return dense
    assert isinstance(dense, CpuConvKnobs)
    return SparseCpuKnobs(
        dense.family,
        dense.vector_lanes,
        VECTOR_REGISTERS[dense.family],
        BLOCK_LANES[dense.family],
        parallel=dense.parallel,
    )


def block_lanes(g_m: int, wanted: int) -> int:
    """The largest divisor of ``g_m`` not above ``wanted``: blocks must not straddle groups."""
    return max(d for d in range(1, min(g_m, wanted) + 1) if g_m % d == 0)


def entry_cycles(lanes: int, tiles: int) -> float:
    """Model of one entry's cost for one block: two FMA pipes, and three FP pipes shared by
    FMAs and weight broadcasts, plus the offset load and loop."""
    return max(lanes * tiles / 2, (lanes * tiles + lanes) / 3) + 1


def choose_tile(
    out_w: int, out_h: int, vector: int, lanes: int, budget: int, fixed: tuple[int, int]
) -> tuple[int, int]:
    """(x vectors, rows) of a block, minimising modelled cycles over the output plane.

    x tiles round the row up to whole tiles (the extra positions are computed and dropped); row
    blocks shift inwards at the bottom (a few rows computed twice). Ties go to fewer rows: a
    3-row block of C3D conv3b ran 1.2x slower than a 2-vector one of equal modelled cost
    (more input rows in flight). ``fixed`` holds knob values (0: free); rows are capped at the
    output height.
    """
    # Knob values are taken as given, even past the register budget (slower, not wrong).
    limit = max(budget, (fixed[0] or 1) * (fixed[1] or 1))
    shapes = [
        (kx, ky)
        for kx in ([fixed[0]] if fixed[0] else range(1, limit + 1))
        for ky in ([min(fixed[1], out_h)] if fixed[1] else range(1, min(limit, out_h) + 1))
        if kx * ky <= limit
    ]
    return min(
        shapes,
        key=lambda s: (
            -(-out_w // (vector * s[0])) * -(-out_h // s[1]) * entry_cycles(lanes, s[0] * s[1]),
            s[1],
        ),
    )


def chunk_channels(
    spec: Conv3dSpec, layout_columns: int, g_n: int, budget: int, rows: int = 1
) -> int:
    """Input channels whose rows (``rows`` output rows' kernel depth x height input rows,
    whole padded width) fit ``budget`` bytes; a multiple of gN when possible; 0 when all fit."""
    if budget == 0:
        return 0
    in_rows = spec.kernel[0] * ((rows - 1) * spec.stride[1] + spec.kernel[1])
    per_channel = in_rows * layout_columns * spec.stride[2] * 4
    chunk = max(1, budget // per_channel)
    if chunk >= g_n:
        chunk -= chunk % g_n
    return 0 if chunk >= spec.in_channels else chunk


def choose_sparse_schedule(
    target: hl.Target, spec: Conv3dSpec, group: tuple[int, int], overrides: str = ""
) -> SparseSchedule:
    knobs = with_overrides(sparse_family_knobs(target), overrides)
    g_m, g_n = group
    out_w = spec.out_size[2]
    if isinstance(knobs, GpuConvKnobs):
        return SparseSchedule(knobs, g_m, g_m, min(knobs.x_per_thread, out_w), FlatLayout.of(spec))
    lanes = block_lanes(g_m, knobs.lanes)
    budget = max(1, (knobs.registers - 1) // (lanes + 1))
    fixed = (knobs.x_vectors, knobs.y_rows)
    kx, ky = choose_tile(out_w, spec.out_size[1], knobs.vector_lanes, lanes, budget, fixed)
    layout = FlatLayout.of(spec, knobs.vector_lanes)
    chunk = chunk_channels(spec, layout.columns, g_n, knobs.chunk_bytes, ky)
    return SparseSchedule(knobs, g_m, lanes, knobs.vector_lanes, layout, kx, ky, chunk)


def apply_sparse_schedule(sched: SparseSchedule, funcs: Any, spec: Conv3dSpec) -> None:
    if isinstance(sched.knobs, GpuConvKnobs):
        _schedule_gpu(sched, sched.knobs, funcs)
    else:
        _schedule_cpu(sched, sched.knobs, funcs, spec)


def _block_in_registers(
    func: hl.Func, level: hl.LoopLevel, f: Any, lanes: int, x: int, y: int = 1
) -> None:
    """Constant extents put a block in registers (see the halide notes). Every dimension is
    bounded; the batch stays out of the parallel Var (fused with it, bounds inference widened
    the block to every row and it went to memory, indexed dynamically)."""
    v = f.vars
    func.compute_at(level).store_in(hl.MemoryType.Register)
    func.bound_extent(v.lane, lanes).bound_extent(v.block, 1).bound_extent(v.x, x)
    func.bound_extent(v.y, y).bound_extent(v.t, 1).bound_extent(v.n, 1)
    if func is f.partial:
        func.bound_extent(f.chunk, 1)


def _vector_x(stage: Any, f: Any, sched: SparseSchedule, x: Any, *outer: Any) -> None:
    """``x`` (a block's x positions) as unrolled vectors, then the rows and the lanes
    unrolled, then ``outer``."""
    v = f.vars
    xv, xw = hl.Var("xv"), hl.Var("xw")
    stage.split(x, xv, xw, sched.vector).reorder(xw, xv, v.y, v.lane, *outer)
    stage.vectorize(xw).unroll(xv).unroll(v.y).unroll(v.lane)


def _schedule_cpu(sched: SparseSchedule, knobs: SparseCpuKnobs, f: Any, spec: Conv3dSpec) -> None:
    """Blocks of ``y_rows`` output rows in parallel. Per block, chunk by chunk of input
    channels: every group, every x tile, every block of ``lanes`` channels sums the chunk's
    entries in registers and adds them to the rows' accumulator (in memory, a few tens of KiB).
    The chunk's input rows stay in L1 while all groups pass over them; without chunks each group
    swept the whole input window from L2 (C3D conv3b at 26 % kept: 66 against 50 ms)."""
    v = f.vars
    out, accum = f.output, f.accum
    co, ci, task = hl.Var("co"), hl.Var("ci"), hl.Var("task")
    yo, yi = hl.Var("yo"), hl.Var("yi")
    out.split(v.c, co, ci, knobs.vector_lanes, hl.TailStrategy.GuardWithIf).vectorize(ci)
    out.split(v.y, yo, yi, sched.y_rows, hl.TailStrategy.ShiftInwards)
    out.reorder(ci, v.x, co, yi, yo, v.t, v.n).fuse(yo, v.t, task)
    if knobs.parallel:
        out.parallel(task)

    passes = sched.group_lanes // sched.lanes
    blocks = -(-spec.out_channels // sched.group_lanes) * passes
    x_round = -(-spec.out_size[2] // sched.x_tile) * sched.x_tile
    _schedule_flat_cpu(f, spec, out, knobs, x_round)
    accum.compute_at(out, task)
    accum.bound(v.lane, 0, sched.lanes).bound(v.block, 0, blocks).bound(v.x, 0, x_round)
    accum.reorder_storage(v.x, v.lane, v.block, v.y, v.t, v.n)
    _vector_x(accum, f, sched, v.x, v.block)
    if f.partial is None:
        return
    gco, gcb, xo, xi = hl.Var("gco"), hl.Var("gcb"), hl.Var("xo"), hl.Var("xi")
    upd = accum.update()
    upd.split(v.block, gco, gcb, passes).split(v.x, xo, xi, sched.x_tile)
    _vector_x(upd, f, sched, xi, gcb, xo, gco, f.chunk_reduction.x)

    partial = f.partial
    level = hl.LoopLevel(accum, gcb)
    _block_in_registers(partial, level, f, sched.lanes, sched.x_tile, sched.y_rows)
    partial.reorder_storage(v.x, v.lane, v.block, v.y, v.t, v.n, f.chunk)
    _vector_x(partial, f, sched, v.x)
    _vector_x(partial.update(), f, sched, v.x, f.reduction.x)


def _schedule_flat_cpu(
    f: Any, spec: Conv3dSpec, out: hl.Func, knobs: SparseCpuKnobs, x_round: int
) -> None:
    """The padded copy, once per sample: rows in parallel, x as vectors.

    Splitting the flat index by the layout's own extents lets the simplifier turn the divisions
    back into the split's Vars. Reading channels-innermost input along x is a strided gather;
    it is O(input) against the conv's O(input x kept weights).
    """
    flat, i, layout = f.flat, f.flat_index, f.layout
    pos, col, chan, row = hl.Var("pos"), hl.Var("col"), hl.Var("chan"), hl.Var("row")
    # The last row's tile reads up to x_round - 1 past its base: bound the copy to that.
    kd, kh, kw = spec.kernel
    dt, dh, dw = spec.dilation
    t_out, h_out, _ = spec.out_size
    # Phases make the largest offset come from any kernel column, not only the last.
    last = max(
        layout.index(spec.in_channels - 1, col * dw, (kh - 1) * dh, (kd - 1) * dt)
        for col in range(kw)
    )
    last += (x_round - 1) + layout.row_pitch * (
        (h_out - 1) * spec.stride[1] + layout.rows * (t_out - 1) * spec.stride[0]
    )
    # Whole rows: the copy's loops split the index by the row pitch.
    rows = -(-(last + 1) // layout.row_pitch)
    flat.bound(i, 0, max(layout.size, rows * layout.row_pitch))
    flat.compute_at(out, f.vars.n)
    flat.split(i, pos, col, layout.columns).split(pos, row, chan, layout.stride * layout.channels)
    flat.vectorize(col, knobs.vector_lanes, hl.TailStrategy.GuardWithIf)
    if knobs.parallel:
        flat.parallel(row)


def _schedule_gpu(sched: SparseSchedule, knobs: GpuConvKnobs, f: Any) -> None:
    """One work-item per group x ``x_tile`` block, channels as the vector lanes; one chunk."""
    v = f.vars
    out, accum = f.output, f.accum
    g_m = sched.lanes
    cbi = tile_output_for_gpu(out, v, g_m, sched.x_tile, knobs)

    # The padded copy runs on the device too (a compute_root Func without a GPU schedule would
    # silently run on the host).
    bi, ti = hl.Var("bi"), hl.Var("ti")
    f.flat.compute_root().split(f.flat_index, bi, ti, 64, hl.TailStrategy.GuardWithIf)
    f.flat.gpu_blocks(bi, v.n).gpu_threads(ti)

    # OpenCL vectors have 2, 3, 4, 8 or 16 lanes, and a 3-vector occupies 4 floats in memory
    # (vload3 aside), which gave wrong results here: other group sizes stay scalar.
    lanes_as_vector = g_m in OPENCL_VECTOR_WIDTHS
    at = hl.LoopLevel(out, cbi)
    stages: list[Any] = [accum]
    if f.partial is not None:
        stages += [accum.update().reorder(v.lane, v.x, f.chunk_reduction.x), f.partial]
        stages.append(f.partial.update().reorder(v.lane, v.x, f.reduction.x))
        _block_in_registers(f.partial, at, f, g_m, sched.x_tile)
    _block_in_registers(accum, at, f, g_m, sched.x_tile)
    for stage in stages:
        (stage.vectorize(v.lane) if lanes_as_vector else stage.unroll(v.lane)).unroll(v.x)
