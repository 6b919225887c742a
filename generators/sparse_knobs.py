"""The sparse Conv3d's schedule knobs: one typed object per target family
(:class:`SparseCpuKnobs` for x86 and ARM64, :class:`SparseGpuKnobs` for OpenCL) and the
per-family values measured for them, which :func:`sparse_family_knobs` gathers. A JSON object of
overrides may set any field (``{"task_rows": 1}``, the build's ``--sparse-schedule``).

What the knobs choose, and why the kernels look as they do: :mod:`.sparse_schedules`; how a
layer's knobs are resolved against its shape and pattern: :mod:`.sparse_choice`.
"""

from __future__ import annotations

import dataclasses

import halide as hl

from .schedules import OPENCL, CpuConvKnobs, GpuConvKnobs, check_bools, target_family_knobs

OPENCL_VECTOR_WIDTHS = (2, 4, 8, 16)


INPUT_LAYOUTS = ("auto", "planar", "interleaved", "interleaved_copy")
QUAD_LAYOUTS = ("interleaved", "interleaved_copy")
PADDINGS = ("auto", "copied", "masked")
# The order of a list's entries within each kernel frame (frames stay outermost, so the entries
# that read one frame are one run: ``skip_frame_padding``): "channel", every kernel location of
# one input channel together (the planar kernel's successive entries then read the same lines of
# one input plane, a row or a float apart), or "location", every channel of one kernel location
# together (each entry a new plane). Per-round time ratio of "channel" against "location" in one
# process, both ways, rounds balanced within rounds (schedule_ab_entry_order_avx512_xeon.md,
# 11 rounds), Intel Xeon (AVX-512), KGS 8x4 unbalanced at a sixth kept: 0.982 on C3D conv2, 1.006
# on conv3b, 0.992 on conv4b and 0.986 on R(2+1)D-18's 128 -> 288 1x3x3; a run before it gave
# 0.982, 0.958, 0.997 and 0.989. Pairs run one way only, in the fixed round order that favoured
# the second build, had given 0.92-1.00. Zen 5, NEON and OpenCL unmeasured; OpenCL keeps
# "location", the order its reports were measured with.
ENTRY_ORDERS = ("channel", "location")

# Positions per tile of the planar kernel's output stage (``_transposed_output`` in
# :mod:`.sparse_schedules`; 0: none, each output vector gathers its floats one by one). Per-round
# time ratio against no tiles in one process, KGS 8x4 unbalanced at a sixth kept unless said, 11
# rounds, Zen 5, AVX-512: C3D conv1 at half kept (3 input channels, output-bound) 0.84, conv2
# 0.985-0.986 (two runs; vanilla 0.991; 0.96 at 2 % kept, where the output is a third of the time),
# conv3b 0.996 (vanilla at a third 1.003), conv4b 0.967 (balanced at half 0.984), conv5b at a
# quarter 0.993, R(2+1)D-18's 1x3x3 0.987 (vanilla 0.956); AVX2 code, conv2, 0.987. 16 positions
# took conv2 1.01 (1.17 at 2 % kept), 4 positions 0.96 and 12 1.01 at 2 % kept. NEON keeps the value
# (unmeasured).
OUTPUT_TILE = 8
# A tile's output vectors are one accumulator block's channels: blocks of fewer lanes (groups
# whose gM has only smaller divisors) would store each position in pieces of 1-3 floats, so
# they keep the gather, whose vectors are the ISA's width (not measured). So do blocks whose
# lanes are no power of two: Halide 21's LLVM aborts ("Calling a function with a bad
# signature") on tiles of 5, 9 or 13 lanes for NEON, 9 for AVX2 and 5 or 9 for SSE 4.1; 6, 7,
# 10, 11, 12 and 15 built and ran right for NEON, but the rule keeps to the powers of two that
# every test draws, rather than a list of the widths LLVM happened to survive.
OUTPUT_TILE_MIN_LANES = 4


