"""Sparse (vanilla / KGS) Conv3d on every target family against torch in float64.

Property tests draw shapes, group shapes (4x4, 8x4 and odd ones), pattern kinds (balanced,
unbalanced with all-pruned / fully kept kernel groups and whole pruned output groups, vanilla,
dense) and weights; the pattern's own tables and generated loops are checked directly. Because
CI draws few cases per family (derandomized; ARM under qemu fewest), named cases run every kind
with 4x4 and 8x4 groups on every family, over the planar/copied kernels and the in-place quads.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import halide as hl
import numpy as np
import pytest
import sparse_harness
import test_conv_dense
from conftest import DEPTH, require_opencl, require_tools
from conv_harness import AVX2_TARGET, AVX512_TARGET, ConvCase, same_plane, temporal_only
from hypothesis import given, settings
from hypothesis import strategies as st
from rt3d_halide.generators.conv3d_sparse import plan_sparse
from rt3d_halide.generators.sparse_choice import choose_sparse_schedule
from rt3d_halide.generators.sparse_knobs import ENTRY_ORDERS
from rt3d_halide.pruning.patterns import kept_units
from sparse_harness import PATTERN_KINDS, SparseCase, check_sparse

GROUPS = st.sampled_from([(4, 4), (8, 4)]) | st.tuples(st.integers(1, 9), st.integers(1, 6))


@st.composite
def sparse_cases(
    draw: st.DrawFn, max_channels: int = 24, max_extent: int = 8, cpu_knobs: bool = True
) -> SparseCase:
    """A conv, group, pattern and sparse knobs that the small shapes would not reach by default:
    for CPU families several reduction chunks, every block width, tile and group slicing, output
    tiles (and none), and each input layout; for OpenCL, work-group shapes and both thread
    orders; on both, entries reading the temporal padding skipped or not."""
    conv = draw(test_conv_dense.conv_cases(max_channels=max_channels, max_extent=max_extent))
    g_m, g_n = draw(GROUPS)
    if g_m > conv.out_channels and g_n > conv.in_channels:
        g_m = conv.out_channels  # larger both ways is refused by the build (test_build_sparse)
    knobs = {}
    if cpu_knobs:
        knobs = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "chunk_bytes": st.sampled_from([0, 64, 500, 2000]),
                    "lanes": st.sampled_from([1, 2, 3, 4, 8]),
                    "x_vectors": st.integers(1, 3),
                    "task_rows": st.integers(1, 3),
                    "task_frames": st.integers(1, 3),  # the in-place quads only
                    "slices": st.integers(1, 3),
                    "output_tile": st.sampled_from([0, 1, 3, 8]),
                    "task_copy_bytes": st.sampled_from([0, 1]),  # on Kd = 1 only
                    "task_copy_min_positions": st.just(0),
                    "padding": st.sampled_from(["auto", "copied", "masked"]),
                    "skip_frame_padding": st.booleans(),
                    "entry_order": st.sampled_from(ENTRY_ORDERS),
                },
            )
        )
        if conv.in_channels >= 4:  # quads over a padded copy, or the planar copy, or "auto"
            layouts = st.sampled_from(["auto", "planar", "interleaved_copy"])
            knobs["input_layout"] = draw(layouts)
    else:
        knobs = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "threads_c": st.sampled_from([1, 2, 8]),
                    "threads_x": st.sampled_from([1, 4, 16]),
                    "x_per_thread": st.integers(1, 5),
                    "x_threads_inner": st.booleans(),
                    "skip_frame_padding": st.booleans(),
                    "entry_order": st.sampled_from(ENTRY_ORDERS),
                },
            )
        )
    return SparseCase(
        conv=conv,
        group=(g_m, g_n),
        kind=draw(st.sampled_from(PATTERN_KINDS)),
        keep=draw(st.sampled_from([1 / 2, 1 / 3, 1 / 6])),
        schedule=json.dumps(knobs) if knobs else "",
    )


@st.composite
def temporal_cases(draw: st.DrawFn, max_channels: int = 24, max_extent: int = 8) -> SparseCase:
    """A drawn sparse case made temporal-only (:func:`conv_harness.temporal_only`), which CPU
    schedules read in place, four input channels at a time (``input_layout`` "interleaved";
    "auto" copies patterns whose quads would be mostly zeros, so with four channels or more the
    draws force it half the time)."""
    case = draw(sparse_cases(max_channels=max_channels, max_extent=max_extent))
    knobs = json.loads(case.schedule or "{}")
    if case.conv.in_channels >= 4:
        knobs["input_layout"] = draw(st.sampled_from(["auto", "interleaved"]))
    return dataclasses.replace(case, conv=temporal_only(case.conv), schedule=json.dumps(knobs))


@pytest.mark.x86
@settings(max_examples=20 * DEPTH)
@given(case=sparse_cases(max_channels=40, max_extent=10))
def test_sparse_x86_matches_torch(case: SparseCase) -> None:
    check_sparse(case, "x86")


@pytest.mark.x86
@settings(max_examples=10 * DEPTH)
@given(case=temporal_cases(max_channels=40, max_extent=10))
def test_sparse_x86_temporal_kernels_match_torch(case: SparseCase) -> None:
    check_sparse(case, "x86")


@pytest.mark.arm
@settings(max_examples=3 * DEPTH)
@given(case=temporal_cases(max_extent=7))
def test_sparse_arm_temporal_kernels_match_torch(case: SparseCase) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(case, "arm")


# Knobs that give every conv of one kernel frame the planar kernel's copy per task, whatever the
# size of its copy and output plane.
COPY_PER_TASK = {"input_layout": "planar", "task_copy_bytes": 1, "task_copy_min_positions": 0}


@st.composite
def banded_cases(draw: st.DrawFn, max_extent: int = 9) -> SparseCase:
    """A drawn sparse case made one kernel frame deep (its strides and temporal padding kept),
    on the planar kernel with its copy made per task (``task_copy_bytes`` 1: every such
    layer), in bands of 1-4 rows that need not divide the output's rows."""
    case = draw(sparse_cases(max_extent=max_extent))
    conv = dataclasses.replace(case.conv, kernel=(1, *case.conv.kernel[1:]))
    knobs = {**json.loads(case.schedule or "{}"), **COPY_PER_TASK}
    knobs["task_rows"] = draw(st.integers(1, 4))
    return dataclasses.replace(case, conv=conv, schedule=json.dumps(knobs))


