"""Which kernel each Conv layer gets: dense code, sparse code, or per target of a multi-target
build. The rules (the dense-fallback break-even and the layers that take sparse code pruned or
not) and the measurements behind them; each choice's reason becomes the manifest's
``kernel_reason``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import halide as hl
import numpy as np

from rt3d_halide.generators.conv3d_quads import QUAD
from rt3d_halide.generators.conv3d_sparse import pattern_shares
from rt3d_halide.generators.layout import interleaved_fits
from rt3d_halide.generators.schedules import target_family_knobs
from rt3d_halide.generators.sparse_choice import QUAD_MIN_FILL, choose_sparse_schedule
from rt3d_halide.generators.sparse_knobs import OPENCL_VECTOR_WIDTHS, QUAD_MAX_ACCUMULATORS
from rt3d_halide.pruning.patterns import SPARSITY_METADATA_KEY, kept_units

from . import artifacts
from .errors import BuildError
from .onnx_import import ConvLayer
from .targets import family_of

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
    layer: ConvLayer, mode: str, sparse_schedule: str, targets: Sequence[hl.Target]
) -> KernelChoice:
    """``mode`` and ``sparse_schedule``: the build's ``--kernel`` and ``--sparse-schedule``.
    :func:`choose_kernel` for each target family of a multi-target build on its own, so that
    a library running GPU code on one device and CPU code on another runs on each the kernel its
    own rules pick (``arm-64-android-opencl,arm-64-android``: the OpenCL line and large-plane
    rule on the GPU, the quads on the CPU). Where the families' kernels differ the layer is
    built by the sparse generator, which gives the targets of ``dense_families`` dense code.

    The generator gives dense code by family (OpenCL or the CPU: a Halide target list shares
    arch, bits and OS), so the targets of one family decide together: a rule that depends on
    CPU features (:data:`TEMPORAL_QUADS_OFF_FAMILIES`) holds for an AVX-512 and AVX2 list only
    where it holds for both."""
    if mode != "auto" or len(targets) < 2:
        return choose_kernel(layer, mode, sparse_schedule, targets)
    shares = functools.cache(functools.partial(_shares, layer, "sparse"))
    families: dict[str, list[hl.Target]] = {}
    for target in targets:
        families.setdefault(family_of(target), []).append(target)
    chosen = {
        f: choose_kernel(layer, mode, sparse_schedule, ts, shares) for f, ts in families.items()
    }
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
    if not overrides:  # the chooser's own fallback
        return (
            f"its groups of {layer.sparsity.group[0]} filters take more accumulators a "
            f"position than the quads' block holds ({QUAD_MAX_ACCUMULATORS})"
        )
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
    mode: str,
    sparse_schedule: str,
    targets: Sequence[hl.Target],
    sparse_shares: Callable[[], tuple[float, float]] | None = None,
) -> KernelChoice:
    """Dense or sparse code, by the rule the manifest documents per layer, for ``--kernel
    mode`` and ``--sparse-schedule sparse_schedule``. ``sparse_shares``
    gives the layer's pattern shares (:func:`_shares`), worked out on first use and kept, so
    that choices for several targets read the weights once.

    An unpruned RGB stem stays dense: with its row copy x-innermost and a task spanning every
    channel block (:mod:`~rt3d_halide.generators.schedules`) the dense code took 0.81 and 0.77 of
    the entry-list kernel's time on C3D conv1 and R(2+1)D-18's 1x7x7 stem (per-round ratio in
    one process, 21-31 rounds)."""
    if mode not in KERNEL_MODES:
        raise BuildError(f"--kernel must be one of {', '.join(KERNEL_MODES)}, not {mode!r}")
    if mode != "auto":
        return KernelChoice(mode, f"--kernel {mode}", _shares(layer, mode))
    sparsity = layer.sparsity
    assert sparsity is not None
    spec = layer.spec
    shares = sparse_shares or functools.cache(functools.partial(_shares, layer, "sparse"))
    temporal = interleaved_fits(spec) and spec.kernel[0] > 1
    if temporal and quads_beat_dense(layer, targets, sparse_schedule, shares()):
        return KernelChoice(
            "sparse",
            f"temporal-only {spec.kernel[0]}x1x1 kernel: the in-place quad kernel ties with or "
            "beats the dense tiling, pruned or not",
            shares(),
        )
    if opencl_only(targets) and gpu_sparse_beats_dense(layer, targets, sparse_schedule, shares()):
        return KernelChoice(
            "sparse",
            f"OpenCL, {spec.kernel[1]}x{spec.kernel[2]} taps over {spec.in_channels} "
            f"channels, output plane {spec.out_size[1]}x{spec.out_size[2]}: the sparse "
            "kernel beats the dense tiling, pruned or not",
            shares(),
        )
    note = ""
    if temporal:
        note = f"; temporal-only, but {why_no_quads(layer, targets, sparse_schedule, shares())}"
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


def _shares(layer: ConvLayer, kernel: str) -> tuple[float, float]:
    """What the sparse schedule chooser weighs (the generator derives the same numbers)."""
    if kernel != "sparse":
        return 1.0, 1.0
    assert layer.sparsity is not None
    return pattern_shares(layer.weight, layer.sparsity.group)
