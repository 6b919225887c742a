"""``python -m rt3d_halide.build``: an ONNX 3D CNN in, static libraries an app links out.

Every Conv node becomes one generated function (a following Relu is fused into it) with its weights
baked in; see :mod:`rt3d_halide.artifacts` for the output layout. Bad input, and the file system's
refusals of the user's paths, end with one line that names the problem, exit status 2, and no
output written (an earlier build at ``--out`` stays).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import halide as hl
import numpy as np

from rt3d_halide.generators.conv3d_quads import QUAD
from rt3d_halide.generators.conv3d_sparse import pattern_shares
from rt3d_halide.generators.layout import interleaved_fits
from rt3d_halide.generators.schedules import (
    FAMILIES,
    choose_schedule,
    family_overrides,
    target_family_knobs,
    with_overrides,
)
from rt3d_halide.generators.sparse_choice import QUAD_MIN_FILL, choose_sparse_schedule
from rt3d_halide.generators.sparse_knobs import OPENCL_VECTOR_WIDTHS, sparse_family_knobs
from rt3d_halide.pruning.patterns import SPARSITY_METADATA_KEY, kept_units

from . import artifacts
from .archive import merge_archives
from .compile import LayerArtifacts, LayerJob, cache_root, compile_layers, compile_runtime
from .errors import BuildError, listing
from .onnx_import import ConvLayer, ModelPlan, plan_model
from .targets import BuildTarget, family_of, parse_target

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "c3d_small_kgs.onnx"
DEFAULT_TARGET = "host"
DENSE_GENERATOR = "rt3d_conv3d_dense"
SPARSE_GENERATOR = "rt3d_conv3d_sparse"
KERNEL_MODES = ("auto", "dense", "sparse")
# Break-even of the dense-fallback rule: with --kernel auto a pruned layer gets sparse code when
# that code runs at most this fraction of the dense MACs (its kept fraction, plus the lanes that pad
# the last group where gM does not divide the filters). bench/sparse_layers.py fits it per layer
# from sparse and dense times measured in one run (2-core AVX2 machine, shared, so noisy): with the
# flat-plane sparse kernel, over two runs 0.81-1.08 on C3D conv2/conv3b/conv4b and R(2+1)D's
# 1x3x3 and 3x1x1 shapes; the rule takes the lowest, rounded down: a layer near the line loses
# little either way. The latest run (bench/results/sparse_layers.md), fitted through each row's
# sparse over dense time and the unpruned layer's, puts it at 0.93 and 0.95 on two layers, above 1
# on three (0.97 and above 1 in the run before).
SPARSE_BREAK_EVEN_KEPT = 0.8
# The same rule for OpenCL targets, outside gpu_sparse_beats_dense's reach,
# fitted on an NVIDIA H100 through OpenCL for the 18 convs of C3D and R(2+1)D-18 that the sparse
# kernel lost unpruned (KGS and vanilla, a tenth to all kept): the 12 with one spatial tap and
# no spatial padding, which read their input in place (bench/results/opencl_gpu_in_place.md),
# break even at 0.45-1 of the dense MACs (above 1 on one); the 6 with spatial taps, which read
# a padded copy (bench/results/opencl_gpu_breakeven.md), at 0.42-0.67, except the two RGB
# stems (below). The rule takes the lowest, rounded down. Between 0.4 and 0.8 kept, where the
# CPU rule builds sparse code, sparse code took 0.50-1.50 of the dense time there (19 of 29
# rows faster); below 0.4, 0.13-0.86 (87 of 87).
GPU_SPARSE_BREAK_EVEN_KEPT = 0.4
# OpenCL targets keep convs of fewer input channels than this (RGB stems) dense, pruned or not:
# on the H100 C3D's conv1 and R(2+1)D-18's 1x7x7 stem took 1.3-3.3 times their dense code's time
# at every kept fraction from a tenth to all (20 rows; bench/results/opencl_gpu_breakeven.md),
# whose 0.09 ms the padded copy alone nearly matches.
GPU_SPARSE_MIN_INPUT_CHANNELS = 4
# The OpenCL rule's reach (gpu_sparse_beats_dense): spatial taps, this many input channels, output
# planes this large.
GPU_SPARSE_MIN_CHANNELS = 64
GPU_SPARSE_MIN_PLANE = 14
# CPU schedule families that keep the temporal-only rule (quads_beat_dense) off: there the
# in-place quads lose to dense code with nothing pruned. Unpruned on a 2-core Zen 5 (AVX-512),
# R(2+1)D-18's 11 distinct 3x1x1 convs at 16x112x112, per-round ratio in one process, seven
# settled runs of 15-31 rounds (the last: 0.94-1.31, median 1.09; 0.98-1.35, median 1.12 since
# dense code skips the temporal padding, bench/results/temporal_quads_avx512.md). Before that the
# quads took 0.904-0.995 of our dense code's time on the three 14x14 planes, 0.99-1.04 on
# layer1's 56x56 conv and 1.17-1.23 on the 56x56 stem, 1.03-1.11 on the 28x28 and 1.16-1.33 on the
# 7x7 (a block of the flattened plane streams every weight, and a 7x7 plane has few blocks). The
# runs before had timed the dense code straight after torch's call (bench/common.py,
# SETTLE_SECONDS) and put the 14x14 and 28x28 planes at 0.61-1.10 (one outlier, 1.75), so the rule
# had stopped only below 14x14. AVX2 code on the same machine, settled, took 0.49-0.86 over three
# runs, so AVX2 and NEON kept the rule. Since dense code skips the temporal padding (its in-place
# reads no longer test the frame), AVX2's quads take 0.96-1.11 of its time, median 1.01, 41.6
# against 41.5 ms summed (bench/results/temporal_quads_avx2_on_zen5.md): a wash, so AVX2 and NEON
# (unmeasured) keep it until a phone or the AVX2 machine says otherwise.
TEMPORAL_QUADS_OFF_FAMILIES = ("x86-avx512",)

# A layer read as dense with at least this share of zero weights gets a note in its reason
# (:func:`unused_zeros`): a trained, unpruned conv has next to none.
UNUSED_ZEROS_NOTE = 0.1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rt3d_halide.build",
        description=(
            "Compile every Conv3d of an ONNX model (channels-innermost activations, weights baked "
            "into code) to one static library + header per model, one Halide runtime library, a "
            "manifest.json and a CMake package."
        ),
        epilog=(
            "Targets are Halide target strings: arm-64-android (ARM CPU, NEON), "
            "arm-64-android-opencl (phone GPU), arm-64-linux (ARM CPU, runs under qemu), host "
            "(this machine), host-opencl (OpenCL here, e.g. PoCL). A comma list such as "
            "'arm-64-android-opencl,arm-64-android' makes one library that picks the first target "
            "whose CPU features the device has, at run time (a target that an earlier one "
            "always beats is refused); to skip an OpenCL target where no "
            "OpenCL device is found, the app calls rt3d_fall_back_without_opencl() from "
            "include/rt3d_opencl_fallback.h first. Exit status: 0 built, 2 bad input or failed "
            "compile."
        ),
    )
    parser.add_argument(
        "model_file", nargs="?", type=Path, metavar="MODEL", help="ONNX file, as --model"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="ONNX file (default: the small 3D CNN shipped in the package)",
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"Halide target(s) (default: {DEFAULT_TARGET})"
    )
    parser.add_argument("--out", type=Path, help="output directory (default: build/<target>/)")
    parser.add_argument(
        "--name",
        help="model name: library lib<name>.a, functions <name>_<layer> (default: file stem)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="layers compiled in parallel (default: CPU count)",
    )
    parser.add_argument(
        "--schedule",
        default="",
        help="JSON of schedule knob overrides for every layer built as dense code, "
        "e.g. '{\"register_tiles\": [[2, 6]]}'; for a comma list of targets whose families' "
        'knobs differ, one object per family: \'{"arm64-neon": {...}, "opencl": {...}}\' '
        f"(families: {', '.join(FAMILIES)}; see the manifest's schedules)",
    )
    parser.add_argument(
        "--kernel",
        choices=KERNEL_MODES,
        default="auto",
        help="Conv code per layer: 'auto' (default) builds sparse code for a pruned layer whose "
        f"sparse code runs at most {SPARSE_BREAK_EVEN_KEPT} of its dense MACs (the manifest's "
        f"sparse_fraction; {GPU_SPARSE_BREAK_EVEN_KEPT} on OpenCL targets, where convs of fewer "
        f"than {GPU_SPARSE_MIN_INPUT_CHANNELS} input channels stay dense), for a temporal-only "
        "Kx1x1 layer (K > 1) that the sparse schedule reads in place as quads (CPU targets, at "
        f"least 4 input channels; not on {', '.join(TEMPORAL_QUADS_OFF_FAMILIES)}) "
        "and, on OpenCL targets, for a conv with spatial taps, >= "
        f"{GPU_SPARSE_MIN_CHANNELS} input channels and an output plane >= "
        f"{GPU_SPARSE_MIN_PLANE}x{GPU_SPARSE_MIN_PLANE} (where its measured schedule applies: "
        "a group of 2, 4, 8 or 16 filters, no override against it); dense code otherwise. A "
        "comma list of targets decides per family, OpenCL or CPU (one library; the manifest's "
        "target_kernels): CPU targets of one list decide together. 'dense' or 'sparse' forces "
        "one for every layer. --schedule applies to dense code",
    )
    parser.add_argument(
        "--sparse-schedule",
        default="",
        help="JSON of sparse schedule knob overrides for every sparse layer, "
        "e.g. '{\"x_vectors\": 3}', or one object per family as for --schedule "
        "(see rt3d_halide.generators.sparse_knobs)",
    )
    parser.add_argument(
        "--keep-assembly", action="store_true", help="also write each layer's assembly to asm/"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    schedule: str = ""
    keep_assembly: bool = False
    quiet: bool = False
    kernel: str = "auto"
    sparse_schedule: str = ""


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """A layer's kernel, why (the manifest's ``kernel_reason``) and the pattern shares the sparse
    schedule chooser weighs (:func:`pattern_shares`; (1, 1) for dense code): worked out once
    per layer, then used by the schedule check, the compile job and the manifest."""

    kernel: str  # "dense", "sparse" or artifacts.PER_TARGET
    reason: str
    shares: tuple[float, float] = (1.0, 1.0)
    target_kernels: tuple[str, ...] = ()  # PER_TARGET: each build target's, in order

    def kernel_at(self, index: int) -> str:
        """The kernel of the build's ``index``-th target."""
        return self.target_kernels[index] if self.target_kernels else self.kernel


