"""The schedule resolver: knobs per target family fitted to a layer's baked shape."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import halide as hl
import numpy as np
import pytest
from rt3d_halide.generators.schedules import (
    ARM64_NEON,
    OPENCL,
    X86_AVX2,
    X86_AVX512,
    blocks_share_task,
    choose_schedule,
    target_family_knobs,
)
from rt3d_halide.generators.sparse_choice import choose_sparse_schedule
from rt3d_halide.generators.spec import Conv3dSpec

from rt3d_halide.targets import parse_target


def spec(cin: int, cout: int, width: int, kernel=(3, 3, 3)) -> Conv3dSpec:
    return Conv3dSpec(
        "layer", cin, cout, (4, 8, width), kernel, pads_begin=(1, 1, 1), pads_end=(1, 1, 1)
    )


@pytest.mark.parametrize(
    "target, knobs",
    [
        ("x86-64-linux-avx-avx2-fma", X86_AVX2),
        ("x86-64-linux-avx512_skylake", X86_AVX512),
        ("x86-64-linux-avx512_sapphirerapids", X86_AVX512),  # names only its own flavour
        ("x86-64-linux-avx512_zen5", X86_AVX512),
        ("x86-64-linux-avx512_cannonlake", X86_AVX512),
        ("arm-64-android", ARM64_NEON),
        ("arm-64-linux", ARM64_NEON),
        ("arm-64-android-opencl", OPENCL),
        ("host-opencl", OPENCL),
    ],
)
def test_each_target_family_gets_its_knobs(target: str, knobs: object) -> None:
    assert target_family_knobs(hl.Target(target)) is knobs


@pytest.mark.parametrize(
    "flavour", ["avx512_skylake", "avx512_cannonlake", "avx512_sapphirerapids", "avx512_zen4",
                "avx512_zen5"],
)  # fmt: skip
def test_avx512_with_any_flavour_is_a_build_target(flavour: str) -> None:
    """Only the bare feature is refused (it crashes Halide 21's LLVM); a flavour beside it is
    what host detection writes and builds 16-float code."""
    (target,) = parse_target(f"x86-64-linux-avx512-{flavour}").targets
    assert target_family_knobs(target) is X86_AVX512


def test_register_tile_avoids_padding_channels() -> None:
    """64 filters: a 24-wide block would compute 72 channels; 16-wide blocks divide exactly."""
    sched = choose_schedule(hl.Target("x86-64-linux-avx-avx2-fma"), spec(32, 64, 56))
    assert 64 % sched.block_channels == 0
    assert sched.block_channels * sched.x_tile <= 8 * 12  # never more accumulators than fit


def test_tiles_shrink_to_small_layers() -> None:
    sched = choose_schedule(hl.Target("arm-64-android"), spec(16, 3, 2))
    assert sched.block_channels == ARM64_NEON.vector_lanes  # one vector covers 3 filters
    assert sched.x_tile == 2  # never wider than the output row


def test_rgb_input_unrolls_the_whole_channel_loop() -> None:
    target = hl.Target("x86-64-linux-avx-avx2-fma")
    assert choose_schedule(target, spec(3, 64, 56)).reduction_unroll == 3
    assert choose_schedule(target, spec(64, 64, 56)).reduction_unroll == 1


def test_overrides_are_data() -> None:
    sched = choose_schedule(
        hl.Target("x86-64-linux-avx-avx2-fma"), spec(64, 64, 56), '{"register_tiles": [[1, 12]]}'
    )
    assert (sched.block_channels, sched.x_tile) == (8, 12)
    gpu = choose_schedule(hl.Target("host-opencl"), spec(64, 64, 56), '{"x_per_thread": 2}')
    assert gpu.x_tile == 2


def test_unknown_knob_names_the_family() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule knobs.*x86-avx2"):
        choose_schedule(hl.Target("x86-64-linux-avx-avx2-fma"), spec(4, 4, 8), '{"tile": 3}')


def test_only_small_weight_tables_share_a_task_across_channel_blocks() -> None:
    assert blocks_share_task(spec(3, 64, 112), 16)  # C3D conv1: 20 KiB of weights
    assert not blocks_share_task(spec(64, 128, 112), 16)  # C3D conv2: 864 KiB


def _lowered_dense(layer: Conv3dSpec, tmp_path: Path, schedule: str = "") -> str:
    np.savez(tmp_path / "w.npz", weight=np.ones(layer.weight_shape, np.float32))
    cmd = [sys.executable, "-m", "rt3d_halide.generators", "-g", "rt3d_conv3d_dense"]
    cmd += ["-o", str(tmp_path), "-f", "layer", "-e", "stmt", "target=x86-64-linux-avx-avx2-fma"]
    cmd += [f"spec={layer.to_json()}", f"weights={tmp_path / 'w.npz'}"]
    if schedule:
        cmd.append(f"schedule={schedule}")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return (tmp_path / "layer.stmt").read_text()


def test_stem_copies_each_row_once_shared_by_every_channel_block(tmp_path: Path) -> None:
    """An RGB stem's task copies its padded rows, x as the vectors, then runs every channel
    block over them; a deep layer's task is one block, its copy vectorized along channels."""
    stem = _lowered_dense(spec(3, 64, 16), tmp_path)
    assert stem.index("produce constant_exterior") < stem.index("for (output.s0.c.co,")
    assert "constant_exterior.s0._1._1" in stem  # x split into vectors
    deep = _lowered_dense(spec(64, 128, 16), tmp_path)
    assert "for (output.s0.c.co," not in deep  # the block is part of the parallel task
    assert "constant_exterior.s0._0._0" in deep


@pytest.mark.parametrize("skip", [True, False])
def test_dense_code_skips_the_kernel_frames_on_the_temporal_padding(
    skip: bool, tmp_path: Path
) -> None:
    """The kernel-frame loop (the reduction's outermost) runs only the frames inside the clip
    for each output frame, a bound from the frame, unless ``skip_frame_padding`` is off: then
    it runs all three over the padding's zeros."""
    layer = Conv3dSpec("layer", 16, 16, (4, 6, 6), (3, 3, 3), pads_begin=(1, 1, 1))
    stmt = _lowered_dense(layer, tmp_path, json.dumps({"skip_frame_padding": skip}))
    bounds = re.findall(r"for \(layer_accum\.s1\.r\d+\$w(?:\.rebased)?, 0, ([^)]+)\)", stmt)
    assert bounds and all((bound == "3") != skip for bound in bounds), bounds


def test_dense_code_skips_padding_frames_only_where_every_frame_reads_the_clip() -> None:
    """The manifest's ``skip_frame_padding`` is what the code does: off without temporal
    padding, off where an output frame reads only padding (a 1-frame kernel padded in time),
    off with the knob off, else on, on every family."""
    padded = Conv3dSpec("c", 8, 8, (4, 6, 6), (3, 3, 3), pads_begin=(1, 1, 1), pads_end=(1, 1, 1))
    unpadded = Conv3dSpec("c", 8, 8, (4, 6, 6), (3, 3, 3), pads_begin=(0, 1, 1))
    only_padding = Conv3dSpec("c", 8, 8, (4, 6, 6), (1, 3, 3), pads_begin=(1, 1, 1))
    off = '{"skip_frame_padding": false}'
    for target in (hl.Target("x86-64-linux-avx-avx2-fma"), hl.Target("host-opencl")):
        assert choose_schedule(target, padded).describe()["skip_frame_padding"]
        for layer, knobs in ((unpadded, ""), (only_padding, ""), (padded, off)):
            assert not choose_schedule(target, layer, knobs).describe()["skip_frame_padding"]


def test_sparse_opencl_code_puts_x_tiles_of_one_group_on_neighbouring_threads() -> None:
    """Unlike dense code: a warp then shares one entry list (bench/results/opencl_gpu_knobs.md)."""
    target, layer = hl.Target("arm-64-android-opencl"), spec(64, 64, 56)
    assert choose_sparse_schedule(target, layer, (8, 4)).knobs.x_threads_inner
    assert not choose_schedule(target, layer).knobs.x_threads_inner


def test_sparse_opencl_code_refuses_the_dense_lanes_knob() -> None:
    """Its lanes are the group's filters: the override was taken and ignored."""
    target, layer = hl.Target("host-opencl"), spec(16, 16, 8)
    with pytest.raises(ValueError, match="other lanes are dense OpenCL code's"):
        choose_sparse_schedule(target, layer, (8, 4), '{"lanes": 16}')
    assert choose_sparse_schedule(target, layer, (8, 4), '{"lanes": 8}').lanes == 8
    assert choose_schedule(target, layer, '{"lanes": 16}').knobs.lanes == 16


@pytest.mark.parametrize(
    ("target", "order"),
    [("x86-64-linux-avx512_skylake", "channel"), ("arm-64-android", "channel"),
     ("host-opencl", "location")],
)  # fmt: skip
def test_planar_lists_take_their_familys_entry_order_and_the_manifest_says_it(
    target: str, order: str
) -> None:
    """CPUs measured "channel" faster (``ENTRY_ORDERS``); OpenCL keeps the order its reports
    were measured with. The quads have an order of their own, so theirs records none."""
    layout = {"input_layout": "planar"}  # as "auto" takes for long reductions
    planar = choose_sparse_schedule(hl.Target(target), spec(16, 16, 8), (8, 4), json.dumps(layout))
    assert planar.knobs.entry_order == order and planar.describe()["entry_order"] == order
    other = {"channel": "location", "location": "channel"}[order]
    forced = choose_sparse_schedule(
        hl.Target(target), spec(16, 16, 8), (8, 4), json.dumps({**layout, "entry_order": other})
    )
    assert forced.describe()["entry_order"] == other
    with pytest.raises(ValueError, match=r"entry_order must be one of \('channel', 'location'\)"):
        choose_sparse_schedule(hl.Target(target), spec(16, 16, 8), (8, 4), '{"entry_order": 1}')
    if target != "host-opencl":
        copied_quads = '{"input_layout": "interleaved_copy"}'
        quads = choose_sparse_schedule(hl.Target(target), spec(16, 16, 8), (8, 4), copied_quads)
        assert quads.input_layout == "interleaved_copy" and "entry_order" not in quads.describe()


def test_thread_order_knob_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="x_threads_inner must be true or false"):
        choose_schedule(hl.Target("host-opencl"), spec(4, 4, 8), '{"x_threads_inner": 1}')