# Kernels' spatial taps for a masked case drawn without any (nothing to mask).
SPATIAL_TAPS = st.sampled_from([(1, 3), (3, 1), (3, 3), (2, 2)])


@st.composite
def masked_cases(draw: st.DrawFn, max_extent: int = 9) -> SparseCase:
    """A drawn sparse case made stride 1 with a same-size output plane (its spatial padding,
    possibly asymmetric, fitted to the kernel; :func:`conv_harness.same_plane`), on the planar
    kernel with the padding left out of the copy and its reads masked, in tasks of 1-4 rows'
    worth of positions that run across rows and frames."""
    case = draw(sparse_cases(max_extent=max_extent))
    knobs = {**json.loads(case.schedule or "{}"), **MASKED_PADDING}
    knobs["task_rows"] = draw(st.integers(1, 4))
    knobs["slices"] = draw(st.integers(0, 3))  # 0: chosen; one that divides no groups: 1
    conv = case.conv
    if conv.kernel[1:] == (1, 1):  # no spatial tap, no padding, no read to mask: give it taps
        conv = dataclasses.replace(conv, kernel=(conv.kernel[0], *draw(SPATIAL_TAPS)))
    return dataclasses.replace(case, conv=same_plane(conv), schedule=json.dumps(knobs))


MASKED_PADDING = {"input_layout": "planar", "padding": "masked"}


@pytest.mark.x86
@settings(max_examples=8 * DEPTH)
@given(case=masked_cases())
def test_sparse_x86_masked_padding_matches_torch(case: SparseCase) -> None:
    check_sparse(case, "x86")


@pytest.mark.arm
@settings(max_examples=4 * DEPTH)
@given(case=masked_cases(max_extent=6))
def test_sparse_arm_masked_padding_matches_torch(case: SparseCase) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(case, "arm")


@pytest.mark.x86
@settings(max_examples=8 * DEPTH)
@given(case=banded_cases())
def test_sparse_x86_copy_per_task_matches_torch(case: SparseCase) -> None:
    check_sparse(case, "x86")


@pytest.mark.arm
@settings(max_examples=4 * DEPTH)
@given(case=banded_cases(max_extent=7))
def test_sparse_arm_copy_per_task_matches_torch(case: SparseCase) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(case, "arm")


@pytest.mark.opencl
@settings(max_examples=8 * DEPTH)
@given(case=sparse_cases(cpu_knobs=False))
def test_sparse_opencl_matches_torch(case: SparseCase) -> None:
    require_opencl()
    check_sparse(case, "opencl")


@st.composite
def gpu_in_place_cases(draw: st.DrawFn) -> SparseCase:
    """A drawn OpenCL case, mostly made to one spatial tap without spatial padding, its spatial
    stride kept (R(2+1)D's temporal convs and strided 1x1x1 downsamples), which the GPU schedule
    reads in place ("auto"), or through the padded copy ("planar"); otherwise, spatial taps and
    padding and all, forced to read in place."""
    case = draw(sparse_cases(cpu_knobs=False))
    knobs = json.loads(case.schedule or "{}")
    if draw(st.integers(0, 2)):
        knobs["input_layout"] = draw(st.sampled_from(["auto", "auto", "planar"]))
        conv = dataclasses.replace(temporal_only(case.conv), stride=case.conv.stride)
    else:
        knobs["input_layout"] = "in_place"
        conv = case.conv
    return dataclasses.replace(case, conv=conv, schedule=json.dumps(knobs))


@pytest.mark.opencl
@settings(max_examples=6 * DEPTH)
@given(case=gpu_in_place_cases())
def test_sparse_opencl_in_place_matches_torch(case: SparseCase) -> None:
    require_opencl()
    check_sparse(case, "opencl")


@pytest.mark.opencl
@pytest.mark.parametrize("kind", ["unbalanced", "vanilla"])
def test_sparse_opencl_temporal_kernel_through_the_padded_copy(kind: str) -> None:
    """The property test above draws the padded copy for temporal-only kernels one time in
    three, which its few derandomized draws need not reach: a Kx1x1 conv with no spatial
    padding, forced through the copy, its temporal padding and stride kept."""
    require_opencl()
    conv = ConvCase(12, 10, (7, 4, 5), (3, 1, 1), (2, 1, 1), pads_begin=(1, 0, 0), relu=True)
    knobs = json.dumps({"input_layout": "planar"})
    check_sparse(SparseCase(conv, (8, 4), kind, keep=1 / 3, schedule=knobs), "opencl")


@pytest.mark.arm
@settings(max_examples=6 * DEPTH)
@given(case=sparse_cases(max_extent=7))
def test_sparse_arm_matches_torch(case: SparseCase) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(case, "arm")


EVERY_KIND = pytest.mark.parametrize("kind", PATTERN_KINDS)
BOTH_GROUPS = pytest.mark.parametrize("group", [(4, 4), (8, 4)], ids=lambda g: f"{g[0]}x{g[1]}")

# Every pattern kind once per family on a padded, strided, dilated layer whose channel counts
# neither group dimension divides.
NAMED = ConvCase(
    10, 13, (4, 7, 9), (3, 3, 3), (1, 2, 1), (2, 1, 1), (1, 1, 1), (1, 0, 2), relu=True, batch=2
)


@pytest.mark.x86
@EVERY_KIND
@BOTH_GROUPS
def test_sparse_x86_every_kind(kind: str, group: tuple[int, int]) -> None:
    check_sparse(SparseCase(NAMED, group, kind, keep=1 / 3), "x86")


@pytest.mark.x86
@pytest.mark.parametrize("tile", [0, 3])
def test_sparse_x86_output_tiles(tile: int) -> None:
    """The output stage without tiles (a gather per vector) and with tiles that split the
    named layer's rows unevenly; the default (``OUTPUT_TILE``) runs in every other test."""
    knobs = json.dumps({"output_tile": tile, "input_layout": "planar"})
    check_sparse(SparseCase(NAMED, (8, 4), "unbalanced", 1 / 3, knobs), "x86")