def choose_layer_kernel(
    layer: ConvLayer, options: BuildOptions, targets: Sequence[hl.Target]
) -> KernelChoice:
    """:func:`choose_kernel` for each target family of a multi-target build on its own, so that
    a library running GPU code on one device and CPU code on another runs on each the kernel its
    own rules pick (``arm-64-android-opencl,arm-64-android``: the OpenCL line and large-plane
    rule on the GPU, the quads on the CPU). Where the families' kernels differ the layer is
    built by the sparse generator, which gives the targets of ``dense_families`` dense code.

    The generator gives dense code by family (OpenCL or the CPU: a Halide target list shares
    arch, bits and OS), so the targets of one family decide together: a rule that depends on
    CPU features (:data:`TEMPORAL_QUADS_OFF_FAMILIES`) holds for an AVX-512 and AVX2 list only
    where it holds for both."""
    if options.kernel != "auto" or len(targets) < 2:
        return choose_kernel(layer, options, targets)
    shares = functools.cache(functools.partial(_shares, layer, "sparse"))
    families: dict[str, list[hl.Target]] = {}
    for target in targets:
        families.setdefault(family_of(target), []).append(target)
    chosen = {f: choose_kernel(layer, options, ts, shares) for f, ts in families.items()}
    each = [chosen[family_of(t)] for t in targets]
    if len({c.reason for c in each}) == 1:
        return each[0]
    reason = "; ".join(f"{family}: {c.kernel}, {c.reason}" for family, c in chosen.items())
    kernels = tuple(c.kernel for c in each)
    if len(set(kernels)) == 1:
        return dataclasses.replace(each[0], reason=reason)
    return KernelChoice(artifacts.PER_TARGET, reason, shares(), kernels)


