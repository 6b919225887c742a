"""Choosing which units to remove so the model's conv MACs drop by a global factor.

Each layer offers *removal items* in the order it would give them up: single units (unbalanced),
or one kernel location from every group at once (balanced). Items from all layers are merged by
score and removed until the MAC target is met, so the target is overshot by less than one item
and each layer's rate falls out of the global ranking rather than being set by hand.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class LayerCandidates:
    """What selection needs to know about one layer."""

    name: str
    scores: torch.Tensor  # per unit; lower is removed first
    unit_macs: torch.Tensor  # same shape as scores
    balanced: bool = False
    min_keep: float = 0.0  # fraction of the layer's prunable MACs that must stay
    max_keep: float = 1.0  # fraction of the layer's prunable MACs that may stay at most


@dataclass
class _Item:
    score: float
    macs: float
    units: list[int]  # flat indices into the layer's unit array


def _items(layer: LayerCandidates) -> list[_Item]:
    """The layer's removal items, weakest first, as plain Python numbers: selection touches
    every unit of a model (864k on C3D with 8x4 groups), where indexing tensors one element at
    a time had taken most of a minute."""
    scores = layer.scores.detach().double().reshape(*layer.scores.shape[:2], -1)
    macs = layer.unit_macs.double().reshape(scores.shape)
    flat_index = torch.arange(scores.numel()).reshape(scores.shape)
    if not layer.balanced:
        order = torch.argsort(scores.flatten(), stable=True)
        return [
            _Item(score, unit_macs, [unit])
            for score, unit_macs, unit in zip(
                scores.flatten()[order].tolist(),
                macs.flatten()[order].tolist(),
                order.tolist(),
                strict=True,
            )
        ]
    # Balanced: slice s removes the s-th weakest location of every group.
    order = torch.argsort(scores, dim=-1, stable=True)
    sorted_scores = torch.gather(scores, -1, order)
    sorted_macs = torch.gather(macs, -1, order)
    sorted_index = torch.gather(flat_index, -1, order)
    return [
        _Item(
            float(sorted_scores[..., s].mean()),
            float(sorted_macs[..., s].sum()),
            sorted_index[..., s].flatten().tolist(),
        )
        for s in range(scores.shape[-1])
    ]


class UnreachableTarget(ValueError):
    """The MAC target lies past what the layers' bounds let selection remove: ``removable``
    MACs per sample at most."""

    def __init__(self, message: str, removable: float) -> None:
        super().__init__(message)
        self.removable = removable


def select_units(
    layers: Sequence[LayerCandidates], required_macs: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Keep-masks (bool, shaped like ``scores``) removing at least ``required_macs`` per sample.

    Returns the masks and the MACs actually removed, which exceed ``required_macs`` by less than
    the cost of the last item removed. Raises :class:`UnreachableTarget` when the bounds make
    the target unreachable (ValueError for bounds that contradict themselves).
    """
    if required_macs < 0:
        raise ValueError(f"required MAC reduction must be >= 0, got {required_macs}")
    keep = {layer.name: [True] * layer.scores.numel() for layer in layers}
    totals = {layer.name: float(layer.unit_macs.double().sum()) for layer in layers}
    removed_by_layer = {layer.name: 0.0 for layer in layers}
    heap: list[tuple[float, int, int]] = []
    items = {}
    removed = 0.0

    def take(layer: LayerCandidates, item: _Item) -> None:
        nonlocal removed
        kept = keep[layer.name]
        for unit in item.units:
            kept[unit] = False
        removed_by_layer[layer.name] += item.macs
        removed += item.macs

    for index, layer in enumerate(layers):
        if not 0.0 <= layer.min_keep <= layer.max_keep <= 1.0:
            raise ValueError(
                f"{layer.name}: need 0 <= min_keep <= max_keep <= 1, "
                f"got {layer.min_keep}, {layer.max_keep}"
            )
        items[index] = _items(layer)
        total = totals[layer.name]
        position = 0
        # Down to max_keep, in score order, skipping any item that would pass min_keep.
        while removed_by_layer[layer.name] < (1.0 - layer.max_keep) * total - 1e-9:
            if position == len(items[index]):
                raise ValueError(
                    f"{layer.name}: removing its units in score order cannot keep between "
                    f"{layer.min_keep} and {layer.max_keep} of its MACs; widen its bounds"
                )
            item = items[index][position]
            if removed_by_layer[layer.name] + item.macs <= (1.0 - layer.min_keep) * total + 1e-9:
                take(layer, item)
            position += 1
        if position < len(items[index]):
            heapq.heappush(heap, (items[index][position].score, index, position))
    while removed < required_macs and heap:
        _, index, position = heapq.heappop(heap)
        layer, item = layers[index], items[index][position]
        total = totals[layer.name]
        # At the layer's min_keep bound this item is skipped; a later, cheaper one (a unit of a
        # padded group) may still fit.
        if removed_by_layer[layer.name] + item.macs <= (1.0 - layer.min_keep) * total + 1e-9:
            take(layer, item)
        if position + 1 < len(items[index]):
            heapq.heappush(heap, (items[index][position + 1].score, index, position + 1))
    if removed < required_macs:
        raise UnreachableTarget(
            f"cannot remove {required_macs:.4g} MACs per sample: the per-layer bounds allow "
            f"only {removed:.4g}",
            removed,
        )
    masks = {
        layer.name: torch.tensor(keep[layer.name], dtype=torch.bool).reshape(layer.scores.shape)
        for layer in layers
    }
    return masks, removed