# Three groups of 4 filters, each its own slice, over 180 flattened positions: the last
# output tile of the last task is cut short.
SLICED_MASKED = ConvCase(3, 12, (5, 6, 6), (3, 3, 3), pads_begin=(1, 1, 1), pads_end=(1, 1, 1))


@pytest.mark.x86
def test_sparse_x86_masked_slices_with_a_short_last_tile() -> None:
    """Masked padding in slices of the channel groups wrote one position of a short last
    output tile from memory no task had written (found by a fuzzer of the prune-export-build
    path: inf in every channel at one position)."""
    knobs = '{"input_layout": "planar", "padding": "masked", "slices": 3}'
    check_sparse(SparseCase(SLICED_MASKED, (4, 4), "unbalanced", 1 / 2, knobs), "x86")


@pytest.mark.x86
@pytest.mark.parametrize("kind", ["unbalanced", "vanilla"])
def test_sparse_x86_chunks_of_half_group_blocks(kind: str) -> None:
    """Chunks of one channel, each group's filters in two accumulator blocks of 4 lanes, and
    (vanilla) empty (group, chunk) lists, whose passes are skipped: every block must find its
    own group's lists and lanes."""
    knobs = '{"chunk_bytes": 64, "lanes": 4, "input_layout": "planar", "padding": "copied"}'
    check_sparse(SparseCase(NAMED, (8, 4), kind, 1 / 3, knobs), "x86")


@pytest.mark.x86
def test_sparse_x86_masked_slices_of_two_passes_per_group() -> None:
    """One slice of both 8x4 groups of 12 filters (the last padded), each in two accumulator
    blocks of 4 lanes: the accumulator spans every group's passes, and the output tiles the
    last short one (a mutation of either was caught only by a property test's draw)."""
    knobs = '{"input_layout": "planar", "padding": "masked", "slices": 1, "lanes": 4}'
    check_sparse(SparseCase(SLICED_MASKED, (8, 4), "unbalanced", 1 / 2, knobs), "x86")


@pytest.mark.x86
def test_sparse_x86_planar_copy_of_temporal_stride() -> None:
    """The planar copy's frames at temporal stride 2, three output frames (a mutation reading
    frame t for output frame t was caught only by a property test's draw)."""
    strided = dataclasses.replace(NAMED, in_size=(7, 7, 9), stride=(2, 2, 1))
    knobs = '{"input_layout": "planar", "padding": "copied"}'
    check_sparse(SparseCase(strided, (8, 4), "unbalanced", 1 / 3, knobs), "x86")


# Accumulator blocks of 9 lanes for AVX2 and 5 for NEON, whose output tiles made LLVM abort.
ODD_LANES = ConvCase(3, 11, (2, 3, 6), (1, 3, 3), pads_begin=(0, 1, 1), pads_end=(0, 1, 1))


@pytest.mark.x86
def test_sparse_x86_odd_lane_blocks() -> None:
    knobs = '{"lanes": 16, "input_layout": "planar"}'
    check_sparse(SparseCase(ODD_LANES, (9, 1), "unbalanced", 1 / 2, knobs), "x86", AVX2_TARGET)


@pytest.mark.arm
def test_sparse_arm_odd_lane_blocks() -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    knobs = '{"lanes": 8, "input_layout": "planar"}'
    check_sparse(SparseCase(ODD_LANES, (5, 1), "unbalanced", 1 / 2, knobs), "arm")


@pytest.mark.opencl
@EVERY_KIND
@BOTH_GROUPS
def test_sparse_opencl_every_kind(kind: str, group: tuple[int, int]) -> None:
    require_opencl()
    check_sparse(SparseCase(NAMED, group, kind, keep=1 / 3), "opencl")


@pytest.mark.opencl
@pytest.mark.parametrize("kind", ["unbalanced", "vanilla"])
def test_sparse_opencl_channel_groups_inner(kind: str) -> None:
    """The thread order the sparse code had before ``SPARSE_OPENCL`` (neighbouring work-items on
    neighbouring channel groups), still reachable through ``--sparse-schedule``."""
    require_opencl()
    knobs = '{"x_threads_inner": false, "threads_c": 8, "threads_x": 8, "x_per_thread": 4}'
    check_sparse(SparseCase(NAMED, (8, 4), kind, keep=1 / 3, schedule=knobs), "opencl")


@pytest.mark.opencl
def test_sparse_opencl_padded_copy_work_groups() -> None:
    """The padded copy's work-group size is a knob; one that divides nothing still covers the
    copy (its last group guarded)."""
    require_opencl()
    knobs = '{"copy_threads": 48, "input_layout": "planar"}'
    check_sparse(SparseCase(NAMED, (8, 4), "unbalanced", keep=1 / 3, schedule=knobs), "opencl")
    bad = '{"copy_threads": 0}'
    with pytest.raises(ValueError, match=r"copy_threads must be in \[1, 256\], not 0"):
        choose_sparse_schedule(hl.Target("host-opencl"), NAMED.spec(), (8, 4), bad)


# Every weight pruned: the output is the bias through the ReLU (NAMED's biases take both
# signs), with no entry loop to run; the 3x1x1 case is one the quads would read in place, and
# NAMED's short reduction takes the copied quads on NEON (and AVX2: test_build_sparse).
PRUNED_AWAY = [NAMED, ConvCase(12, 10, (5, 4, 5), (3, 1, 1), pads_begin=(1, 0, 0), relu=True)]


@pytest.mark.x86
@pytest.mark.parametrize("conv", PRUNED_AWAY, ids=["3x3x3", "3x1x1"])
def test_sparse_x86_every_weight_pruned(conv: ConvCase) -> None:
    check_sparse(SparseCase(conv, (8, 4), "vanilla", keep=0.0), "x86")


@pytest.mark.opencl
def test_sparse_opencl_every_weight_pruned() -> None:
    require_opencl()
    check_sparse(SparseCase(NAMED, (8, 4), "vanilla", keep=0.0), "opencl")