# The most vectors (x_vectors) or positions (output_tile) a tile unrolls: 256 compiled, 4096
# crashed LLVM.
MAX_UNROLL = 256
# The quads unroll every accumulator of a block (positions x gM / H, :mod:`.conv3d_quads`): the
# most a block may hold. One small layer (8 -> 32 channels, 3x1x1, 2x300 planes, gM 32, 8
# accumulators a position) compiled in 5.7 s with 512, 43 s with 1024 and 155 s with 2048.
QUAD_MAX_ACCUMULATORS = 512


@dataclasses.dataclass(frozen=True)
class SparseCpuKnobs:
    """``registers``: the family's vector registers; a block of ``x_vectors`` vectors needs
    ``lanes * x_vectors`` accumulators, ``x_vectors`` input vectors and one broadcast weight.

    ``lanes``: channels per accumulator block (the largest divisor of gM up to it is used).
    ``x_vectors``: the block's vectors of consecutive plane positions (one input vector load each
    per entry). ``task_rows``: output rows per parallel task, whose plane positions run as one
    flat range of blocks. 0 means chosen per layer (:func:`~.sparse_choice.choose_sparse_schedule`).
    ``slices``: parts a task's channel groups are split into, each a parallel task of its own
    (tasks of many rows reuse each weight over more positions; slices keep enough parallel
    work); the largest divisor of the group count up to it is used; 0: chosen.
    ``chunk_bytes``: input bytes one reduction chunk may span (the input rows a task reads, for a
    chunk of input channels); every group runs over a chunk while it is in cache. 0: one chunk.
    32 KiB (AVX2, Zen 3): C3D conv3b at 26 % kept ran 39 ms, against 45 ms at 16 KiB and 44 ms
    at 64 KiB; the default is the family's ``CHUNK_BYTES`` (128 KiB on AVX-512).
    ``chunk_pass_cycles`` and ``cached_weight_bytes``: the cost model's cycles per accumulator
    register of a block's pass per chunk (:func:`~.sparse_choice.block_overhead`) and the
    largest weight table it charges nothing to stream per task
    (:func:`~.sparse_choice.modelled_cycles`); the family's ``CHUNK_PASS_CYCLES`` and
    ``CACHED_WEIGHT_BYTES``.
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
    Quad blocks hold ``x_vectors`` positions (0: as many as the registers hold; their
    accumulators at most ``QUAD_MAX_ACCUMULATORS``), of one row when copied, of the flattened
    plane when read in place, and run ``task_rows`` rows (0: one read in place,
    ``QUAD_COPY_TASK_ROWS`` copied) as a task (read in place: that many rows' positions, in
    whole blocks); read in place, a task runs ``task_frames`` consecutive output
    frames of its positions (0: chosen, see ``QUAD_TASK_FRAMES``). The ``lanes``, ``slices``,
    ``chunk_bytes``, ``output_tile``, ``task_copy_bytes`` and ``task_copy_min_positions`` knobs
    do not apply to quads, nor ``task_frames`` to any other kernel.
    ``entry_order``: the planar kernel's order of a list's entries within each kernel frame,
    "channel" or "location" (:data:`ENTRY_ORDERS`); the quads keep their own.
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
    entry_order: str = "channel"
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
        for name in ("x_vectors", "output_tile"):  # unrolled: 4096 crashed LLVM (exit -11)
            if getattr(self, name) > MAX_UNROLL:
                raise ValueError(
                    f"sparse knob {name} must be <= {MAX_UNROLL} (an unrolled tile), "
                    f"got {getattr(self, name)}"
                )
        cycles = self.chunk_pass_cycles
        if isinstance(cycles, bool) or not isinstance(cycles, int | float) or not cycles >= 0:
            raise ValueError(f"sparse knob chunk_pass_cycles must be a number >= 0, got {cycles!r}")
        check_bools(self, "parallel", "skip_frame_padding")
        if self.padding not in PADDINGS:
            raise ValueError(f"sparse knob padding must be one of {PADDINGS}, not {self.padding!r}")
        check_entry_order(self.entry_order, "sparse knob")
        if self.input_layout not in INPUT_LAYOUTS:
            raise ValueError(
                f"sparse knob input_layout must be one of {INPUT_LAYOUTS}, "
                f"not {self.input_layout!r}"
            )


# Channels per block: 4 on AVX2 fills 8-12 of 16 ymm registers with 2-3 vectors; AVX-512's 32
# registers hold 8 x 3. NEON's 4-float vectors take 4 x 6.
VECTOR_REGISTERS = {"x86-avx2": 16, "x86-avx512": 32, "arm64-neon": 32}
BLOCK_LANES = {"x86-avx2": 4, "x86-avx512": 8, "arm64-neon": 4}


GPU_INPUT_LAYOUTS = ("auto", "planar", "in_place")


@dataclasses.dataclass(frozen=True)
class SparseGpuKnobs(GpuConvKnobs):
    """The dense code's OpenCL knobs, plus ``input_layout``: "planar" (the padded copy, x
    innermost), "in_place" (the input read as it is, zero outside it) or "auto": in place
    where :func:`~.sparse_choice.gpu_reads_in_place` holds. ``skip_frame_padding`` means what
    it does on CPUs (:class:`SparseCpuKnobs`), and so does ``entry_order`` ("location" here,
    :data:`ENTRY_ORDERS`). ``copy_threads``: work-items per work-group of the padded copy (one
    per float; 64, unmeasured against other sizes)."""

    input_layout: str = "auto"
    copy_threads: int = 64
    entry_order: str = "location"

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
        check_entry_order(self.entry_order, "sparse OpenCL knob")


def check_entry_order(order: str, what: str) -> None:
    if order not in ENTRY_ORDERS:
        raise ValueError(f"{what} entry_order must be one of {ENTRY_ORDERS}, not {order!r}")


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


SparseKnobs = SparseCpuKnobs | SparseGpuKnobs

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
# Weight tables up to this size are not charged for streaming through the core once per task
# (``WEIGHT_BYTES_PER_CYCLE`` in :mod:`.sparse_choice`), per family: on AVX2 and NEON those that fit
# a core's L2 (512 KiB on phones; reasoned, unmeasured). On Zen 5 (AVX-512) a table that fits L2
# still costs its trip into L1 once per task: charged like the others, the chooser gives fewer,
# taller tasks to layers whose cheap uncharged tables had won them 2-5 row tasks. Per-round time
# ratio against the old choice in one process (KGS 8x4 unbalanced unless said, 11-15 rounds):
# R(2+1)D-18's 128 -> 288 1x3x3 conv at a sixth kept 0.92 (vanilla 0.96; 28-row tasks in two slices,
# not 5 rows) and at an eighth 0.98; its stride-2 64 -> 230 1x3x3 conv 0.90-0.99 from two thirds to
# an eighth kept (14 rows, not 5) and its stride-2 128 -> 460 one 0.91 and 0.95 at a sixth and an
# eighth; C3D conv2 at an eighth 0.95, conv3a 0.95; the stride-2 1x1x1 downsamples 0.92-0.98, but
# R(2+1)D-18's 128 -> 256 one (0.2-0.3 ms) 1.01-1.03 at a half and a third kept.
CACHED_WEIGHT_BYTES = {"x86-avx2": 512 * 1024, "x86-avx512": 0, "arm64-neon": 512 * 1024}

# The chunk budget (the ``chunk_bytes`` knob's default) and the modelled cost of a block's pass over
# the task's accumulator per register (``block_overhead`` in :mod:`.sparse_choice`), per family.
# AVX2 and NEON keep 32 KiB, measured on Zen 3 (the ``chunk_bytes`` knob's note; NEON unmeasured),
# and two cycles, a reasoned value (a load, add and store per register). On Zen 5 (AVX-512, 48 KiB
# L1, 1 MiB L2) chunks that fit L2 won: fewer accumulator passes gain more than reading a chunk's
# inputs from L2 costs, and the budget alone moves C3D conv3a/conv3b to 28-row tasks in two slices
# (not 5 rows at low kept fractions) and conv4b to 44-channel chunks. One cycle per register, also
# reasoned (xor-zeroed registers, the add takes its load as an operand, one 64-byte store per
# register) and kept because its picks timed faster, moves conv2 to 14 rows of 8-channel chunks (two
# cycles: 8 rows of 16, 0.99-1.08 of the old time). Per-round ratio against the old choices (32 KiB,
# two cycles), one process, 11 rounds, KGS 8x4 unbalanced unless said: conv2 0.949 at a sixth kept,
# 0.963 at half, vanilla at a sixth 0.920; conv3a balanced at 26 % 0.947; conv3b 0.954 at a sixth,
# 0.988 at half; conv4b 0.976 at half, balanced at 26 % 0.936; conv5b at 26 % 0.948; R(2+1)D-18's
# 1x3x3 0.908 at 26 %, 0.995 at half. 256 KiB chunks took conv2 at a sixth 1.03, one chunk took
# conv4b 1.07. On an Intel Xeon (2 MB L2 per core), both ways, rounds balanced within rounds, 11
# rounds, at a sixth kept (bench/results/schedule_ab_chunks_avx512_xeon.md): 32 and 64 KiB
# 1.02-1.13 of the time, 512 KiB 1.00-1.11, 256 KiB 0.97 on conv3b and the 28x28 1x3x3, 1.00-1.01
# on conv2 and conv4b, and 1.04-1.06 at half kept (rounds only rotated) on conv2, conv3b and the
# 56x56 1x3x3: no other size there.
CHUNK_BYTES = {"x86-avx2": 32768, "x86-avx512": 131072, "arm64-neon": 32768}
CHUNK_PASS_CYCLES = {"x86-avx2": 2, "x86-avx512": 1, "arm64-neon": 2}

# The planar copy made inside each task (the ``task_copy_bytes`` knob), per family: a task copies
# one frame of its band of rows just before its entry loops read them from L2, where the copy of the
# whole input, made before the tasks, went through memory (it runs at the speed of a plain copy, see
# sparse_schedules._schedule_flat_cpu). Layers of one kernel frame only: a 3x3x3 kernel's task would
# copy three input frames per output frame, and tasks that ran their frames in turn, each copying
# one new frame, took 0.96-1.03 of C3D conv2's time (sparse_schedules._schedule_flat_cpu). On Zen 5
# (AVX-512), per-round time ratio in one process against the copy of the whole input, 11 rounds, KGS
# 8x4 unbalanced unless said, R(2+1)D-18's 1x3x3 convs: 56x56 planes (64 channels, a 13.5 MB copy)
# 0.93 at a sixth kept and 0.96 at half; 28x28 (128 channels, 3.6 MB) 0.98 twice at a sixth, 0.98 at
# a third, 0.97 at half, vanilla at a quarter 0.97, layer2.0's second conv balanced at a quarter
# 0.94; 14x14 (256 channels, 1 MB, two or four slices, each of which copies the band again) 1.07 and
# 1.05 at a sixth, 1.00 at half; 7x7 (0.3 MB, eight slices) 1.08. Against libraries built before the
# knob existed (15 rounds, no torch in the process), at a sixth kept: the 56x56 conv 0.92-0.93 and
# the 28x28 one 0.98-0.99 over two runs each, and 0.84-0.86 in three runs whose baseline took 7-35 %
# longer than in the others (memory that the shared host kept busy, we think: just before the last
# of them a plain copy of conv2's copy took 1.5 ms, not 0.83, and the per-task copy reads from L2
# what the whole input's copy sends through memory); C3D conv2 and conv3b, which keep the whole
# input's copy, 1.00. AVX2 and NEON give the 28x28 and 56x56 convs the copied quads, so the knob is
# off there (unmeasured).
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


def sparse_family_knobs(target: hl.Target) -> SparseKnobs:
    """The sparse knobs of ``target``'s family: the dense family's vector width and threading,
    with the per-family values measured for the sparse kernels (the tables above)."""
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
