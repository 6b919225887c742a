"""Torch-side geometry of kernel groups: unit norms, unit masks, unit costs.

The semantics are those of :mod:`rt3d_halide.pruning.patterns` (the torch-free contract); this
module only gives differentiable torch versions, so that regularizers can back-propagate through
unit norms.

A *unit* is what a scheme keeps or removes as a whole: for ``kgs`` one kernel location of one
kernel group, unit array ``(P, Q, Kd, Kh, Kw)``; for ``vanilla`` one whole group, ``(P, Q)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .patterns import DEFAULT_GROUP, check_group, check_scheme

# Keeps the gradient of a unit norm finite at exactly zero (d||w||/dw is undefined there).
NORM_FLOOR = 1e-12


@dataclass(frozen=True)
class LayerSparsity:
    """The declared scheme and group of one conv layer."""

    scheme: str = "kgs"
    group: tuple[int, int] = DEFAULT_GROUP

    def __post_init__(self) -> None:
        check_scheme(self.scheme)
        object.__setattr__(self, "group", check_group(self.group))

    def unit_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        g_m, g_n = self.group
        p, q = math.ceil(weight_shape[0] / g_m), math.ceil(weight_shape[1] / g_n)
        if self.scheme == "kgs":
            return (p, q, *weight_shape[2:])
        if self.scheme == "vanilla":
            return (p, q)
        raise ValueError("a dense layer has no prunable units")


def _padded_groups(weight: torch.Tensor, group: tuple[int, int]) -> torch.Tensor:
    """View ``weight`` as ``(P, gM, Q, gN, Kd, Kh, Kw)`` with the last groups zero-padded."""
    if weight.dim() != 5:
        raise ValueError(f"Conv3d weight must have rank 5, got shape {tuple(weight.shape)}")
    g_m, g_n = group
    m, n = weight.shape[:2]
    p, q = math.ceil(m / g_m), math.ceil(n / g_n)
    padded = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, q * g_n - n, 0, p * g_m - m))
    return padded.reshape(p, g_m, q, g_n, *weight.shape[2:])


def unit_sq_norms(weight: torch.Tensor, spec: LayerSparsity) -> torch.Tensor:
    """Squared L2 norm of every unit (differentiable), in float32 at least: in a float16
    model's own type, :data:`NORM_FLOOR` was 0, and the reweighted penalty's ``1 / (||W||^2 +
    eps)`` passed float16's 65504 on every unit below a norm of 0.004, as regularization drives
    them, and made the loss infinite."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    sq = _padded_groups(weight, spec.group).pow(2).sum(dim=(1, 3))
    if spec.scheme == "vanilla":
        return sq.sum(dim=(2, 3, 4))
    if spec.scheme == "kgs":
        return sq
    raise ValueError("a dense layer has no prunable units")


def unit_norms(weight: torch.Tensor, spec: LayerSparsity) -> torch.Tensor:
    """L2 norm of every unit, with a gradient that stays finite at zero."""
    return torch.sqrt(unit_sq_norms(weight, spec) + NORM_FLOOR)


def unit_mask_to_weight_mask(
    units: torch.Tensor, weight_shape: tuple[int, ...], spec: LayerSparsity
) -> torch.Tensor:
    """Expand a unit mask (``spec.unit_shape``) to a float mask of the weight's shape."""
    expected = spec.unit_shape(weight_shape)
    if tuple(units.shape) != expected:
        raise ValueError(f"unit mask shape {tuple(units.shape)} != expected {expected}")
    g_m, g_n = spec.group
    m, n, *kernel = weight_shape
    if spec.scheme == "vanilla":
        units = units.reshape(*units.shape, 1, 1, 1).expand(*units.shape, *kernel)
    full = units.repeat_interleave(g_m, dim=0).repeat_interleave(g_n, dim=1)
    return full[:m, :n].to(torch.float32).contiguous()


def unit_channel_counts(weight_shape: tuple[int, ...], spec: LayerSparsity) -> torch.Tensor:
    """``(P, Q)`` number of real (unpadded) weights per kernel location of each group."""
    g_m, g_n = spec.group
    m, n = weight_shape[:2]
    rows = torch.tensor([min(g_m, m - p * g_m) for p in range(math.ceil(m / g_m))])
    cols = torch.tensor([min(g_n, n - q * g_n) for q in range(math.ceil(n / g_n))])
    return rows[:, None] * cols[None, :]


def unit_sizes(weight_shape: tuple[int, ...], spec: LayerSparsity) -> torch.Tensor:
    """Real (unpadded) weights per unit, shaped like :func:`unit_norms`: fewer in the groups
    that the channel counts do not fill."""
    counts = unit_channel_counts(weight_shape, spec)
    if spec.scheme == "vanilla":
        return counts * math.prod(weight_shape[2:])
    return counts.reshape(*counts.shape, 1, 1, 1).expand(*counts.shape, *weight_shape[2:])


def unit_scaled_norms(weight: torch.Tensor, spec: LayerSparsity) -> torch.Tensor:
    """Every unit's norm as if it held as many weights as the layer's largest unit (scaled by
    the square root of that over its real weights): a unit of a truncated group (R(2+1)D's 45
    or 921 channels) is not ranked below full ones merely for holding fewer weights (by norm,
    the last groups were pruned first). Full units keep their norm exactly."""
    sizes = unit_sizes(tuple(weight.shape), spec).to(torch.float64)
    scale = (sizes.max() / sizes).sqrt().to(weight.device, weight.dtype)
    return unit_norms(weight, spec) * scale


def unit_macs(
    weight_shape: tuple[int, ...], spec: LayerSparsity, output_volume: int
) -> torch.Tensor:
    """MACs one unit costs per sample, counted the dense way (padding positions included).

    Padded channels of the last group cost nothing, so units of a truncated group are cheaper.
    """
    per_location = unit_channel_counts(weight_shape, spec).to(torch.float64) * output_volume
    if spec.scheme == "vanilla":
        return per_location * math.prod(weight_shape[2:])
    return per_location.reshape(*per_location.shape, 1, 1, 1).expand(
        *per_location.shape, *weight_shape[2:]
    )