@pytest.mark.arm
@pytest.mark.parametrize("layout", ["auto", "planar"])
def test_sparse_arm_every_weight_pruned(layout: str) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    knobs = json.dumps({"input_layout": layout})
    check_sparse(SparseCase(NAMED, (8, 4), "vanilla", keep=0.0, schedule=knobs), "arm")


@pytest.mark.arm
@EVERY_KIND
@BOTH_GROUPS
def test_sparse_arm_every_kind(kind: str, group: tuple[int, int]) -> None:
    """The property tests' few ARM draws (qemu is slow) need not reach every kind and group:
    these do, on the padded, strided, dilated layer."""
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(SparseCase(NAMED, group, kind, keep=1 / 3), "arm")


# Read in place with pruned taps, temporal stride and dilation 2 and padding at both ends, so
# every output frame skips a different run of quads; 12 input channels (three quads).
IN_PLACE_STRIDED = ConvCase(
    12, 10, (9, 4, 5), (3, 1, 1), (2, 1, 1), (2, 1, 1), (2, 0, 0), (1, 0, 0), batch=2
)
IN_PLACE = '{"input_layout": "interleaved"}'


@pytest.mark.x86
@EVERY_KIND
@BOTH_GROUPS
def test_sparse_x86_in_place_every_kind(kind: str, group: tuple[int, int]) -> None:
    check_sparse(SparseCase(IN_PLACE_STRIDED, group, kind, 1 / 3, IN_PLACE), "x86")


# Strided in every dimension, an odd width, temporal padding at both ends, a partial last x tile.
GPU_IN_PLACE = ConvCase(
    9, 10, (7, 5, 7), (3, 1, 1), (2, 2, 2), (2, 1, 1), (2, 0, 0), (1, 0, 0), relu=True, batch=2
)


@pytest.mark.opencl
@EVERY_KIND
def test_sparse_opencl_in_place_every_kind(kind: str) -> None:
    require_opencl()
    knobs = '{"input_layout": "in_place", "x_per_thread": 3}'
    check_sparse(SparseCase(GPU_IN_PLACE, (8, 4), kind, 1 / 3, knobs), "opencl")


# Spatial taps read in place: rows and columns differ in dilation, padding and stride, so an
# offset that took one for the other reads the wrong input.
GPU_IN_PLACE_SPATIAL = ConvCase(
    10, 13, (4, 9, 8), (2, 3, 2), (1, 2, 1), (1, 1, 2), (1, 2, 0), (0, 1, 1), relu=True, batch=2
)


@pytest.mark.opencl
@EVERY_KIND
def test_sparse_opencl_in_place_spatial_every_kind(kind: str) -> None:
    """Forced in place: per entry a row and column offset, the padding read as zeros outside
    the input."""
    require_opencl()
    knobs = '{"input_layout": "in_place", "x_per_thread": 3}'
    check_sparse(SparseCase(GPU_IN_PLACE_SPATIAL, (8, 4), kind, 1 / 3, knobs), "opencl")


@pytest.mark.opencl
def test_sparse_opencl_in_place_columns_alone() -> None:
    """A kernel of columns only (1x1x3): its entries' column offsets must count as spatial
    reads even where no row offset does (a check of rows alone read the wrong input, relative
    error 1.17)."""
    require_opencl()
    conv = ConvCase(8, 8, (3, 5, 6), (1, 1, 3), pads_begin=(0, 0, 1), pads_end=(0, 0, 1))
    knobs = '{"input_layout": "in_place"}'
    check_sparse(SparseCase(conv, (8, 4), "unbalanced", 1 / 3, knobs), "opencl")


def test_sparse_x86_temporal_kernel_with_spatial_end_padding() -> None:
    """A Kx1x1 kernel that pads its rows and columns at the end only (explicit ONNX pads) is no
    temporal-only layer: the in-place quads read past the input's last row."""
    conv = ConvCase(8, 8, (4, 5, 5), (3, 1, 1), pads_begin=(1, 0, 0), pads_end=(1, 1, 1))
    check_sparse(SparseCase(conv, (4, 4), "dense"), "x86")


@pytest.mark.arm
@pytest.mark.parametrize("kind", ["unbalanced", "vanilla"])
def test_sparse_arm_in_place_strided(kind: str) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(SparseCase(IN_PLACE_STRIDED, (8, 4), kind, 1 / 3, IN_PLACE), "arm")


# Read in place, 3 frames per task over 7 output frames: the last task's frame range is cut
# short, and the first and last frames skip the quads that would read the temporal padding.
# Blocks of 3 positions cross the 5-wide rows, and the 20-position plane's last block shifts
# inwards. The fused ReLU: no other fixed in-place case has it.
IN_PLACE_FRAMES = SparseCase(
    ConvCase(
        12, 10, (7, 4, 5), (3, 1, 1), pads_begin=(1, 0, 0), pads_end=(1, 0, 0), relu=True, batch=2
    ),
    (8, 4),
    "unbalanced",
    1 / 3,
    '{"input_layout": "interleaved", "task_frames": 3}',
)


# A copy per task (one kernel frame) on a temporally strided and padded, dilated layer: 7 output
# rows in bands of 3 (the last guarded), two slices (each copies its band), a 3-vector x tile
# wider than the 9-wide row, output tiles of 3, chunks of a few channels; and the same with a
# spatial stride of 2.
BANDED = ConvCase(
    10, 13, (5, 7, 9), (1, 3, 3), (2, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), relu=True, batch=2
)
BANDED_STRIDED = dataclasses.replace(BANDED, in_size=(5, 13, 17), stride=(2, 2, 2))
BANDED_KNOBS = json.dumps(
    {
        **COPY_PER_TASK,
        "task_rows": 3,
        "slices": 2,
        "x_vectors": 3,
        "output_tile": 3,
        "chunk_bytes": 64,
    }
)


@pytest.mark.x86
@EVERY_KIND
@pytest.mark.parametrize("conv", [BANDED, BANDED_STRIDED], ids=["stride1", "stride2"])
def test_sparse_x86_copy_per_task_every_kind(kind: str, conv: ConvCase) -> None:
    check_sparse(SparseCase(conv, (8, 4), kind, 1 / 3, BANDED_KNOBS), "x86")