def test_sparse_opencl_reads_one_tap_unpadded_kernels_in_place() -> None:
    """Temporal and pointwise convs without spatial padding, strided or not, skip the padded
    copy on the GPU; a kernel with spatial taps or spatial padding keeps it unless forced;
    "planar" keeps the copy."""
    gpu = hl.Target("host-opencl")
    temporal = Conv3dSpec("t", 16, 8, (4, 6, 6), (3, 1, 1), pads_begin=(1, 0, 0))
    pointwise = Conv3dSpec("p", 16, 8, (4, 6, 6), (1, 1, 1), stride=(2, 2, 2))
    padded = Conv3dSpec("q", 16, 8, (4, 6, 6), (1, 1, 1), pads_begin=(0, 1, 0))
    for layer in (temporal, pointwise):
        assert choose_sparse_schedule(gpu, layer, (8, 4)).input_layout == "in_place"
    planar = '{"input_layout": "planar"}'
    assert choose_sparse_schedule(gpu, temporal, (8, 4), planar).input_layout == "planar"
    for layer in (padded, spec(16, 8, 6)):
        assert choose_sparse_schedule(gpu, layer, (8, 4)).input_layout == "planar"
        forced = choose_sparse_schedule(gpu, layer, (8, 4), '{"input_layout": "in_place"}')
        assert forced.input_layout == "in_place"
    with pytest.raises(ValueError, match="input_layout must be one of"):
        choose_sparse_schedule(gpu, temporal, (8, 4), '{"input_layout": "interleaved"}')


def test_groups_past_the_quads_block_take_the_planar_kernel() -> None:
    """A 640-filter group holds 640 accumulators a position on NEON (one channel a vector),
    past the quads' cap: with no override the chooser takes the planar kernel (it had raised,
    and the layer's build failed); forced, the quads are refused with what fits."""
    layer = Conv3dSpec(
        "layer", 8, 640, (4, 8, 8), (3, 1, 1), pads_begin=(1, 0, 0), pads_end=(1, 0, 0)
    )
    arm, avx2 = hl.Target("arm-64-android"), hl.Target("x86-64-linux-avx2-fma-f16c-sse41")
    assert choose_sparse_schedule(arm, layer, (640, 4)).input_layout == "planar"
    assert choose_sparse_schedule(avx2, layer, (640, 4)).input_layout == "interleaved"  # 320
    assert choose_sparse_schedule(arm, layer, (512, 4)).input_layout == "interleaved"
    with pytest.raises(ValueError, match=r"640 accumulators each .* the knob input_layout"):
        choose_sparse_schedule(arm, layer, (640, 4), '{"input_layout": "interleaved"}')
