"""Kernel-group sparsity patterns, shared by the pruner and the build driver.

This module is deliberately torch-free (numpy and onnx only) so that ``rt3d_halide.build`` can
import it without the pruning extra. It fixes the semantics both halves agree on:

* A Conv3d weight ``W`` has shape ``(M, N, Kd, Kh, Kw)``. With group ``(gM, gN)`` the kernel group
  ``(p, q)`` covers filters ``[p*gM, (p+1)*gM)`` and input channels ``[q*gN, (q+1)*gN)``; the last
  group along an axis is truncated to the real channel count (equivalently, padded with zeros).
  ``P = ceil(M / gM)`` and ``Q = ceil(N / gN)``.
* A KGS unit is ``(p, q, d, h, w)``: the column of (up to) ``gM*gN`` weights at one kernel location
  of one group. It is kept iff any weight in it is non-zero.
* Vanilla: a whole group (all kernel locations) is kept or removed together.
* Dense: no structure is claimed.

The ONNX model carries the declared scheme of each conv under the ``rt3d.sparsity`` metadata key
(see :data:`SPARSITY_METADATA_KEY`); the zeros of the weights carry the pattern itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import listing

SCHEMES = ("dense", "vanilla", "kgs")
SPARSITY_METADATA_KEY = "rt3d.sparsity"
SPARSITY_METADATA_VERSION = 1
DEFAULT_GROUP = (8, 4)


def check_group(group: Any) -> tuple[int, int]:
    """Normalise a group shape, rejecting anything that is not two positive integers (a truth
    value is none: metadata's ``[true, 4]`` is not ``[1, 4]``)."""
    wrong = ValueError(f"group must be two positive integers (gM, gN), got {group!r}")
    try:
        values = list(group)
    except TypeError:
        raise wrong from None
    integers = all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) for v in values
    )
    if len(values) != 2 or not integers or min(values) <= 0:
        raise wrong
    return int(values[0]), int(values[1])


def check_group_fits(
    scheme: str, group: tuple[int, int], shape: tuple[int, ...], name: str
) -> tuple[int, int]:
    """A declared group must not exceed its layer both ways. A truncated last group is part of
    the contract; a group larger than the layer in both dimensions holds the whole layer, which
    only metadata meant for another layer would say (the exporter writes groups clipped).
    Returns the group clipped to the layer, as the build reads it: past the layer a group only
    pads, holding the same units (and a huge one would ask numpy for its padding)."""
    m, n = shape[:2]
    if scheme != "dense" and group[0] > m and group[1] > n:
        raise ValueError(
            f"{name}: declared {scheme} group {list(group)} does not fit the layer ({m} filters "
            f"x {n} input channels): it is larger in both dimensions"
        )
    return clipped_group(group, (m, n))


def clipped_group(group: tuple[int, int], weight_shape: Sequence[int]) -> tuple[int, int]:
    """``group`` no larger than the layer (M filters, N input channels): the same units, since
    a group dimension past the layer's holds it whole either way. A 3 -> 6 stem pruned with
    8x4 groups is declared 6x3: the build refuses a declared group larger than its layer in
    both dimensions, which it reads as metadata meant for another layer."""
    return min(group[0], weight_shape[0]), min(group[1], weight_shape[1])


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown sparsity scheme {scheme!r}; expected one of {SCHEMES}")
    return scheme


def group_counts(shape: tuple[int, ...], group: tuple[int, int]) -> tuple[int, int]:
    """Number of kernel groups ``(P, Q)`` along filters and input channels (last one padded)."""
    g_m, g_n = check_group(group)
    return math.ceil(shape[0] / g_m), math.ceil(shape[1] / g_n)


