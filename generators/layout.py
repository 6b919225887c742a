"""Activation layout shared by every Conv3d generator: channels innermost, batch outermost.

numpy (N, T, H, W, C) is Halide (c, x, y, t, n). Every dimension but the batch is baked, and the
strides of a dense C-contiguous array are required, so that a wrong array fails Halide's buffer
checks with an error code instead of being read out of bounds. The sparse generator's planar
kernel copies its input into a second layout, :class:`FlatLayout` (x innermost); its quad kernel
reads the input as it is (:func:`interleaved_fits`) or a padded copy that keeps channels
innermost (:class:`~.conv3d_quads.PaddedChannels`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import halide as hl
import numpy as np

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
    buf: hl.ImageParam | hl.Func,
    shape: tuple[int, int, int, int, int],
    batch_of: hl.ImageParam | None = None,
) -> None:
    """Bakes extents and dense strides of a numpy (N, T, H, W, C) array; N stays free, or, for
    an output, equal to the batch of ``batch_of`` (its input), from the same first clip: an app
    that passed a batch of 2 clips with an output for 1 got 1 computed and no error.

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
    # The batch may start anywhere (an app's slice of clips k..), the output's where its
    # input's does: output clip n is input clip n.
    param.dim(4).set_stride(stride)
    if batch_of is not None:
        param.dim(4).set_bounds(batch_of.dim(4).min(), batch_of.dim(4).extent())
    if is_output:
        buf.set_estimates([hl.Range(0, e) for e in extents] + [hl.Range(0, 1)])
    else:
        param.dim(4).set_estimate(0, 1)


def zero_outside(inp: hl.ImageParam, spec: Conv3dSpec) -> hl.Func:
    """The input as a Func, zero outside its baked extent (channels, x, y, frames)."""
    t, h, w = spec.in_size
    bounds = [hl.Range(0, spec.in_channels), hl.Range(0, w), hl.Range(0, h), hl.Range(0, t)]
    return hl.BoundaryConditions.constant_exterior(inp, 0.0, bounds)


def input_source(inp: hl.ImageParam, spec: Conv3dSpec) -> hl.Func:
    """The input as a Func, zero outside the baked extent when the layer pads."""
    return zero_outside(inp, spec) if spec.has_padding else hl.Func(inp)


