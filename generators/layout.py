"""Activation layout shared by every Conv3d generator: channels innermost, batch outermost.

numpy (N, T, H, W, C) is Halide (c, x, y, t, n). Every dimension but the batch is baked, and the
strides of a dense C-contiguous array are required, so that a wrong array fails Halide's buffer
checks with an error code instead of being read out of bounds. The sparse generator's internal
copy of its input uses a second layout, :class:`FlatLayout` (x innermost).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import halide as hl

from .spec import Conv3dSpec


@dataclasses.dataclass
class ConvVars:
    """Pure Vars of the conv pipelines: ``lane``/``block`` split the output channel explicitly."""

    c: hl.Var = dataclasses.field(default_factory=lambda: hl.Var("c"))
    x: hl.Var = dataclasses.field(default_factory=lambda: hl.Var("x"))
    y: hl.Var = dataclasses.field(default_factory=lambda: hl.Var("y"))
    t: hl.Var = dataclasses.field(default_factory=lambda: hl.Var("t"))
    n: hl.Var = dataclasses.field(default_factory=lambda: hl.Var("n"))
    lane: hl.Var = dataclasses.field(default_factory=lambda: hl.Var("lane"))
    block: hl.Var = dataclasses.field(default_factory=lambda: hl.Var("block"))


def constrain_activation(
    buf: hl.ImageParam | hl.Func, shape: tuple[int, int, int, int, int], spec: Conv3dSpec
) -> None:
    """Bakes extents and dense strides of a numpy (N, T, H, W, C) array; N stays free.

    Estimates (batch 1) are set too, for the autoscheduler baseline.
    """
    _, t, h, w, c = shape
    extents = (c, w, h, t)
    is_output = isinstance(buf, hl.Func)
    param = buf.output_buffer() if is_output else buf
    stride = 1
    for dim, extent in enumerate(extents):
        param.dim(dim).set_bounds(0, extent).set_stride(stride)
        if not is_output:
            param.dim(dim).set_estimate(0, extent)
        stride *= extent
    param.dim(4).set_min(0).set_stride(stride)
    if is_output:
        buf.set_estimates([hl.Range(0, e) for e in extents] + [hl.Range(0, 1)])
    else:
        param.dim(4).set_estimate(0, 1)


def input_source(inp: hl.ImageParam, spec: Conv3dSpec) -> hl.Func:
    """The input as a Func, zero outside the baked extent when the layer pads."""
    if not spec.has_padding:
        return hl.Func(inp)
    t, h, w = spec.in_size
    bounds = [hl.Range(0, spec.in_channels), hl.Range(0, w), hl.Range(0, h), hl.Range(0, t)]
    return hl.BoundaryConditions.constant_exterior(inp, 0.0, bounds)


def output_from_blocks(
    output: hl.Func, accum: hl.Func, block: int, relu: bool, v: ConvVars
) -> None:
    """output(c, ...) = accum(c % block, c / block, ...), with the optional fused ReLU.

    Once the schedule splits ``c`` by ``block`` the simplifier turns the modulo and division into
    the split's own Vars, so loads of ``accum`` stay dense vectors.
    """
    value = accum[v.c % block, v.c // block, v.x, v.y, v.t, v.n]
    if relu:
        value = hl.max(value, 0.0)
    output[v.c, v.x, v.y, v.t, v.n] = value


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where the zero-padded input lies in ``flat``: x innermost, split into stride phases.

    Padded column ``X = q * sw + phase`` lies at ``q + Wq * (phase + sw * (c + C * (y + Hp * t)))``,
    so for every entry the inputs of consecutive output x positions are consecutive floats (one
    vector load), whatever the stride. With channels innermost they were ``C * sw`` floats apart:
    one broadcast per multiply (see :mod:`.sparse_schedules` for what that cost). The sparse
    generator copies its input into this layout.
    """

    channels: int
    stride: int
    columns: int  # Wq: padded columns per phase
    rows: int  # Hp
    frames: int  # Tp

    @classmethod
    def of(cls, spec: Conv3dSpec, align: int = 1) -> FlatLayout:
        """``align``: rows padded to a multiple of it. With the CPU vector width, a vector of the
        copy never straddles two rows, which lets the simplifier drop the flat index's vector
        divisions (unaligned, they made the copy cost as much as a 3x1x1 layer's convolution).
        """
        tp, hp, wp = (spec.in_size[i] + spec.pads_begin[i] + spec.pads_end[i] for i in range(3))
        sw = spec.stride[2]
        columns = -(-wp // sw)
        return cls(spec.in_channels, sw, -(-columns // align) * align, hp, tp)

    @property
    def row_pitch(self) -> int:
        """Floats between one channel's padded rows (all channels and phases of a row)."""
        return self.columns * self.stride * self.channels

    @property
    def size(self) -> int:
        return self.row_pitch * self.rows * self.frames

    def index(self, c: Any, col: Any, row: Any, frame: Any) -> Any:
        """Flat index of padded position (col, row, frame) of channel ``c``."""
        q, phase = col // self.stride, col % self.stride
        return (
            q
            + self.columns * (phase + self.stride * c)
            + self.row_pitch * (row + self.rows * frame)
        )