def quads_beat_dense(
    layer: ConvLayer, targets: Sequence[hl.Target], overrides: str, shares: tuple[float, float]
) -> bool:
    """Whether a temporal-only kernel deeper than one frame (Kx1x1, K > 1) takes the sparse
    kernel whatever its kept fraction: every target's sparse schedule reads it in place as quads
    (CPU targets only, at least 4 input channels, a pattern whose quads are mostly kept, no
    override against it).

    There the quads beat the dense tiling even with nothing pruned, until dense code skipped the
    temporal padding; since, they tie with it. Measured, unpruned, every distinct 3x1x1 conv of
    R(2+1)D-18 at 16x112x112 (11 shapes, 45-1152 input channels), AVX2, per-round ratio in one
    process over 31 rounds (``bench/temporal_quads.py``): on Zen 3 0.71-0.98 of our dense
    code's time, median 0.84, the 45-channel stem's near 1 (0.98-1.04 over four runs), with
    dense code timed in torch's wake (before ``SETTLE_SECONDS``); AVX2 code on a Zen 5,
    settled, 0.50-0.84, median 0.73, and since the skip 0.96-1.11, median 1.01. Not 1x1x1
    convs: four pointwise shapes came out at 0.73-1.07. Not on AVX-512
    (:data:`TEMPORAL_QUADS_OFF_FAMILIES`). The GPU
    schedule has no quads (:func:`gpu_sparse_beats_dense` is the OpenCL rule)."""
    if temporal_rule_off(targets):
        return False
    schedules = _sparse_schedules(layer, targets, overrides, shares)
    return schedules is not None and all(s.input_layout == "interleaved" for s in schedules)


def temporal_rule_off(targets: Sequence[hl.Target]) -> str:
    """Why the temporal-only rule does not hold for some target's CPU family
    (:data:`TEMPORAL_QUADS_OFF_FAMILIES`), else ""."""
    for target in targets:
        family = target_family_knobs(target).family
        if family in TEMPORAL_QUADS_OFF_FAMILIES:
            return f"the in-place quads lose to dense code unpruned on {family}"
    return ""


def _sparse_schedules(
    layer: ConvLayer, targets: Sequence[hl.Target], overrides: str, shares: tuple[float, float]
) -> list[Any] | None:
    """Each target's sparse schedule for ``layer``; None for a bad ``--sparse-schedule``, which
    is reported for the layers that use it."""
    assert layer.sparsity is not None
    group = layer.sparsity.group
    try:
        return [choose_sparse_schedule(t, layer.spec, group, overrides, *shares) for t in targets]
    except ValueError:
        return None


def why_no_quads(
    layer: ConvLayer, targets: Sequence[hl.Target], overrides: str, shares: tuple[float, float]
) -> str:
    """Why a temporal-only layer missed the quads' rule (:func:`quads_beat_dense`), as the
    manifest's ``kernel_reason`` says it: the first of the rule's conditions that fails."""
    quad_fill = shares[1]
    if off := temporal_rule_off(targets):
        return off
    if any(family_of(t) == "opencl" for t in targets):
        return "the GPU schedule has no quads"
    if layer.spec.in_channels < QUAD:
        return f"its {layer.spec.in_channels} input channels are fewer than a quad's {QUAD}"
    if quad_fill < QUAD_MIN_FILL:
        return (
            f"its quads would multiply {1 - quad_fill:.0%} zeros (at most "
            f"{1 - QUAD_MIN_FILL:.0%} for the quads)"
        )
    schedules = _sparse_schedules(layer, targets, overrides, shares)
    if schedules is None:
        return "its --sparse-schedule is not valid for it"
    layouts = ", ".join(sorted({s.input_layout for s in schedules}))
    return f"--sparse-schedule gives it the {layouts} input layout"


