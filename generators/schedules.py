"""Schedules for the Conv3d algorithms: one small typed knob object per target family.

Tuning is data: each family's defaults live in one frozen dataclass below, and a build may override
any field with a JSON object (``--schedule '{"register_tiles": [[2, 6]]}'``). The resolver then fits
the knobs to one layer's baked shape (register tile, output-channel block) so that no tile computes
more than it must.

Register tiles are (output-channel vectors, output x positions), accumulated entirely in registers,
as in Halide's apps/conv_layer:
- x86 AVX2 (16 ymm): 12 accumulators; FMA takes the weight vector from memory, one register holds
  the broadcast input, so 3x4 / 2x6 / 1x12 tiles fit without spills.
- x86 AVX-512 and ARM64 NEON (32 registers): 24 accumulators (4x6, 3x8, 2x12), or 1x16.
- OpenCL: each work-item accumulates ``lanes`` channels for ``x_per_thread`` positions in private
  registers; work-groups of threads_c x threads_x <= 256 items, tails guarded.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import halide as hl

from .baking import frame_taps_inside
from .spec import Conv3dSpec


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not _is_positive_int(value):
            raise ValueError(f"schedule knob {name} must be a positive integer, got {value!r}")


def check_bools(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, bool):
            raise ValueError(f"schedule knob {name} must be true or false, not {value!r}")


@dataclasses.dataclass(frozen=True)
class CpuConvKnobs:
    """A CPU family's dense-schedule knobs, the data ``--schedule`` overrides: the register
    tiles (output-channel vectors x x positions) the chooser may take, whose accumulators and
    operands must fit the ISA's registers, so they differ per family (see the constants)."""

    family: str
    vector_lanes: int
    register_tiles: tuple[tuple[int, int], ...]
    reduction_unroll: int = 1
    parallel: bool = True
    skip_frame_padding: bool = True  # see frames_skipped

    def __post_init__(self) -> None:
        _positive(self, "vector_lanes", "reduction_unroll")
        check_bools(self, "parallel", "skip_frame_padding")
        tiles = self.register_tiles
        if (
            not isinstance(tiles, tuple)
            or not tiles
            or not all(isinstance(tile, tuple) and len(tile) == 2 for tile in tiles)
            or not all(_is_positive_int(n) for tile in tiles for n in tile)
        ):
            raise ValueError(
                "schedule knob register_tiles must be a non-empty list of [channel vectors, "
                f"x positions] pairs of positive integers, got {self.register_tiles!r}"
            )


@dataclasses.dataclass(frozen=True)
class GpuConvKnobs:
    """The OpenCL dense schedule's knobs: a work-group of ``threads_c`` x ``threads_x``
    work-items, each computing ``lanes`` output channels (one OpenCL vector) at
    ``x_per_thread`` positions."""

    family: str = "opencl"
    lanes: int = 4
    threads_c: int = 8
    threads_x: int = 8
    x_per_thread: int = 4
    x_threads_inner: bool = False  # neighbouring work-items take neighbouring x tiles
    skip_frame_padding: bool = True  # see frames_skipped

    def __post_init__(self) -> None:
        _positive(self, "lanes", "threads_c", "threads_x", "x_per_thread")
        check_bools(self, "x_threads_inner", "skip_frame_padding")
        # OpenCL also has 3-wide vectors, but PoCL computed wrong results with them.
        if self.lanes not in (1, 2, 4, 8, 16):
            raise ValueError(f"OpenCL vectors here have 1, 2, 4, 8 or 16 lanes, not {self.lanes}")
        if self.threads_c * self.threads_x > 256:
            raise ValueError("OpenCL work-groups are kept to <= 256 items (threads_c * threads_x)")


SMALL_CHANNELS = 4
X86_AVX2 = CpuConvKnobs("x86-avx2", 8, ((3, 4), (2, 6), (1, 12)))
X86_AVX512 = CpuConvKnobs("x86-avx512", 16, ((4, 6), (3, 8), (2, 12), (1, 16)))
ARM64_NEON = CpuConvKnobs("arm64-neon", 4, ((4, 6), (3, 8), (2, 12), (1, 16)))
OPENCL = GpuConvKnobs()
FAMILIES = tuple(k.family for k in (X86_AVX2, X86_AVX512, ARM64_NEON, OPENCL))

Knobs = CpuConvKnobs | GpuConvKnobs


@dataclasses.dataclass(frozen=True)
class ConvSchedule:
    """Knobs resolved against one layer: what the algorithm and the schedule both depend on."""

    knobs: Knobs
    block_channels: int
    x_tile: int
    reduction_unroll: int = 1
    skip_frame_padding: bool = False  # frames_skipped: the knob where the layer allows it

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.knobs.family,
            "block_channels": self.block_channels,
            "x_tile": self.x_tile,
            "reduction_unroll": self.reduction_unroll,
            "skip_frame_padding": self.skip_frame_padding,
            **gpu_threads_described(self.knobs),
        }


