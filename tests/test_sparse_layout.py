"""The sparse CPU kernel's input layouts and schedule choice, without compiling.

The planar code reads its padded copy at ``base(position(x, y), t * stride) + offset(entry)``;
these checks tie that arithmetic to the padded input position the convolution means. Temporal-only
kernels read the input in place, four input channels at a time; the quads are checked against
the weights they hold. Both kernels skip, per output frame, the entries that would read the
temporal padding: the runs they take are checked against the frames the entries mean.
"""

from __future__ import annotations

import dataclasses
import itertools

import halide as hl
import numpy as np
import pytest
import test_conv_dense
from conv_harness import same_plane, temporal_only
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rt3d_halide.generators.baking import frame_offsets, frame_ranges, shortened_frame_ranges
from rt3d_halide.generators.conv3d_quads import (
    PaddedChannels,
    plan_quads,
    quad_fill,
    quad_offsets,
)
from rt3d_halide.generators.conv3d_sparse import entry_offsets, plan_sparse
from rt3d_halide.generators.layout import FlatLayout, MaskedLayout
from rt3d_halide.generators.sparse_choice import (
    MIN_TASKS,
    QUAD_MIN_FILL,
    TASK_ACCUMULATOR_MAX_BYTES,
    channel_input_bytes,
    choose_sparse_schedule,
    frames_inside,
    task_blocks,
    task_count,
)
from rt3d_halide.generators.sparse_knobs import CHUNK_BYTES, QUAD_COPY_MAX_ENTRIES, TASK_COPY_BYTES
from rt3d_halide.generators.sparse_schedules import masked_extent
from rt3d_halide.generators.spec import Conv3dSpec
from rt3d_halide.pruning.patterns import kept_units


@settings(max_examples=40, deadline=None)
@given(conv=test_conv_dense.conv_cases(max_channels=6, max_extent=7))
def test_plane_position_plus_offset_is_the_padded_input_read(conv):
    check_reads(conv.spec(), FlatLayout.of(conv.spec()))


