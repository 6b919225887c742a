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
quads there, though unpruned they lose to dense code (``rt3d_halide.build``'s
``TEMPORAL_QUADS_OFF_FAMILIES``).

Other kernels with spatial taps and short reductions (input channels x taps <= the knob
``quad_copy_max_entries``: on AVX2 C3D conv2 and R(2+1)D's 1x3x3 convs up to 256 channels; none
on AVX-512) take the same quads over a zero-padded copy that keeps channels innermost: the copy
pads without transposing, each group runs its quads over every block of the task's rows with
its weights in L1, and the output takes the lane sums directly, with no accumulator in memory.
Longer reductions keep the planar copy: a quad reads 16 bytes of a window of every channel per
position, and once a group's weights and a block's window outgrow the caches the planar kernel,
which chunks input channels, wins (measurements beside ``QUAD_COPY_MAX_ENTRIES``).

OpenCL keeps channels as vector lanes: one work-item writes a group's gM channels x ``x_tile``,
and neighbouring work-items take neighbouring x tiles of the same group (``SPARSE_OPENCL``).
Kernels of one spatial tap without spatial padding read their input in place there, with no
padded copy (:func:`gpu_reads_in_place`); others may be forced to (slower on an H100).

A JSON object of overrides may set any field of the family's sparse knobs (``{"task_rows": 1}``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import halide as hl

from .baking import frame_taps_inside
from .conv3d_quads import QUAD
from .layout import FlatLayout, MaskedLayout, check_interleaved, interleaved_fits
from .schedules import (
    OPENCL,
    CpuConvKnobs,
    GpuConvKnobs,
    check_bools,
    gpu_threads_described,
    target_family_knobs,
    tile_output_for_gpu,
    with_overrides,
)
from .spec import Conv3dSpec

OPENCL_VECTOR_WIDTHS = (2, 4, 8, 16)


INPUT_LAYOUTS = ("auto", "planar", "interleaved", "interleaved_copy")
QUAD_LAYOUTS = ("interleaved", "interleaved_copy")
PADDINGS = ("auto", "copied", "masked")

# Positions per tile of the planar kernel's output stage (``_transposed_output``; 0: none, each
# output vector gathers its floats one by one). Per-round time ratio against no tiles in one
# process, KGS 8x4 unbalanced at a sixth kept unless said, 11 rounds, Zen 5, AVX-512: C3D conv1
# at half kept (3 input channels, output-bound) 0.84, conv2 0.985-0.986 (two runs; vanilla
# 0.991; 0.96 at 2 % kept, where the output is a third of the time), conv3b 0.996 (vanilla at
# a third 1.003), conv4b 0.967 (balanced at half 0.984), conv5b at a quarter 0.993, R(2+1)D-18's
# 1x3x3 0.987 (vanilla 0.956); AVX2 code, conv2, 0.987. 16 positions took conv2 1.01 (1.17 at
# 2 % kept), 4 positions 0.96 and 12 1.01 at 2 % kept. NEON keeps the value (unmeasured).
OUTPUT_TILE = 8
# A tile's output vectors are one accumulator block's channels: blocks of fewer lanes (groups
# whose gM has only smaller divisors) would store each position in pieces of 1-3 floats, so
# they keep the gather, whose vectors are the ISA's width (not measured). So do blocks whose
# lanes are no power of two: Halide 21's LLVM aborts ("Calling a function with a bad
# signature") on tiles of 5, 9 or 13 lanes for NEON, 9 for AVX2 and 5 or 9 for SSE 4.1; 6, 7,
# 10, 11, 12 and 15 built and ran right for NEON, but the rule keeps to the powers of two that
# every test draws, rather than a list of the widths LLVM happened to survive.
OUTPUT_TILE_MIN_LANES = 4