def frames_skipped(knobs: Knobs, spec: Conv3dSpec) -> bool:
    """Whether dense code skips the kernel frames that read the temporal padding
    (:func:`~.conv3d_dense.dense_conv3d`): the knob on, some kernel frame reading the temporal
    padding, and every output frame reading some input frame. Where one reads only padding its
    kernel-frame loop would be empty, and Halide's bounds inference, tightened by the predicate,
    then asked the input for frames outside the clip, before its start or past its end (OpenCL
    builds failed their buffer checks; CPU ones did not): such a layer keeps the padding's
    zeros."""
    inside = frame_taps_inside(spec)
    return knobs.skip_frame_padding and not inside.all() and bool(inside.any(axis=1).all())


def gpu_threads_described(knobs: Any) -> dict[str, Any]:
    """A GPU schedule's work-group shape and thread order, for the manifest (nothing on CPUs)."""
    if not isinstance(knobs, GpuConvKnobs):
        return {}
    return {
        "work_group": {"channel_threads": knobs.threads_c, "x_threads": knobs.threads_x},
        "x_threads_inner": knobs.x_threads_inner,
    }


def target_family_knobs(target: hl.Target) -> Knobs:
    """The knobs of ``target``'s family: what one schedule per family means in practice."""
    if target.has_gpu_feature():
        if not target.has_feature(hl.TargetFeature.OpenCL):
            raise ValueError(f"GPU target {target} is not supported: only OpenCL has a schedule")
        return OPENCL
    if target.arch == hl.TargetArch.ARM and target.bits == 64:
        return ARM64_NEON
    if target.arch == hl.TargetArch.X86 and target.bits == 64:
        # Halide's own vector width: every AVX-512 flavour (a Sapphire Rapids or Zen 5 target
        # names only its own) builds 16-float vectors, whose knobs are AVX-512's.
        if target.natural_vector_size(hl.Float(32)) >= X86_AVX512.vector_lanes:
            return X86_AVX512
        return X86_AVX2
    raise ValueError(f"no Conv3d schedule for target {target}: use an x86-64, arm-64 or OpenCL one")


def family_overrides(overrides: str) -> dict[str, dict[str, Any]] | None:
    """The per-family form of a JSON object of overrides, every key a family name
    (``{"arm64-neon": {...}, "opencl": {...}}``), else None: the plain form, one set of knobs
    for every target. A multi-target library mixes families whose knobs differ, which only the
    per-family form can tune together."""
    data, per_family = _parsed_overrides(overrides)
    return data if per_family else None


def _parsed_overrides(overrides: str) -> tuple[dict[str, Any], bool]:
    """The JSON object of overrides, and whether it is the per-family form."""
    try:
        data = json.loads(overrides)
    except RecursionError:  # nested past the parser's depth (a JSONDecodeError is a ValueError)
        raise ValueError("schedule overrides nest too deeply for a JSON object of knobs") from None
    if not isinstance(data, dict):
        raise ValueError(f"schedule overrides must be a JSON object, got {overrides!r}")
    named = set(data) & set(FAMILIES)
    if not named:
        return data, False
    if named != set(data):
        raise ValueError(
            f"schedule overrides mix family keys {sorted(named)} with knobs "
            f"{sorted(set(data) - named)}: give knobs for every target, or per family"
        )
    for family, knobs in data.items():
        if not isinstance(knobs, dict):
            raise ValueError(f"the {family} schedule overrides must be a JSON object")
    return data, True