@settings(max_examples=40, deadline=None)
@given(
    conv=test_conv_dense.conv_cases(max_channels=4, max_extent=7),
    band=st.integers(1, 4),
    x_tile=st.sampled_from([4, 8, 24]),
)
def test_band_position_plus_offset_is_the_input_read(conv, band, x_tile):
    """A copy per band (one kernel frame): every block position of every band, the rounded-up
    ones past its last row included, reads inside the band's copy, and every real output
    position reads the padded input it means, from its band's first row."""
    conv = dataclasses.replace(conv, kernel=(1, *conv.kernel[1:]))
    spec = conv.spec()
    whole = FlatLayout.of(spec)
    positions = task_blocks(spec, whole, band, x_tile) * x_tile
    layout = whole.banded(spec, band, positions)
    plan = plan_sparse(np.ones(spec.weight_shape, np.float32), (1, 1))
    offsets = entry_offsets(plan, spec, layout)
    assert min(offsets) >= 0 and max(offsets) + positions <= layout.size
    _, dh, dw = spec.dilation
    _, sh, sw = spec.stride
    for y, x in np.ndindex(*spec.out_size[1:]):
        o = layout.position(x, y % band)
        for (ci, _, kh, kw), offset in zip(plan.taps, offsets, strict=True):
            c, col, row, frame = layout.decompose(o + int(offset))
            want = (ci, x * sw + kw * dw, y * sh + kh * dh, 0)
            got = (c, col, row + y // band * band * sh, frame)
            assert got == want or (is_padding(spec, want) and is_padding(spec, got))


@settings(max_examples=30, deadline=None)
@given(
    conv=test_conv_dense.conv_cases(max_channels=4, max_extent=6),
    task_positions=st.sampled_from([1, 7, 16, 48]),
)
def test_masked_reads_are_the_input_or_masked_padding(conv, task_positions):
    """Without spatial padding in the copy, each entry's read at each output position is masked
    exactly where the padded position is spatial padding; every other read lands on the input
    it means (temporal padding on the copy's zero frames), and every read of every task's
    rounded-up positions stays within the copy's extent."""
    spec = same_plane(conv).spec()
    layout = MaskedLayout.of(spec)
    plan = plan_sparse(np.ones(spec.weight_shape, np.float32), (1, 1))
    offsets = entry_offsets(plan, spec, layout)
    bits = layout.entry_bits(plan.taps[:, 2], plan.taps[:, 3], spec)
    first, end = masked_extent(spec, layout, task_positions)
    positions = layout.position(0, 0, spec.out_size[0])
    computed = -(-positions // task_positions) * task_positions
    assert first <= offsets.min() and computed - 1 + offsets.max() < end
    outside = layout.outside_bits(spec)
    assert outside.shape == (positions,)
    dt, dh, dw = spec.dilation
    _, h, w = spec.in_size
    _, ph, pw = spec.pads_begin
    for t, y, x in np.ndindex(*spec.out_size):
        o = layout.position(x, y, t)
        for (ci, kd, kh, kw), offset, entry in zip(plan.taps, offsets, bits, strict=True):
            want = (ci, x + kw * dw, y + kh * dh, t + kd * dt)
            padding = not (0 <= want[1] - pw < w and 0 <= want[2] - ph < h)
            assert bool(outside[o] & entry) == padding
            if not padding:
                assert layout.decompose(o + int(offset)) == want


def pruned_weight(spec: Conv3dSpec, kept: float, seed: int) -> np.ndarray:
    """Random weights with every (filter, channel, depth) entry kept with probability ``kept``."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(spec.weight_shape).astype(np.float32)
    return weight * (rng.random((*spec.weight_shape[:3], 1, 1)) < kept)


@settings(max_examples=40, deadline=None)
@given(
    conv=test_conv_dense.conv_cases(max_channels=9, max_extent=7),
    kept=st.sampled_from([1.0, 0.5, 0.2]),
    seed=st.integers(0, 2**16),
    planar=st.booleans(),
)
def test_frame_ranges_skip_exactly_the_padding(conv, kept, seed, planar):
    """Per list and output frame, the run of entries the code takes is every entry whose frame
    lies inside the clip, and no other: the in-place quads' groups, and the planar kernel's
    (group, chunk) lists of a conv with any taps (whose chunks cut the lists' order)."""
    spec = (conv if planar else temporal_only(conv)).spec()
    assume(planar or spec.in_channels >= 4)
    weight = pruned_weight(spec, kept, seed)
    plan = plan_sparse(weight, (2, 1), chunk=2) if planar else plan_quads(weight, (1, 1))
    ranges = frame_ranges(plan.taps, plan.starts, spec)
    frames = spec.in_size[0]
    assert ranges.shape == (len(plan.starts) - 1, spec.out_size[0], 2)
    # The table the generated code adds to t * stride: the frame each quad means.
    assert np.array_equal(
        frame_offsets(plan.taps, spec), plan.taps[:, 1] * spec.dilation[0] - spec.pads_begin[0]
    )
    shorter = False
    for i, (lo, hi) in enumerate(itertools.pairwise(plan.starts)):
        depth = plan.taps[lo:hi, 1]
        for t in range(spec.out_size[0]):
            read = t * spec.stride[0] + depth * spec.dilation[0] - spec.pads_begin[0]
            inside = set((lo + np.nonzero((read >= 0) & (read < frames))[0]).tolist())
            first, count = (int(v) for v in ranges[i, t])
            assert set(range(first, first + count)) == inside
            shorter |= count < hi - lo
    # The code takes the table only where it skips something.
    assert (shortened_frame_ranges(plan.taps, plan.starts, spec) is None) == (not shorter)


@settings(max_examples=60, deadline=None)
@given(
    conv=test_conv_dense.conv_cases(max_channels=11, max_extent=5),
    group=st.tuples(st.integers(1, 9), st.integers(1, 6)),
    kept=st.sampled_from([1.0, 0.5, 0.2, 0.0]),
    seed=st.integers(0, 2**16),
)
def test_quads_hold_exactly_the_kept_weights(conv, group, kept, seed):
    """Adding every quad's weights back at its channels and location gives the pruned weight:
    no entry lost, none doubled, none read past the last channel; quads are depth-major and
    distinct within a group, and ``quad_fill`` is the kept share of their entries."""
    spec = conv.spec()
    assume(spec.in_channels >= 4)
    weight = pruned_weight(spec, kept, seed)
    plan = plan_quads(weight, group)
    g_m = group[0]
    m, n = spec.out_channels, spec.in_channels
    rebuilt = np.zeros((len(plan.starts) - 1, g_m, *weight.shape[1:]), np.float64)
    for p, (lo, hi) in enumerate(itertools.pairwise(plan.starts)):
        keys = [tuple(tap) for tap in plan.taps[lo:hi]]
        assert len(set(keys)) == len(keys)
        assert np.all(np.diff(plan.taps[lo:hi, 1]) >= 0)
        for (first, kd, kh, kw), w in zip(keys, plan.weights[lo:hi], strict=True):
            assert 0 <= first <= n - 4
            rebuilt[p, :, first : first + 4, kd, kh, kw] += w
    rebuilt = rebuilt.reshape(-1, *weight.shape[1:])
    assert np.array_equal(rebuilt[:m], weight) and not rebuilt[m:].any()
    entries = np.repeat(kept_units(weight, group), group[1], axis=1)[:, :n].sum()
    if plan.quads:
        assert quad_fill(weight, group) == pytest.approx(entries / (4 * plan.quads))


@settings(max_examples=40, deadline=None)
@given(conv=test_conv_dense.conv_cases(max_channels=9, max_extent=7))
def test_quad_base_plus_offset_is_the_padded_input_read(conv):
    """In the channels-innermost padded copy, every quad's read for every output position and
    input-channel lane lands on the padded input the convolution means."""
    spec = conv.spec()
    assume(spec.in_channels >= 4)
    padded = PaddedChannels.of(spec)
    plan = plan_quads(np.ones(spec.weight_shape, np.float32), (1, 1))
    offsets = quad_offsets(plan, spec, padded)
    st_, sh, sw = spec.stride
    dt, dh, dw = spec.dilation
    for t, y, x in np.ndindex(*spec.out_size):
        base = padded.base(spec, x, y, t)
        for (first, kd, kh, kw), offset in zip(plan.taps, offsets, strict=True):
            for lane in range(4):
                want = (first + lane, x * sw + kw * dw, y * sh + kh * dh, t * st_ + kd * dt)
                read = base + int(offset) + lane
                assert padded.decompose(read) == want and 0 <= read < padded.size


def check_reads(spec: Conv3dSpec, layout: FlatLayout) -> None:
    """Every entry's read, for every output position, lands on the input it means."""
    weight = np.ones(spec.weight_shape, np.float32)
    plan = plan_sparse(weight, (1, 1))
    offsets = entry_offsets(plan, spec, layout)
    st_, sh, sw = spec.stride
    dt, dh, dw = spec.dilation
    for t, y, x in np.ndindex(*spec.out_size):
        base = layout.base(layout.position(x, y), t * st_)
        for (ci, kd, kh, kw), offset in zip(plan.taps, offsets, strict=True):
            read = base + int(offset)
            want = (ci, x * sw + kw * dw, y * sh + kh * dh, t * st_ + kd * dt)
            got = layout.decompose(read)
            # Padding may share its zeros with the next row's: any zero will do, but a real
            # input read must land on exactly its own float.
            assert got == want or (is_padding(spec, want) and is_padding(spec, got))
            # The last row's right padding may overhang the last plane (the schedule's copy
            # extent covers it with zeros), by less than a row.
            assert 0 <= read < layout.size + layout.columns


def is_padding(spec: Conv3dSpec, position: tuple[int, int, int, int]) -> bool:
    """Whether padded (channel, col, row, frame) lies outside the real input."""
    _, col, row, frame = position
    t, h, w = spec.in_size
    pt, ph, pw = spec.pads_begin
    return not (0 <= col - pw < w and 0 <= row - ph < h and 0 <= frame - pt < t)


def c3d_conv(
    size: tuple[int, int, int],
    cin: int,
    cout: int,
    kernel: tuple[int, int, int] = (3, 3, 3),
    pads: tuple[int, int, int] = (1, 1, 1),
    **fields,
) -> Conv3dSpec:
    """A conv padded alike on both sides; by default C3D's: 3x3x3, padded by 1."""
    return Conv3dSpec(
        name="c",
        in_channels=cin,
        out_channels=cout,
        in_size=size,
        kernel=kernel,
        pads_begin=pads,
        pads_end=pads,
        **fields,
    )


def test_row_padding_is_shared_without_an_x_stride():
    spec = c3d_conv((1, 4, 28), 2, 2, kernel=(1, 3, 3), pads=(0, 1, 1))
    assert FlatLayout.of(spec).columns == 29


def test_decompose_inverts_index_with_strides():
    spec = c3d_conv((3, 7, 9), 3, 2, stride=(2, 2, 3))
    layout = FlatLayout.of(spec)
    seen = set()
    for c, f, row, col in itertools.product(range(3), range(5), range(9), range(11)):
        i = layout.index(c, col, row, f)
        assert layout.decompose(i) == (c, col, row, f)
        seen.add(i)
    assert len(seen) == 3 * 5 * 9 * 11 and max(seen) < layout.size


AVX2 = hl.Target("x86-64-linux-avx2-fma")
PLANAR = '{"input_layout": "planar"}'


def input_layout(sched) -> str:
    """What the schedule reads: "planar", "interleaved" (in place) or "interleaved_copy"."""
    return sched.describe()["input_layout"]


@pytest.mark.parametrize(
    "shape",
    [
        ((16, 56, 56), 64, 128),
        ((8, 28, 28), 256, 256),
        ((4, 14, 14), 512, 512),
        ((2, 7, 7), 512, 512),
    ],
)
def test_free_choice_keeps_enough_tasks_and_registers(shape):
    spec = c3d_conv(*shape)
    cin = spec.in_channels
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), PLANAR, 0.26)
    out_t, out_h, _ = spec.out_size
    tasks = -(-out_h // sched.task_rows) * out_t
    assert tasks * sched.slices >= min(MIN_TASKS, out_h * out_t)
    assert sched.slices == 1 or tasks * (sched.slices - 1) < MIN_TASKS  # no needless slices
    assert sched.lanes * sched.x_vectors + sched.x_vectors + 1 <= 16  # ymm registers
    assert 0 < sched.chunk < cin and sched.chunk % 4 == 0


@pytest.mark.parametrize(
    "shape", [((16, 56, 56), 64, 128), ((8, 28, 28), 256, 256), ((4, 14, 14), 512, 512)]
)
@pytest.mark.parametrize("kept", [0.167, 0.5])
def test_avx512_chunks_fill_l2_where_avx2_fills_l1(shape, kept):
    """Each family's chunks stay within its budget (``CHUNK_BYTES``), and on AVX-512 they are
    larger than AVX2's whole budget: chunks that fit L2 measured faster on Zen 5. Both keep
    enough parallel parts."""
    spec = c3d_conv(*shape)
    avx512 = hl.Target("x86-64-linux-avx512_skylake")
    chunk_bytes = {}
    for family, target in (("x86-avx512", avx512), ("x86-avx2", AVX2)):
        sched = choose_sparse_schedule(target, spec, (8, 4), PLANAR, kept)
        assert 0 < sched.chunk < spec.in_channels
        chunk_bytes[family] = sched.chunk * channel_input_bytes(spec, sched.layout, sched.task_rows)
        assert chunk_bytes[family] <= CHUNK_BYTES[family]
        tasks = task_count(spec, sched.layout, sched.task_rows, sched.x_tile)
        assert tasks * sched.slices >= MIN_TASKS
    assert chunk_bytes["x86-avx512"] > CHUNK_BYTES["x86-avx2"]


def test_avx512_pass_cost_and_accumulator_cap_pick_the_measured_tasks():
    """One cycle per accumulator register (``CHUNK_PASS_CYCLES``) gives C3D conv2 the 14-row
    tasks of 8-channel chunks that timed faster on Zen 5 (two cycles chose 8 rows of 16); the
    accumulator cap keeps conv1's task accumulator within L2 (28 rows would hold 792 KiB)."""
    avx512 = hl.Target("x86-64-linux-avx512_skylake")
    conv2 = choose_sparse_schedule(avx512, c3d_conv((16, 56, 56), 64, 128), (8, 4), PLANAR, 0.167)
    assert (conv2.task_rows, conv2.chunk) == (14, 8)
    two = '{"input_layout": "planar", "chunk_pass_cycles": 2}'  # a knob: tuning is data
    conv2 = choose_sparse_schedule(avx512, c3d_conv((16, 56, 56), 64, 128), (8, 4), two, 0.167)
    assert (conv2.task_rows, conv2.chunk) == (8, 16)
    stem = c3d_conv((16, 112, 112), 3, 64)
    conv1 = choose_sparse_schedule(avx512, stem, (8, 4), PLANAR, 0.26)
    blocks = task_blocks(stem, conv1.layout, conv1.task_rows, conv1.x_tile)
    assert 64 * blocks * conv1.x_tile * 4 <= TASK_ACCUMULATOR_MAX_BYTES


def test_avx512_charges_weight_tables_that_fit_l2():
    """R(2+1)D-18's 128 -> 288 1x3x3 conv at a sixth kept (216 KiB of weights): AVX-512 charges
    each task's trip of the table into L1 (``CACHED_WEIGHT_BYTES``), which gives it the
    whole-frame tasks in two slices that timed faster on Zen 5 than the 5-row ones it took with
    the table uncharged."""
    spec = Conv3dSpec(
        name="s", in_channels=128, out_channels=288, in_size=(8, 28, 28), kernel=(1, 3, 3),
        pads_begin=(0, 1, 1), pads_end=(0, 1, 1),
    )  # fmt: skip
    avx512 = hl.Target("x86-64-linux-avx512_skylake")
    wide = choose_sparse_schedule(avx512, spec, (8, 4), PLANAR, 1 / 6)
    assert (wide.task_rows, wide.slices) == (28, 2)
    uncharged = '{"input_layout": "planar", "cached_weight_bytes": 524288}'
    narrow = choose_sparse_schedule(avx512, spec, (8, 4), uncharged, 1 / 6)
    assert narrow.task_rows < 28
    for bad, message in (
        ('{"cached_weight_bytes": 1.5}', "cached_weight_bytes must be an integer >= 0"),
        ('{"chunk_pass_cycles": -1}', "chunk_pass_cycles must be a number >= 0"),
        ('{"chunk_pass_cycles": true}', "chunk_pass_cycles must be a number >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            choose_sparse_schedule(avx512, spec, (8, 4), bad, 1 / 6)


def test_deep_layers_take_whole_frames_in_slices():
    """C3D conv4b: 7.4 MB of weights stream once per task, so tasks cover whole frames and
    parallel work comes from slicing the channel groups."""
    spec = c3d_conv((4, 14, 14), 512, 512)
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26)
    assert (sched.task_rows, sched.slices) == (14, 4)
    cached = choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.01)
    assert cached.task_rows < 14  # 0.08 MB of weights: no streaming to pay for


@pytest.mark.parametrize("layout", ["planar", "interleaved_copy"])
def test_task_rows_override_is_taken_capped_at_the_height(layout):
    spec = Conv3dSpec(name="c", in_channels=8, out_channels=8, in_size=(2, 5, 5), kernel=(1, 3, 3))
    for rows, taken in ((2, 2), (9, 3)):
        knobs = f'{{"task_rows": {rows}, "input_layout": "{layout}"}}'
        sched = choose_sparse_schedule(AVX2, spec, (8, 4), knobs)
        assert (sched.task_rows, input_layout(sched)) == (taken, layout)


def temporal_conv(kernel: tuple[int, int, int] = (3, 1, 1), **fields) -> Conv3dSpec:
    """R(2+1)D's 3x1x1 conv of layer2: 288 -> 128 channels over 8x28x28."""
    pads = (kernel[0] // 2, 0, 0)
    args = dict(
        name="t", in_channels=288, out_channels=128, in_size=(8, 28, 28), kernel=kernel,
        pads_begin=pads, pads_end=pads,
    )  # fmt: skip
    return Conv3dSpec(**{**args, **fields})


@pytest.mark.parametrize("kernel", [(3, 1, 1), (1, 1, 1)])
def test_temporal_kernels_take_the_interleaved_input(kernel):
    spec = temporal_conv(kernel)
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26)
    assert input_layout(sched) == "interleaved" and sched.layout is None  # no copy
    assert sched.lanes == 2  # a ymm holds 2 output channels x 4 input channels
    accumulators = sched.x_tile * 8 // sched.lanes
    assert (sched.x_tile, accumulators) == (3, 12)
    assert accumulators + sched.x_tile + 1 <= 16  # an input per position, a weight vector
    forced = choose_sparse_schedule(AVX2, spec, (8, 4), '{"input_layout": "planar"}')
    assert input_layout(forced) == "planar"


@pytest.mark.parametrize(
    "fields",
    [
        {"kernel": (3, 3, 3), "pads_begin": (1, 1, 1), "pads_end": (1, 1, 1)},
        {"kernel": (3, 1, 1), "stride": (1, 2, 2)},
        {"kernel": (1, 1, 1), "pads_begin": (0, 1, 0), "pads_end": (0, 0, 0)},
    ],
)
def test_interleaved_input_needs_one_spatial_tap(fields):
    spec = temporal_conv(**fields)
    assert input_layout(choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26)) == "planar"
    with pytest.raises(ValueError, match="interleaved input needs a 1x1 spatial kernel"):
        choose_sparse_schedule(AVX2, spec, (8, 4), '{"input_layout": "interleaved"}')


@pytest.mark.parametrize(
    ("target", "width", "group", "overrides", "positions", "lanes"),
    [
        (AVX2, 28, (8, 4), "", 3, 2),
        (AVX2, 1, (8, 4), "", 1, 2),  # never more positions than the plane holds
        (AVX2, 28, (8, 4), '{"x_vectors": 5}', 5, 2),  # the knob sets the block
        (AVX2, 28, (3, 4), "", 3, 1),  # gM odd: one channel per 4-lane vector
        (hl.Target("arm-64-android"), 28, (8, 4), "", 3, 1),  # NEON: 3 x 8 accumulators
        (hl.Target("x86-64-linux-avx512_skylake"), 28, (8, 4), "", 10, 4),  # 10 x 2 of 32 registers
    ],
)
def test_interleaved_blocks(target, width, group, overrides, positions, lanes):
    spec = temporal_conv(in_size=(8, width, width))
    sched = choose_sparse_schedule(target, spec, group, overrides, 0.26)
    assert input_layout(sched) == "interleaved"
    assert (sched.x_tile, sched.lanes) == (positions, lanes)


@pytest.mark.parametrize(
    ("size", "overrides", "frames"),
    [
        ((16, 56, 56), "", 4),  # R(2+1)D-18's layer1: 224 tasks of 4 frames
        ((8, 28, 28), "", 4),  # layer2: 54 tasks (27 of 10 blocks per frame range)
        ((4, 14, 14), "", 1),  # layer3: 2 frames would leave 28 tasks
        ((2, 7, 7), "", 1),
        ((8, 28, 28), '{"task_frames": 3}', 3),  # the knob sets it, not dividing the frames
        ((8, 28, 28), '{"task_frames": 20}', 8),  # capped at the clip
        ((8, 28, 28), '{"input_layout": "interleaved_copy"}', 1),  # copied quads: one frame
    ],
)
def test_in_place_tasks_take_consecutive_frames(size, overrides, frames):
    spec = temporal_conv(in_size=size)
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), overrides, 0.26)
    assert sched.task_frames == frames
    out_t, out_h, out_w = spec.out_size
    if input_layout(sched) == "interleaved":  # a task: one row's worth of plane positions
        assert sched.task_blocks == -(-out_w // sched.x_tile)
    plane_tasks = -(-out_h * out_w // (sched.task_blocks * sched.x_tile))
    assert overrides or frames == 1 or plane_tasks * -(-out_t // frames) >= 2 * MIN_TASKS


def test_quads_that_would_multiply_many_zeros_take_the_planar_copy():
    """Fewer than four input channels, or quads under ``QUAD_MIN_FILL`` kept: "auto" copies;
    the in-place read of fewer than four channels is refused when forced."""
    narrow = temporal_conv(in_channels=3)
    assert input_layout(choose_sparse_schedule(AVX2, narrow, (8, 4), "", 0.26)) == "planar"
    with pytest.raises(ValueError, match="read 4 input channels at a time; the layer has 3"):
        choose_sparse_schedule(AVX2, narrow, (8, 4), '{"input_layout": "interleaved"}')
    spec = temporal_conv()
    half_full = choose_sparse_schedule(AVX2, spec, (8, 2), "", 0.26, QUAD_MIN_FILL / 2)
    assert input_layout(half_full) == "planar"
    full = choose_sparse_schedule(AVX2, spec, (8, 2), "", 0.26, QUAD_MIN_FILL)
    assert input_layout(full) == "interleaved"


def test_units_of_two_channels_fill_quads_by_their_pattern():
    """8x2 units: two kept units side by side fill a quad, one alone half fills it."""
    spec = temporal_conv(in_channels=8, out_channels=8)
    weight = np.zeros(spec.weight_shape, np.float32)
    weight[:, 0:4, 0] = 1.0  # channels 0-3 at depth 0: one whole quad
    weight[:, 4:6, 1] = 1.0  # channels 4-5 at depth 1: half a quad
    assert quad_fill(weight, (8, 2)) == pytest.approx(6 / 8)
    assert quad_fill(weight, (8, 4)) == pytest.approx(1.0)  # 8x4 units fill their quads


def test_slices_divide_the_groups():
    """A slice is a task of whole groups, all slices alike: the knob is rounded down to a
    divisor of the group count."""
    spec = c3d_conv((2, 7, 7), 16, 32)  # 4 groups of 8
    planar = '"input_layout": "planar"'
    assert choose_sparse_schedule(AVX2, spec, (8, 4), f'{{"slices": 3, {planar}}}').slices == 2
    assert choose_sparse_schedule(AVX2, spec, (8, 4), f'{{"slices": 9, {planar}}}').slices == 4


@pytest.mark.parametrize(
    ("shape", "kernel", "layout"),
    [
        (((16, 56, 56), 64, 128), (3, 3, 3), "interleaved_copy"),  # C3D conv2: 1728 entries
        (((8, 28, 28), 128, 288), (1, 3, 3), "interleaved_copy"),  # R(2+1)D 1x3x3: 1152
        (((4, 14, 14), 256, 576), (1, 3, 3), "interleaved_copy"),  # 2304, the limit
        (((8, 16, 16), 96, 96), (3, 3, 3), "planar"),  # 2592
        (((8, 28, 28), 128, 256), (3, 3, 3), "planar"),  # C3D conv3a: 3456
        (((16, 112, 112), 3, 64), (3, 3, 3), "planar"),  # an RGB stem: under four channels
        (((8, 28, 28), 128, 256), (1, 1, 1), "planar"),  # no spatial tap (a strided shortcut)
    ],
)
def test_short_reductions_take_quads_over_a_padded_copy(shape, kernel, layout):
    pads = tuple(k // 2 for k in kernel)
    spec = c3d_conv(*shape, kernel=kernel, pads=pads)
    limit = QUAD_COPY_MAX_ENTRIES["x86-avx2"]
    assert spec.in_channels * spec.kernel_volume <= limit or layout == "planar"
    if kernel == (1, 1, 1):
        spec = c3d_conv(*shape, kernel=kernel, pads=(0, 0, 0), stride=(1, 2, 2))
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26)
    assert input_layout(sched) == layout
    if layout != "planar":
        assert (sched.x_tile, sched.lanes, sched.task_rows) == (3, 2, 2)
        half_full = choose_sparse_schedule(AVX2, spec, (8, 2), "", 0.26, QUAD_MIN_FILL / 2)
        assert input_layout(half_full) == "planar"


def test_avx512_keeps_spatial_kernels_planar():
    """On AVX-512 the planar kernel beat the copied quads even on the shortest reductions
    measured, so "auto" gives them no quads there; the knob brings them back, and temporal-only
    kernels keep the in-place quads."""
    avx512 = hl.Target("x86-64-linux-avx512_skylake")
    conv2 = c3d_conv((16, 56, 56), 64, 128)  # 1728 entries: copied quads on AVX2
    assert input_layout(choose_sparse_schedule(AVX2, conv2, (8, 4), "", 0.26)) == (
        "interleaved_copy"
    )
    assert input_layout(choose_sparse_schedule(avx512, conv2, (8, 4), "", 0.26)) == "planar"
    knob = '{"quad_copy_max_entries": 1728}'
    assert input_layout(choose_sparse_schedule(avx512, conv2, (8, 4), knob, 0.26)) == (
        "interleaved_copy"
    )
    assert input_layout(choose_sparse_schedule(avx512, temporal_conv(), (8, 4))) == "interleaved"
    with pytest.raises(ValueError, match="quad_copy_max_entries must be an integer >= 0"):
        choose_sparse_schedule(avx512, conv2, (8, 4), '{"quad_copy_max_entries": -1}')


def test_copy_per_task_where_the_whole_copy_is_large():
    """AVX-512 builds give the convs of one kernel frame whose whole copy passes
    ``TASK_COPY_BYTES`` and whose output plane holds ``TASK_COPY_MIN_POSITIONS`` a copy per task
    (R(2+1)D-18's 1x3x3 convs onto 28x28 planes, strided or not; not those onto 14x14 planes,
    even the strided one's 3.7 MB copy); 3x3x3 kernels and AVX2 keep one copy of the whole
    input, and the knobs turn it on or off."""
    avx512 = hl.Target("x86-64-linux-avx512_skylake")
    pads = (0, 1, 1)

    def sched(target, spec, knobs=""):
        return choose_sparse_schedule(target, spec, (8, 4), knobs, 0.167)

    r2plus1d = c3d_conv((8, 28, 28), 128, 288, kernel=(1, 3, 3), pads=pads)
    assert TASK_COPY_BYTES["x86-avx512"] < FlatLayout.of(r2plus1d).size * 4
    banded = sched(avx512, r2plus1d)
    assert banded.layout.band == banded.task_rows and banded.describe()["copy_per_task"]
    assert banded.layout.rows >= banded.task_rows + 2 and banded.layout.frames == 1
    strided = c3d_conv((16, 56, 56), 64, 230, kernel=(1, 3, 3), pads=pads, stride=(1, 2, 2))
    assert sched(avx512, strided).describe()["copy_per_task"]
    onto_14x14 = c3d_conv((8, 28, 28), 128, 460, kernel=(1, 3, 3), pads=pads, stride=(1, 2, 2))
    assert TASK_COPY_BYTES["x86-avx512"] < FlatLayout.of(onto_14x14).size * 4
    small = c3d_conv((4, 14, 14), 256, 576, kernel=(1, 3, 3), pads=pads)
    conv2 = c3d_conv((16, 56, 56), 64, 128)
    copied = '{"padding": "copied"}'  # the 14x14 plane's "auto" padding is masked, no copy
    for spec in (onto_14x14, small, conv2):
        assert not sched(avx512, spec, copied).describe()["copy_per_task"]
    assert sched(avx512, onto_14x14, '{"task_copy_min_positions": 0}').layout.band
    assert not sched(AVX2, r2plus1d, PLANAR).describe()["copy_per_task"]
    assert not sched(avx512, r2plus1d, '{"task_copy_bytes": 0}').layout.band
    assert sched(AVX2, r2plus1d, '{"input_layout": "planar", "task_copy_bytes": 1}').layout.band
    with pytest.raises(ValueError, match="task_copy_bytes must be an integer >= 0"):
        sched(avx512, r2plus1d, '{"task_copy_bytes": -1}')


def test_quads_over_a_copy_need_four_channels():
    stem = c3d_conv((16, 112, 112), 3, 64)
    with pytest.raises(ValueError, match="read 4 input channels at a time; the layer has 3"):
        choose_sparse_schedule(AVX2, stem, (8, 4), '{"input_layout": "interleaved_copy"}')


AVX512 = hl.Target("x86-64-linux-avx512_skylake")


@pytest.mark.parametrize("kept", [0.167, 0.5])
def test_auto_padding_masks_the_small_planes_that_timed_faster(kept):
    """On AVX-512 "auto" leaves the padding out of the copy of R(2+1)D-18's 14x14 1x3x3 conv
    (98 % useful positions rather than 87.5 %; it took 0.96-0.98 of the time), and keeps it in
    conv2's, conv3b's and the 28x28 1x3x3's (96 % against 99 %; masked they took 1.04-1.25) and
    in 7x7 planes (no gain); AVX2 and NEON keep it. C3D conv4b's 4 frames gain as much, but
    copied it skips the entries that read its padding frames, a sixth of them (masked it took
    1.13 of that time), so it is masked only where it would not skip them."""
    conv4b = c3d_conv((4, 14, 14), 512, 512)
    small = [c3d_conv((4, 14, 14), 256, 576, kernel=(1, 3, 3), pads=(0, 1, 1))]
    large = [
        conv4b,
        c3d_conv((16, 56, 56), 64, 128),
        c3d_conv((8, 28, 28), 256, 256),
        c3d_conv((8, 28, 28), 128, 288, kernel=(1, 3, 3), pads=(0, 1, 1)),
        c3d_conv((2, 7, 7), 512, 512),
    ]
    no_skip = '{"input_layout": "planar", "skip_frame_padding": false}'
    for target, spec, knobs, padding in [
        *((AVX512, spec, PLANAR, "masked") for spec in small),
        (AVX512, conv4b, no_skip, "masked"),
        *((AVX512, spec, PLANAR, "copied") for spec in large),
        *((AVX2, spec, PLANAR, "copied") for spec in [*small, conv4b]),
    ]:
        sched = choose_sparse_schedule(target, spec, (8, 4), knobs, kept)
        assert sched.describe()["padding"] == padding, spec
        assert sched.describe()["skip_frame_padding"] == (knobs != no_skip and padding != "masked")
        assert isinstance(sched.layout, MaskedLayout) == (padding == "masked")


def test_frames_inside_counts_the_taps_on_the_clip():
    """The share of (output frame, kernel frame) pairs reading inside the clip, which the
    chooser weighs copied code's entries by: a 3-frame kernel padded by one on T frames skips
    two of its 3T pairs; unpadded or one kernel frame deep it skips none."""
    for frames, share in [(16, 46 / 48), (4, 10 / 12), (2, 4 / 6), (1, 1 / 3)]:
        assert frames_inside(c3d_conv((frames, 7, 7), 8, 8)) == pytest.approx(share)
    assert frames_inside(c3d_conv((4, 7, 7), 8, 8, pads=(0, 1, 1))) == 1
    # Stride 2 over 8 frames: only output frame 0 reads the padding, one of its 3 taps.
    assert frames_inside(c3d_conv((8, 7, 7), 8, 8, stride=(2, 1, 1))) == pytest.approx(11 / 12)
    assert frames_inside(c3d_conv((4, 7, 7), 8, 8, kernel=(1, 3, 3), pads=(0, 1, 1))) == 1


def test_masked_padding_needs_stride_one_and_a_same_size_plane():
    """Forced "masked", a conv whose output plane is not its input's keeps the copied padding;
    the masked tasks are runs of whole blocks over the output, sliced as the row tasks are."""
    masked = '{"input_layout": "planar", "padding": "masked"}'
    strided = c3d_conv((4, 14, 14), 16, 16, stride=(1, 2, 2))
    unpadded = c3d_conv((4, 14, 14), 16, 16, pads=(1, 0, 0))
    for spec in (strided, unpadded):
        assert not MaskedLayout.fits(spec)
        sched = choose_sparse_schedule(AVX2, spec, (8, 4), masked, 0.5)
        assert isinstance(sched.layout, FlatLayout) and sched.describe()["padding"] == "copied"
    spec = c3d_conv((4, 14, 14), 512, 512, pads=(0, 1, 1))
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), masked, 0.5)
    assert isinstance(sched.layout, MaskedLayout) and sched.describe()["padding"] == "masked"
    positions = sched.task_blocks * sched.x_tile
    assert positions >= sched.task_rows * 14  # a task's rows' worth of positions, whole blocks
    tasks = -(-2 * 14 * 14 // positions)  # over the output's 2 frames, across rows and frames
    wanted = -(-MIN_TASKS // tasks)  # slices: the largest divisor of the 64 groups up to it
    assert sched.slices == max(d for d in (1, 2, 4, 8, 16, 32, 64) if d <= wanted)
    with pytest.raises(ValueError, match="padding must be one of"):
        choose_sparse_schedule(AVX2, spec, (8, 4), '{"padding": "zeros"}')


@pytest.mark.parametrize("family", ["x", "arm64-neon"])
def test_a_family_knob_other_than_the_targets_is_refused(family):
    """The family picks the chunk budget and pass cost: an override naming another family (or
    none) is an error, not a KeyError deep in the chooser nor NEON knobs on x86 code."""
    spec = c3d_conv((16, 56, 56), 64, 128)
    with pytest.raises(ValueError, match=rf"family is the target's \(x86-avx2\), not '{family}'"):
        choose_sparse_schedule(AVX2, spec, (8, 4), f'{{"family": "{family}"}}')
    same = choose_sparse_schedule(AVX2, spec, (8, 4), '{"family": "x86-avx2"}')
    assert same == choose_sparse_schedule(AVX2, spec, (8, 4))


def test_the_manifests_schedule_fields_name_the_schedules_own():
    """The manifest's schedule record (``describe``): its task and chunk fields, each checked
    where it differs from the others, were never read back."""
    temporal = choose_sparse_schedule(AVX2, c3d_conv((16, 56, 56), 16, 8, (3, 1, 1), (1, 0, 0)),
                                      (8, 4), "", 0.26)  # fmt: skip
    planar = choose_sparse_schedule(AVX2, c3d_conv((8, 28, 28), 64, 64), (8, 4), PLANAR, 0.26)
    for sched in (temporal, planar):
        fields = {
            "task_rows": sched.task_rows,
            "task_frames": sched.task_frames,
            "task_blocks": sched.task_blocks,
            "chunk_channels": sched.chunk,
            "slices": sched.slices,
        }
        assert {k: sched.describe()[k] for k in fields} == fields
    assert temporal.task_frames > 1 and temporal.task_frames != temporal.task_rows
    assert planar.chunk not in (0, planar.slices)


def test_four_input_channels_take_the_in_place_quads():
    """A quad is four channels: a temporal layer of exactly four takes it in place."""
    spec = c3d_conv((8, 28, 28), 4, 8, (3, 1, 1), (1, 0, 0))
    assert input_layout(choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26)) == "interleaved"


def test_the_masked_layout_needs_its_mask_bits_to_fit():
    """Kernel height + width mask bits, at most 31: 33 gave wrong sums (relative error 0.13)."""

    def plane_kept(kernel: tuple[int, int, int]) -> Conv3dSpec:
        pads = [k - 1 for k in kernel]
        begin = tuple(p // 2 for p in pads)
        end = tuple(p - b for p, b in zip(pads, begin, strict=True))
        return Conv3dSpec("c", 1, 1, (1, 20, 20), kernel, pads_begin=begin, pads_end=end)

    assert MaskedLayout.fits(plane_kept((1, 15, 16)))
    assert not MaskedLayout.fits(plane_kept((1, 16, 17)))


def test_frame_ranges_refuse_entries_that_are_not_depth_major():
    """A run per output frame needs a list's entries ordered by kernel frame."""
    spec = c3d_conv((4, 3, 3), 1, 1)
    taps = np.array([[0, 1, 0, 0], [0, 0, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="not depth-major"):
        frame_ranges(taps, np.array([0, 2]), spec)
