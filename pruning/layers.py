"""The prunable layers of a model and what each of their units costs."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import listing
from .flops import layer_macs, per_module
from .groups import LayerSparsity, unit_macs
from .masks import is_masked


@dataclass
class PrunableLayer:
    """A Conv3d the pruner may sparsify, with its unit costs fixed at prepare time."""

    name: str
    conv: nn.Conv3d
    spec: LayerSparsity
    dense_macs: int
    unit_macs: torch.Tensor  # per sample, shape spec.unit_shape(weight shape)
    cost_weight: torch.Tensor  # unit_macs / mean over every prunable unit (penalty weights)
    reference_norm: float = 1.0  # RMS unit norm of the dense layer: makes layers comparable
    aliases: tuple[str, ...] = ()  # other names the model reaches this conv by

    @property
    def weight(self) -> torch.Tensor:
        """The trainable weight (``weight_orig`` once a mask is installed)."""
        return self.conv.weight_orig if is_masked(self.conv) else self.conv.weight

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


def check_not_wrapped(model: nn.Module, taker: str) -> None:
    """The pruner holds the model's own modules and the export traces them, which a wrapper
    hides behind its own forward: torch.compile's cannot be traced, DataParallel's refuses the
    meta device, and torch.fx traces none of them."""
    wrapped = getattr(model, "_orig_mod", None)
    if isinstance(wrapped, nn.Module):
        raise ValueError(
            f"the model is torch.compile's wrapper: give {taker} the module itself "
            "(model._orig_mod); training through the compiled model works"
        )
    wrappers = (
        nn.DataParallel,
        nn.parallel.DistributedDataParallel,
        torch.optim.swa_utils.AveragedModel,
    )
    if isinstance(model, wrappers):
        raise ValueError(
            f"the model is wrapped in {type(model).__name__}: give {taker} the module itself "
            "(model.module)"
        )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A glob matches ``name`` itself; a plain name also matches the convs of the module it
    names (``stem`` for ``stem.0``), so that globs keep meaning what they always did
    (``*.0`` is a conv whose own name ends in ``.0``)."""
    return any(
        fnmatch.fnmatchcase(name, p) or (not _GLOB.search(p) and name.startswith(p + "."))
        for p in patterns
    )


_GLOB = re.compile(r"[*?\[]")

# Hooks of torch.nn.utils' old weight_norm and spectral_norm, which recompute ``weight`` from
# other parameters before every forward.
_WEIGHT_HOOKS = ("WeightNorm", "SpectralNorm")


def _check_stored_weight(name: str, conv: nn.Conv3d) -> None:
    """The pruner masks the conv's stored weight: one that a parametrization or weight_norm
    computes is not it (a meta-device error at prepare, or a TypeError at prune)."""
    hooks = {type(hook).__name__ for hook in conv._forward_pre_hooks.values()}
    if parametrize.is_parametrized(conv, "weight") or hooks & set(_WEIGHT_HOOKS):
        raise ValueError(
            f"conv {name!r} computes its weight (weight_norm, spectral_norm or another "
            "parametrization), and the pruner masks a stored weight: remove it first "
            "(torch.nn.utils.parametrize.remove_parametrizations, or remove_weight_norm), or "
            "exclude the conv"
        )


def find_prunable_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    spec: LayerSparsity,
    exclude: Sequence[str] = (),
) -> tuple[list[PrunableLayer], int]:
    """Prunable Conv3d layers and all conv MACs. ``exclude`` holds fnmatch patterns of conv
    names, or names of modules whose convs all stay dense."""
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv3d)]
    # A conv module reached by two names (nn.Sequential(conv, act, conv)) is one layer,
    # named by the first; excluded by either.
    first = {id(m): n for n, m in modules.items()}
    names: dict[str, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Conv3d):
            names.setdefault(first[id(module)], []).append(name)

    def excluded(conv: str, patterns: Sequence[str] = exclude) -> bool:
        return any(_matches(name, patterns) for name in names[conv])

    for name in convs:
        if modules[name].groups == 1 and not excluded(name):
            _check_stored_weight(name, modules[name])
    records = per_module(layer_macs(model, input_shape))
    unknown = [p for p in exclude if not any(excluded(n, [p]) for n in convs)]
    if unknown:
        raise ValueError(
            f"exclude pattern {unknown[0]!r} matches no conv of the model (globs match conv "
            "names; a module's plain name covers its convs); its convs: "
            + (listing(convs, shown=6) or "none")
        )
    layers = []
    for name, record in records.items():
        conv = modules[name]
        if not isinstance(conv, nn.Conv3d) or conv.groups != 1 or excluded(name):
            continue
        costs = unit_macs(record.weight_shape, spec, record.output_volume)
        aliases = tuple(n for n in names[name] if n != name)
        layers.append(PrunableLayer(name, conv, spec, record.macs, costs, costs, aliases=aliases))
    if not layers:
        raise ValueError("the model has no prunable Conv3d layer (groups=1, not excluded)")
    # A weight another module also holds (tied; excluded or not, a conv or not) would take
    # the mask in place under the other's name too.
    holders: dict[int, list[str]] = {}
    for name, module in modules.items():
        for key, parameter in module.named_parameters(prefix=name, recurse=False):
            holders.setdefault(id(parameter), []).append(key)
    for layer in layers:
        own = {f"{layer.name}.{key}" for key, _ in layer.conv.named_parameters(recurse=False)}
        others = [h for h in holders.get(id(layer.weight), []) if h not in own]
        if others:
            raise ValueError(
                f"conv {layer.name!r} shares its weight tensor with {others[0]!r} (tied): the "
                "pruner masks a conv's weight in place, which the other would take too; untie "
                "them, or exclude the conv"
            )
    mean_cost = torch.cat([layer.unit_macs.flatten() for layer in layers]).mean()
    for layer in layers:
        # On the weight's device, where the penalty multiplies it every training step.
        layer.cost_weight = (layer.unit_macs / mean_cost).to(layer.weight.device, torch.float32)
    total_conv = sum(r.macs for r in records.values() if r.kind == "conv")
    return layers, total_conv
