"""Sparsity-inducing penalties over pruning units (the policy half of the pruner).

All penalties are FLOPs-aware: a unit's term is weighted by the MACs that unit costs (normalised to
mean 1 over the prunable units), so one strength pushes hardest where removing weights saves most
compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .groups import unit_norms
from .layers import PrunableLayer


class Regularizer:
    """No penalty: the magnitude-pruning baseline prunes the dense weights as they are."""

    def penalty(self, layers: Sequence[PrunableLayer]) -> torch.Tensor:
        return torch.zeros(())

    def reweight(self, layers: Sequence[PrunableLayer]) -> None:
        """Nothing to update for a fixed penalty."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A stateless penalty ignores saved state."""


def _cost(layer: PrunableLayer) -> torch.Tensor:
    """The layer's unit costs on its weight's device: made there
    (:func:`~.layers.find_prunable_layers`), moved only for a model moved after ``prepare``."""
    return layer.cost_weight.to(layer.weight.device)


@dataclass
class GroupLasso(Regularizer):
    """Plain group lasso: ``strength * sum_u cost_u * ||W_u||`` (the paper's baseline)."""

    strength: float = 5e-4

    def __post_init__(self) -> None:
        if not 0 <= self.strength < math.inf:  # NaN too
            raise ValueError(f"penalty strength must be a finite number >= 0, got {self.strength}")

    def penalty(self, layers: Sequence[PrunableLayer]) -> torch.Tensor:
        terms = [(_cost(layer) * unit_norms(layer.weight, layer.spec)).sum() for layer in layers]
        return self.strength * torch.stack(terms).sum() if terms else torch.zeros(())


@dataclass
class ReweightedGroupLasso(Regularizer):
    """Reweighted group lasso (RT3D): ``strength * sum_u cost_u * P_u * ||W_u||``.

    ``P_u = 1 / (||W_u||^2 + eps)`` is refreshed by :meth:`reweight` and held constant (detached)
    in between, while the gradient flows through ``||W_u||``. The gradient on a unit then has
    magnitude ``strength * cost_u * P_u``, which grows as the unit shrinks: small units are driven
    to zero while large ones are barely touched, approximating an L0 penalty (Candes et al. 2008).
    """

    strength: float = 5e-4
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (0 <= self.strength < math.inf and 0 < self.eps < math.inf):  # NaN too
            raise ValueError(
                f"need a finite strength >= 0 and a finite eps > 0, got {self.strength}, {self.eps}"
            )
        self.weights: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def reweight(self, layers: Sequence[PrunableLayer]) -> None:
        for layer in layers:
            norms = unit_norms(layer.weight, layer.spec)
            self.weights[layer.name] = 1.0 / (norms.pow(2) + self.eps)

    def penalty(self, layers: Sequence[PrunableLayer]) -> torch.Tensor:
        if not self.weights:
            self.reweight(layers)
        terms = [
            (_cost(layer) * self._weights(layer) * unit_norms(layer.weight, layer.spec)).sum()
            for layer in layers
        ]
        return self.strength * torch.stack(terms).sum() if terms else torch.zeros(())

    def _weights(self, layer: PrunableLayer) -> torch.Tensor:
        """``P`` on the layer's device: a resumed run loads them from a checkpoint onto the
        CPU, while its model may train on a GPU. Moved once, then kept there."""
        weights = self.weights[layer.name]
        if weights.device != layer.weight.device:
            weights = self.weights[layer.name] = weights.to(layer.weight.device)
        return weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"reweight.{name}": w.clone() for name, w in self.weights.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights = {
            name.removeprefix("reweight."): w.clone()
            for name, w in state.items()
            if name.startswith("reweight.")
        }


ALGORITHMS = ("magnitude", "group_lasso", "reweighted")


def make_regularizer(algorithm: str, strength: float = 5e-4, eps: float = 1e-6) -> Regularizer:
    if algorithm == "magnitude":
        return Regularizer()
    if algorithm == "group_lasso":
        return GroupLasso(strength)
    if algorithm == "reweighted":
        return ReweightedGroupLasso(strength, eps)
    raise ValueError(f"unknown pruning algorithm {algorithm!r}; expected one of {ALGORITHMS}")