def unused_zeros(layer: ConvLayer) -> str:
    """A note for a layer read as dense whose weight still holds many zeros: filter or channel
    pruning (torch's ``ln_structured``) and unstructured pruning usually zero no whole KGS
    unit, so the build computes those zeros; the note says so, and how to use them, rather
    than let a pruned model build silently as dense."""
    weight = layer.weight
    assert layer.sparsity is not None
    zeros = float(np.mean(weight == 0))
    if zeros < UNUSED_ZEROS_NOTE:
        return ""
    unit = "x".join(map(str, layer.sparsity.group))
    pruned_units = int((~kept_units(weight, layer.sparsity.group)).sum())
    if pruned_units:  # declared dense by the metadata
        return (
            f"; {zeros:.0%} of its weights are zero, filling {pruned_units} whole {unit} units, "
            f"but the {SPARSITY_METADATA_KEY} metadata declares it dense: computed (declare it "
            "kgs to skip them)"
        )
    filters = int(np.sum(~weight.reshape(weight.shape[0], -1).any(axis=1)))
    channels = int(np.sum(~weight.swapaxes(0, 1).reshape(weight.shape[1], -1).any(axis=1)))
    whole, fixes = [], []
    if filters:
        whole.append(f"{filters} of {weight.shape[0]} whole filters")
        fixes.append("remove the pruned filters from the model")
    if channels:
        whole.append(f"{channels} of {weight.shape[1]} whole input channels")
        fixes.append("remove the pruned input channels from the model")
    held = f" ({' and '.join(whole)})" if whole else ""
    fixes.append("prune to a KGS pattern: docs/pruning.md")
    return (
        f"; {zeros:.0%} of its weights are zero{held} but they fill no whole {unit} unit: "
        f"computed as dense ({', or '.join(fixes)})"
    )


def gpu_sparse_beats_dense(
    layer: ConvLayer, targets: Sequence[hl.Target], overrides: str, shares: tuple[float, float]
) -> bool:
    """Whether OpenCL ``targets`` give a conv the sparse kernel whatever its kept fraction: a
    kernel with spatial taps, at least ``GPU_SPARSE_MIN_CHANNELS`` input channels and an output
    plane of at least ``GPU_SPARSE_MIN_PLANE`` squared, on the schedule that was measured (x
    tiles on neighbouring work-items, a group's channels as one OpenCL vector, the padded copy;
    no override against it: forced in place, such convs took 1.10-2.45x the copy's time,
    ``bench/results/opencl_gpu_in_place_spatial.md``).

    There the sparse kernel (:data:`~rt3d_halide.generators.sparse_knobs.SPARSE_OPENCL`)
    beat the dense tiling with nothing pruned. Measured on an NVIDIA H100 through OpenCL, every
    distinct conv of C3D and R(2+1)D-18 at 16x112x112 unpruned, 8x4 groups
    (``bench/results/opencl_gpu_unpruned.md``): 0.38-0.85 of our dense code's time on the 12 such
    convs. It took 1.37-3.22 times as long on the other 6 with spatial taps (RGB stems, 7x7
    output planes) and, reading the padded copy, 2.68-5.75 on the three 1x1x1 convs; of the 11
    temporal-only convs two came out at 0.87 and 0.89, the rest 1.12-3.10 (read in place, 12
    of these pointwise and temporal convs took 0.97-2.26: opencl_gpu_in_place.md), so those
    keep the kept-fraction rule (:data:`GPU_SPARSE_BREAK_EVEN_KEPT`). Phone GPUs are not
    measured."""
    if not opencl_only(targets):
        return False
    spec = layer.spec
    _, out_h, out_w = spec.out_size
    if not (
        spec.kernel[1:] != (1, 1)
        and spec.in_channels >= GPU_SPARSE_MIN_CHANNELS
        and min(out_h, out_w) >= GPU_SPARSE_MIN_PLANE
    ):
        return False
    schedules = _sparse_schedules(layer, targets, overrides, shares)
    return schedules is not None and all(
        s.knobs.x_threads_inner
        and s.group_lanes in OPENCL_VECTOR_WIDTHS
        and s.input_layout == "planar"
        for s in schedules
    )


def opencl_only(targets: Sequence[hl.Target]) -> bool:
    """Whether every one of ``targets`` is OpenCL: where the GPU rules apply (per target in a
    multi-target build, :func:`choose_layer_kernel`)."""
    return bool(targets) and all(family_of(t) == "opencl" for t in targets)


def sparse_break_even(targets: Sequence[hl.Target]) -> float:
    """The break-even kept fraction of the dense-fallback rule for code on ``targets``: the
    OpenCL one when all are OpenCL, else the CPU one (a multi-target build decides per target,
    :func:`choose_layer_kernel`)."""
    if opencl_only(targets):
        return GPU_SPARSE_BREAK_EVEN_KEPT
    return SPARSE_BREAK_EVEN_KEPT


