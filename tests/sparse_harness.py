"""Sparse Conv3d cases end to end: random valid patterns, the sparse generator, torch as reference.

``check_sparse(case, family)`` draws a KGS pattern of the case's kind, zeroes the pruned weights,
builds a one-Conv model declaring that scheme and group with the real build (``kernel="sparse"``)
for the family's target, runs it on NaN-poisoned outputs (x86 and OpenCL
in-process, ARM under qemu-aarch64) and compares with torch conv3d on the masked weights in float64.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from conv_harness import (
    FAMILY_TARGETS,
    ConvCase,
    assert_kernel,
    assert_matches,
    random_case_data,
    reference,
    run_generated,
)
from rt3d_halide.pruning.patterns import (
    SPARSITY_METADATA_KEY,
    sparsity_metadata,
    unit_mask_to_weight_mask,
)

from rt3d_halide.build import build
from rt3d_halide.layer_model import conv_layer_onnx

# balanced: every output group keeps the same number of entries (the straight path);
# unbalanced: per-group keep rates, with all-pruned, fully kept and whole pruned output groups;
# vanilla: kernel groups kept or removed whole; dense: nothing pruned.
PATTERN_KINDS = ("balanced", "unbalanced", "vanilla", "dense")


@dataclasses.dataclass(frozen=True)
class SparseCase:
    conv: ConvCase
    group: tuple[int, int]
    kind: str
    keep: float = 0.5
    schedule: str = ""  # sparse knob overrides (--sparse-schedule)

    def counts(self) -> tuple[int, int]:
        g_m, g_n = self.group
        return -(-self.conv.out_channels // g_m), -(-self.conv.in_channels // g_n)


def random_units(case: SparseCase) -> np.ndarray:
    """A (P, Q, Kd, Kh, Kw) kept-unit mask of the case's kind."""
    rng = np.random.default_rng(case.conv.seed + 1)
    p, q = case.counts()
    kernel = case.conv.kernel
    locations = int(np.prod(kernel))
    if case.kind == "dense":
        return np.ones((p, q, *kernel), dtype=bool)
    if case.kind == "vanilla":
        groups = rng.random((p, q)) < case.keep
        return np.broadcast_to(groups[:, :, None, None, None], (p, q, *kernel)).copy()
    if case.kind == "balanced":
        kept = max(1, round(case.keep * locations))
        units = np.zeros((p, q, locations), dtype=bool)
        for index in np.ndindex(p, q):
            units[index][rng.choice(locations, kept, replace=False)] = True
        return units.reshape(p, q, *kernel)
    # Unbalanced: each kernel group its own rate, then the corner cases forced in at distinct
    # kernel groups (each present whenever the grid has room for it): a fully kept kernel group,
    # an all-pruned one, and a whole output group pruned (any but the kept one's, when p > 1).
    rates = rng.random((p, q, 1))
    units = rng.random((p, q, locations)) < rates
    kept_row, kept_col = int(rng.integers(p)), int(rng.integers(q))
    units[kept_row, kept_col] = True
    pruned_row = (kept_row + 1 + int(rng.integers(p - 1))) % p if p > 1 else kept_row
    if p > 1:
        units[pruned_row] = False
    if q > 1:  # (with one column, the pruned output group is the all-pruned kernel group)
        units[kept_row, (kept_col + 1) % q] = False
    return units.reshape(p, q, *kernel)


def masked_weight(case: SparseCase, weight: np.ndarray) -> np.ndarray:
    mask = unit_mask_to_weight_mask(random_units(case), weight.shape, case.group)
    return np.where(mask, weight, np.float32(0)).astype(np.float32)


def build_sparse_layer(
    case: SparseCase, weight: np.ndarray, bias: np.ndarray | None, target: str, work: Path
) -> Path:
    """The real build of a one-Conv model whose metadata declares the case's scheme and group.

    Sparse code is forced, so that "dense" (nothing pruned) cases run the sparse generator too.
    """
    scheme = {"vanilla": "vanilla", "dense": "dense"}.get(case.kind, "kgs")
    metadata = {SPARSITY_METADATA_KEY: sparsity_metadata({"w": (scheme, case.group)})}
    model = conv_layer_onnx(case.conv.spec(), weight, bias, case.conv.batch, metadata)
    onnx.save(model, str(work / "case.onnx"))
    built = build(
        work / "case.onnx",
        target,
        work / "build",
        name="case",
        jobs=1,
        quiet=True,
        kernel="sparse",
        sparse_schedule=case.schedule,
    )
    assert_kernel(built, "sparse")
    _assert_layout_taken(built, case.schedule)
    return built


def _assert_layout_taken(build_dir: Path, schedule: str) -> None:
    """A forced ``input_layout`` (not "auto") is the kernel every target runs: dropped, the
    case would test another kernel under its name. (Other knobs are fitted to the layer as
    sparse_knobs.py documents: lanes to a divisor of gM, masked padding where it fits.)"""
    layout = json.loads(schedule).get("input_layout", "auto") if schedule else "auto"
    if layout == "auto":
        return
    for function in json.loads((build_dir / "manifest.json").read_text())["functions"]:
        for target, taken in function["schedules"].items():
            assert taken["input_layout"] == layout, f"{target}: {taken['input_layout']!r}"


def check_sparse(case: SparseCase, family: str, target: str = "") -> float:
    """Builds ``case`` for ``target`` (default: the family's) and runs it on ``family``; asserts
    and returns the relative error."""
    x, weight, bias = random_case_data(case.conv)
    weight = masked_weight(case, weight)
    with tempfile.TemporaryDirectory(prefix="rt3d-sparse-") as tmp:
        target = target or FAMILY_TARGETS[family]
        build_dir = build_sparse_layer(case, weight, bias, target, Path(tmp))
        out = run_generated(case.conv, family, build_dir, x)
    return assert_matches(out, reference(case.conv, x, weight, bias), case.conv, family)
