"""Dense Conv3d on every target family against torch in float64 (property tests + named shapes)."""

from __future__ import annotations

import conv_harness
import numpy as np
import pytest
from conftest import DEPTH, require_opencl, require_tools
from conv_harness import ConvCase, assert_matches, check_conv
from hypothesis import given, settings
from hypothesis import strategies as st

KERNELS = [(3, 3, 3), (1, 3, 3), (3, 1, 1), (3, 7, 7), (1, 7, 7), (1, 1, 1)]


@st.composite
def conv_cases(draw: st.DrawFn, max_channels: int = 40, max_extent: int = 10) -> ConvCase:
    kernel = draw(
        st.sampled_from(KERNELS) | st.tuples(*[st.integers(1, 3)] * 3)  # type: ignore[operator]
    )
    stride = draw(st.tuples(*[st.integers(1, 2)] * 3))
    dilation = draw(st.tuples(*[st.integers(1, 2)] * 3))
    pads_begin = draw(st.tuples(*[st.integers(0, 2)] * 3))
    pads_end = draw(st.tuples(*[st.integers(0, 2)] * 3))
    in_size = []
    for axis in range(3):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        smallest = max(1, span - pads_begin[axis] - pads_end[axis])
        in_size.append(draw(st.integers(smallest, max(smallest, max_extent))))
    return ConvCase(
        in_channels=draw(st.integers(1, max_channels)),
        out_channels=draw(st.integers(1, max_channels)),
        in_size=tuple(in_size),
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        pads_begin=pads_begin,
        pads_end=pads_end,
        bias=draw(st.booleans()),
        relu=draw(st.booleans()),
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.x86
@settings(max_examples=25 * DEPTH)
@given(case=conv_cases())
def test_dense_x86_matches_torch(case: ConvCase) -> None:
    check_conv(case, "x86")


@pytest.mark.opencl
@settings(max_examples=10 * DEPTH)
@given(case=conv_cases(max_channels=24, max_extent=8))
def test_dense_opencl_matches_torch(case: ConvCase) -> None:
    require_opencl()
    check_conv(case, "opencl")


@pytest.mark.arm
@settings(max_examples=8 * DEPTH)
@given(case=conv_cases(max_channels=24, max_extent=7))
def test_dense_arm_matches_torch(case: ConvCase) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_conv(case, "arm")


# Channel counts real models use (R(2+1)D has 45, 230, 460, 921) and the kernels of C3D and
# R(2+1)D, at small spatial sizes.
REAL_SHAPES = [
    ConvCase(3, 64, (4, 12, 12), (3, 3, 3), pads_begin=(1, 1, 1), pads_end=(1, 1, 1), relu=True),
    ConvCase(3, 45, (4, 14, 14), (1, 7, 7), (1, 2, 2), pads_begin=(0, 3, 3), pads_end=(0, 3, 3)),
    ConvCase(45, 64, (4, 7, 7), (3, 1, 1), pads_begin=(1, 0, 0), pads_end=(1, 0, 0), relu=True),
    ConvCase(64, 230, (2, 5, 5), (1, 3, 3), pads_begin=(0, 1, 1), pads_end=(0, 1, 1)),
    ConvCase(230, 128, (3, 4, 4), (3, 1, 1), (2, 1, 1), pads_begin=(1, 0, 0), pads_end=(1, 0, 0)),
    ConvCase(460, 921, (1, 2, 2), (1, 1, 1), bias=False),
    ConvCase(16, 16, (4, 9, 9), (3, 3, 3), pads_begin=(1, 1, 1), pads_end=(1, 1, 1), batch=3),
]


@pytest.mark.x86
@pytest.mark.parametrize("case", REAL_SHAPES, ids=lambda c: f"{c.in_channels}-{c.out_channels}")
def test_dense_x86_real_shapes(case: ConvCase) -> None:
    check_conv(case, "x86")


# The real shapes with temporal padding and spatial taps (dense code on every family, pruned or
# not), with the kernel frames on the padding multiplied by its zeros: the knob off, where the
# property tests take its default, on.
FRAME_PADDED = [REAL_SHAPES[0], REAL_SHAPES[6]]
NO_SKIP = '{"skip_frame_padding": false}'


@pytest.mark.x86
@pytest.mark.parametrize("case", FRAME_PADDED, ids=lambda c: f"{c.in_channels}-{c.out_channels}")
def test_dense_x86_reading_the_frame_padding(case: ConvCase) -> None:
    check_conv(case, "x86", schedule=NO_SKIP)


@pytest.mark.opencl
def test_dense_opencl_reading_the_frame_padding() -> None:
    require_opencl()
    check_conv(FRAME_PADDED[1], "opencl", schedule=NO_SKIP)


@pytest.mark.arm
def test_dense_arm_reading_the_frame_padding() -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_conv(FRAME_PADDED[1], "arm", schedule=NO_SKIP)


# A 1x3x3 conv padded by a frame at each end: its first and last output frames read only
# padding, so the skip stays off (schedules.frames_skipped); forced on, OpenCL code asked the
# input for frames outside it.
PADDING_ONLY_FRAMES = ConvCase(8, 8, (3, 5, 5), (1, 3, 3), pads_begin=(1, 1, 1), pads_end=(1, 1, 1))


@pytest.mark.opencl
def test_dense_opencl_frames_of_padding_only() -> None:
    require_opencl()
    check_conv(PADDING_ONLY_FRAMES, "opencl")


@pytest.mark.opencl
@pytest.mark.parametrize("case", REAL_SHAPES[:3], ids=lambda c: f"{c.in_channels}-{c.out_channels}")
def test_dense_opencl_real_shapes(case: ConvCase) -> None:
    require_opencl()
    check_conv(case, "opencl")


@pytest.mark.opencl
@pytest.mark.parametrize(
    "case", REAL_SHAPES[2:5], ids=lambda c: f"{c.in_channels}-{c.out_channels}"
)
def test_dense_opencl_x_threads_inner(case: ConvCase) -> None:
    """The sparse code's thread order (neighbouring work-items on neighbouring x tiles), which
    ``--schedule`` can give dense code too, with tails in x and channels."""
    require_opencl()
    check_conv(case, "opencl", schedule='{"x_threads_inner": true, "threads_x": 16}')


@pytest.mark.arm
@pytest.mark.parametrize("case", REAL_SHAPES[:3], ids=lambda c: f"{c.in_channels}-{c.out_channels}")
def test_dense_arm_real_shapes(case: ConvCase) -> None:
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    check_conv(case, "arm")


def test_harness_catches_a_wrong_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison must be able to fail: a reference off by 0.1 % is caught."""
    original = conv_harness.reference
    monkeypatch.setattr(conv_harness, "reference", lambda *a: original(*a) * 1.001)
    with pytest.raises(AssertionError, match=r"^\w+: relative error"):
        check_conv(ConvCase(4, 8, (3, 5, 5)), "x86")


def one_element_off(reference, delta: float = 5e-3):
    """``reference`` with its smallest element moved by ``delta``: under the relative L2 bound of
    a 72-output case (its norm is about 90), over the element-wise one (about 1e-3)."""

    def moved(*args):
        ref = reference(*args)
        ref.flat[int(np.argmin(np.abs(ref)))] += delta
        return ref

    return moved


def test_harness_catches_one_wrong_element(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_harness, "reference", one_element_off(conv_harness.reference))
    with pytest.raises(AssertionError, match="element"):
        check_conv(ConvCase(4, 8, (3, 5, 5)), "x86")


def test_the_check_takes_rounding_of_a_nearly_all_zero_output_but_not_a_wrong_one() -> None:
    """A ReLU left one of six outputs (0.0102) on a 2400-term reduction: float32 rounding
    (8.7e-6, torch's own float32 conv did worse) passes, an element off by a dropped tap does
    not, nor a 0.1 % error of every output at a normal scale."""
    case = ConvCase(32, 6, (4, 4, 3), kernel=(3, 5, 5), relu=True)
    ref = np.zeros((1, 1, 1, 1, 6))
    ref[..., 2] = 0.0102
    assert_matches(ref + np.where(ref > 0, 8.7e-6, 0.0), ref, case, "x86")
    with pytest.raises(AssertionError, match=r"relative error|element"):
        assert_matches(ref + np.where(ref > 0, 0.05, 0.0), ref, case, "x86")
    normal = np.random.default_rng(0).standard_normal((1, 2, 2, 2, 6)) * np.sqrt(2400)
    with pytest.raises(AssertionError, match=r"^\w+: relative error"):
        assert_matches(normal * 1.001, normal, case, "x86")