def choose_kernel(
    layer: ConvLayer,
    options: BuildOptions,
    targets: Sequence[hl.Target],
    sparse_shares: Callable[[], tuple[float, float]] | None = None,
) -> KernelChoice:
    """Dense or sparse code, by the rule the manifest documents per layer. ``sparse_shares``
    gives the layer's pattern shares (:func:`_shares`), worked out on first use and kept, so
    that choices for several targets read the weights once.

    An unpruned RGB stem stays dense: with its row copy x-innermost and a task spanning every
    channel block (:mod:`~rt3d_halide.generators.schedules`) the dense code took 0.81 and 0.77 of
    the entry-list kernel's time on C3D conv1 and R(2+1)D-18's 1x7x7 stem (per-round ratio in
    one process, 21-31 rounds)."""
    mode = options.kernel
    if mode not in KERNEL_MODES:
        raise BuildError(f"--kernel must be one of {', '.join(KERNEL_MODES)}, not {mode!r}")
    if mode != "auto":
        return KernelChoice(mode, f"--kernel {mode}", _shares(layer, mode))
    sparsity = layer.sparsity
    assert sparsity is not None
    spec = layer.spec
    shares = sparse_shares or functools.cache(functools.partial(_shares, layer, "sparse"))
    overrides = options.sparse_schedule
    temporal = interleaved_fits(spec) and spec.kernel[0] > 1
    if temporal and quads_beat_dense(layer, targets, overrides, shares()):
        return KernelChoice(
            "sparse",
            f"temporal-only {spec.kernel[0]}x1x1 kernel: the in-place quad kernel ties with or "
            "beats the dense tiling, pruned or not",
            shares(),
        )
    if opencl_only(targets) and gpu_sparse_beats_dense(layer, targets, overrides, shares()):
        return KernelChoice(
            "sparse",
            f"OpenCL, {spec.kernel[1]}x{spec.kernel[2]} taps over {spec.in_channels} "
            f"channels, output plane {spec.out_size[1]}x{spec.out_size[2]}: the sparse "
            "kernel beats the dense tiling, pruned or not",
            shares(),
        )
    note = ""
    if temporal:
        note = f"; temporal-only, but {why_no_quads(layer, targets, overrides, shares())}"
    if sparsity.scheme == "dense":
        return KernelChoice("dense", f"scheme dense ({sparsity.source}){unused_zeros(layer)}{note}")
    if opencl_only(targets) and spec.in_channels < GPU_SPARSE_MIN_INPUT_CHANNELS:
        return KernelChoice(
            "dense",
            f"OpenCL, {spec.in_channels} input channels (< {GPU_SPARSE_MIN_INPUT_CHANNELS}): "
            "dense code is faster at every kept fraction measured",
        )
    # What the sparse code executes, the lanes a group pads past the last filter included.
    share = sparsity.sparse_fraction
    what = f"sparse code's MACs {share:.3f} of dense"
    if f"{share:.3f}" != f"{sparsity.kept_fraction:.3f}":
        what += f" (kept {sparsity.kept_fraction:.3f}, plus the lanes padding the last group)"
    break_even = sparse_break_even(targets)
    if share > break_even:
        return KernelChoice(
            "dense", f"{what} > break-even {break_even}: dense code is faster{note}"
        )
    return KernelChoice("sparse", f"{what} <= break-even {break_even}", shares())


def _layer_job(
    layer: ConvLayer, choice: KernelChoice, target: BuildTarget, options: BuildOptions
) -> LayerJob:
    kernel = choice.kernel
    arrays = {"weight": layer.weight}
    if layer.bias is not None:
        arrays["bias"] = layer.bias
    params: tuple[tuple[str, str], ...] = ()
    if kernel == artifacts.PER_TARGET:
        dense = {
            family_of(t) for i, t in enumerate(target.targets) if choice.kernel_at(i) == "dense"
        }
        params = (("dense_families", ",".join(sorted(dense))), ("dense_schedule", options.schedule))
    if kernel != "dense":
        assert layer.sparsity is not None
        # The group travels in the weights file (and so in the compile cache key).
        arrays["group"] = np.asarray(layer.sparsity.group, dtype=np.float32)
    return LayerJob(
        generator=DENSE_GENERATOR if kernel == "dense" else SPARSE_GENERATOR,
        fn_name=layer.spec.name,
        spec_json=layer.spec.to_json(),
        arrays=arrays,
        target=target.generator_target(),
        schedule=options.schedule if kernel == "dense" else options.sparse_schedule,
        emit_assembly=options.keep_assembly,
        params=params,
    )


def _shares(layer: ConvLayer, kernel: str) -> tuple[float, float]:
    """What the sparse schedule chooser weighs (the generator derives the same numbers)."""
    if kernel != "sparse":
        return 1.0, 1.0
    assert layer.sparsity is not None
    return pattern_shares(layer.weight, layer.sparsity.group)


def _schedule(
    layer: ConvLayer,
    kernel: str,
    target: hl.Target,
    options: BuildOptions,
    shares: tuple[float, float],
) -> Any:
    if kernel == "sparse":
        assert layer.sparsity is not None
        group = layer.sparsity.group
        return choose_sparse_schedule(target, layer.spec, group, options.sparse_schedule, *shares)
    return choose_schedule(target, layer.spec, options.schedule)


def _function_entry(
    layer: ConvLayer, choice: KernelChoice, target: BuildTarget, options: BuildOptions
) -> dict[str, Any]:
    spec, kernel = layer.spec, choice.kernel
    assert layer.sparsity is not None
    io = {
        "input": {
            "name": "input",
            "onnx_tensor": layer.input_name,
            "dtype": "float32",
            "shape": artifacts.activation_shape(spec.input_shape()),
            "layout": "NTHWC",
        },
        "output": {
            "name": "output",
            "onnx_tensor": layer.output_name,
            "dtype": "float32",
            "shape": artifacts.activation_shape(spec.output_shape()),
            "layout": "NTHWC",
        },
    }
    return {
        "name": spec.name,
        "node": layer.node,
        "op": "Conv",
        "kernel": kernel,
        "target_kernels": {
            t.to_string(): choice.kernel_at(i) for i, t in enumerate(target.targets)
        },
        "kernel_reason": choice.reason,
        "sparsity": layer.sparsity.describe(),
        "fused_relu": spec.relu,
        **io,
        "arguments": [io["input"], io["output"]],
        "spec": {
            "in_channels": spec.in_channels,
            "out_channels": spec.out_channels,
            "in_size": list(spec.in_size),
            "kernel": list(spec.kernel),
            "stride": list(spec.stride),
            "dilation": list(spec.dilation),
            "pads_begin": list(spec.pads_begin),
            "pads_end": list(spec.pads_end),
            "bias": spec.has_bias,
        },
        "macs_per_sample": spec.macs(),
        "weight": {"onnx_initializer": layer.weight_name, "shape": list(layer.weight.shape)},
        "schedules": {
            t.to_string(): _schedule(
                layer, choice.kernel_at(i), t, options, choice.shares
            ).describe()
            for i, t in enumerate(target.targets)
        },
    }


