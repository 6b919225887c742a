"""MAC counting from shapes alone.

The forward pass runs on the ``meta`` device (shapes, no arithmetic), so counting C3D at
3x16x112x112 costs milliseconds and needs no memory for activations. Counts are per sample and
dense: every output position of a conv costs ``(in/groups) * Kd*Kh*Kw`` MACs, padding included,
which is the convention behind the published figures (C3D 38.5 G, R(2+1)D-18 40.5 G).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .masks import remask_

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class LayerMacs:
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    output_volume: int  # output positions per sample and channel: what a weight multiplies over
    macs: int


def _layer_macs(name: str, module: nn.Module, output: torch.Tensor) -> LayerMacs:
    """One call's MACs, from its whole output: the sample is one clip, but a forward may fold
    frames or sub-clips into the batch axis (a per-frame Conv2d on ``(T, C, H, W)``), whose
    every item a weight multiplies over. Counting from the second axis took such a conv's MACs
    divided by T, and the pruner's target with them."""
    if isinstance(module, nn.Linear):
        macs = output.numel() * module.in_features
        return LayerMacs(name, "linear", (module.out_features, module.in_features), 1, macs)
    kernel = math.prod(module.kernel_size)
    weight_shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    macs = output.numel() * (module.in_channels // module.groups) * kernel
    return LayerMacs(name, "conv", weight_shape, output.numel() // module.out_channels, macs)


def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> list[LayerMacs]:
    """Per-layer MACs for one sample of ``input_shape`` (C, D, H, W) or (1, C, D, H, W)."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 4:
        shape = (1, *shape)
    if len(shape) != 5 or shape[0] != 1 or min(shape) <= 0:
        raise ValueError(f"input_shape must be (C, D, H, W) or (1, C, D, H, W), got {input_shape}")
    records: list[LayerMacs] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        records.append(_layer_macs(names[module], module, output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
    tensors = [*model.named_parameters(), *model.named_buffers()]
    state = {name: torch.empty_like(t, device="meta") for name, t in tensors}
    floating = [t for _, t in tensors if t.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.float32
    device = floating[0].device if floating else torch.device("cpu")
    # In eval mode: a batch of one through a BatchNorm in training mode fails where the last
    # feature map is 1x1x1 (no statistics to take), though the model trains on larger batches.
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            try:  # on the meta device: shapes alone, no arithmetic, whatever the model's size
                # Not tie_weights: it also swaps a module reached by two names (a conv applied
                # twice) under each name, and the second swap's "original" was the first's
                # meta tensor, which it put back for good. A weight tied across modules keeps
                # its real tensor in the second module here, which shapes on meta still take.
                torch.func.functional_call(
                    model,
                    state,
                    (torch.empty(shape, dtype=dtype, device="meta"),),
                    tie_weights=False,
                )
            except (RuntimeError, NotImplementedError) as err:
                # A forward that makes or reads real tensors (a constant kept as a plain
                # attribute or made in forward, .item()) runs once for real instead; torch's
                # errors there name the meta device, a shape that does not fit does not.
                if "meta" not in str(err).lower():
                    raise
                records.clear()
                model(torch.zeros(shape, dtype=dtype, device=device))
    except (RuntimeError, NotImplementedError) as err:  # the caller's input shape does not fit
        raise ValueError(
            f"the model's forward fails on input_shape {tuple(input_shape)} (C, D, H, W): {err}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
            remask_(module)
    return records


def per_module(records: list[LayerMacs]) -> dict[str, LayerMacs]:
    """``records`` summed per module: a module called more than once in a forward (a conv
    applied twice, its weight shared) costs each call's MACs, and each of its weights is
    multiplied over every call's output positions (``output_volume``)."""
    merged: dict[str, LayerMacs] = {}
    for record in records:
        first = merged.get(record.name)
        if first is None:
            merged[record.name] = record
            continue
        merged[record.name] = dataclasses.replace(
            first,
            output_volume=first.output_volume + record.output_volume,
            macs=first.macs + record.macs,
        )
    return merged


def count_macs(model: nn.Module, input_shape: Sequence[int], *, convs_only: bool = False) -> int:
    """Total dense MACs per sample (convs and linears, or convs only)."""
    return sum(r.macs for r in layer_macs(model, input_shape) if r.kind == "conv" or not convs_only)


def conv_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Dense MACs per conv layer, keyed by module name (every call of a shared conv)."""
    records = per_module(layer_macs(model, input_shape))
    return {name: r.macs for name, r in records.items() if r.kind == "conv"}