@pytest.mark.arm
@pytest.mark.parametrize("conv", [BANDED, BANDED_STRIDED], ids=["stride1", "stride2"])
def test_sparse_arm_copy_per_task(conv: ConvCase) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(SparseCase(conv, (8, 4), "unbalanced", 1 / 3, BANDED_KNOBS), "arm")


# The padding left out of the copy and its reads masked: asymmetric padding (2 columns before
# the row, none after; a dilated kernel's 4 rows split 1 and 3), temporal padding on zero
# frames, 13 filters in groups of 8; tasks of one block (16 positions on AVX-512) or of 2-3
# blocks run across the 7-wide rows and the 42-position frames, the last one cut short, in two
# slices; output tiles of 3 positions, the last of each task cut short, and the gather; chunks
# of a few channels.
MASKED = ConvCase(
    10, 13, (5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 2, 1), (1, 1, 2), (2, 3, 0), relu=True, batch=2
)
MASKED_KNOBS = [
    json.dumps({**MASKED_PADDING, "task_rows": 1, "x_vectors": 1, "slices": 2, "chunk_bytes": 64}),
    json.dumps({**MASKED_PADDING, "task_rows": 1, "x_vectors": 1, "output_tile": 3}),
    json.dumps({**MASKED_PADDING, "x_vectors": 2, "output_tile": 0, "lanes": 4}),
]


# The same with the row's padding after it (2 columns, none before): reads past the row's end
# are the ones masked.
MASKED_AFTER = dataclasses.replace(MASKED, pads_begin=(1, 1, 0), pads_end=(2, 3, 2))


@pytest.mark.x86
@EVERY_KIND
@pytest.mark.parametrize("knobs", MASKED_KNOBS, ids=["slices", "tile3", "gather"])
def test_sparse_x86_masked_padding_every_kind(kind: str, knobs: str) -> None:
    check_sparse(SparseCase(MASKED, (8, 4), kind, 1 / 3, knobs), "x86")


@pytest.mark.x86
@EVERY_KIND
def test_sparse_x86_masked_padding_after_the_row(kind: str) -> None:
    check_sparse(SparseCase(MASKED_AFTER, (8, 4), kind, 1 / 3, MASKED_KNOBS[1]), "x86")


# A kernel one column wide whose rows are padded: masked reads are needed although no column
# is padded.
COLUMN_KERNEL = ConvCase(5, 9, (3, 6, 5), (1, 3, 1), pads_begin=(0, 1, 0), pads_end=(0, 1, 0))


@pytest.mark.x86
def test_sparse_x86_masked_padding_of_a_column_kernel() -> None:
    check_sparse(SparseCase(COLUMN_KERNEL, (8, 4), "unbalanced", 1 / 2, MASKED_KNOBS[1]), "x86")


@pytest.mark.arm
@pytest.mark.parametrize("conv", [MASKED, MASKED_AFTER], ids=["before-the-row", "after-the-row"])
def test_sparse_arm_masked_padding(conv: ConvCase) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(SparseCase(conv, (8, 4), "unbalanced", 1 / 3, MASKED_KNOBS[0]), "arm")


@pytest.mark.x86
def test_sparse_x86_in_place_frame_ranges() -> None:
    check_sparse(IN_PLACE_FRAMES, "x86")


@pytest.mark.arm
def test_sparse_arm_in_place_frame_ranges() -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_sparse(IN_PLACE_FRAMES, "arm")


@pytest.mark.x86
def test_in_place_read_keeps_its_promises_when_checked() -> None:
    """A block's column may pass its row's end on purpose (one address per block); a target
    that checks ``unsafe_promise_clamped`` gets each position's own column and row instead."""
    check_sparse(IN_PLACE_FRAMES, "x86", "host-check_unsafe_promises")


@pytest.mark.arm
def test_sparse_arm_tile_wider_than_the_row() -> None:
    """A 12-wide x tile over a 1-wide output reads a padded-copy row past the last whole one
    (found by the deep profile: the copy's bound was not a whole number of rows)."""
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    conv = ConvCase(2, 1, (3, 3, 5), dilation=(1, 1, 2), bias=False)
    knobs = '{"chunk_bytes": 0, "task_rows": 1, "x_vectors": 3}'
    check_sparse(SparseCase(conv, (1, 4), "balanced", 0.5, knobs), "arm")


@pytest.mark.arm
def test_sparse_arm_copied_rows_of_three_columns_at_x_stride_3() -> None:
    """A 3-column row of an x stride of 3 (every third float, 3 lanes) stopped Halide 21's ARM
    code generator (found by a fuzzer of the ARM and OpenCL kernels)."""
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    conv = ConvCase(2, 1, (1, 1, 7), (1, 1, 1), stride=(1, 1, 3), pads_begin=(0, 0, 1), bias=False)
    check_sparse(SparseCase(conv, (1, 1), "dense"), "arm")