def check_schedule(
    plan: ModelPlan, choices: list[KernelChoice], target: BuildTarget, options: BuildOptions
) -> None:
    """Resolves ``--schedule`` / ``--sparse-schedule`` for every layer and target before any
    compile starts.

    The generator subprocess would otherwise fail on each layer with a Python traceback. A flag
    that no layer's kernel uses is still checked against each target family's knobs, so that a
    typo does not pass silently (with a note that it applies to no layer); one that some layers
    use is checked on the targets whose code uses it (knob sets differ per family).
    """
    flags = {
        "dense": ("--schedule", options.schedule, target_family_knobs),
        "sparse": ("--sparse-schedule", options.sparse_schedule, sparse_family_knobs),
    }
    for kernel, (flag, text, family_knobs) in flags.items():
        if not text:
            continue
        _check_families(flag, text, [family_knobs(t).family for t in target.targets])
        per_target = [
            [
                (lay, c)
                for lay, c in zip(plan.layers, choices, strict=True)
                if c.kernel_at(i) == kernel
            ]
            for i in range(len(target.targets))
        ]
        used = any(per_target)
        for hl_target, pairs in zip(target.targets, per_target, strict=True):
            where = str(hl_target)
            try:
                if not used:
                    with_overrides(family_knobs(hl_target), text)
                for layer, choice in pairs:
                    where = f"{hl_target} (layer {layer.node!r})"
                    _schedule(layer, kernel, hl_target, options, choice.shares)
            except json.JSONDecodeError as exc:
                raise BuildError(f"{flag} {text!r} is not valid JSON: {exc}") from exc
            except Exception as exc:  # knob values are user input: any failure is theirs
                raise BuildError(f"{flag} {text!r} for {where}: {exc}") from exc
        if not used:
            _log(options, f"note: {flag} applies to no layer: every layer runs other code")


def _check_families(flag: str, text: str, families: list[str]) -> None:
    """Per-family overrides name only families the build has: a family of no target is a typo
    or a flag meant for another build, not something to drop silently."""
    try:
        per_family = family_overrides(text)
    except json.JSONDecodeError as exc:
        raise BuildError(f"{flag} {text!r} is not valid JSON: {exc}") from exc
    except ValueError as exc:
        raise BuildError(f"{flag} {text!r}: {exc}") from exc
    for family in per_family or {}:
        if family not in families:
            raise BuildError(
                f"{flag} {text!r}: no target of this build is {family} "
                f"(its families: {', '.join(dict.fromkeys(families))})"
            )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _log(options: BuildOptions, message: str) -> None:
    if not options.quiet:
        print(message, file=sys.stderr, flush=True)


def assemble(
    plan: ModelPlan,
    choices: list[KernelChoice],
    target: BuildTarget,
    compiled: list[LayerArtifacts],
    runtime: Path,
    options: BuildOptions,
    dest: Path,
) -> dict[str, Any]:
    (dest / "include").mkdir(parents=True)
    (dest / "lib").mkdir()
    merge_archives([c.library for c in compiled], dest / "lib" / f"lib{plan.name}.a")
    shutil.copy2(runtime, dest / "lib" / "libhalide_runtime.a")
    if options.keep_assembly:
        (dest / "asm").mkdir()
        for c in compiled:
            for asm in c.assembly:
                shutil.copy2(asm, dest / "asm" / asm.name)
    functions = [
        _function_entry(layer, choice, target, options)
        for layer, choice in zip(plan.layers, choices, strict=True)
    ]
    executed = {
        t.to_string(): sum(
            f["sparsity"]["sparse_macs_per_sample"]
            if f["target_kernels"][t.to_string()] == "sparse"
            else f["macs_per_sample"]
            for f in functions
        )
        for t in target.targets
    }
    opencl = "opencl" in target.families
    fallback = target.falls_back_from_opencl
    header = dest / "include" / f"{plan.name}.h"
    artifacts.write_header(header, plan.name, functions, opencl, fallback)
    artifacts.copy_runtime_headers(dest / "include")
    if fallback:
        artifacts.copy_opencl_fallback_header(dest / "include")
    artifacts.write_cmake_config(dest / "lib", plan.name, target.text, target.first)
    manifest = {
        "format": artifacts.MANIFEST_FORMAT,
        "model": plan.name,
        "source": {"path": str(plan.path), "sha256": _sha256(plan.path)},
        "target": target.text,
        "halide_targets": [t.to_string() for t in target.targets],
        "target_families": target.families,
        "library": f"lib/lib{plan.name}.a",
        "runtime": "lib/libhalide_runtime.a",
        "runtime_target": target.runtime_target().to_string(),
        "header": f"include/{plan.name}.h",
        **(
            {"opencl_fallback_header": f"include/{artifacts.OPENCL_FALLBACK_HEADER}"}
            if fallback
            else {}
        ),
        "cmake_package": f"lib/cmake/{plan.name}/{plan.name}Config.cmake",
        # The graph's input as its ONNX file declares it (its layout is the graph's, NCDHW as torch
        # exports a Conv3d model); each function gives its own input's shape and layout.
        "model_input": {"name": plan.input_name, "shape": plan.input_shape},
        "model_outputs": _model_outputs(plan, functions),
        "steps": plan.steps,
        "functions": functions,
        "host_ops": plan.host_ops,
        "host_constants": plan.host_constants,
        "host_weights": artifacts.write_host_weights(dest, plan.host_weights),
        "total_macs_per_sample": sum(layer.spec.macs() for layer in plan.layers),
        # By the first target's kernels: the code a device that has its features runs.
        "executed_macs_per_sample": executed[target.first.to_string()],
        "executed_macs_per_sample_by_target": executed,
        # Weighed against each layer's sparse_fraction, not its kept_fraction.
        "sparse_break_even_fraction": sparse_break_even([target.first]),
        "sparse_break_even_by_target": {
            t.to_string(): sparse_break_even([t]) for t in target.targets
        },
        "versions": artifacts.tool_versions(),
    }
    artifacts.write_manifest(dest / "manifest.json", manifest)
    return manifest


