"""How a layer's sparse schedule is chosen: the family's knobs (:mod:`.sparse_knobs`) resolved
against its shape and pattern into a :class:`SparseSchedule` (kernel, input layout, block, task
and chunk sizes), by a cost model of the planar kernel (:func:`modelled_cycles`) and rules
measured for the quads. The schedules that apply it: :mod:`.sparse_schedules`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import halide as hl

from .baking import frame_taps_inside
from .conv3d_quads import QUAD
from .layout import FlatLayout, MaskedLayout, check_interleaved, interleaved_fits
from .schedules import gpu_threads_described, with_overrides
from .sparse_knobs import (
    QUAD_LAYOUTS,
    QUAD_MAX_ACCUMULATORS,
    SparseCpuKnobs,
    SparseGpuKnobs,
    SparseKnobs,
    sparse_family_knobs,
)
from .spec import Conv3dSpec


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
        if self.input_layout not in QUAD_LAYOUTS:  # the quads' order is their own
            shared["entry_order"] = self.knobs.entry_order
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
# The largest accumulator a task may keep (its slice's channels x its rounded-up positions),
# unless no shape fits: the model has no term for an accumulator that outgrows L2. Only C3D
# conv1 (64 channels of 112-wide rows) among the benchmark layers meets it: the model above
# gave it 28-row tasks (792 KiB), now 14 (396 KiB). Against the old 5-row tasks, one process,
# 11-15 rounds: at 26 % kept (balanced) 28 rows 1.19, 14 rows 0.94; at half kept (unbalanced)
# 28 rows 0.97-0.98, 14 rows 1.07-1.08, 8 rows 1.09: conv1's rows mostly trade places with the
# pattern, and the cap only rules out the accumulator that L2 cannot hold.
TASK_ACCUMULATOR_MAX_BYTES = 512 * 1024
# "auto" masks the padding where the chosen masked shape's useful positions
# (:func:`useful_positions`) are at least this many times the copied shape's: between the
# losses measured beside ``PADDING`` in :mod:`.sparse_knobs` (1.03-1.04 times as many: conv2,
# conv3b, the 28x28 1x3x3) and wins (1.12: the 14x14 planes; 1.09 on the 3x1x1, which takes no
# mask tests).
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
        if knobs.lanes not in (sparse_family_knobs(target).lanes, g_m):  # was taken, ignored
            raise ValueError(
                f"sparse OpenCL knob lanes {knobs.lanes}: sparse OpenCL code runs one lane per "
                f"output channel of its group (gM = {g_m}); other lanes are dense OpenCL code's "
                '(give CPU families theirs per family: {"x86-avx512": {"lanes": ...}})'
            )
        layout = FlatLayout.of(spec)
        x_tile = min(knobs.x_per_thread, spec.out_size[2])
        gpu_layout = knobs.input_layout
        if gpu_layout == "auto":
            gpu_layout = "in_place" if gpu_reads_in_place(spec) else "planar"
        return SparseSchedule(knobs, g_m, g_m, x_tile, layout, input_layout=gpu_layout)
    input_layout = knobs.input_layout
    # A position's accumulators alone past the quads' cap (groups of more than 512 filters on
    # NEON, 1024 on AVX2): the planar kernel, whose blocks take ``lanes`` of a group's filters.
    quads_fit = _quad_vector(knobs, g_m)[1] <= QUAD_MAX_ACCUMULATORS
    quads_may = spec.in_channels >= QUAD and quad_fill >= QUAD_MIN_FILL and quads_fit
    if input_layout == "auto" and quads_may:
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
    halves, per_position = _quad_vector(knobs, g_m)
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
    if positions * per_position > QUAD_MAX_ACCUMULATORS:
        most = QUAD_MAX_ACCUMULATORS // per_position
        fix = f"at most {most} positions" if most else 'the knob input_layout "planar"'
        raise ValueError(
            f"{spec.name}: the quads' block of {positions} positions (knob x_vectors, or "
            f"registers) x {per_position} accumulators each unrolls {positions * per_position}, "
            f"more than {QUAD_MAX_ACCUMULATORS}, for a group of {g_m} filters: {fix}"
        )
    return SparseSchedule(
        knobs, g_m, halves, 1, None, positions, rows, 0, 1, input_layout, frames, blocks
    )


def _quad_vector(knobs: SparseCpuKnobs, g_m: int) -> tuple[int, int]:
    """(H, gM / H): the quads' output channels per vector and a position's accumulators.
    Vector widths stay powers of two (a 9-channel group as one vector crashed LLVM's code
    generation): the largest power of two dividing gM, up to a quarter of the vector."""
    halves = min(g_m & -g_m, max(1, knobs.vector_lanes // QUAD))
    return halves, g_m // halves


def quad_task_frames(out_frames: int, plane_tasks: int) -> int:
    """Output frames per task of the in-place quads: up to ``QUAD_TASK_FRAMES``, halved while
    the tasks would number under ``2 * MIN_TASKS`` (``plane_tasks`` per frame range)."""
    frames = min(QUAD_TASK_FRAMES, out_frames)
    while frames > 1 and plane_tasks * -(-out_frames // frames) < 2 * MIN_TASKS:
        frames //= 2
    return frames