@settings(max_examples=40)
@given(
    case=sparse_cases(max_channels=20, max_extent=4),
    chunk=st.integers(0, 24),
    order=st.sampled_from(ENTRY_ORDERS),
)
def test_plan_holds_exactly_the_kept_entries(case: SparseCase, chunk: int, order: str) -> None:
    """No pruned entry is baked (nothing zero is loaded), no kept one is lost, each chunk's
    list holds only its own input channels, and a list runs kernel frame by kernel frame, each
    frame's entries in ``order``."""
    _, weight, _ = sparse_harness.random_case_data(case.conv)
    weight = sparse_harness.masked_weight(case, weight)
    plan = plan_sparse(weight, case.group, chunk, order)
    key = {"channel": [1, 0, 2, 3], "location": [1, 2, 3, 0]}[order]  # of (ci, kd, kh, kw)
    for lo, hi in itertools.pairwise(plan.starts):
        keys = plan.taps[lo:hi][:, key].tolist()
        assert keys == sorted(keys)
    g_m, g_n = case.group
    n = case.conv.in_channels
    width = min(chunk or n, n)
    assert plan.chunks == -(-n // width)
    units = kept_units(weight, case.group)
    channels = np.minimum(g_n, n - g_n * np.arange(units.shape[1]))
    per_group = (units.sum(axis=(2, 3, 4)) * channels).sum(axis=1)
    assert plan.lengths.reshape(-1, plan.chunks).sum(axis=1).tolist() == per_group.tolist()
    assert plan.weights.shape == (plan.entries, g_m)
    # Every baked weight column holds a non-zero (the weights are drawn non-zero where kept).
    assert np.all(np.abs(plan.weights).sum(axis=1) > 0)
    # Rebuilding the dense weight from the tables gives the masked weight back.
    rebuilt = np.zeros((units.shape[0] * g_m, *weight.shape[1:]), dtype=np.float32)
    for p in range(units.shape[0]):
        for k in range(plan.chunks):
            index = p * plan.chunks + k
            for e in range(plan.starts[index], plan.starts[index + 1]):
                ci, kd, kh, kw = plan.taps[e]
                assert k * width <= ci < (k + 1) * width
                rebuilt[p * g_m : (p + 1) * g_m, ci, kd, kh, kw] = plan.weights[e]
    np.testing.assert_array_equal(rebuilt[: weight.shape[0]], weight)
    # Each (group, chunk) list's length, counted from the units: balanced iff all are equal.
    per_list = np.zeros((units.shape[0], plan.chunks), dtype=np.int64)
    for ci in range(n):
        per_list[:, ci // width] += units[:, ci // g_n].sum(axis=(1, 2, 3))
    assert plan.lengths.tolist() == per_list.ravel().tolist()
    assert plan.balanced == bool(np.all(per_list == per_list.flat[0]))


def _lowered(
    case: SparseCase, tmp_path: Path, schedule: str = "", target: str = AVX2_TARGET
) -> str:
    """The generator's lowered statement, by default for AVX2 (the statement tests read the AVX2
    schedule's loops, 3 x 4 blocks and the like, whatever this host has), through its standard
    command line."""
    _, weight, _ = sparse_harness.random_case_data(case.conv)
    np.savez(tmp_path / "w.npz", weight=sparse_harness.masked_weight(case, weight))
    cmd = [
        sys.executable,
        "-m",
        "rt3d_halide.generators",
        "-g",
        "rt3d_conv3d_sparse",
        "-o",
        str(tmp_path),
        "-f",
        "layer",
        "-e",
        "stmt",
        f"target={target}",
        f"spec={case.conv.spec('layer').to_json()}",
        f"weights={tmp_path / 'w.npz'}",
        f"group={case.group[0]},{case.group[1]}",
    ]
    if schedule:
        cmd.append(f"schedule={schedule}")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return (tmp_path / "layer.stmt").read_text()


REDUCTION_LOOP = re.compile(r"for \(layer_partial\.s1\.layer_r\$x, 0, (\w+)\)")
QUAD_LOOP = re.compile(r"for \(layer_dot\.s1\.layer_r\$x, 0, (\w+)\)")


# Per input layout: its schedule override, its reduction loop, the Func that loop produces, and
# the balanced trip count of ConvCase(16, 32, (3, 6, 6)) at a third kept: 4 channel blocks x 27
# locations / 3 = 36 kept 8x4 units, each 4 entries (planar) or one quad.
COPIES = {
    "planar": ('{"input_layout": "planar"}', REDUCTION_LOOP, "layer_partial", 36 * 4),
    "quads": ('{"input_layout": "interleaved_copy"}', QUAD_LOOP, "layer_dot", 36),
}


@pytest.mark.parametrize("copy", COPIES)
def test_unbalanced_groups_run_their_own_length(copy: str, tmp_path: Path) -> None:
    """The ``r < length(p)`` predicate becomes the loop bound: no group runs the longest list."""
    schedule, loop, produced, _ = COPIES[copy]
    case = SparseCase(ConvCase(16, 32, (3, 6, 6)), (8, 4), "unbalanced")
    stmt = _lowered(case, tmp_path, schedule)
    bounds = loop.findall(stmt)
    assert bounds, "no reduction loop found"
    assert all(not b.isdigit() for b in bounds), f"constant (padded) trip counts: {bounds}"
    assert "layer_starts[" in stmt
    assert "select(" not in stmt.split(f"produce {produced}", 1)[1].split("consume", 1)[0]


@pytest.mark.parametrize("copy", COPIES)
def test_balanced_groups_take_the_straight_loop(copy: str, tmp_path: Path) -> None:
    schedule, loop, _, trips = COPIES[copy]
    case = SparseCase(ConvCase(16, 32, (3, 6, 6)), (8, 4), "balanced", keep=1 / 3)
    stmt = _lowered(case, tmp_path, schedule)
    bounds = loop.findall(stmt)
    assert bounds and all(b == str(trips) for b in bounds), bounds
    assert "layer_starts" not in stmt


# A 3x3x3 conv padded by one frame at each end of 4: its first and last output frames read 2 of
# the 3 kernel frames.
FRAME_PADDED_CONV = ConvCase(16, 32, (4, 6, 6), pads_begin=(1, 1, 1), pads_end=(1, 1, 1))


@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("skip", [True, False])
def test_copies_skip_the_temporal_padding(copy: str, skip: bool, tmp_path: Path) -> None:
    """Over either copy, each output frame runs only its entries that read inside the clip (a
    bound from the frame-range table, even for balanced lists), unless ``skip_frame_padding``
    is off: then balanced lists take the straight loop over the padding's zero frames."""
    schedule, loop, _, _ = COPIES[copy]
    knobs = {**json.loads(schedule), "skip_frame_padding": skip}
    case = SparseCase(FRAME_PADDED_CONV, (8, 4), "balanced", keep=1 / 3)
    stmt = _lowered(case, tmp_path, json.dumps(knobs))
    bounds = loop.findall(stmt)
    assert bounds and all(b.isdigit() != skip for b in bounds), bounds
    assert ("layer_frame_ranges[" in stmt) == skip


# A 3x1x1 conv (R(2+1)D's temporal kind), which the CPU schedule reads in place.
TEMPORAL_CONV = ConvCase(
    16, 32, (4, 6, 8), kernel=(3, 1, 1), pads_begin=(1, 0, 0), pads_end=(1, 0, 0)
)


def test_temporal_kernels_read_in_place_and_skip_the_padding(tmp_path: Path) -> None:
    """A 3x1x1 conv: no padded copy, and each output frame runs only its quads that read
    inside the clip (a bound from the frame-range table), with no per-quad select. Each quad
    loads four input channels once per position, repeated into both halves of the vector; a
    block's positions lie a constant distance apart (no division in the loop), though blocks
    run over the flattened plane."""
    stmt = _lowered(SparseCase(TEMPORAL_CONV, (8, 4), "balanced", keep=2 / 3), tmp_path)
    bounds = QUAD_LOOP.findall(stmt)
    assert bounds and all(not b.isdigit() for b in bounds), bounds
    assert "layer_frame_ranges[" in stmt
    assert "layer_flat" not in stmt and "layer_padded" not in stmt  # neither copy
    loop = stmt.split("produce layer_dot", 1)[1].split("consume", 1)[0]
    assert "select(" not in loop
    reads = loop.count(", 1, 4)], 0, 1, 2, 3, 0, 1, 2, 3)")  # 4 floats, repeated
    assert reads == loop.count("layer_wquads[") == 12  # 3 positions x 4 accumulators
    quad_loop = loop.split("for (layer_dot.s1.layer_r$x", 1)[1]
    assert "/" not in quad_loop and "%" not in quad_loop


def test_quad_blocks_run_every_group(tmp_path: Path) -> None:
    """The in-place kernel runs every group over one block of positions before the next block:
    the block's inputs stay in L1 while the groups' weights stream past. Blocks run over the
    flattened plane: a task of one 8-wide row's worth of positions is 3 blocks of 3."""
    stmt = _lowered(SparseCase(TEMPORAL_CONV, (8, 4), "balanced", keep=1 / 3), tmp_path)
    blocks = "for (output.s1.layer_plane$y.bi, 0, 3)"
    assert stmt.index(blocks) < stmt.index("for (output.s1.c.go,")


def test_in_place_tasks_run_consecutive_frames(tmp_path: Path) -> None:
    """Read in place, consecutive parallel tasks are the output frames of one range of plane
    positions (the frame is the task index modulo the 4 frames, the first block its quotient
    times 3 blocks), so each finds two of its three input frames of those positions in cache;
    with 2 frames per task, the task's frames run one after the other."""
    case = SparseCase(TEMPORAL_CONV, (8, 4), "balanced", keep=1 / 3)
    stmt = _lowered(case, tmp_path)  # 24 one-frame tasks: too few to take two frames each
    assert "output.s1.t.to.task % 4" in stmt and "for (output.s1.t.ti," not in stmt
    assert "(output.s1.t.to.task/4)*3" in stmt
    stmt = _lowered(case, tmp_path, '{"task_frames": 2}')
    assert "output.s1.t.to.task % 2" in stmt and "for (output.s1.t.ti, 0, 2)" in stmt


def test_copied_quads_run_each_group_over_the_task(tmp_path: Path) -> None:
    """Over the padded copy (a 3x3x3 conv), each group's quads run over every block of the
    task's rows before the next group: the group's weights stay in L1."""
    case = SparseCase(ConvCase(16, 32, (3, 6, 14)), (8, 4), "balanced", keep=1 / 3)
    stmt = _lowered(case, tmp_path, '{"input_layout": "interleaved_copy"}')
    assert "produce layer_padded" in stmt and "layer_flat" not in stmt
    assert stmt.index("for (output.s0.c.go,") < stmt.index("for (output.s0.x.xo,")


PLANAR = '{"input_layout": "planar"}'


def _copy_loops(stmt: str) -> str:
    """The planar copy's parallel loop body in a lowered statement."""
    return stmt.split("internal func layer_par_for_layer_flat", 1)[1].split("internal func", 1)[0]


def test_planar_copy_writes_whole_rows_without_division(tmp_path: Path) -> None:
    """The planar copy writes each channel's padded row as one vector (15 columns here: 14 and
    a shared padding column, past AVX2's 8 lanes), so no lane divides its flat index to find
    its channel; rows wider than ``COPY_ROW_VECTOR_MAX`` keep the ISA's vectors."""
    conv = ConvCase(16, 32, (3, 6, 14), pads_begin=(1, 1, 1), pads_end=(1, 1, 1))
    stmt = _lowered(SparseCase(conv, (8, 4), "balanced", keep=1 / 3), tmp_path, PLANAR)
    copy = _copy_loops(stmt)
    assert re.search(r"layer_flat\[ramp\(.*, 1, 15\)", copy), copy
    assert not re.search(r"[/%]x\d+\(", copy), copy
    # Rows past COPY_ROW_VECTOR_MAX columns (LLVM's compile time) keep AVX2-wide vectors.
    wide = ConvCase(4, 8, (1, 2, 140), kernel=(1, 3, 3), pads_begin=(0, 1, 1), pads_end=(0, 1, 1))
    stmt = _lowered(SparseCase(wide, (8, 4), "balanced", keep=1 / 3), tmp_path, PLANAR)
    copy = _copy_loops(stmt)
    assert re.search(r"layer_flat\[ramp\(.*, 1, 8\)", copy) and ", 1, 141)" not in copy


def test_copy_per_task_is_made_in_the_task(tmp_path: Path) -> None:
    """With ``task_copy_bytes`` a 1x3x3 conv's task copies one frame of its band's rows
    (2 rows, 2 halo rows and one more for the last block's overrun, 8 channels) inside the
    task, with no copy of the whole input before the tasks and no division per lane."""
    conv = ConvCase(8, 16, (3, 6, 14), kernel=(1, 3, 3), pads_begin=(0, 1, 1), pads_end=(0, 1, 1))
    knobs = json.dumps({**COPY_PER_TASK, "task_rows": 2, "x_vectors": 1})
    stmt = _lowered(SparseCase(conv, (8, 4), "balanced", keep=1 / 3), tmp_path, knobs)
    assert "internal func layer_par_for_layer_flat" not in stmt
    task = stmt.split("internal func layer_par_for_output_s0_y_yo_task", 1)[1]
    assert "produce layer_flat" in task.split("produce layer_accum", 1)[0]
    copy = task.split("produce layer_flat", 1)[1].split("consume layer_flat", 1)[0]
    assert re.search(r"allocate layer_flat\[float32 \* 600\b", task), task[:400]
    assert re.search(r"layer_flat\[ramp\(.*, 1, 15\)", copy), copy
    assert not re.search(r"[/%]x\d+\(", copy), copy


def test_masked_reads_are_whole_vectors_of_positions(tmp_path: Path) -> None:
    """With the padding masked, each input vector is one load of 16 consecutive positions,
    zeroed by the position's baked mask bits, even on 4x4 planes: arithmetic masks (``o % 4``)
    let Halide turn those loads into gathers of 4-float pieces."""
    conv = ConvCase(16, 16, (4, 4, 4), pads_begin=(1, 1, 1), pads_end=(1, 1, 1))
    knobs = json.dumps({**MASKED_PADDING, "x_vectors": 2})
    case = SparseCase(conv, (8, 4), "balanced", keep=1 / 3)
    stmt = _lowered(case, tmp_path, knobs, AVX512_TARGET)
    entry_loop = stmt.split("for (layer_partial.s1.layer_r$x", 1)[1].split("consume", 1)[0]
    reads = re.findall(
        r"layer_outside_bits\[ramp\([^\n]*? == x16\(0\), "
        r"layer_flat\[ramp\([^\n]*?, 1, 16\)\], x16\(0\.0+f\)\)",
        entry_loop,
    )
    assert len(reads) == 2 * 8, entry_loop[:800]  # 2 vectors x 8 channels of the block
    assert not re.search(r"[/%] x16\(", entry_loop), entry_loop[:800]
    # A kernel with no spatial taps reads no padding: no mask at all.
    temporal = ConvCase(16, 16, (4, 4, 4), (3, 1, 1), pads_begin=(1, 0, 0), pads_end=(1, 0, 0))
    stmt = _lowered(dataclasses.replace(case, conv=temporal), tmp_path, knobs, AVX512_TARGET)
    assert "layer_flat[ramp(" in stmt and "outside_bits" not in stmt


def test_empty_chunk_lists_skip_their_pass(tmp_path: Path) -> None:
    """Vanilla groups keep whole channel blocks, so with one block per chunk most (group, chunk)
    lists are empty: those skip their pass over the accumulator (a baked table guards the
    group's pass), and the output still matches. Balanced patterns have no empty list."""
    knobs = '{"chunk_bytes": 64, "task_rows": 1, "input_layout": "planar"}'
    conv = ConvCase(16, 32, (3, 6, 6), pads_begin=(1, 1, 1), pads_end=(1, 1, 1))
    vanilla = SparseCase(conv, (8, 4), "vanilla", keep=1 / 3, schedule=knobs)
    stmt = _lowered(vanilla, tmp_path, knobs)
    guard = re.search(r"if \(layer_nonempty\[.*\] != \(uint8\)0\)", stmt)
    assert guard and guard.start() < stmt.index("produce layer_partial")  # the whole pass
    balanced = dataclasses.replace(vanilla, kind="balanced")
    assert "layer_nonempty" not in _lowered(balanced, tmp_path, knobs)
    check_sparse(vanilla, "x86")


def test_chunk_loop_order(tmp_path: Path) -> None:
    """Per chunk, the planar kernel runs each group over every block of the task (the chunk's
    input rows stay in L1)."""
    knobs = {"task_rows": 2, "x_vectors": 1, "slices": 1, "input_layout": "planar"}
    schedule = json.dumps(knobs)
    case = SparseCase(ConvCase(16, 32, (3, 6, 6)), (8, 4), "balanced", keep=1 / 3)
    stmt = _lowered(case, tmp_path, schedule)
    assert stmt.index("for (layer_accum.s1.block.gco,") < stmt.index("for (layer_accum.s1.o.oo,")


def test_slices_are_tasks_of_their_own(tmp_path: Path) -> None:
    """Slices of a task's channel groups run in the one parallel loop beside the row tasks,
    each writing its channels of the output, not as a parallel loop nested in every task."""
    schedule = json.dumps({"task_rows": 6, "slices": 2, "input_layout": "planar"})
    stmt = _lowered(SparseCase(ConvCase(16, 32, (3, 6, 6)), (8, 4), "balanced"), tmp_path, schedule)
    loops = sorted(re.findall(r"internal func layer_par_for_(\w+) \(", stmt))
    assert len(loops) == 2 and loops[0].startswith("layer_flat"), loops  # the input copy
    assert loops[1].startswith("output_s0_"), loops


def test_sparse_harness_catches_one_wrong_element(monkeypatch: pytest.MonkeyPatch) -> None:
    moved = test_conv_dense.one_element_off(sparse_harness.reference)
    monkeypatch.setattr(sparse_harness, "reference", moved)
    with pytest.raises(AssertionError, match="element"):
        check_sparse(SparseCase(ConvCase(4, 8, (3, 5, 5)), (4, 4), "dense"), "x86")


def test_unbalanced_patterns_hold_every_corner_case() -> None:
    """A fully kept kernel group, an all-pruned one and (p > 1) a whole pruned output group, at
    distinct places whatever the grid (they once overwrote one another)."""
    grids = [(8, 4, 0), (16, 4, 1), (24, 4, 2), (8, 12, 3), (24, 12, 4)]
    for out_channels, in_channels, seed in grids:
        for s in range(seed, seed + 5):
            conv = ConvCase(in_channels, out_channels, (3, 4, 4), seed=s)
            case = SparseCase(conv, (8, 4), "unbalanced")
            units = sparse_harness.random_units(case).reshape(*case.counts(), -1)
            p, q = case.counts()
            assert units.all(axis=2).any(), case
            if p * q > 1:
                assert (~units.any(axis=2)).any(), case
            if p > 1:
                pruned = [r for r in range(p) if not units[r].any()]
                assert pruned, case
                assert any(units[r].all(axis=1).any() for r in range(p) if r not in pruned), case


def test_sparse_harness_catches_a_wrong_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison must be able to fail: a reference off by 0.1 % is caught."""
    original = sparse_harness.reference
    monkeypatch.setattr(sparse_harness, "reference", lambda *a: original(*a) * 1.001)
    with pytest.raises(AssertionError, match=r"^\w+: relative error"):
        check_sparse(SparseCase(ConvCase(4, 8, (3, 5, 5)), (4, 4), "unbalanced"), "x86")
