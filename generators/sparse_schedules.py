"""Schedules of the sparse Conv3d (vanilla / KGS) for x86, ARM64 and OpenCL.

The layout is the one the Halide notes measured at ~95 % of this CPU's FMA peak: the output channel
is split into (lane, group) Vars, the ``gM`` lanes of a group form one vector, and a block of
``x_tile`` output x positions is accumulated in registers while the loop over the group's entry list
runs outside it. Each entry costs one weight vector load, then per x position one broadcast input
load and one FMA. The target family and vector width come from the dense knobs
(:mod:`rt3d_halide.generators.schedules`); the accumulator budget is the family's vector
registers less the weight vector and the broadcast input.

A JSON object of overrides may set any field of the family's sparse knobs (``{"x_tile": 8}``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import halide as hl

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
    """``accumulators``: vector registers the x block may hold (see VECTOR_REGISTERS).

    ``x_tile`` 0 means: the largest block the budget allows, shrunk to split the row evenly.
    """

    family: str
    vector_lanes: int
    accumulators: int
    x_tile: int = 0
    parallel: bool = True

    def __post_init__(self) -> None:
        for name in ("vector_lanes", "accumulators"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sparse knob {name} must be a positive integer, got {value!r}")
        if not isinstance(self.x_tile, int) or isinstance(self.x_tile, bool) or self.x_tile < 0:
            raise ValueError(f"sparse knob x_tile must be an integer >= 0, got {self.x_tile!r}")
        if not isinstance(self.parallel, bool):
            raise ValueError(f"sparse knob parallel must be true or false, not {self.parallel!r}")


SparseKnobs = SparseCpuKnobs | GpuConvKnobs


@dataclasses.dataclass(frozen=True)
class SparseSchedule:
    knobs: SparseKnobs
    lanes: int  # gM: the output channels of one group, one (possibly split) vector
    x_tile: int

    def describe(self) -> dict[str, Any]:
        return {"family": self.knobs.family, "lanes": self.lanes, "x_tile": self.x_tile}


# Architectural vector registers per CPU family. The sparse block needs one weight vector and one
# broadcast input besides its accumulators (the dense tile needs a weight vector per channel
# vector), so it may use all but two: on AVX2, x blocks of 14 ran 1.2x faster than the dense
# budget's 12 (conv3a shape, kept 0.36; 2-core Zen 3).
VECTOR_REGISTERS = {"x86-avx2": 16, "x86-avx512": 32, "arm64-neon": 32}


def sparse_family_knobs(target: hl.Target) -> SparseKnobs:
    dense = target_family_knobs(target)
    if isinstance(dense, GpuConvKnobs):
        return dense
    assert isinstance(dense, CpuConvKnobs)
    budget = VECTOR_REGISTERS[dense.family] - 2
    return SparseCpuKnobs(dense.family, dense.vector_lanes, budget, parallel=dense.parallel)


def _x_tile(total: int, largest: int) -> int:
    """The x block for a row of ``total`` outputs with at most ``largest`` accumulators.

    Blocks shift inwards at the row's end, so a block that does not divide the row recomputes
    columns; each entry also pays a fixed cost (weight load, offset load, loop) per block. Minimise
    computed columns x (1 + 1/x) over blocks from half the budget up: 28 columns with 12
    accumulators gives 7 (no recomputed column) rather than 10 (two recomputed).
    """
    largest = max(1, min(largest, total))
    candidates = range(max(1, largest // 2), largest + 1)
    return min(candidates, key=lambda x: (-(-total // x) * x * (1 + 1 / x), -x))


def choose_sparse_schedule(
    target: hl.Target, spec: Conv3dSpec, group: tuple[int, int], overrides: str = ""
) -> SparseSchedule:
    knobs = with_overrides(sparse_family_knobs(target), overrides)
    g_m = group[0]
    out_w = spec.out_size[2]
    if isinstance(knobs, GpuConvKnobs):
        return SparseSchedule(knobs, g_m, min(knobs.x_per_thread, out_w))
    vectors = -(-g_m // knobs.vector_lanes)
    largest = knobs.x_tile or max(1, knobs.accumulators // vectors)
    return SparseSchedule(knobs, g_m, _x_tile(out_w, largest))


def apply_sparse_schedule(sched: SparseSchedule, funcs: Any, spec: Conv3dSpec) -> None:
    if isinstance(sched.knobs, GpuConvKnobs):
        _schedule_gpu(sched, sched.knobs, funcs)
    else:
        _schedule_cpu(sched, sched.knobs, funcs, spec)


def _accumulate_in_registers(
    accum: hl.Func, at: hl.Func, level: hl.Var, f: Any, g_m: int, x_tile: int
) -> None:
    """Constant extents put the accumulator block in registers (see the halide notes).

    Every dimension is bounded. The batch stays out of the fused parallel Var: fused with the
    free batch, bounds inference widened the block to every (y, t) row, and the block was
    allocated in memory and indexed dynamically (seen in the lowered code).
    """
    v = f.vars
    accum.compute_at(at, level).store_in(hl.MemoryType.Register)
    accum.bound_extent(v.lane, g_m).bound_extent(v.block, 1).bound_extent(v.x, x_tile)
    accum.bound_extent(v.y, 1).bound_extent(v.t, 1).bound_extent(v.n, 1)


def lane_vector(g_m: int, native: int) -> int:
    """Vector width for the ``gM`` lanes of a group on a CPU.

    A power of two is vectorized whole (LLVM splits it into native registers). Other group sizes
    take the largest power of two dividing them (at most the native width), the rest unrolled:
    a 9-wide guarded vector store hit an LLVM assertion ("Calling a function with a bad
    signature") here.
    """
    if g_m & (g_m - 1) == 0:
        return g_m
    width = g_m & -g_m
    return min(width, native)


def _vectorize_lanes(stage: Any, var: hl.Var, g_m: int, native: int) -> None:
    width = lane_vector(g_m, native)
    if width == g_m:
        stage.vectorize(var)
        return
    if width > 1:
        stage.vectorize(var, width)
    stage.unroll(var)


def _schedule_cpu(sched: SparseSchedule, knobs: SparseCpuKnobs, f: Any, spec: Conv3dSpec) -> None:
    v = f.vars
    out, accum = f.output, f.accum
    g_m = sched.lanes
    co, ci, xo, xi = hl.Var("co"), hl.Var("ci"), hl.Var("xo"), hl.Var("xi")
    yt, task = hl.Var("yt"), hl.Var("task")

    out.split(v.c, co, ci, g_m, hl.TailStrategy.GuardWithIf)
    out.split(v.x, xo, xi, sched.x_tile, hl.TailStrategy.ShiftInwards)
    out.reorder(ci, xi, xo, v.y, v.t, co, v.n)
    _vectorize_lanes(out, ci, g_m, knobs.vector_lanes)
    out.unroll(xi)
    out.fuse(v.y, v.t, yt).fuse(yt, co, task)
    if knobs.parallel:
        out.parallel(task)
    _schedule_flat_cpu(f, spec, out, knobs)

    _accumulate_in_registers(accum, out, xo, f, g_m, sched.x_tile)
    _vectorize_lanes(accum, v.lane, g_m, knobs.vector_lanes)
    accum.unroll(v.x)
    if f.reduction is not None:
        upd = accum.update()
        upd.reorder(v.lane, v.x, f.reduction.x)
        _vectorize_lanes(upd, v.lane, g_m, knobs.vector_lanes)
        upd.unroll(v.x)


def _schedule_flat_cpu(f: Any, spec: Conv3dSpec, out: hl.Func, knobs: SparseCpuKnobs) -> None:
    """The padded copy, once per sample: rows in parallel, channels as vectors.

    Splitting the flat index by the channel count lets the simplifier turn ``i % C`` and ``i / C``
    back into the split's own Vars, so the copy reads the input with dense vector loads.
    """
    flat, i = f.flat, f.flat_index
    tp, hp, wp = (spec.in_size[k] + spec.pads_begin[k] + spec.pads_end[k] for k in range(3))
    pos, ch, row, col = hl.Var("pos"), hl.Var("ch"), hl.Var("row"), hl.Var("col")
    # x tiles shift inwards, so every read lies inside the padded input: bound it exactly.
    flat.bound(i, 0, spec.in_channels * wp * hp * tp)
    flat.compute_at(out, f.vars.n)
    flat.split(i, pos, ch, spec.in_channels).split(pos, row, col, wp)
    flat.vectorize(ch, knobs.vector_lanes, hl.TailStrategy.GuardWithIf)
    if knobs.parallel:
        flat.parallel(row)


def _schedule_gpu(sched: SparseSchedule, knobs: GpuConvKnobs, f: Any) -> None:
    v = f.vars
    out, accum = f.output, f.accum
    g_m = sched.lanes
    cbi = tile_output_for_gpu(out, v, g_m, sched.x_tile, knobs)

    # The padded copy runs on the device too (a compute_root Func without a GPU schedule would
    # silently run on the host).
    bi, ti = hl.Var("bi"), hl.Var("ti")
    f.flat.compute_root().split(f.flat_index, bi, ti, 64, hl.TailStrategy.GuardWithIf)
    f.flat.gpu_blocks(bi, v.n).gpu_threads(ti)

    _accumulate_in_registers(accum, out, cbi, f, g_m, sched.x_tile)
    # OpenCL vectors have 2, 3, 4, 8 or 16 lanes, and a 3-vector occupies 4 floats in memory
    # (vload3 aside), which gave wrong results here: other group sizes stay scalar.
    lanes_as_vector = g_m in OPENCL_VECTOR_WIDTHS
    stages = [accum] if f.reduction is None else [accum, accum.update()]
    for stage in stages:
        if f.reduction is not None and stage is not accum:
            stage.reorder(v.lane, v.x, f.reduction.x)
        (stage.vectorize(v.lane) if lanes_as_vector else stage.unroll(v.lane)).unroll(v.x)
