"""The schedule resolver: knobs per target family fitted to a layer's baked shape."""

from __future__ import annotations

import halide as hl
import pytest
from rt3d_halide.generators.schedules import (
    ARM64_NEON,
    OPENCL,
    X86_AVX2,
    X86_AVX512,
    choose_schedule,
    target_family_knobs,
)
from rt3d_halide.generators.spec import Conv3dSpec


def spec(cin: int, cout: int, width: int, kernel=(3, 3, 3)) -> Conv3dSpec:
    return Conv3dSpec(
        "layer", cin, cout, (4, 8, width), kernel, pads_begin=(1, 1, 1), pads_end=(1, 1, 1)
    )


@pytest.mark.parametrize(
    "target, knobs",
    [
        ("x86-64-linux-avx-avx2-fma", X86_AVX2),
        ("x86-64-linux-avx512_skylake", X86_AVX512),
        ("arm-64-android", ARM64_NEON),
        ("arm-64-linux", ARM64_NEON),
        ("arm-64-android-opencl", OPENCL),
        ("host-opencl", OPENCL),
    ],
)
def test_each_target_family_gets_its_knobs(target: str, knobs: object) -> None:
    assert target_family_knobs(hl.Target(target)) is knobs


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