def output_from_blocks(
    output: hl.Func, accum: hl.Func, block: int, relu: bool, v: ConvVars
) -> None:
    """output(c, ...) = accum(c % block, c / block, ...), with the optional fused ReLU.

    Once the schedule splits ``c`` by ``block`` (the dense schedule does) the simplifier turns the
    modulo and division into the split's own Vars, so loads of ``accum`` stay dense vectors.
    """
    value = accum[v.c % block, v.c // block, v.x, v.y, v.t, v.n]
    if relu:
        value = hl.max(value, 0.0)
    output[v.c, v.x, v.y, v.t, v.n] = value


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where the zero-padded input lies in ``flat``: one plane per (frame, channel, stride phase),
    x innermost, then y.

    Padded column ``X = q * sx + px`` and row ``Y = qy * sy + py`` of channel ``c`` in frame ``f``
    lie at ``q + Wq * (qy + Hq * (py + sy * (px + sx * (c + C * f))))``. Output position (x, y)
    reads, for every entry, ``x + Wq * y`` plus the entry's constant offset, whatever the stride:
    a schedule can run vectors along ``o = x + Wq * y``, the plane flattened, so that the row
    width need not be a multiple of the vector (a 28-wide row costs 29 positions, one padding
    column shared with the next row, where whole vectors per row cost 32). With channels
    innermost the inputs of consecutive outputs were ``C * sx`` floats apart: one broadcast per
    multiply (see :mod:`.sparse_schedules` for what that cost). The sparse generator's planar
    kernel copies its input into this layout, or into :class:`MaskedLayout`.
    """

    channels: int
    stride: tuple[int, int]  # (sy, sx)
    columns: int  # Wq: padded columns per x phase
    rows: int  # Hq: padded rows per y phase
    frames: int  # Tp
    band: int = 0  # output rows per task copy (:meth:`banded`); 0: one copy of the whole input

    @classmethod
    def of(cls, spec: Conv3dSpec) -> FlatLayout:
        """Without an x stride, a row's right padding and the next row's left padding share
        their (zero) floats: a pitch of ``W + max(left, right)`` rather than ``W + left +
        right`` columns (29 against 30 for a 28-wide row padded by 1), which is the waste the
        flattened plane computes and drops per row. Every read of a real input column still
        lands on its own float, every padding read on a zero."""
        tp, hp, wp = (spec.in_size[i] + spec.pads_begin[i] + spec.pads_end[i] for i in range(3))
        sy, sx = spec.stride[1], spec.stride[2]
        if sx == 1:
            columns = spec.in_size[2] + max(spec.pads_begin[2], spec.pads_end[2])
        else:
            columns = -(-wp // sx)
        return cls(spec.in_channels, (sy, sx), columns, -(-hp // sy), tp)

    def banded(self, spec: Conv3dSpec, band: int, positions: int) -> FlatLayout:
        """The layout of one task's copy: one frame of the input rows that ``band`` output rows
        read (one kernel frame), for blocks that compute ``positions`` plane positions from the
        band's first; the band starts at padded row ``band * stride`` times its number. Each
        (channel, stride phase) plane's rows reach as far as the last block's farthest read:
        the positions rounded up past the band's last row, whose sums are dropped, read their
        own plane (input rows past the band, or zeros) and never past the copy."""
        if spec.kernel[0] != 1:
            raise ValueError(f"{spec.name}: a copy per band needs one kernel frame (Kd = 1)")
        sy, sx = self.stride
        reach = positions - 1 + (spec.kernel[2] - 1) * spec.dilation[2] // sx
        reach += (spec.kernel[1] - 1) * spec.dilation[1] // sy * self.columns
        return dataclasses.replace(self, rows=reach // self.columns + 1, frames=1, band=band)

    def base(self, o: Any, frame: Any) -> Any:
        """Flat index of channel 0's input at position ``o`` of padded frame ``frame``."""
        return o + self.frame_pitch * frame

    @property
    def frame_pitch(self) -> int:
        """Floats between consecutive padded frames (every channel's planes)."""
        return self.columns * self.rows * self.stride[0] * self.stride[1] * self.channels

    @property
    def size(self) -> int:
        return self.frame_pitch * self.frames

    def position(self, x: Any, y: Any) -> Any:
        """``o``: the flattened plane position of output (x, y)."""
        return x + self.columns * y

    def index(self, c: Any, col: Any, row: Any, frame: Any) -> Any:
        """Flat index of padded position (col, row, frame) of channel ``c``."""
        sy, sx = self.stride
        plane = row % sy + sy * (col % sx + sx * c)
        return col // sx + self.columns * (row // sy + self.rows * plane) + self.frame_pitch * frame

    def decompose(self, i: Any) -> tuple[Any, Any, Any, Any]:
        """(c, col, row, frame) of flat index ``i``: the inverse of :meth:`index`."""
        sy, sx = self.stride
        q, rest = i % self.columns, i // self.columns
        qy, rest = rest % self.rows, rest // self.rows
        py, rest = rest % sy, rest // sy
        px, rest = rest % sx, rest // sx
        return rest % self.channels, q * sx + px, qy * sy + py, rest // self.channels


@dataclasses.dataclass(frozen=True)
class MaskedLayout:
    """The input without its spatial padding: one plane per channel of every (temporally
    padded) frame, x innermost, then y, then the frame, ``x + W * (y + H * (f + Tp * c))``.

    For a stride-1 conv whose output plane is its input's (:meth:`fits`), output position
    ``o = x + W * (y + H * t)`` reads, for every entry, ``o`` plus the entry's constant offset,
    across rows and frames: a task's positions run on with no padding column per row and no
    padding rows per frame, so its blocks of vectors round up once per task rather than once
    per band of rows of each frame (C3D conv4b's 14x14 frames computed 224 positions for 196).
    A read that falls on the left or right padding lands on the neighbouring row's last or
    first float, one on the top or bottom padding on a neighbouring frame's row: the kernel
    masks those reads to zero (:meth:`outside_bits`), a test per input vector that costs more
    than the padding saves on larger planes (``PADDING`` in :mod:`.sparse_knobs`).
    Temporal padding stays as zero frames.
    """

    channels: int
    width: int
    height: int
    frames: int  # Tp: the input's frames with the temporal padding
    pads: tuple[int, int, int]  # (t, y, x) padding before the input

    @staticmethod
    def fits(spec: Conv3dSpec) -> bool:
        """Stride 1, an output plane of the input's size (every position computed is an output
        position) and at most 31 mask bits (kernel height + width)."""
        return (
            spec.stride == (1, 1, 1)
            and spec.out_size[1:] == spec.in_size[1:]
            and spec.kernel[1] + spec.kernel[2] <= 31
        )

    @classmethod
    def of(cls, spec: Conv3dSpec) -> MaskedLayout:
        if not cls.fits(spec):
            raise ValueError(f"{spec.name}: a masked layout needs stride 1 and a same-size plane")
        frames = spec.in_size[0] + spec.pads_begin[0] + spec.pads_end[0]
        _, h, w = spec.in_size
        return cls(spec.in_channels, w, h, frames, spec.pads_begin)

    @property
    def size(self) -> int:
        return self.width * self.height * self.frames * self.channels

    @property
    def columns(self) -> int:
        """Positions per row, as :attr:`FlatLayout.columns` (the schedule's model reads it)."""
        return self.width

    @property
    def stride(self) -> tuple[int, int]:
        """(sy, sx), as :attr:`FlatLayout.stride`: no stride phases."""
        return (1, 1)

    @property
    def plane(self) -> int:
        """Floats per frame of one channel."""
        return self.width * self.height

    def index(self, c: Any, col: Any, row: Any, frame: Any) -> Any:
        """Flat index of padded position (col, row, frame) of channel ``c``; padding columns and
        rows fall on neighbouring floats (or before the first: a negative index)."""
        x, y = col - self.pads[2], row - self.pads[1]
        return x + self.width * (y + self.height * (frame + self.frames * c))

    def decompose(self, i: Any) -> tuple[Any, Any, Any, Any]:
        """(c, col, row, frame) of flat index ``i`` (padded coordinates): :meth:`index`'s
        inverse over the stored floats."""
        x, rest = i % self.width, i // self.width
        y, rest = rest % self.height, rest // self.height
        frame, c = rest % self.frames, rest // self.frames
        return c, x + self.pads[2], y + self.pads[1], frame

    def position(self, x: Any, y: Any, t: Any) -> Any:
        """``o``: the flattened position of output (x, y, t)."""
        return x + self.width * (y + self.height * t)

    @staticmethod
    def masks_reads(spec: Conv3dSpec) -> bool:
        """Whether any read falls on the left-out padding: a fitting conv with spatial taps has
        padding for them; one without has none, and its reads take no mask."""
        return spec.kernel[1:] != (1, 1)

    def outside_bits(self, spec: Conv3dSpec) -> np.ndarray:
        """Per output position ``o``, bit ``kx`` set where kernel column ``kx`` reads the
        padding, bit ``Kw + ky`` where kernel row ``ky`` does: an entry whose
        :meth:`entry_bits` meet these reads zero. A baked table rather than arithmetic on
        ``o``: Halide rewrote ``o % W`` for widths that divide the vector into a repeating
        pattern and the loads into gathers of 4-float pieces (the embedded model's 4x4 and 2x2
        planes: 1.4-1.5 times the copied padding's time, 2-3 times on one thread)."""
        _, dh, dw = spec.dilation
        o = np.arange(self.position(0, 0, spec.out_size[0]))
        x, y = o % self.width, o // self.width % self.height
        bits = np.zeros(o.shape, np.int64)
        for kx in range(spec.kernel[2]):
            column = x + kx * dw - self.pads[2]
            bits |= ((column < 0) | (column >= self.width)).astype(np.int64) << kx
        for ky in range(spec.kernel[1]):
            row = y + ky * dh - self.pads[1]
            bits |= ((row < 0) | (row >= self.height)).astype(np.int64) << (spec.kernel[2] + ky)
        return bits.astype(np.int32)

    @staticmethod
    def entry_bits(kh: np.ndarray, kw: np.ndarray, spec: Conv3dSpec) -> np.ndarray:
        """Per entry (kernel row ``kh``, column ``kw``), the bits of :meth:`outside_bits` that
        mask it."""
        return ((1 << kw) | (1 << (spec.kernel[2] + kh))).astype(np.int32)


def interleaved_fits(spec: Conv3dSpec) -> bool:
    """Whether output (x, y) reads input (x, y) only, so the input can be read in place, channels
    innermost: one spatial tap, spatial stride 1, no spatial padding (Kx1x1 convs)."""
    return (
        spec.kernel[1:] == (1, 1)
        and spec.stride[1:] == (1, 1)
        and spec.pads_begin[1:] == (0, 0)
        and spec.pads_end[1:] == (0, 0)
    )


def check_interleaved(spec: Conv3dSpec) -> None:
    """Refuses an in-place read the layer does not allow (:func:`interleaved_fits`)."""
    if not interleaved_fits(spec):
        raise ValueError(
            f"{spec.name}: an interleaved input needs a 1x1 spatial kernel, spatial stride 1 and "
            "no spatial padding"
        )
