"""Masks held the torch way: ``weight_orig`` + ``weight_mask`` buffer + forward pre-hook.

We reuse :mod:`torch.nn.utils.prune` so a pruned model stays an ordinary ``nn.Module`` that any
torch tool understands, and record the layer's declared scheme on the module itself (attribute
:data:`SPARSITY_ATTR`) so that export needs nothing but the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune

from .groups import LayerSparsity

SPARSITY_ATTR = "rt3d_sparsity"


def is_masked(conv: nn.Module) -> bool:
    return prune.is_pruned(conv) and hasattr(conv, "weight_mask")


def sparsity_of(conv: nn.Module) -> LayerSparsity | None:
    """The scheme and group declared for ``conv``, or None if it was never pruned."""
    return getattr(conv, SPARSITY_ATTR, None)


@torch.inference_mode(False)
def set_mask(conv: nn.Conv3d, mask: torch.Tensor, spec: LayerSparsity) -> None:
    """Install or replace the weight mask of ``conv`` (1 keeps a weight, 0 removes it).

    Out of inference mode, where ``prune()`` may be called from: a mask buffer made there is an
    inference tensor, which the next training step's backward cannot save."""
    weight = conv.weight_orig if is_masked(conv) else conv.weight
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}"
        )
    mask = mask.to(device=weight.device, dtype=weight.dtype, copy=True)
    if is_masked(conv):
        conv.weight_mask.copy_(mask)
    else:
        order = list(conv._parameters)
        prune.custom_from_mask(conv, "weight", mask)
        _restore_order(conv, order, "weight", "weight_orig")
    setattr(conv, SPARSITY_ATTR, spec)
    remask_(conv)


def get_mask(conv: nn.Module) -> torch.Tensor | None:
    return conv.weight_mask if is_masked(conv) else None


@torch.no_grad()
def refresh_weight_(conv: nn.Module) -> None:
    """Recompute the derived ``weight`` as a graph leaf.

    After a forward pass it is a non-leaf tensor, which ``copy.deepcopy`` refuses; the pre-hook
    recomputes it at the next forward anyway.
    """
    if is_masked(conv):
        conv.weight = conv.weight_orig * conv.weight_mask


@torch.no_grad()
def remask_(conv: nn.Module) -> None:
    """Zero the stored weights under the mask, so optimiser state cannot revive them."""
    if is_masked(conv):
        conv.weight_orig.mul_(conv.weight_mask)
        refresh_weight_(conv)


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on a masked model after a forward pass."""
    for module in model.modules():
        refresh_weight_(module)
    return copy.deepcopy(model)


def mask_gradient_(conv: nn.Module) -> None:
    """Zero gradients of pruned weights (the reparametrization already does; momentum need not)."""
    if is_masked(conv) and conv.weight_orig.grad is not None:
        conv.weight_orig.grad.mul_(conv.weight_mask)


def bake(conv: nn.Module) -> None:
    """Make the mask permanent: ``weight`` becomes a plain parameter with exact zeros."""
    if is_masked(conv):
        order = list(conv._parameters)
        prune.remove(conv, "weight")
        _restore_order(conv, order, "weight_orig", "weight")


def _restore_order(conv: nn.Module, order: list[str], old: str, new: str) -> None:
    """Put the renamed weight back where it stood among the conv's parameters.

    torch's pruning re-registers it after the bias; an optimizer's state maps parameters by
    position, so an optimizer made on one side of masking would load a state saved on the other
    with the bias's momentum on the weight. Kept in place, ``model.parameters()`` has one order
    whether masks are installed or baked.
    """
    params = conv._parameters
    ordered = {(new if name == old else name): None for name in order}
    reordered = {name: params[name] for name in ordered if name in params}
    reordered |= {name: value for name, value in params.items() if name not in reordered}
    params.clear()
    params.update(reordered)
