"""Activation layout shared by every Conv3d generator: channels innermost, batch outermost.

numpy (N, T, H, W, C) is Halide (c, x, y, t, n). Every dimension but the batch is baked, and the
strides of a dense C-contiguous array are required, so that a wrong array fails Halide's buffer
checks with an error code instead of being read out of bounds.
"""

from __future__ import annotations

import dataclasses

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
