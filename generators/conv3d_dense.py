"""Dense Conv3d: the algorithm once, and the generator that bakes one layer's weights into code.

Weights are packed into output-channel blocks of ``block`` filters, innermost over the filter:
``packed[kd, kh, kw, ci, lane]`` per block, so that the inner loop reads one contiguous vector per
(input channel, kernel tap) and walks memory sequentially. The block size is the schedule's register
tile width, which is why the schedule is chosen before the algorithm is written.
"""

from __future__ import annotations

import dataclasses

import halide as hl
import numpy as np

from .baking import baked_buffer, filters_by_group, load_layer
from .layout import ConvVars, constrain_activation, input_source, output_from_blocks
from .schedules import ConvSchedule, apply_conv_schedule, choose_schedule
from .spec import Conv3dSpec


def pack_dense_weights(weight: np.ndarray, block: int) -> np.ndarray:
    """(M, N, Kd, Kh, Kw) -> (M_blocks, Kd, Kh, Kw, N, block), zero-padded in M.

    In Halide's reversed axis order this is w(lane, ci, kw, kh, kd, block_index).
    """
    return np.ascontiguousarray(filters_by_group(weight, block).transpose(0, 3, 4, 5, 2, 1))


def pack_bias(bias: np.ndarray | None, out_channels: int, block: int) -> np.ndarray:
    blocks = -(-out_channels // block)
    padded = np.zeros(blocks * block, dtype=np.float32)
    if bias is not None:
        padded[:out_channels] = bias
    return padded.reshape(blocks, block)


@dataclasses.dataclass
class ConvFuncs:
    """The Funcs and Vars a schedule needs to see: the accumulator and its reduction domain, the
    output and the row copy it reads (``source``)."""

    vars: ConvVars
    accum: hl.Func
    reduction: hl.RDom
    output: hl.Func
    source: hl.Func


def dense_conv3d(
    inp: hl.ImageParam,
    weights: hl.Buffer,
    bias: hl.Buffer,
    spec: Conv3dSpec,
    block: int,
    output: hl.Func,
    skip_frame_padding: bool = False,
) -> ConvFuncs:
    """Defines ``output(c, x, y, t, n)``; ``accum`` is computed per output-channel block.

    ``skip_frame_padding`` (where :func:`~.schedules.frames_skipped` allows it): the kernel
    frames that would read the temporal padding are left out of the reduction (its outermost
    loop, whose bounds Halide trims to the frames inside the clip) rather than multiplied by
    zeros: 4, 8, 17 and 33 % of a 3-frame kernel's MACs on 16, 8, 4 and 2 frames. Unpruned on
    Zen 5 (AVX-512, per-round ratio against the knob off over 21 rounds) C3D conv1 took 0.98 of
    the time, conv2 0.96, conv4b 0.84, conv5b 0.71, and R(2+1)D-18's 3x1x1 convs on 4 and 2
    frames 0.93 and 0.955 (a first run of 11 rounds had put the 2-frame one at 0.87). AVX2 code
    gained more on the 3x1x1 convs, whose in-place reads had each tested the frame: R(2+1)D-18's
    16-frame stem.3 0.86, its 2-frame layer4.1 conv 0.47."""
    v = ConvVars()
    src = input_source(inp, spec)
    kd, kh, kw = spec.kernel
    r = hl.RDom([hl.Range(0, spec.in_channels), hl.Range(0, kw), hl.Range(0, kh), hl.Range(0, kd)])
    st, sh, sw = spec.stride
    dt, dh, dw = spec.dilation
    xs = v.x * sw + r.y * dw - spec.pads_begin[2]
    ys = v.y * sh + r.z * dh - spec.pads_begin[1]
    ts = v.t * st + r.w * dt - spec.pads_begin[0]
    if skip_frame_padding:
        r.where((ts >= 0) & (ts < spec.in_size[0]))

    accum = hl.Func(f"{spec.name}_accum")
    accum[v.lane, v.block, v.x, v.y, v.t, v.n] = bias[v.lane, v.block]
    accum[v.lane, v.block, v.x, v.y, v.t, v.n] += (
        weights[v.lane, r.x, r.y, r.z, r.w, v.block] * src[r.x, xs, ys, ts, v.n]
    )
    output_from_blocks(output, accum, block, spec.relu, v)
    return ConvFuncs(v, accum, r, output, src)


@hl.generator(name="rt3d_conv3d_dense")
class DenseConv3dGenerator(hl.Generator):
    """One dense Conv3d layer with its weights baked in.

    ``spec`` is the layer's JSON (:class:`Conv3dSpec`), ``weights`` an ``.npz`` holding ``weight``
    (M, N, Kd, Kh, Kw) and optionally ``bias`` (M,), ``schedule`` an optional JSON of knob
    overrides (tuning is data: see :mod:`rt3d_halide.generators.schedules`).
    """

    spec = hl.GeneratorParam("")
    weights = hl.GeneratorParam("")
    schedule = hl.GeneratorParam("")

    input = hl.InputBuffer(hl.Float(32), 5)
    output = hl.OutputBuffer(hl.Float(32), 5)

    def generate(self) -> None:
        spec, weight, bias, _ = load_layer(str(self.spec), str(self.weights))
        generate_dense(self, spec, weight, bias, str(self.schedule))


def check_dense_inputs(params: dict[str, str], target: hl.Target) -> None:
    """The dense generator's parameters (spec, weights, schedule; missing ones empty) checked
    for ``target`` as :meth:`DenseConv3dGenerator.generate` reads them: the command line's check
    before Halide runs it, so that bad input is one error line."""
    spec, *_ = load_layer(params.get("spec", ""), params.get("weights", ""))
    choose_schedule(target, spec, params.get("schedule", ""))


def generate_dense(
    gen: hl.Generator,
    spec: Conv3dSpec,
    weight: np.ndarray,
    bias: np.ndarray | None,
    overrides: str,
) -> None:
    """The dense layer into ``gen``'s ``input`` and ``output``: the dense generator's body, also
    what the sparse generator builds for targets that take dense code (``dense_families``)."""
    sched: ConvSchedule = choose_schedule(gen.target(), spec, overrides)
    # An autoscheduler gets the plain algorithm (the kernel-frame predicate included): one block
    # spanning every output channel, so the weights are w(c, ci, kw, kh, kd) and no
    # schedule-specific split is baked in.
    block = spec.out_channels if gen.using_autoscheduler() else sched.block_channels
    wbuf = baked_buffer(pack_dense_weights(weight, block), f"{spec.name}_wpacked")
    bbuf = baked_buffer(pack_bias(bias, spec.out_channels, block), f"{spec.name}_bias")

    constrain_activation(gen.input, spec.input_shape())
    skip = sched.skip_frame_padding
    funcs = dense_conv3d(gen.input, wbuf, bbuf, spec, block, gen.output, skip)
    constrain_activation(gen.output, spec.output_shape(), batch_of=gen.input)

    if gen.using_autoscheduler():
        return
    apply_conv_schedule(sched, funcs, spec)