@dataclasses.dataclass(frozen=True)
class SparseCpuKnobs:
    """``registers``: the family's vector registers; a block of ``x_vectors`` vectors needs
    ``lanes * x_vectors`` accumulators, ``x_vectors`` input vectors and one broadcast weight.

    ``lanes``: channels per accumulator block (the largest divisor of gM up to it is used).
    ``x_vectors``: the block's vectors of consecutive plane positions (one input vector load each
    per entry). ``task_rows``: output rows per parallel task, whose plane positions run as one
    flat range of blocks. 0 means chosen per layer (:func:`choose_sparse_schedule`).
    ``slices``: parts a task's channel groups are split into, each a parallel task of its own
    (tasks of many rows reuse each weight over more positions; slices keep enough parallel
    work); the largest divisor of the group count up to it is used; 0: chosen.
    ``chunk_bytes``: input bytes one reduction chunk may span (the input rows a task reads, for a
    chunk of input channels); every group runs over a chunk while it is in cache. 0: one chunk.
    32 KiB (AVX2, Zen 3): C3D conv3b at 26 % kept ran 39 ms, against 45 ms at 16 KiB and 44 ms
    at 64 KiB; the default is the family's ``CHUNK_BYTES`` (128 KiB on AVX-512).
    ``chunk_pass_cycles`` and ``cached_weight_bytes``: the cost model's cycles per accumulator
    register of a block's pass per chunk (:func:`block_overhead`) and the largest weight table
    it charges nothing to stream per task (:func:`modelled_cycles`); the family's
    ``CHUNK_PASS_CYCLES`` and ``CACHED_WEIGHT_BYTES``.
    ``task_copy_bytes``: the planar copy is made inside each task, of the rows and the frame
    the task reads (:meth:`~.layout.FlatLayout.banded`: with the rows its last block's
    rounded-up positions reach), where the layer has one kernel frame, its whole copy would
    take more than this many bytes (the family's ``TASK_COPY_BYTES``) and its output plane
    holds at least ``task_copy_min_positions`` positions (``TASK_COPY_MIN_POSITIONS``); 0
    bytes: always one copy of the whole input before the tasks.
    ``padding``: how the planar copy holds the spatial padding: "copied"; "masked" (left out,
    its reads masked) wherever it fits (stride-1 convs whose output plane is the input's,
    :meth:`~.layout.MaskedLayout.fits`; copied elsewhere); or "auto", masked where it fits and
    computes at least ``MASKED_MIN_GAIN`` times the copied layout's useful positions. The
    default is the family's ``PADDING`` ("auto" on AVX-512; "copied" on AVX2 and NEON, which
    have no mask registers: see there). Masked, a task is a run of the blocks that
    ``task_rows`` rows would take, over the flattened output, and the copy is made once per
    sample (no ``task_copy_bytes``).
    ``output_tile``: positions of a row per output tile (at most the row), transposed in
    registers from the accumulator's position-major blocks, each output vector one block's
    ``lanes`` channels (``OUTPUT_TILE``; blocks under ``OUTPUT_TILE_MIN_LANES`` lanes or of no
    power of two take no tiles); 0: each output vector of ``vector_lanes`` channels gathers its
    floats one by one.
    ``input_layout``: "planar" (the x-innermost copy), "interleaved" (the input read in place,
    four input channels at a time; temporal-only kernels of at least four input channels),
    "interleaved_copy" (the same quads over a zero-padded copy that keeps channels innermost;
    any kernel of at least four input channels) or "auto": interleaved wherever it fits, else
    interleaved_copy for kernels with spatial taps whose reductions have at most
    ``quad_copy_max_entries`` entries (input channels x kernel taps; the family's
    ``QUAD_COPY_MAX_ENTRIES``, 0 on AVX-512), else planar;
    either quad layout only where the pattern's quads are at least ``QUAD_MIN_FILL`` full.
    Quad blocks hold ``x_vectors`` positions (0: as many as the registers hold), of one row
    when copied, of the flattened plane when read in place, and run ``task_rows`` rows (0: one
    read in place, ``QUAD_COPY_TASK_ROWS`` copied) as a task (read in place: that many rows'
    positions, in whole blocks); read in place, a task runs ``task_frames`` consecutive output
    frames of its positions (0: chosen, see ``QUAD_TASK_FRAMES``). The ``lanes``, ``slices``,
    ``chunk_bytes``, ``output_tile``, ``task_copy_bytes`` and ``task_copy_min_positions`` knobs
    do not apply to quads, nor ``task_frames`` to any other kernel.
    ``skip_frame_padding``: per output frame, each list runs only its entries whose input frame
    lies inside the clip (:func:`~.baking.reduction_entry`), where the copied padding
    would have them multiply its zero frames; a masked task's positions run across frames, so
    masked code cannot, and the quads read in place always skip.
    """

    family: str
    vector_lanes: int
    registers: int
    lanes: int
    x_vectors: int = 0
    task_rows: int = 0
    task_frames: int = 0
    slices: int = 0
    chunk_bytes: int = 32768  # the family's CHUNK_BYTES (sparse_family_knobs)
    output_tile: int = OUTPUT_TILE
    parallel: bool = True
    input_layout: str = "auto"
    quad_copy_max_entries: int = 0
    task_copy_bytes: int = 0
    task_copy_min_positions: int = 0
    padding: str = "copied"
    skip_frame_padding: bool = True
    chunk_pass_cycles: float = 2.0  # the family's CHUNK_PASS_CYCLES (sparse_family_knobs)
    cached_weight_bytes: int = 512 * 1024  # the family's CACHED_WEIGHT_BYTES

    def __post_init__(self) -> None:
        if self.family not in VECTOR_REGISTERS:
            raise ValueError(
                f"sparse knob family must be one of {sorted(VECTOR_REGISTERS)}, not {self.family!r}"
            )
        for name in ("vector_lanes", "registers", "lanes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sparse knob {name} must be a positive integer, got {value!r}")
        for name in (
            "x_vectors",
            "task_rows",
            "task_frames",
            "slices",
            "chunk_bytes",
            "output_tile",
            "quad_copy_max_entries",
            "task_copy_bytes",
            "task_copy_min_positions",
            "cached_weight_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"sparse knob {name} must be an integer >= 0, got {value!r}")
        cycles = self.chunk_pass_cycles
        if isinstance(cycles, bool) or not isinstance(cycles, int | float) or not cycles >= 0:
            raise ValueError(f"sparse knob chunk_pass_cycles must be a number >= 0, got {cycles!r}")
        check_bools(self, "parallel", "skip_frame_padding")
        if self.padding not in PADDINGS:
            raise ValueError(f"sparse knob padding must be one of {PADDINGS}, not {self.padding!r}")
        if self.input_layout not in INPUT_LAYOUTS:
            raise ValueError(
                f"sparse knob input_layout must be one of {INPUT_LAYOUTS}, "
                f"not {self.input_layout!r}"
            )


@dataclasses.dataclass(frozen=True)
class SparseSchedule:
    """Sparse knobs resolved against one layer and pattern (:func:`choose_sparse_schedule`):
    what the algorithm (its layout and chunks) and the schedule both depend on."""

    knobs: SparseKnobs
    group_lanes: int  # gM: output channels sharing one entry list
    lanes: int  # output channels per accumulator block (divides gM); quads: per vector
    vector: int  # CPU: plane positions per vector (quads: 1); GPU: x positions per work-item
    layout: FlatLayout | MaskedLayout | None  # the planar kernel's copy; None for quads
    x_vectors: int = 1  # quads: the block's positions
    task_rows: int = 1  # CPU: output rows per parallel task
    chunk: int = 0  # input channels per reduction chunk; 0: all
    slices: int = 1  # CPU: parallel parts of a task's channel groups
    input_layout: str = "planar"  # INPUT_LAYOUTS (CPU) or GPU_INPUT_LAYOUTS (GPU) but "auto"
    task_frames: int = 1  # CPU, quads read in place: output frames per parallel task
    task_blocks: int = 1  # CPU, quads read in place or masked padding: blocks per task

    @property
    def x_tile(self) -> int:
        return self.vector * self.x_vectors

    @property
    def padding(self) -> str:
        """Where the spatial padding is: "masked" (:class:`~.layout.MaskedLayout`), "copied" (a
        padded copy) or "none" (the input read in place)."""
        if isinstance(self.layout, MaskedLayout):
            return "masked"
        return "none" if self.input_layout in ("interleaved", "in_place") else "copied"

    @property
    def skips_frame_padding(self) -> bool:
        """Whether the code skips the entries that read the temporal padding, where the layer
        has any: the quads read in place always do, masked tasks (across frames) cannot."""
        if isinstance(self.layout, MaskedLayout):
            return False
        return self.input_layout == "interleaved" or self.knobs.skip_frame_padding

    def describe(self) -> dict[str, Any]:
        shared = {
            "family": self.knobs.family,
            "lanes": self.lanes,
            "x_tile": self.x_tile,
            "input_layout": self.input_layout,
            "skip_frame_padding": self.skips_frame_padding,
        }
        if isinstance(self.knobs, SparseGpuKnobs):
            copied = self.input_layout == "planar"
            copy = {"copy_threads": self.knobs.copy_threads} if copied else {}
            return {**shared, **gpu_threads_described(self.knobs), **copy}
        return {
            **shared,
            "task_rows": self.task_rows,
            "task_frames": self.task_frames,
            "task_blocks": self.task_blocks,
            "chunk_channels": self.chunk,
            "slices": self.slices,
            "copy_per_task": isinstance(self.layout, FlatLayout) and bool(self.layout.band),
            "padding": self.padding,
        }


# Channels per block: 4 on AVX2 fills 8-12 of 16 ymm registers with 2-3 vectors; AVX-512's 32
# registers hold 8 x 3. NEON's 4-float vectors take 4 x 6.
VECTOR_REGISTERS = {"x86-avx2": 16, "x86-avx512": 32, "arm64-neon": 32}
BLOCK_LANES = {"x86-avx2": 4, "x86-avx512": 8, "arm64-neon": 4}


GPU_INPUT_LAYOUTS = ("auto", "planar", "in_place")


@dataclasses.dataclass(frozen=True)
class SparseGpuKnobs(GpuConvKnobs):
    """The dense code's OpenCL knobs, plus ``input_layout``: "planar" (the padded copy, x
    innermost), "in_place" (the input read as it is, zero outside it) or "auto": in place
    where :func:`gpu_reads_in_place` holds. ``skip_frame_padding`` means what it does on CPUs
    (:class:`SparseCpuKnobs`). ``copy_threads``: work-items per work-group of the padded copy
    (one per float; 64, unmeasured against other sizes)."""

    input_layout: str = "auto"
    copy_threads: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        threads = self.copy_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 < threads <= 256:
            raise ValueError(
                f"sparse OpenCL knob copy_threads must be in [1, 256], not {threads!r}"
            )
        if self.input_layout not in GPU_INPUT_LAYOUTS:
            raise ValueError(
                f"sparse OpenCL knob input_layout must be one of {GPU_INPUT_LAYOUTS}, "
                f"not {self.input_layout!r}"
            )


# Neighbouring work-items take neighbouring x tiles of one channel group (x threads inner, 16 of
# them x 4 groups, 2 positions each), so a 32-wide warp spans two entry lists rather than eight:
# less waiting when groups keep unequal counts, one weight per step for 16 work-items, and
# neighbouring positions of each input plane per load. With the dense code's knobs (channel groups
# inner, 8 x 8 x 4) the sparse code took 1.2-2.7x as long on an H100
# (bench/results/opencl_gpu_knobs.md: 0.43 against 0.23 ms on R(2+1)D's 1x3x3 at a third kept,
# 4.10 against 1.53 ms on C3D conv4b unbalanced). One group per warp (2 x 32 work-items) was no
# better (conv4b unbalanced 1.66 ms). The dense code's own best knobs differ per layer there, so
# it keeps its defaults. Larger register tiles lost too (bench/results/opencl_gpu_tiles.md): 4
# positions per work-item took 0.88-0.92 of the time on conv2, within that run's noise (identical
# code 0.95-1.16), but 1.86-2.63 on conv4b's 14-wide rows; 8 positions 1.01-4.30.
SPARSE_OPENCL = SparseGpuKnobs(
    **dataclasses.asdict(
        dataclasses.replace(OPENCL, threads_c=4, threads_x=16, x_per_thread=2, x_threads_inner=True)
    )
)


def gpu_reads_in_place(spec: Conv3dSpec) -> bool:
    """Whether "auto" has the GPU sparse code read the input as it is (channels innermost):
    one spatial tap and no spatial padding, so that every entry's input lies at the output
    position's own (strided) x and y, in a frame that a baked offset gives. The padded copy is
    a kernel and a device buffer per call: on an H100 the copy took 0.07-0.09 ms and releasing
    its buffer 0.04 ms per call of R(2+1)D-18's 1x1x1 downsample and 3x1x1 convs, as long as the
    whole layer's dense code (bench/results/opencl_gpu_breakeven.md). Read in place, the 12 such
    convs of R(2+1)D-18 took a median 0.60 of the copying code's time over 120 rows (0.10-1.25;
    bench/results/opencl_gpu_in_place.md). Only the two 7x7-plane convs of 921 and 1152 channels
    lost, on 9 of their 20 rows (1.05-1.25: unpruned, KGS at two thirds kept and, on the
    1152-channel one, KGS at a third): neighbouring work-items read a channel row apart there,
    where the copy let them read neighbouring floats. Interleaved in one run at two thirds kept
    (bench/results/opencl_gpu_in_place_ab.md), in place took 0.77-1.00 of the copy's time on
    four temporal convs, but 1.08-1.20 with balanced KGS on the 7x7 planes. Forced in place
    (``input_layout`` "in_place"), kernels with spatial taps and padding read per entry a baked
    row and column offset too: 1.10-2.45x the copy's time on C3D conv2, conv3b, conv4b and
    R(2+1)D-18's 1x3x3 at a third kept (bench/results/opencl_gpu_in_place_spatial.md), so
    "auto" keeps the copy for them; the knob stays for GPUs where the copy costs more."""
    return spec.kernel[1:] == (1, 1) and not any(spec.pads_begin[1:]) and not any(spec.pads_end[1:])


SparseKnobs = SparseCpuKnobs | SparseGpuKnobs


def sparse_family_knobs(target: hl.Target) -> SparseKnobs:
    """The sparse knobs of ``target``'s family: the dense family's vector width and threading,
    with the per-family values measured for the sparse kernels (the tables below)."""
    dense = target_family_knobs(target)
    if isinstance(dense, GpuConvKnobs):
        return SPARSE_OPENCL
    assert isinstance(dense, CpuConvKnobs)
    return SparseCpuKnobs(
        dense.family,
        dense.vector_lanes,
        VECTOR_REGISTERS[dense.family],
        BLOCK_LANES[dense.family],
        chunk_bytes=CHUNK_BYTES[dense.family],
        parallel=dense.parallel,
        quad_copy_max_entries=QUAD_COPY_MAX_ENTRIES[dense.family],
        task_copy_bytes=TASK_COPY_BYTES[dense.family],
        task_copy_min_positions=TASK_COPY_MIN_POSITIONS,
        padding=PADDING[dense.family],
        chunk_pass_cycles=CHUNK_PASS_CYCLES[dense.family],
        cached_weight_bytes=CACHED_WEIGHT_BYTES[dense.family],
    )


def divisors_up_to(n: int, most: int) -> list[int]:
    """The divisors of ``n`` not above ``most``, ascending: a block's lanes must not straddle
    channel groups, nor a slice split a group."""
    return [d for d in range(1, min(n, most) + 1) if n % d == 0]


# Each accumulator takes one FMA per entry, so an entry cannot beat the FMA latency (4 cycles on
# Zen 3 and on Cortex-A76-class cores); measured, a block of exactly 2 x 4 accumulators ran 8 %
# slower per FMA than a 3 x 4 one, hence the half cycle of slack.
CHAIN_CYCLES = 4.5


def entry_cycles(lanes: int, tiles: int, masked: bool = False) -> float:
    """Model of one entry's cost for one block: two FMA pipes, three FP pipes shared by FMAs
    and weight broadcasts, and the accumulators' dependency chains, plus the offset load and
    loop. ``masked`` (:class:`~.layout.MaskedLayout`): each input vector's mask test takes an
    FMA pipe's slot."""
    fmas = lanes * tiles + (tiles if masked else 0)
    return max(fmas / 2, (fmas + lanes) / 3, CHAIN_CYCLES) + 1


# The quad kernel (interleaved input) multiplies a pruned entry of a partly kept quad by zero:
# below this share of kept entries in its quads, "auto" copies instead (at half full the quads
# would do twice the planar kernel's multiplies; units of 4 or 8 input channels fill them).
QUAD_MIN_FILL = 0.75

# Quads over a padded copy (kernels with spatial taps): each quad holds 4 input channels x gM
# weights and a block reads every channel of its window, so only short reductions keep both in
# cache. The longest reduction (input channels x kernel taps) that takes them, per family.
# AVX2 (Zen 3), against the planar kernel, per-round time ratio in one process (9-11 rounds,
# KGS 8x4 at 22-26 % kept): C3D conv2 (64 x 27 = 1728) 0.90, R(2+1)D-18's 1x3x3 convs of 128
# and 256 channels (1152, 2304) 0.81 and 0.92; the embedded model's 96-channel 3x3x3 conv
# (2592) 1.05, C3D conv3a (3456) 1.11, conv3b (6912) 1.18, conv4b (13824) 1.31, conv5a 1.30.
# AVX-512 (Zen 5), the same way, KGS 8x4 balanced at a quarter kept (15 rounds) the planar
# kernel took 0.85 of the quads' time on C3D conv2, 0.93 on R(2+1)D-18's 128-channel 1x3x3
# conv and 0.86 on its 64-channel one (576 entries; also 0.86 at half kept); with the whole-row
# copy, each layout timed twice per round, 0.80 on conv2 and 0.88 on the 128-channel 1x3x3. A
# 16-float vector holds only 4 channels x 4 quad inputs and each position's quad is broadcast
# into it, where the planar kernel's block of 8 channels x 2-3 vectors broadcasts each weight
# once for 2-3 FMAs. NEON keeps AVX2's value (unmeasured).
QUAD_COPY_MAX_ENTRIES = {"x86-avx2": 2304, "x86-avx512": 0, "arm64-neon": 2304}
# Rows per task of the copied quads: every group's weights serve two rows (C3D conv2, 11
# rounds: one row 1.02 and four rows 1.01 of the time of two).
QUAD_COPY_TASK_ROWS = 2
# Output frames per task of the in-place quads: a task's next frame finds two of its three input
# frames (a 3x1x1 kernel) in its own core's caches, where consecutive one-frame tasks ran on
# different cores. Per-round time ratio in one process, 4 frames against 1, R(2+1)D-18's 3x1x1
# convs at a third, a sixth (unbalanced) and a quarter (vanilla) kept, three runs each:
# layer1.0 0.94-1.00, layer1.1's second 0.98-1.01, layer2.1 0.86-1.03 (median of all 27:
# 0.985); layer2.0's temporal stride 2 0.95-0.96; unpruned, layer1.0 0.98-1.01 and layer2.1
# 1.01-1.02. 8 frames were no better. Fewer frames where under 2 * MIN_TASKS tasks would remain:
# layer3's 14x14 planes gained nothing (2 frames: 0.77-1.18 over ten runs, 4 frames 1.03-1.05).
QUAD_TASK_FRAMES = 4


# Rows per task: more rows reuse each weight over more positions and round the flat range up
# less often, but shrink the chunk of input channels that fits the chunk bytes. At least
# MIN_TASKS parallel parts (tasks x slices): several per core, so that a core slowed by other
# work (or a phone's little cores) leaves less idle time at the end. Per-round time ratio in one
# process, 16 against 8 parts (the deep layers' slices doubled; KGS 8x4, the C3D stack's
# weights or 26 % kept): C3D conv4b 0.965-0.98 over three runs, conv4a 0.967, conv5a/b
# 0.98-0.99; R(2+1)D-18 layer4.1's 1x3x3 conv 0.983, its 1x1x1 downsample 0.997. 32 parts
# gave conv4b no more (0.96-0.98) and took that 0.6 ms downsample 1.08 of the time.
MAX_TASK_ROWS = 32
MIN_TASKS = 16

# Per task the whole weight table streams through the core once. C3D conv4b (7.4 MB of weights
# at 26 % kept), 14-wide rows in 16-wide blocks either way: 1-row tasks 29.7 ms, 14-row tasks
# 23-26 ms over two runs, about 8 bytes per cycle per core.
WEIGHT_BYTES_PER_CYCLE = 8
# Tables up to this size are not charged, per family: on AVX2 and NEON those that fit a core's L2
# (512 KiB on phones; reasoned, unmeasured). On Zen 5 (AVX-512) a table that fits L2 still costs its
# trip into L1 once per task: charged like the others, the chooser gives fewer, taller tasks to
# layers whose cheap uncharged tables had won them 2-5 row tasks. Per-round time ratio against the
# old choice in one process (KGS 8x4 unbalanced unless said, 11-15 rounds): R(2+1)D-18's 128 -> 288
# 1x3x3 conv at a sixth kept 0.92 (vanilla 0.96; 28-row tasks in two slices, not 5 rows) and at an
# eighth 0.98; its stride-2 64 -> 230 1x3x3 conv 0.90-0.99 from two thirds to an eighth kept (14
# rows, not 5) and its stride-2 128 -> 460 one 0.91 and 0.95 at a sixth and an eighth; C3D conv2 at
# an eighth 0.95, conv3a 0.95; the stride-2 1x1x1 downsamples 0.92-0.98, but R(2+1)D-18's 128 -> 256
# one (0.2-0.3 ms) 1.01-1.03 at a half and a third kept.
CACHED_WEIGHT_BYTES = {"x86-avx2": 512 * 1024, "x86-avx512": 0, "arm64-neon": 512 * 1024}

# The chunk budget (the ``chunk_bytes`` knob's default) and the modelled cost of a block's pass
# over the task's accumulator per register (:func:`block_overhead`), per family. AVX2 and NEON
# keep 32 KiB, measured on Zen 3 (the ``chunk_bytes`` knob's note; NEON unmeasured), and two
# cycles, a reasoned value (a load, add and store per register). On Zen 5 (AVX-512, 48 KiB L1,
# 1 MiB L2) chunks that fit L2 won: fewer accumulator passes gain more than reading a chunk's
# inputs from L2 costs, and the budget alone moves C3D conv3a/conv3b to 28-row tasks in two
# slices (not 5 rows at low kept fractions) and conv4b to 44-channel chunks. One cycle per
# register, also reasoned (xor-zeroed registers, the add takes its load as an operand, one
# 64-byte store per register) and kept because its picks timed faster, moves conv2 to 14 rows
# of 8-channel chunks (two cycles: 8 rows of 16, 0.99-1.08 of the old time). Per-round ratio
# against the old choices (32 KiB, two cycles), one process, 11 rounds, KGS 8x4 unbalanced
# unless said: conv2 0.949 at a sixth kept, 0.963 at half, vanilla at a sixth 0.920; conv3a
# balanced at 26 % 0.947; conv3b 0.954 at a sixth, 0.988 at half; conv4b 0.976 at half,
# balanced at 26 % 0.936; conv5b at 26 % 0.948; R(2+1)D-18's 1x3x3 0.908 at 26 %, 0.995 at
# half. 256 KiB chunks took conv2 at a sixth 1.03, one chunk took conv4b 1.07.
CHUNK_BYTES = {"x86-avx2": 32768, "x86-avx512": 131072, "arm64-neon": 32768}
CHUNK_PASS_CYCLES = {"x86-avx2": 2, "x86-avx512": 1, "arm64-neon": 2}
# The largest accumulator a task may keep (its slice's channels x its rounded-up positions),
# unless no shape fits: the model has no term for an accumulator that outgrows L2. Only C3D
# conv1 (64 channels of 112-wide rows) among the benchmark layers meets it: the model above
# gave it 28-row tasks (792 KiB), now 14 (396 KiB). Against the old 5-row tasks, one process,
# 11-15 rounds: at 26 % kept (balanced) 28 rows 1.19, 14 rows 0.94; at half kept (unbalanced)
# 28 rows 0.97-0.98, 14 rows 1.07-1.08, 8 rows 1.09: conv1's rows mostly trade places with the
# pattern, and the cap only rules out the accumulator that L2 cannot hold.
TASK_ACCUMULATOR_MAX_BYTES = 512 * 1024

# The planar copy made inside each task (the ``task_copy_bytes`` knob), per family: a task copies
# one frame of its band of rows just before its entry loops read them from L2, where the copy of the
# whole input, made before the tasks, went through memory (it runs at the speed of a plain copy, see
# _schedule_flat_cpu). Layers of one kernel frame only: a 3x3x3 kernel's task would copy three input
# frames per output frame, and tasks that ran their frames in turn, each copying one new frame, took
# 0.96-1.03 of C3D conv2's time (_schedule_flat_cpu). On Zen 5 (AVX-512), per-round time ratio in
# one process against the copy of the whole input, 11 rounds, KGS 8x4 unbalanced unless said,
# R(2+1)D-18's 1x3x3 convs: 56x56 planes (64 channels, a 13.5 MB copy) 0.93 at a sixth kept and 0.96
# at half; 28x28 (128 channels, 3.6 MB) 0.98 twice at a sixth, 0.98 at a third, 0.97 at half,
# vanilla at a quarter 0.97, layer2.0's second conv balanced at a quarter 0.94; 14x14 (256 channels,
# 1 MB, two or four slices, each of which copies the band again) 1.07 and 1.05 at a sixth, 1.00 at
# half; 7x7 (0.3 MB, eight slices) 1.08. Against libraries built before the knob existed (15 rounds,
# no torch in the process), at a sixth kept: the 56x56 conv 0.92-0.93 and the 28x28 one 0.98-0.99
# over two runs each, and 0.84-0.86 in three runs whose baseline took 7-35 % longer than in the
# others (memory that the shared host kept busy, we think: just before the last of them a plain copy
# of conv2's copy took 1.5 ms, not 0.83, and the per-task copy reads from L2 what the whole input's
# copy sends through memory); C3D conv2 and conv3b, which keep the whole input's copy, 1.00. AVX2
# and NEON give the 28x28 and 56x56 convs the copied quads, so the knob is off there (unmeasured).
TASK_COPY_BYTES = {"x86-avx2": 0, "x86-avx512": 2 * 1024 * 1024, "arm64-neon": 0}
# The copy per task also needs an output plane of this many positions (the
# ``task_copy_min_positions`` knob's default, every family): on smaller planes a task's copy is
# spread over fewer positions, and their slices each copy it again. The stride-2 1x3x3 convs of
# R(2+1)D-18 (the same ratios, AVX-512): 56x56 -> 28x28 (64 channels, a 13.8 MB copy) 0.92 at a
# sixth kept, 0.97 at half and 0.94 vanilla at a sixth; 28x28 -> 14x14 (128 channels, 3.7 MB, two
# slices) 1.21 and 1.06, where the byte budget alone would have given it the copy per task.
TASK_COPY_MIN_POSITIONS = 28 * 28

# The planar copy's spatial padding (the ``padding`` knob), per family: "copied" (zero columns
# and rows in the copy, :class:`~.layout.FlatLayout`), "masked" (none, the reads that fall on it
# masked, :class:`~.layout.MaskedLayout`) or "auto" (masked where it fits and gains enough useful
# positions, ``MASKED_MIN_GAIN``). Masked, a task's positions run across rows and frames, so its
# blocks round up once per task: C3D conv4b (14x14 planes) computes 98 % useful positions rather
# than 87.5 %. But each block's input vector takes a mask test per entry, on an FMA pipe: C3D
# conv2's 3-vector blocks ran 1.10 of the time with the tests against the same code without
# them (wrong results, timing only), conv4b's 2-vector blocks 1.05. On Zen 5 (AVX-512), KGS 8x4
# unbalanced at a sixth kept unless said, masked (output tiles) against copied, per-round time
# ratio in one process (11-31 rounds): C3D conv4b 0.92-0.95 over five runs (balanced at 26 %
# 0.936, vanilla at a quarter 0.905, half kept 0.91-0.93 over two runs), R(2+1)D-18's 14x14 1x3x3
# conv 0.96-0.98 over four runs (half kept 0.98), its 28x28 3x1x1 forced onto the planar kernel
# (no mask tests) 0.89, every sparse layer of the embedded default model on the host (planes of
# 2x2 to 16x16, microseconds a call) 0.78-0.95; conv3b 1.04-1.08, conv2 1.21-1.25 and
# R(2+1)D-18's 28x28 1x3x3 conv (against its copy per task) 0.95-1.14 over six runs, whose copied
# shapes compute 96 % useful positions against 99 % masked; C3D conv5b (7x7 planes, the same
# 76.6 % useful positions either way), balanced at 26 %, 1.02 (1.10-1.26 with 1- or 3-vector
# blocks). Before the masked output took tiles
# (each channel vector gathered), the 14x14 1x3x3 took 1.08-1.10. AVX2 and NEON have no mask
# registers (a compare and blend per input vector): "copied"; AVX2 code on the same Zen 5 took
# 1.99 of the time masked on conv4b (31 rounds), NEON is unmeasured.
PADDING = {"x86-avx2": "copied", "x86-avx512": "auto", "arm64-neon": "copied"}
# "auto" masks the padding where the chosen masked shape's useful positions
# (:func:`useful_positions`) are at least this many times the copied shape's: between the
# measured losses above (1.03-1.04 times as many: conv2, conv3b, the 28x28 1x3x3) and wins
# (1.12: the 14x14 planes; 1.09 on the 3x1x1, which takes no mask tests).
MASKED_MIN_GAIN = 1.05
# The copied code skips the entries that read the temporal padding (``skip_frame_padding``):
# the gain is weighed against the share it runs (:func:`frames_inside`). C3D conv4b (4 frames,
# 98 % against 87.5 % useful positions, 83 % of its entries run copied) therefore stays copied:
# copied and skipping, it took 0.885 of the masked code's time (KGS 8x4 unbalanced at a sixth
# kept, 15 rounds). The embedded model's conv2 (16 frames of 16x16) turned copied too: 1.03
# and 1.07 of the masked time in two runs of 41 and 21 rounds, within those runs' spread on
# its unchanged layers (0.91-1.08), microseconds a call.


def task_blocks(spec: Conv3dSpec, layout: FlatLayout | MaskedLayout, rows: int, x_tile: int) -> int:
    """Blocks of ``x_tile`` plane positions a task of ``rows`` output rows computes: positions
    ``[y0 * Wq, y0 * Wq + (rows - 1) * Wq + W)`` (``Wq``: the layout's ``columns``), rounded up."""
    span = (rows - 1) * layout.columns + spec.out_size[2]
    return -(-span // x_tile)


def task_count(spec: Conv3dSpec, layout: FlatLayout | MaskedLayout, rows: int, x_tile: int) -> int:
    """Tasks over the output (before slices): bands of ``rows`` rows per frame, or with a
    :class:`~.layout.MaskedLayout` runs of :func:`task_blocks` blocks over every frame's
    positions."""
    out_t, out_h, out_w = spec.out_size
    if isinstance(layout, MaskedLayout):
        return -(-out_t * out_h * out_w // (task_blocks(spec, layout, rows, x_tile) * x_tile))
    return -(-out_h // rows) * out_t


def channel_input_bytes(spec: Conv3dSpec, layout: FlatLayout | MaskedLayout, rows: int) -> int:
    """Bytes of one input channel that a task of ``rows`` output rows reads: kernel depth x
    the rows' kernel-height input rows, whole padded width."""
    in_rows = spec.kernel[0] * ((rows - 1) * spec.stride[1] + spec.kernel[1])
    return in_rows * layout.columns * layout.stride[1] * 4


def block_overhead(lanes: int, x_vectors: int, per_register: float) -> float:
    """Cycles a block pays once per chunk: zeroing its registers and adding them into the
    task's accumulator (a load, add and store per register: ``per_register`` cycles, the
    ``chunk_pass_cycles`` knob), plus the loop around them."""
    return per_register * lanes * x_vectors + 10


def modelled_cycles(
    spec: Conv3dSpec,
    layout: FlatLayout | MaskedLayout,
    vector: int,
    lanes: int,
    shape: tuple[int, int, int],
    chunk: int,
    kept: float,
    knobs: SparseCpuKnobs,
) -> float:
    """Cycles per block of ``lanes`` channels over the output, for a (x vectors, task rows,
    slices) ``shape``, with ``knobs``' ``chunk_pass_cycles`` and ``cached_weight_bytes``.

    A task computes its rows' plane positions rounded up to whole blocks (:func:`task_blocks`):
    the padding columns between rows and the last block's tail are computed and dropped. Row
    blocks shift inwards at the bottom (a few rows computed twice; with a copy per task the
    last block is guarded instead). With a :class:`~.layout.MaskedLayout` a task is a run of
    that many blocks over the whole output (:func:`task_count`), and each entry pays its mask
    tests (:func:`entry_cycles`) where the kernel has spatial taps. The copy is not modelled,
    nor the band each slice copies again. Per block, each chunk's ``kept`` share of its
    (channel, kernel location) entries, then the block's overhead (fewer, longer chunks win).
    Per task the weights stream through once (unless the table is at most
    ``cached_weight_bytes``); every slice of a task reads the task's input rows again.
    """
    x_vectors, rows, slices = shape
    tasks = task_count(spec, layout, rows, vector * x_vectors)
    blocks = tasks * task_blocks(spec, layout, rows, vector * x_vectors)
    chunk = chunk or spec.in_channels
    chunks = -(-spec.in_channels // chunk)
    entries = kept * spec.in_channels * spec.kernel_volume
    masked = isinstance(layout, MaskedLayout) and layout.masks_reads(spec)
    entry = entry_cycles(lanes, x_vectors, masked)
    overhead = block_overhead(lanes, x_vectors, knobs.chunk_pass_cycles)
    compute = blocks * (entries * entry + chunks * overhead)
    weights = 0.0
    if entries * spec.out_channels * 4 > knobs.cached_weight_bytes:
        weights = tasks * entries * lanes * 4
    task_input = channel_input_bytes(spec, layout, rows) * spec.in_channels
    inputs = tasks * slices * task_input * lanes / spec.out_channels
    return compute + (weights + inputs) / WEIGHT_BYTES_PER_CYCLE


def chunk_channels(
    spec: Conv3dSpec, layout: FlatLayout | MaskedLayout, g_n: int, budget: int, rows: int = 1
) -> int:
    """Input channels whose rows a task of ``rows`` output rows reads fit ``budget`` bytes
    (:func:`channel_input_bytes`); a multiple of gN when possible; 0 when all fit."""
    if budget == 0:
        return 0
    chunk = max(1, budget // channel_input_bytes(spec, layout, rows))
    if chunk >= g_n:
        chunk -= chunk % g_n
    return 0 if chunk >= spec.in_channels else chunk


def choose_sparse_schedule(
    target: hl.Target,
    spec: Conv3dSpec,
    group: tuple[int, int],
    overrides: str = "",
    kept: float = 1.0,
    quad_fill: float = 1.0,
) -> SparseSchedule:
    """``kept``: the share of (group, channel, kernel location) entries the pattern keeps
    (:func:`~.conv3d_sparse.kept_share`); it weighs the per-chunk overhead against the entries.
    Ties go to fewer task rows (more tasks). ``quad_fill``: the kept share of the entries in the
    pattern's quads (:func:`~.conv3d_quads.quad_fill`); "auto" takes quads only where it is at
    least ``QUAD_MIN_FILL``."""
    knobs = with_overrides(sparse_family_knobs(target), overrides)
    g_m = group[0]
    if isinstance(knobs, SparseGpuKnobs):
        layout = FlatLayout.of(spec)
        x_tile = min(knobs.x_per_thread, spec.out_size[2])
        gpu_layout = knobs.input_layout
        if gpu_layout == "auto":
            gpu_layout = "in_place" if gpu_reads_in_place(spec) else "planar"
        return SparseSchedule(knobs, g_m, g_m, x_tile, layout, input_layout=gpu_layout)
    input_layout = knobs.input_layout
    if input_layout == "auto" and spec.in_channels >= QUAD and quad_fill >= QUAD_MIN_FILL:
        spatial_taps = spec.kernel[1:] != (1, 1)  # what the copied quads were measured on
        reduction = spec.in_channels * spec.kernel_volume
        if interleaved_fits(spec):
            input_layout = "interleaved"
        elif spatial_taps and reduction <= knobs.quad_copy_max_entries:
            input_layout = "interleaved_copy"
    if input_layout in QUAD_LAYOUTS:
        return _quad_schedule(knobs, spec, g_m, input_layout)
    lanes = divisors_up_to(g_m, knobs.lanes)[-1]
    vector = knobs.vector_lanes
    layout: FlatLayout | MaskedLayout = FlatLayout.of(spec)
    shape, chunk = _planar_shape(knobs, spec, layout, group, lanes, kept)
    if knobs.padding != "copied" and MaskedLayout.fits(spec):
        masked = MaskedLayout.of(spec)
        masked_shape, masked_chunk = _planar_shape(knobs, spec, masked, group, lanes, kept)
        # Copied, each position runs only the entries that read inside the clip.
        run = frames_inside(spec) if knobs.skip_frame_padding else 1.0
        gain = (
            run
            * useful_positions(spec, masked, masked_shape, vector)
            / useful_positions(spec, layout, shape, vector)
        )
        if knobs.padding == "masked" or gain >= MASKED_MIN_GAIN:
            layout, shape, chunk = masked, masked_shape, masked_chunk
    kx, rows, parts = shape
    if isinstance(layout, MaskedLayout):
        per_task = task_blocks(spec, layout, rows, vector * kx)
        return SparseSchedule(
            knobs, g_m, lanes, vector, layout, kx, rows, chunk, parts, task_blocks=per_task
        )
    if copies_per_task(spec, layout, knobs):
        positions = task_blocks(spec, layout, rows, vector * kx) * vector * kx
        layout = layout.banded(spec, rows, positions)
    return SparseSchedule(knobs, g_m, lanes, vector, layout, kx, rows, chunk, parts)


def _planar_shape(
    knobs: SparseCpuKnobs,
    spec: Conv3dSpec,
    layout: FlatLayout | MaskedLayout,
    group: tuple[int, int],
    lanes: int,
    kept: float,
) -> tuple[tuple[int, int, int], int]:
    """The planar kernel's cheapest (x vectors, task rows, slices) shape on ``layout`` by
    :func:`modelled_cycles`, and its chunk's input channels."""
    g_m, g_n = group
    out_h = spec.out_size[1]
    vector = knobs.vector_lanes
    # Knob values are taken as given, even past the register budget (slower, not wrong).
    budget = max(1, (knobs.registers - 1) // (lanes + 1))
    widths = [knobs.x_vectors] if knobs.x_vectors else range(1, budget + 1)
    groups = -(-spec.out_channels // g_m)
    heights = (
        [min(knobs.task_rows, out_h)]
        if knobs.task_rows
        else range(1, min(MAX_TASK_ROWS, out_h) + 1)
    )

    def slices(rows: int, kx: int) -> int:
        wanted = knobs.slices or -(-MIN_TASKS // task_count(spec, layout, rows, vector * kx))
        return divisors_up_to(groups, wanted)[-1]

    def chunk(rows: int) -> int:
        return chunk_channels(spec, layout, g_n, knobs.chunk_bytes, rows)

    def cost(shape: tuple[int, int, int]) -> tuple[float, int]:
        cycles = modelled_cycles(spec, layout, vector, lanes, shape, chunk(shape[1]), kept, knobs)
        return cycles, shape[1]

    def accumulator_bytes(shape: tuple[int, int, int]) -> int:
        kx, rows, parts = shape
        x_tile = vector * kx
        return groups // parts * g_m * task_blocks(spec, layout, rows, x_tile) * x_tile * 4

    shapes = [(kx, rows, slices(rows, kx)) for kx in widths for rows in heights]
    fitting = [s for s in shapes if accumulator_bytes(s) <= TASK_ACCUMULATOR_MAX_BYTES]
    best = min(fitting or shapes, key=cost)
    return best, chunk(best[1])


def frames_inside(spec: Conv3dSpec) -> float:
    """The share of (output frame, kernel frame) pairs whose input frame lies inside the clip:
    of entries spread evenly over the kernel's frames, the share that code skipping the
    temporal padding (``skip_frame_padding``) runs. C3D's 3x3x3 convs on 16, 8, 4 and 2 frames
    run 96, 92, 83 and 67 %."""
    return float(frame_taps_inside(spec).mean())


def useful_positions(
    spec: Conv3dSpec, layout: FlatLayout | MaskedLayout, shape: tuple[int, int, int], vector: int
) -> float:
    """The share of the positions that a (x vectors, task rows, slices) ``shape`` computes
    which are output positions (:func:`task_blocks`, :func:`task_count`)."""
    x_tile, rows = vector * shape[0], shape[1]
    computed = task_count(spec, layout, rows, x_tile) * task_blocks(spec, layout, rows, x_tile)
    return math.prod(spec.out_size) / (computed * x_tile)


def copies_per_task(spec: Conv3dSpec, layout: FlatLayout, knobs: SparseCpuKnobs) -> bool:
    """Whether the planar kernel copies its input inside each task (``task_copy_bytes``,
    ``task_copy_min_positions``)."""
    _, out_h, out_w = spec.out_size
    large_copy = 0 < knobs.task_copy_bytes < layout.size * 4
    large_plane = out_h * out_w >= knobs.task_copy_min_positions
    return spec.kernel[0] == 1 and large_copy and large_plane


def _quad_schedule(
    knobs: SparseCpuKnobs, spec: Conv3dSpec, g_m: int, input_layout: str
) -> SparseSchedule:
    """Quads (:mod:`.conv3d_quads`): ``lanes`` (H) output channels per vector of ``4 * H``
    floats, so a position takes ``gM / H`` accumulators; a block holds as many positions as the
    registers do beside one input vector per position and a weight vector (AVX2: 3 positions x
    4 accumulators; NEON: 3 x 8). Read in place on AVX2, blocks of 6 positions x half a group's
    channels (2 weight vectors per quad, half the weight bytes per FMA; two passes per group)
    ran R(2+1)D-18's 288 -> 128 3x1x1 conv at 1.08-1.16 of the time from a sixth to two thirds
    kept (1.16 with 5 positions), though in C with the block's inputs in L1 they ran 1.3x
    faster: the weights streaming from L2 are not what holds the real loop back."""
    rows = 1 if input_layout == "interleaved" else QUAD_COPY_TASK_ROWS
    if input_layout == "interleaved":
        check_interleaved(spec)
    if spec.in_channels < QUAD:
        raise ValueError(
            f"{spec.name}: an interleaved input is read {QUAD} input channels at a time; "
            f"the layer has {spec.in_channels}"
        )
    # Vector widths stay powers of two (a 9-channel group as one vector crashed LLVM's code
    # generation): the largest power of two dividing gM, up to a quarter of the vector.
    halves = min(g_m & -g_m, max(1, knobs.vector_lanes // QUAD))
    per_position = g_m // halves
    positions = knobs.x_vectors or max(1, (knobs.registers - 1) // (per_position + 1))
    out_t, out_h, out_w = spec.out_size
    rows = min(knobs.task_rows or rows, out_h)
    frames = blocks = 1
    if input_layout == "interleaved":
        # Blocks run over the flattened plane; a task takes its rows' worth of positions.
        plane = out_h * out_w
        positions = min(positions, plane)
        blocks = -(-rows * out_w // positions)
        tasks = -(-plane // (blocks * positions))
        frames = min(knobs.task_frames or quad_task_frames(out_t, tasks), out_t)
    else:
        positions = min(positions, out_w)
    return SparseSchedule(
        knobs, g_m, halves, 1, None, positions, rows, 0, 1, input_layout, frames, blocks
    )


def quad_task_frames(out_frames: int, plane_tasks: int) -> int:
    """Output frames per task of the in-place quads: up to ``QUAD_TASK_FRAMES``, halved while
    the tasks would number under ``2 * MIN_TASKS`` (``plane_tasks`` per frame range)."""
    frames = min(QUAD_TASK_FRAMES, out_frames)
    while frames > 1 and plane_tasks * -(-out_frames // frames) < 2 * MIN_TASKS:
        frames //= 2
    return frames


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
    if tiles_output(knobs, sched.lanes):
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
    """Whether the planar kernel's output stage runs in transposed tiles (:data:`OUTPUT_TILE`)
    for accumulator blocks of ``lanes`` channels, rather than the gather."""
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
    and 0.75 ms with 4 x 4.
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
    :func:`_schedule_flat_cpu`), a wider one in vectors of the ISA's width."""
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