def _model_outputs(plan: ModelPlan, functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The graph's outputs: one that a function writes is in that function's layout and shape
    (channels innermost), any other in the graph's own, as the host op that writes it has it."""
    written = {f["output"]["onnx_tensor"]: f for f in functions}
    outputs = []
    for output in plan.outputs:
        function = written.get(output["name"])
        if function is None:
            outputs.append({**output, "layout": "as in the ONNX graph"})
        else:
            written_as = {key: function["output"][key] for key in ("shape", "layout")}
            outputs.append({**output, **written_as, "function": function["name"]})
    return outputs


def _check_out_dir(out: Path) -> None:
    """A build replaces only an earlier build or an empty directory, never the user's files,
    and finds out before compiling anything whether it can write there."""
    try:
        _check_out_path(out)
    except OSError as exc:  # an unreadable --out, say
        raise BuildError(f"--out {out}: {exc}") from exc


def _check_out_path(out: Path) -> None:
    cwd = Path.cwd().resolve()
    if out.resolve() in (cwd, *cwd.parents):
        raise BuildError(
            f"--out {out}: the current directory or one holding it; a build replaces its --out "
            "directory whole, so name a directory of its own (such as build/)"
        )
    if out.is_symlink() and not out.exists():
        raise BuildError(f"--out {out}: a symlink to nothing ({os.readlink(out)})")
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_build(out):
        raise BuildError(
            f"--out {out}: a non-empty directory that is not an rt3d_halide build; "
            "choose another path (a build replaces its --out directory whole)"
        )
    # The build writes beside --out as given (a symlink there is replaced, not followed).
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise BuildError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(f"--out {out}: cannot write in {parent}")
    # Permission bits do not tell all (root, a read-only or virtual file system): a directory
    # made and removed where the build will make its own says it before anything compiles.
    probe = parent / _hidden_name("probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise BuildError(f"--out {out}: cannot write in {parent}: {exc.strerror}") from exc
    longest = os.pathconf(parent, "PC_NAME_MAX")
    for part in out.absolute().relative_to(parent).parts:
        if 0 < longest < len(os.fsencode(part)):
            raise BuildError(f"--out {out}: a name longer than the {longest} bytes {parent} allows")


def _is_build(out: Path) -> bool:
    """Whether ``out`` holds an earlier build: a manifest of this tool's (any format version),
    not merely a file of that name (:func:`artifacts.read_manifest`)."""
    try:
        artifacts.read_manifest(out)
    except (OSError, ValueError):
        return False
    return True


def _hidden_name(kind: str) -> str:
    """A name for a directory beside --out while the build swaps it in: not derived from
    --out's own name, which may already be as long as the file system allows."""
    return f".rt3d_halide-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _replace_dir(new: Path, dest: Path) -> None:
    """Puts ``new`` at ``dest``; an older build there is removed only after the new one is in."""
    old = None
    if dest.exists():
        old = dest.with_name(_hidden_name("old"))
        dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None and old.is_symlink():  # --out was a link: it is replaced, not followed
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(
    model: Path | str = DEFAULT_MODEL,
    target: str = DEFAULT_TARGET,
    out: Path | str | None = None,
    *,
    name: str | None = None,
    jobs: int | None = None,
    schedule: str = "",
    keep_assembly: bool = False,
    quiet: bool = False,
    kernel: str = "auto",
    sparse_schedule: str = "",
) -> Path:
    """Builds ``model`` for ``target`` into ``out`` (default ``build/<target>``).

    Raises :class:`BuildError` for bad input and where the file system refuses the user's paths
    (--out, the compile cache); ``out`` is left as it was then.
    """
    build_target = parse_target(target)
    if jobs is None:
        jobs = os.cpu_count() or 1
    if jobs < 1:
        raise BuildError("--jobs must be >= 1")
    options = BuildOptions(schedule, keep_assembly, quiet, kernel, sparse_schedule)
    out = Path(out) if out else Path("build") / build_target.text
    _check_out_dir(out)
    started = time.monotonic()
    plan = plan_model(Path(model), name)
    if name and plan.name != name:
        _log(options, f"model name {name!r} is {plan.name!r} in C (letters, digits, underscores)")
    choices = [choose_layer_kernel(layer, options, build_target.targets) for layer in plan.layers]
    check_schedule(plan, choices, build_target, options)
    count = len(plan.layers)
    _log(options, f"{plan.name}: {count} conv layer{'s' * (count != 1)} for {build_target.text}")
    for note in batch_bound_reshapes(plan):
        _log(options, f"note: {note}")
    jobs_list = [
        _layer_job(layer, choice, build_target, options)
        for layer, choice in zip(plan.layers, choices, strict=True)
    ]

    chosen = {layer.spec.name: choice for layer, choice in zip(plan.layers, choices, strict=True)}

    def progress(done: int, total: int, result: LayerArtifacts) -> None:
        how = "cached" if result.cached else f"compiled in {result.seconds:.1f} s"
        choice = chosen[result.fn_name]
        kernel = "per target" if choice.kernel == artifacts.PER_TARGET else choice.kernel
        _log(options, f"  [{done}/{total}] {result.fn_name}: {kernel}, {how} ({choice.reason})")

    try:
        compiled = compile_layers(jobs_list, jobs, progress)
        runtime = compile_runtime(build_target.runtime_target().to_string())
        manifests: list[dict[str, Any]] = []  # what assemble wrote into the staging directory
        dropped = _write_out(
            out,
            lambda staging: manifests.append(
                assemble(plan, choices, build_target, compiled, runtime, options, staging)
            ),
        )
    except OSError as exc:
        if where := _users_path(exc, out):
            raise BuildError(f"{where}: {exc}") from exc
        raise
    if dropped:
        removed = listing(dropped, shown=5)
        _log(options, f"{plan.name}: removed with the earlier build in {out}/: {removed}")
    _log(options, _summary(manifests[0], build_target))
    _log(options, f"{plan.name}: wrote {out}/ in {time.monotonic() - started:.1f} s")
    return out


def batch_bound_reshapes(plan: ModelPlan) -> list[str]:
    """Host Reshapes whose constant shape starts with the graph's static batch (torch's
    ``x.view(x.size(0), -1)`` exported without a dynamic batch axis writes ``[1, -1]``): the
    functions take any batch, but an app running another through these would fail or mix
    clips, so the build says so."""
    batch = plan.input_shape[0] if plan.input_shape else None
    if not isinstance(batch, int) or batch < 1:
        return []
    notes = []
    for op in plan.host_ops:
        if op["op"] != "Reshape" or len(op["inputs"]) < 2:
            continue
        name = op["inputs"][1]
        constant = plan.host_constants.get(name, {})
        stored = plan.host_weights.get(constant.get("initializer", name))
        values = constant.get("values") if stored is None else stored.ravel().tolist()
        if values and values[0] == batch:
            notes.append(
                f"host op {op['node']!r} reshapes to {values}: the exported batch of {batch} is "
                "fixed there (the functions take any batch; export with a dynamic batch axis, "
                "or change that constant, to run others)"
            )
    return notes


def _summary(manifest: dict[str, Any], target: BuildTarget) -> str:
    """What pruning bought, in one line, as the manifest counts it: the first target's sparse
    layers and the conv MACs its code runs per clip against dense code's."""
    first = target.first.to_string()
    functions = manifest["functions"]
    sparse = sum(f["target_kernels"][first] == "sparse" for f in functions)
    executed, total = manifest["executed_macs_per_sample"], manifest["total_macs_per_sample"]
    on = f" on {target.text.split(',')[0].strip()}" if len(target.targets) > 1 else ""
    if not executed:
        macs = "every conv weight pruned, no conv MACs left"
    elif executed < total:
        macs = f"{total / executed:.2f}x fewer conv MACs than dense code"
    elif executed > total:  # sparse code forced where its groups' padding lanes cost more
        macs = f"{executed / total:.2f}x more conv MACs than dense code"
    else:
        macs = "as many conv MACs as dense code"
    layers = len(functions)
    return (
        f"{manifest['model']}: {sparse} of {layers} conv layer{'s' * (layers != 1)} sparse{on}, "
        f"{macs} ({executed:,} of {total:,} per clip)"
    )


def _write_out(out: Path, write: Callable[[Path], object]) -> list[str]:
    """Has ``write`` fill a directory beside ``out`` and swaps it in; on failure nothing it
    made stays, the directories made to hold ``out`` included. Returns the files of an
    earlier build there that the new one does not hold (gone with it: the user's own notes,
    an earlier --keep-assembly's asm/), relative to ``out``."""
    made: list[Path] = []
    try:
        for parent in reversed(out.absolute().parents):
            if parent.is_dir():
                continue
            try:
                parent.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                continue
            except OSError as exc:
                raise BuildError(f"--out {out}: cannot make {parent}: {exc.strerror}") from exc
            made.append(parent)  # only what this build made goes again on failure
        # Made with the umask's mode (mkdtemp's 0700 would keep the build from other users).
        staging = out.parent / _hidden_name("tmp")
        staging.mkdir()
        try:
            write(staging)
            dropped = _files_only_in(out, staging)
            _replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except BaseException:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return dropped


def _files_only_in(old: Path, new: Path) -> list[str]:
    """What lies under ``old`` with no counterpart under ``new``, relative paths (a directory
    once, as ``name/``; links not followed)."""
    if old.is_symlink() or not old.is_dir():
        return []
    found = []

    def walk(directory: Path) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            rel = Path(entry.path).relative_to(old)
            if not os.path.lexists(new / rel):
                found.append(f"{rel}/" if entry.is_dir(follow_symlinks=False) else str(rel))
            elif entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path))

    walk(old)
    return found


def _users_path(exc: OSError, out: Path) -> str:
    """Which of the user's paths the file system refused (beside --out, the compile cache: no
    space, no permission, a cache path that is a file), named as the user gave it, which is the
    user's to fix; "" for a file of the package itself, a bug to see with its traceback (the
    directories made to hold --out report their own refusals)."""
    names = [Path(os.fsdecode(n)).resolve() for n in (exc.filename, exc.filename2) if n]
    cache = cache_root()
    if any(name.is_relative_to(cache.resolve()) for name in names):
        return f"the compile cache {cache}"
    if any(name.is_relative_to(out.absolute().parent.resolve()) for name in names):
        return f"--out {out}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    given = vars(args).pop("model_file")
    if given is not None and args.model is not None:
        parser.error("give the model once: as MODEL or as --model")
    args.model = given or args.model or DEFAULT_MODEL
    try:
        build(**vars(args))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