@contextlib.contextmanager
def _named(name: str) -> Iterator[None]:
    """A ValueError meanwhile names the layer ``name`` (the checks of a weight know no name)."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _check_weight(weight: np.ndarray) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 5:
        raise ValueError(
            f"Conv3d weight must have rank 5 (M, N, Kd, Kh, Kw), got shape {weight.shape}"
        )
    if not np.issubdtype(weight.dtype, np.number):
        raise ValueError(f"weight must be numeric, got dtype {weight.dtype}")
    if not np.all(np.isfinite(weight)):
        raise ValueError("weight contains NaN or infinite values")
    return weight


def _grouped_nonzero(weight: np.ndarray, group: tuple[int, int]) -> np.ndarray:
    """Non-zero indicator reshaped to ``(P, gM, Q, gN, Kd, Kh, Kw)`` with zero padding."""
    g_m, g_n = check_group(group)
    m, n, *kernel = weight.shape
    p, q = group_counts(weight.shape, (g_m, g_n))
    padded = np.zeros((p * g_m, q * g_n, *kernel), dtype=bool)
    padded[:m, :n] = weight != 0
    return padded.reshape(p, g_m, q, g_n, *kernel)


def kept_units(weight: np.ndarray, group: tuple[int, int]) -> np.ndarray:
    """Boolean ``(P, Q, Kd, Kh, Kw)`` array: which KGS units hold any non-zero weight."""
    weight = _check_weight(weight)
    return _grouped_nonzero(weight, group).any(axis=(1, 3))


def kept_groups(weight: np.ndarray, group: tuple[int, int]) -> np.ndarray:
    """Boolean ``(P, Q)`` array: which kernel groups hold any non-zero weight."""
    return kept_units(weight, group).any(axis=(2, 3, 4))


def unit_mask_to_weight_mask(
    units: np.ndarray, weight_shape: tuple[int, ...], group: tuple[int, int]
) -> np.ndarray:
    """Expand a ``(P, Q, Kd, Kh, Kw)`` unit mask to a boolean mask of the weight's shape."""
    g_m, g_n = check_group(group)
    m, n, *kernel = weight_shape
    p, q = group_counts(weight_shape, (g_m, g_n))
    units = np.asarray(units, dtype=bool)
    if units.shape != (p, q, *kernel):
        raise ValueError(
            f"unit mask shape {units.shape} does not match weight {tuple(weight_shape)} "
            f"with group {(g_m, g_n)} (expected {(p, q, *kernel)})"
        )
    full = np.repeat(np.repeat(units, g_m, axis=0), g_n, axis=1)
    return full[:m, :n]


def locations_per_group(units: np.ndarray) -> np.ndarray:
    """``(P, Q)`` count of kept kernel locations in each group."""
    return np.asarray(units, dtype=bool).sum(axis=(2, 3, 4))


def is_balanced(units: np.ndarray) -> bool:
    """True when every group of the layer keeps the same number of kernel locations."""
    counts = locations_per_group(units)
    return bool(counts.size == 0 or np.all(counts == counts.flat[0]))


@dataclass(frozen=True)
class LayerPattern:
    """A layer's pattern as re-derived from its zeros."""

    name: str
    scheme: str
    group: tuple[int, int]
    shape: tuple[int, ...]
    units: np.ndarray

    @property
    def kept_fraction(self) -> float:
        """Share of the KGS units kept (1.0 for an untouched layer). Not weighted by MACs: the
        build's manifest ``kept_fraction`` is, and differs where the group does not divide the
        channels (a truncated group's units hold fewer weights)."""
        return float(self.units.mean()) if self.units.size else 1.0

    @property
    def balanced(self) -> bool:
        return is_balanced(self.units)

    def summary(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "group": list(self.group),
            "shape": list(self.shape),
            "kept_units": int(self.units.sum()),
            "total_units": int(self.units.size),
            "kept_groups": int(self.units.any(axis=(2, 3, 4)).sum()),
            "total_groups": int(self.units.shape[0] * self.units.shape[1]),
            "balanced": self.balanced,
        }


def validate_pattern(
    weight: np.ndarray, scheme: str, group: tuple[int, int], name: str = "weight"
) -> LayerPattern:
    """Re-derive a layer's pattern from its zeros and check the declared scheme describes it.

    Any zero pattern is a valid KGS pattern (vanilla and dense are special cases of it), and any
    weights are valid for ``dense``. A ``vanilla`` layer must not hold a partially pruned group:
    a group with some all-zero kernel-location columns and some non-zero ones is a KGS pattern
    mislabelled as vanilla, and the generator would silently compute the dead columns.
    """
    with _named(name):
        check_scheme(scheme)
        group = check_group(group)
        weight = _check_weight(weight)
    units = kept_units(weight, group)
    if scheme == "vanilla":
        counts = locations_per_group(units)
        full = int(np.prod(weight.shape[2:]))
        partial = np.argwhere((counts > 0) & (counts < full))
        if partial.size:
            p, q = (int(v) for v in partial[0])
            raise ValueError(
                f"{name}: declared vanilla with group {group}, but kernel group (p={p}, q={q}) "
                f"keeps {int(counts[p, q])} of {full} kernel locations "
                f"({len(partial)} partially pruned groups in all)"
            )
    return LayerPattern(name=name, scheme=scheme, group=group, shape=weight.shape, units=units)


