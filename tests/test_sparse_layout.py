"""The sparse CPU kernel's input layouts and schedule choice, without compiling.

The planar code reads its padded copy at ``base(position(x, y), t * stride) + offset(entry)``;
these checks tie that arithmetic to the padded input position the convolution means. Temporal-only
kernels read the input in place and skip, per output frame, the entries that would read the
temporal padding: checked against the frames those entries mean.
"""

from __future__ import annotations

import itertools

import halide as hl
import numpy as np
import pytest
import test_conv_dense
from conv_harness import temporal_only
from hypothesis import given, settings
from hypothesis import strategies as st
from rt3d_halide.generators.conv3d_sparse import (
    entry_offsets,
    frame_offsets,
    frame_ranges,
    plan_sparse,
)
from rt3d_halide.generators.layout import FlatLayout
from rt3d_halide.generators.sparse_schedules import MIN_TASKS, choose_sparse_schedule
from rt3d_halide.generators.spec import Conv3dSpec


@settings(max_examples=40, deadline=None)
@given(conv=test_conv_dense.conv_cases(max_channels=6, max_extent=7))
def test_plane_position_plus_offset_is_the_padded_input_read(conv):
    check_reads(conv.spec(), FlatLayout.of(conv.spec()))


@settings(max_examples=40, deadline=None)
@given(
    conv=test_conv_dense.conv_cases(max_channels=6, max_extent=7),
    kept=st.sampled_from([1.0, 0.5, 0.2]),
    chunk=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_interleaved_frame_ranges_skip_exactly_the_padding(conv, kept, chunk, seed):
    """Per (group, chunk) list and output frame, the run of entries the in-place read takes is
    every kept entry whose frame lies inside the clip, and no other."""
    spec = temporal_only(conv).spec()
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(spec.weight_shape).astype(np.float32)
    weight *= rng.random((*spec.weight_shape[:3], 1, 1)) < kept
    plan = plan_sparse(weight, (1, 1), chunk)
    ranges = frame_ranges(plan, spec)
    frames = spec.in_size[0]
    assert ranges.shape == (len(plan.starts) - 1, spec.out_size[0], 2)
    # The table the generated code adds to t * stride: the frame each entry means.
    assert np.array_equal(
        frame_offsets(plan, spec), plan.taps[:, 1] * spec.dilation[0] - spec.pads_begin[0]
    )
    for i, (lo, hi) in enumerate(itertools.pairwise(plan.starts)):
        depth = plan.taps[lo:hi, 1]
        for t in range(spec.out_size[0]):
            read = t * spec.stride[0] + depth * spec.dilation[0] - spec.pads_begin[0]
            inside = set((lo + np.nonzero((read >= 0) & (read < frames))[0]).tolist())
            first, count = (int(v) for v in ranges[i, t])
            assert set(range(first, first + count)) == inside


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
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26)
    out_t, out_h, _ = spec.out_size
    tasks = -(-out_h // sched.task_rows) * out_t
    assert tasks * sched.slices >= min(MIN_TASKS, out_h * out_t)
    assert sched.slices == 1 or tasks * (sched.slices - 1) < MIN_TASKS  # no needless slices
    assert sched.lanes * sched.x_vectors + sched.x_vectors + 1 <= 16  # ymm registers
    assert 0 < sched.chunk < cin and sched.chunk % 4 == 0


def test_deep_layers_take_whole_frames_in_slices():
    """C3D conv4b: 7.4 MB of weights stream once per task, so tasks cover whole frames and
    parallel work comes from slicing the channel groups."""
    spec = c3d_conv((4, 14, 14), 512, 512)
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26)
    assert (sched.task_rows, sched.slices) == (14, 2)
    cached = choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.01)
    assert cached.task_rows < 14  # 0.08 MB of weights: no streaming to pay for


def test_task_rows_override_is_taken_capped_at_the_height():
    spec = Conv3dSpec(name="c", in_channels=8, out_channels=8, in_size=(2, 5, 5), kernel=(1, 3, 3))
    assert choose_sparse_schedule(AVX2, spec, (8, 4), '{"task_rows": 2}').task_rows == 2
    assert choose_sparse_schedule(AVX2, spec, (8, 4), '{"task_rows": 9}').task_rows == 3


def temporal_conv(kernel: tuple[int, int, int] = (3, 1, 1), **fields) -> Conv3dSpec:
    """R(2+1)D's 3x1x1 conv of layer2: 288 -> 128 channels over 8x28x28."""
    pads = (kernel[0] // 2, 0, 0)
    args = dict(
        name="t", in_channels=288, out_channels=128, in_size=(8, 28, 28), kernel=kernel,
        pads_begin=pads, pads_end=pads,
    )  # fmt: skip
    return Conv3dSpec(**{**args, **fields})


def test_interleaved_input_has_no_flat_copy():
    layout = FlatLayout.interleaved_of(temporal_conv(in_channels=5, in_size=(3, 4, 6)))
    assert (layout.columns, layout.rows, layout.frames) == (6, 4, 3)  # the input, no padding
    for flat_index in (lambda: layout.index(0, 0, 0, 0), lambda: layout.decompose(0)):
        with pytest.raises(ValueError, match="read in place"):
            flat_index()


@pytest.mark.parametrize("kernel", [(3, 1, 1), (1, 1, 1)])
def test_temporal_kernels_take_the_interleaved_input(kernel):
    spec = temporal_conv(kernel)
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26)
    assert sched.layout.interleaved and sched.describe()["input_layout"] == "interleaved"
    assert sched.lanes == 8  # channels as the ymm lanes
    assert sched.x_vectors + 2 <= 16  # accumulators, a weight vector, a broadcast
    forced = choose_sparse_schedule(AVX2, spec, (8, 4), '{"input_layout": "planar"}')
    assert not forced.layout.interleaved


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
    assert not choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26).layout.interleaved
    with pytest.raises(ValueError, match="interleaved input needs a 1x1 spatial kernel"):
        choose_sparse_schedule(AVX2, spec, (8, 4), '{"input_layout": "interleaved"}')


@pytest.mark.parametrize(
    ("width", "overrides", "positions"),
    [
        (28, "", 14),  # R(2+1)D layer2: two blocks per row
        (7, "", 7),
        (28, '{"x_vectors": 5}', 4),  # the knob caps the block; the block divides the row
        (17, '{"input_layout": "interleaved"}', 1),  # forced: correct, if slow
    ],
)
def test_interleaved_blocks_divide_the_row(width, overrides, positions):
    spec = temporal_conv(in_size=(8, width, width))
    sched = choose_sparse_schedule(AVX2, spec, (8, 4), overrides, 0.26)
    assert sched.layout.interleaved and sched.x_tile == positions


@pytest.mark.parametrize("width", [17, 3])
def test_rows_without_a_block_width_take_the_planar_copy(width):
    """A row whose divisors up to the register budget are all below four positions would leave
    the FMA latency bare: "auto" copies instead."""
    spec = temporal_conv(in_size=(8, width, width))
    assert not choose_sparse_schedule(AVX2, spec, (8, 4), "", 0.26).layout.interleaved


def test_slices_divide_the_groups():
    """A slice is a task of whole groups, all slices alike: the knob is rounded down to a
    divisor of the group count."""
    spec = c3d_conv((2, 7, 7), 16, 32)  # 4 groups of 8
    assert choose_sparse_schedule(AVX2, spec, (8, 4), '{"slices": 3}').slices == 2
    assert choose_sparse_schedule(AVX2, spec, (8, 4), '{"slices": 9}').slices == 4