def with_overrides(knobs: Any, overrides: str) -> Any:
    """``knobs`` with the fields a JSON object names replaced, or with those of its family's
    object in the per-family form (:func:`family_overrides`; a family it leaves out keeps its
    defaults); lists become tuples of tuples."""
    if not overrides:
        return knobs
    data, per_family = _parsed_overrides(overrides)
    if per_family:
        data = data.get(knobs.family, {})
    fields = {f.name for f in dataclasses.fields(knobs)}
    if data.get("family", knobs.family) != knobs.family:
        raise ValueError(
            f"schedule knob family is the target's ({knobs.family}), not {data['family']!r}: "
            f"to tune another family, key its knobs by it ({', '.join(FAMILIES)})"
        )
    unknown = set(data) - fields
    if unknown:
        raise ValueError(
            f"unknown schedule knobs {sorted(unknown)}; {knobs.family} has {sorted(fields)} "
            f"(per-family overrides are keyed by {', '.join(FAMILIES)})"
        )
    for name, value in data.items():
        if isinstance(value, list):
            data[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return dataclasses.replace(knobs, **data)


def _waste(total: int, tile: int) -> float:
    """Work done over work needed when ``total`` is covered by whole tiles of ``tile``."""
    return -(-total // tile) * tile / total


def choose_schedule(target: hl.Target, spec: Conv3dSpec, overrides: str = "") -> ConvSchedule:
    """The dense schedule of ``spec`` on ``target``: on CPUs the register tile with the least
    edge waste (channels and positions computed past the layer's) per accumulator, so that one
    knob list serves every shape."""
    knobs = with_overrides(target_family_knobs(target), overrides)
    out_w = spec.out_size[2]
    if isinstance(knobs, GpuConvKnobs):
        x_tile = min(knobs.x_per_thread, out_w)
        return ConvSchedule(
            knobs, knobs.lanes, x_tile, skip_frame_padding=frames_skipped(knobs, spec)
        )
    vec = knobs.vector_lanes
    best: tuple[float, int, int] | None = None
    for co_vectors, x_tile in knobs.register_tiles:
        co_vectors = min(co_vectors, -(-spec.out_channels // vec))
        x_tile = min(x_tile, out_w)
        block = co_vectors * vec
        # Channel padding is real extra work; x tiles shift inwards and only recompute.
        cost = _waste(spec.out_channels, block) * _waste(out_w, x_tile) / (co_vectors * x_tile)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, block, x_tile)
    assert best is not None
    # A handful of input channels (RGB stems) would leave a loop of 3 iterations around the FMAs.
    unroll = spec.in_channels if spec.in_channels <= SMALL_CHANNELS else knobs.reduction_unroll
    return ConvSchedule(knobs, best[1], best[2], unroll, frames_skipped(knobs, spec))


def apply_conv_schedule(sched: ConvSchedule, funcs: Any, spec: Conv3dSpec) -> None:
    if isinstance(sched.knobs, GpuConvKnobs):
        _schedule_gpu(sched, sched.knobs, funcs)
    else:
        _schedule_cpu(sched, sched.knobs, funcs, spec)


def _bound_to_one_block(accum: hl.Func, v: Any, block: int) -> None:
    """Pins the register tile to one channel block of one output row.

    A guarded channel tail would otherwise make its extent symbolic, and a fused parallel loop
    over rows would make Halide allocate it for every row (in memory, indexed by task).
    """
    accum.bound_extent(v.lane, block).bound_extent(v.block, 1)
    accum.bound_extent(v.y, 1).bound_extent(v.t, 1).bound_extent(v.n, 1)


def pads_within_rows(spec: Conv3dSpec) -> bool:
    """Whether padding reaches inside an output row (H or W); time-only padding does not.

    With time-only padding the boundary test depends on the frame alone, which is constant over
    a row's FMA loops, so the input is read in place and no slab is copied.
    """
    return any(spec.pads_begin[1:]) or any(spec.pads_end[1:])


# A task is one output row of one channel block, or, when every block's weights fit this budget,
# one output row of every block: the row's padded input copy then serves all blocks instead of
# being made once per block. Measured on the RGB stems (weights of 20-28 KiB), per-round ratio
# in one process, 21-31 rounds: C3D conv1 (4 blocks of 16 channels) 19.7 -> 15.7 ms (0.80),
# R(2+1)D-18's 1x7x7 stem (2 blocks) 5.9 -> 4.8 ms (0.82); with no copy to share, its strided
# 1x1x1 convs of 64 -> 128 and 128 -> 256 channels (32 and 128 KiB) 0.86 and 1.00 (41 rounds).
# Larger tables stay per block: a row's task would stream all of them. Measured on AVX2 only;
# sharing leaves rows x frames parallel tasks (1,792 on C3D conv1), enough for a phone's cores.
SHARED_BLOCK_WEIGHT_BYTES = 128 * 1024


def blocks_share_task(spec: Conv3dSpec, block: int) -> bool:
    """Whether a task computes one row of every channel block (see above)."""
    padded_channels = -(-spec.out_channels // block) * block
    weight_bytes = padded_channels * spec.in_channels * spec.kernel_volume * 4
    return weight_bytes <= SHARED_BLOCK_WEIGHT_BYTES


def _schedule_row_copy(source: hl.Func, at: hl.LoopLevel, spec: Conv3dSpec, vec: int) -> None:
    """The task's padded input rows, vectorized along channels; a layer of fewer channels than
    a vector (an RGB stem) stores x innermost and vectorizes x instead (the broadcast loads
    read either layout): 3-channel vectors of 8 lanes left the copy mostly idle (C3D conv1's
    dense code, 64-channel blocks, one interleaved run: 32.6 -> 19.2 ms)."""
    c, x = source.args()[:2]
    source.compute_at(at)
    if spec.in_channels < vec:
        source.reorder_storage(x, c, *source.args()[2:]).reorder(x, c)
        source.vectorize(x, vec, hl.TailStrategy.GuardWithIf)
    else:
        source.vectorize(c, vec, hl.TailStrategy.GuardWithIf)


def _schedule_cpu(sched: ConvSchedule, knobs: CpuConvKnobs, f: Any, spec: Conv3dSpec) -> None:
    v = f.vars
    out, accum, r = f.output, f.accum, f.reduction
    block, vec = sched.block_channels, knobs.vector_lanes
    co, ci, xo, xi = hl.Var("co"), hl.Var("ci"), hl.Var("xo"), hl.Var("xi")
    yt, task = hl.Var("yt"), hl.Var("task")

    out.split(v.c, co, ci, block, hl.TailStrategy.GuardWithIf)
    out.split(v.x, xo, xi, sched.x_tile, hl.TailStrategy.ShiftInwards)
    # The batch stays a serial outer loop: it is the one extent not known at compile time.
    if blocks_share_task(spec, block):
        out.reorder(ci, xi, xo, co, v.y, v.t, v.n).fuse(v.y, v.t, task)
    else:
        out.reorder(ci, xi, xo, v.y, v.t, co, v.n).fuse(v.y, v.t, yt).fuse(yt, co, task)
    out.vectorize(ci, vec).unroll(ci).unroll(xi)
    if knobs.parallel:
        out.parallel(task)
    if pads_within_rows(spec):
        # Zero-padded copy of the input rows one task reads (C x padded W x Kh x Kd floats per
        # thread), so the FMA loop reads with no boundary selects.
        _schedule_row_copy(f.source, hl.LoopLevel(out, task), spec, vec)

    accum.compute_at(out, xo).store_in(hl.MemoryType.Register)
    _bound_to_one_block(accum, v, block)
    accum.vectorize(v.lane, vec).unroll(v.lane).unroll(v.x)
    upd = accum.update()
    upd.reorder(v.lane, v.x, r.x, r.y, r.z, r.w)
    upd.vectorize(v.lane, vec).unroll(v.lane).unroll(v.x)
    if sched.reduction_unroll > 1:
        rxo, rxi = hl.RVar("rxo"), hl.RVar("rxi")
        upd.split(r.x, rxo, rxi, sched.reduction_unroll, hl.TailStrategy.GuardWithIf)
        upd.unroll(rxi)


def tile_output_for_gpu(
    out: hl.Func, v: Any, lanes: int, x_tile: int, knobs: GpuConvKnobs
) -> hl.Var:
    """Work-groups of threads_c x threads_x items, each writing ``lanes`` channels x ``x_tile``.

    Every split is guarded (OpenCL has no predicated stores). Returns the innermost thread Var,
    where a conv's register tile is computed: the channel block's, or with ``x_threads_inner``
    the x tile's.
    """
    co, ci, cbo, cbi = hl.Var("co"), hl.Var("ci"), hl.Var("cbo"), hl.Var("cbi")
    xo, xi, xoo, xoi = hl.Var("xo"), hl.Var("xi"), hl.Var("xoo"), hl.Var("xoi")
    yt, ytn = hl.Var("yt"), hl.Var("ytn")
    guard = hl.TailStrategy.GuardWithIf
    out.split(v.c, co, ci, lanes, guard)
    out.split(co, cbo, cbi, knobs.threads_c, guard)
    out.split(v.x, xo, xi, x_tile, guard)
    out.split(xo, xoo, xoi, knobs.threads_x, guard)
    threads = (xoi, cbi) if knobs.x_threads_inner else (cbi, xoi)
    out.reorder(ci, xi, *threads, cbo, xoo, v.y, v.t, v.n)
    out.fuse(v.y, v.t, yt).fuse(yt, v.n, ytn)
    out.unroll(ci).unroll(xi)
    out.gpu_threads(*threads).gpu_blocks(cbo, xoo, ytn)
    return threads[0]


def _schedule_gpu(sched: ConvSchedule, knobs: GpuConvKnobs, f: Any) -> None:
    v = f.vars
    out, accum, r = f.output, f.accum, f.reduction
    thread = tile_output_for_gpu(out, v, sched.block_channels, sched.x_tile, knobs)
    accum.compute_at(out, thread).store_in(hl.MemoryType.Register)
    _bound_to_one_block(accum, v, sched.block_channels)
    accum.vectorize(v.lane).unroll(v.x)
    upd = accum.update()
    upd.reorder(v.lane, v.x, r.x, r.y, r.z, r.w)
    upd.vectorize(v.lane).unroll(v.x)