def sparsity_metadata(layers: Mapping[str, tuple[str, tuple[int, int]]]) -> str:
    """The JSON string stored under ``rt3d.sparsity``: name -> (scheme, group)."""
    body = {
        "version": SPARSITY_METADATA_VERSION,
        "layers": {
            name: {"scheme": check_scheme(scheme), "group": list(check_group(group))}
            for name, (scheme, group) in layers.items()
        },
    }
    return json.dumps(body, sort_keys=True)


def parse_sparsity_metadata(text: str) -> dict[str, tuple[str, tuple[int, int]]]:
    """Parse and validate an ``rt3d.sparsity`` JSON string into name -> (scheme, group)."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:  # (nested past the parser's depth)
        raise ValueError(f"{SPARSITY_METADATA_KEY} is not valid JSON: {err}") from None
    version = body.get("version") if isinstance(body, dict) else None
    if isinstance(version, bool) or version != SPARSITY_METADATA_VERSION:  # true == 1
        raise ValueError(
            f"{SPARSITY_METADATA_KEY} must be an object with version "
            f"{SPARSITY_METADATA_VERSION}, got {str(body)[:80]!r}"
        )
    layers = body.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{SPARSITY_METADATA_KEY}: 'layers' must be an object")
    parsed = {}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or set(entry) != {"scheme", "group"}:
            raise ValueError(
                f"{SPARSITY_METADATA_KEY}: layer {name!r} must have exactly 'scheme' and 'group'"
            )
        try:
            parsed[name] = (check_scheme(entry["scheme"]), check_group(entry["group"]))
        except ValueError as err:
            raise ValueError(f"{SPARSITY_METADATA_KEY}: layer {name!r}: {err}") from None
    return parsed


def inferred_scheme(
    weight: np.ndarray, group: tuple[int, int] = DEFAULT_GROUP, name: str = "weight"
) -> str:
    """The scheme of a Conv3d weight that no metadata declares: ``kgs`` when a whole unit of
    ``group`` is zero, else ``dense`` (the build's reading with the default group, and the
    exporter's for convs the pruner did not touch). Bad weights are refused naming ``name``,
    as :func:`validate_pattern` refuses them."""
    with _named(name):
        units = kept_units(weight, group)
    return "dense" if units.all() else "kgs"


def conv_weight_arrays(model: Any) -> dict[str, np.ndarray]:
    """Every 3D Conv node's weight, by the name of the Conv's weight input (the key the
    metadata uses), resolved as the build resolves it: an initializer, a Constant node's
    tensor, or an Identity of either (torch's exporter puts one before the second of two convs
    whose weights are equal)."""
    from onnx import numpy_helper

    arrays = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:  # in graph order: an Identity of a Constant follows it
        if node.op_type == "Identity" and node.input and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
        tensors = [a.t for a in node.attribute if a.name == "value"]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and tensors:
            arrays[node.output[0]] = tensors[0]
    weights = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in arrays:
            weight = numpy_helper.to_array(arrays[node.input[1]])
            if weight.ndim == 5:
                weights[node.input[1]] = weight
    return weights


def check_onnx_sparsity(path: str | Path) -> dict[str, LayerPattern]:
    """Check an ONNX file against the ``rt3d.sparsity`` contract, as the build reads it.

    Every layer named in the metadata must be the weight of a 3D Conv node, its declared group
    must fit the layer, and its zeros must form a valid pattern of the declared scheme and
    group. A Conv node the metadata does not name (every one, in a file without the metadata)
    is inferred as the build infers it (:func:`inferred_scheme`). Returns the derived pattern
    per conv weight; raises ValueError naming the layer on any violation.
    """
    import onnx

    model = onnx.load(str(path))
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    declared = (
        parse_sparsity_metadata(metadata[SPARSITY_METADATA_KEY])
        if SPARSITY_METADATA_KEY in metadata
        else {}
    )
    weights = conv_weight_arrays(model)
    unknown = sorted(set(declared) - set(weights))
    if unknown:
        known = listing([repr(name) for name in weights], shown=3) or "none"
        raise ValueError(
            f"{path}: {SPARSITY_METADATA_KEY} names {unknown[0]!r}, which is not the weight "
            f"of any 3D Conv node (their weights: {known})"
        )
    patterns = {}
    for name, weight in weights.items():
        if name in declared:
            scheme, group = declared[name]
            group = check_group_fits(scheme, group, weight.shape, name)
        else:
            scheme, group = inferred_scheme(weight, name=name), DEFAULT_GROUP
        patterns[name] = validate_pattern(weight, scheme, group, name=name)
    return patterns
