"""The pruner lifecycle: prepare, regularize, reweight, prune, fine-tune, finalize.

It fits a user's own training loop::

    pruner = Pruner(model, (3, 16, 112, 112), target_rate=3.6).prepare()
    for step, (x, y) in enumerate(loader):              # regularization phase
        loss = F.cross_entropy(model(x), y) + pruner.regularization()
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        if step % 100 == 99:
            pruner.reweight()
    print(pruner.prune().format_table())                 # hard pruning to the MAC target
    for x, y in loader:                                  # masked fine-tuning
        F.cross_entropy(model(x), y).backward()
        pruner.fine_tune_step(optimizer); optimizer.zero_grad()
    pruner.finalize()                                    # zeros baked in, ready to export

The mechanism (groups, masks, MAC accounting) lives in :mod:`groups`, :mod:`masks` and
:mod:`layers`; the policy (penalty and schedule) in :mod:`regularizers` and :mod:`selection`.
Under torch.distributed every rank computes the same thing from the same weights, and rank 0's
penalty weights and masks are broadcast anyway so that floating-point ties cannot split ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .groups import LayerSparsity, unit_mask_to_weight_mask, unit_scaled_norms, unit_sq_norms
from .layers import PrunableLayer, check_not_wrapped, find_prunable_layers
from .masks import bake, get_mask, is_masked, mask_gradient_, remask_, set_mask
from .regularizers import ReweightedGroupLasso, make_regularizer
from .report import LayerReport, PruningReport
from .selection import LayerCandidates, UnreachableTarget, select_units


def _broadcast_(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)


def _number(name: str, value: object) -> float:
    """``value`` as a float: a real number of Python's, numpy's, or a one-element tensor; not a
    string, a truth value or a complex number."""
    dtype = str(getattr(value, "dtype", ""))
    text_or_truth = isinstance(value, str | bytes | bytearray | bool)  # numpy bools: dtype
    if text_or_truth or "bool" in dtype or "complex" in dtype or isinstance(value, complex):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc


def _rounded_down(rate: float) -> str:
    """``rate`` to three significant digits, rounded down: a rate the message offers is one
    the selection reaches (1.9751 is 1.97, not 1.98)."""
    if not math.isfinite(rate):
        return "inf"
    unit = 10.0 ** (math.floor(math.log10(rate)) - 2)
    return f"{math.floor(rate / unit + 1e-9) * unit:.3g}"


def _keep_bounds(name: str, bounds: object) -> tuple[float, float]:
    """A ``layer_bounds`` value as (min_keep, max_keep) in [0, 1]: any pair of numbers (a tuple,
    a list, a numpy array, a tensor)."""
    wrong = ValueError(
        f"layer_bounds[{name!r}] must be (min_keep, max_keep), 0 <= min <= max <= 1, got {bounds!r}"
    )
    if isinstance(bounds, str | bytes | bytearray | Mapping):
        raise wrong
    try:
        pair = [_number(name, b) for b in bounds]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise wrong from None
    if len(pair) != 2 or not 0 <= pair[0] <= pair[1] <= 1:
        raise wrong
    return pair[0], pair[1]


class Pruner:
    """FLOPs-targeted structured pruning of a model's Conv3d layers.

    ``target_rate`` is the factor by which the model's conv MACs (excluded layers included, as
    dense) must shrink. ``algorithm`` picks the penalty: ``reweighted`` (RT3D), ``group_lasso``
    or ``magnitude`` (none). ``layer_bounds`` maps a layer name to ``(min_keep, max_keep)``
    fractions of its MACs; other layers keep at least ``min_keep``. ``flops_exponent`` sets how
    strongly a unit's cost lowers its score when layers compete for the global budget (0, the
    default: normalised magnitude, so FLOPs-awareness comes from the cost-weighted penalty;
    1: magnitude per MAC, which in a small 3D CNN strips the full-resolution early layers and
    wrecks accuracy).
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        target_rate: float,
        scheme: str = "kgs",
        group: Sequence[int] = (8, 4),
        algorithm: str = "reweighted",
        balanced: bool = False,
        exclude: Sequence[str] = (),
        layer_bounds: Mapping[str, tuple[float, float]] | None = None,
        min_keep: float = 0.05,
        strength: float = 5e-4,
        eps: float = 1e-6,
        flops_exponent: float = 0.0,
    ) -> None:
        target_rate = _number("target_rate", target_rate)
        if not 1.0 <= target_rate < float("inf"):  # NaN and inf too
            raise ValueError(
                "target_rate is a reduction factor and must be a finite number >= 1, "
                f"got {target_rate}"
            )
        if scheme not in ("kgs", "vanilla"):
            raise ValueError(f"scheme must be 'kgs' or 'vanilla', got {scheme!r}")
        if not isinstance(balanced, bool | np.bool_):  # "no" would be true
            raise ValueError(f"balanced must be True or False, got {balanced!r}")
        if balanced and scheme != "kgs":
            raise ValueError(
                "balanced applies to the kgs scheme only (a vanilla group is one unit)"
            )
        if isinstance(exclude, str):  # a tuple of it would be its letters
            raise ValueError(f"exclude must be a list of layer names, got the string {exclude!r}")
        min_keep = _number("min_keep", min_keep)
        if not 0.0 <= min_keep <= 1.0:
            raise ValueError(f"min_keep must be in [0, 1], got {min_keep}")
        flops_exponent = _number("flops_exponent", flops_exponent)
        if not math.isfinite(flops_exponent):  # NaN scores would drop units in index order
            raise ValueError(f"flops_exponent must be a finite number, got {flops_exponent}")
        check_not_wrapped(model, "the Pruner")
        self.model = model
        self.input_shape = tuple(input_shape)
        self.target_rate = float(target_rate)
        self.spec = LayerSparsity(scheme, group)  # checks the group
        self.balanced = bool(balanced)
        self.exclude = tuple(exclude)
        self.layer_bounds = {
            name: _keep_bounds(name, bounds) for name, bounds in (layer_bounds or {}).items()
        }
        self.min_keep = min_keep
        self.flops_exponent = flops_exponent
        strength, eps = _number("strength", strength), _number("eps", eps)
        self.regularizer = make_regularizer(algorithm, strength, eps)
        self.algorithm = algorithm
        self.layers: list[PrunableLayer] = []
        self.conv_macs_before = 0
        self._finalized = False

    def prepare(self) -> Pruner:
        """Find prunable layers, their unit costs and reference scales; set initial penalties."""
        self.layers, self.conv_macs_before = find_prunable_layers(
            self.model, self.input_shape, self.spec, self.exclude
        )
        # A conv reached by two names (nn.Sequential(conv, act, conv)) is bounded by either.
        names = {n: layer.name for layer in self.layers for n in (layer.name, *layer.aliases)}
        unknown = sorted(set(self.layer_bounds) - set(names))
        if unknown:
            raise ValueError(f"layer_bounds names {unknown[0]!r}, which is not a prunable layer")
        bounds: dict[str, tuple[float, float]] = {}
        for name, pair in self.layer_bounds.items():
            if bounds.setdefault(names[name], pair) != pair:
                raise ValueError(f"layer_bounds bounds {names[name]!r} twice, by two names")
        self.layer_bounds = bounds
        with torch.no_grad():
            for layer in self.layers:
                reference = unit_scaled_norms(layer.weight, layer.spec).pow(2).mean().sqrt()
                _broadcast_(reference)
                layer.reference_norm = max(float(reference), 1e-12)
        self.reweight()
        return self

    def _require_prepared(self) -> None:
        """Prepared, and every layer still the model's module of its name: a conv replaced
        after prepare() would be reported as pruned while the model runs the new, dense one."""
        if not self.layers:
            raise RuntimeError("call Pruner.prepare() first")
        for layer in self.layers:
            try:
                current = self.model.get_submodule(layer.name)
            except AttributeError:
                current = None
            if current is not layer.conv:
                raise RuntimeError(
                    f"layer {layer.name!r} is no longer the model's module of that name (replaced "
                    "or removed after prepare()): make a Pruner for the model as it is now"
                )

    def regularization(self) -> torch.Tensor:
        """The penalty to add to the loss (zero for magnitude pruning)."""
        self._require_prepared()
        return self.regularizer.penalty(self.layers)

    def reweight(self) -> None:
        """Refresh the reweighted penalty's ``P = 1 / (||W||^2 + eps)`` from current weights."""
        self._require_prepared()
        self.regularizer.reweight(self.layers)
        if isinstance(self.regularizer, ReweightedGroupLasso):
            for weights in self.regularizer.weights.values():
                _broadcast_(weights)

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """Per-unit scores comparable across layers: lowest goes first."""
        self._require_prepared()
        return {
            layer.name: unit_scaled_norms(layer.weight, layer.spec).double()
            / layer.reference_norm
            / layer.cost_weight.to(layer.weight.device, torch.float64) ** self.flops_exponent
            for layer in self.layers
        }

    def required_removal(self) -> float:
        """Conv MACs per sample that pruning must remove to meet the target rate.

        As ``before - before / rate``: where the quotient is a whole number of MACs it is exact,
        so a reachable target is not overshot by a rounding (``before * (1 - 1 / rate)`` gave
        2506752.0000000005 for 3760128 MACs at 3x, one more unit removed)."""
        return self.conv_macs_before - self.conv_macs_before / self.target_rate

    @torch.no_grad()
    def plan(self) -> dict[str, torch.Tensor]:
        """The unit keep-masks :meth:`prune` would install now (a dry run).

        Raises ValueError when the scheme's granularity and the layer bounds cannot reach the
        target, so a caller can find out before spending a regularization phase.
        """
        self._require_prepared()
        scores = self.scores()
        candidates = [
            LayerCandidates(
                layer.name,
                scores[layer.name].cpu(),  # selection is bookkeeping, beside the CPU unit costs
                layer.unit_macs,
                balanced=self.balanced,
                min_keep=self.layer_bounds.get(layer.name, (self.min_keep, 1.0))[0],
                max_keep=self.layer_bounds.get(layer.name, (self.min_keep, 1.0))[1],
            )
            for layer in self.layers
        ]
        try:
            keep, _ = select_units(candidates, self.required_removal())
        except UnreachableTarget as err:
            before = self.conv_macs_before
            reachable = before / (before - err.removable) if err.removable < before else math.inf
            raise ValueError(
                f"target_rate {self.target_rate:g} cannot be reached: the scheme's units and "
                f"the per-layer bounds (min_keep {self.min_keep:g}, layer_bounds, excluded "
                f"layers) allow at most {_rounded_down(reachable)}x fewer conv MACs; lower the "
                "rate or min_keep"
            ) from err
        return keep

    @torch.no_grad()
    def prune(self) -> PruningReport:
        """Install masks that meet the MAC target (overshooting by less than one unit)."""
        keep = self.plan()
        for layer in self.layers:
            # On the weights' device: an NCCL process group broadcasts GPU tensors only.
            units = keep[layer.name].to(layer.weight.device, torch.uint8)
            _broadcast_(units)
            mask = unit_mask_to_weight_mask(units.bool(), layer.weight_shape, layer.spec)
            set_mask(layer.conv, mask, layer.spec)
        return self.report()

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights (before an optimizer step)."""
        self._require_prepared()
        for layer in self.layers:
            mask_gradient_(layer.conv)

    def apply_masks(self) -> None:
        """Zero pruned weights again (after an optimizer step moved them)."""
        self._require_prepared()
        for layer in self.layers:
            remask_(layer.conv)

    def fine_tune_step(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """``optimizer.step()`` (``scaler.step(optimizer)`` under mixed precision: the caller
        still calls ``scaler.update()``) with pruned weights held at exactly zero.

        Only between :meth:`prune` and :meth:`finalize`: without masks the step would regrow
        the pruned weights (momentum and weight decay move them) and silently undo the pruning.
        """
        self._require_prepared()
        if not any(is_masked(layer.conv) for layer in self.layers):
            raise RuntimeError(
                "fine_tune_step needs the masks of Pruner.prune(), before finalize(): a step "
                "without them would regrow the pruned weights"
            )
        self.mask_gradients()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
        self.apply_masks()

    def finalize(self) -> PruningReport:
        """Bake the masks into plain weights with exact zeros; the model is ready to export.
        Again after that, it changes nothing."""
        self._require_prepared()
        if not self._finalized and not any(is_masked(layer.conv) for layer in self.layers):
            # Without it the model would export dense, as if pruned (torch.ao's habit of a
            # step() that prunes leads here).
            raise RuntimeError(
                "finalize() bakes the masks of Pruner.prune(), and there are none: call prune() "
                "first (a model finalized by an earlier run needs no finalize: export it)"
            )
        for layer in self.layers:
            bake(layer.conv)
        self._finalized = True
        return self.report()

    @torch.no_grad()
    def kept_units(self, layer: PrunableLayer) -> torch.Tensor:
        mask = get_mask(layer.conv)
        present = mask if mask is not None else (layer.conv.weight != 0).float()
        return unit_sq_norms(present, layer.spec) > 0

    def report(self) -> PruningReport:
        self._require_prepared()
        reports = []
        for layer in self.layers:
            kept = self.kept_units(layer).cpu()  # indexes the CPU unit costs
            removed = round(float(layer.unit_macs[~kept].sum()))
            reports.append(
                LayerReport(
                    layer.name,
                    layer.spec.scheme,
                    layer.spec.group,
                    int(kept.sum()),
                    kept.numel(),
                    layer.dense_macs,
                    layer.dense_macs - removed,
                )
            )
        removed_total = sum(r.macs_before - r.macs_after for r in reports)
        return PruningReport(
            reports, self.conv_macs_before, self.conv_macs_before - removed_total, self.target_rate
        )

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Masks, penalty weights and reference scales, and the scheme, group and layers they
        belong to (tensors and plain Python values: weights_only-loadable). Before
        :meth:`prepare` there is nothing to save: refused, as its load would be."""
        self._require_prepared()
        return {
            "layout": self._layout(),
            "masks": {
                layer.name: get_mask(layer.conv).clone()
                for layer in self.layers
                if get_mask(layer.conv) is not None
            },
            "regularizer": self.regularizer.state_dict(),
            "reference_norms": {
                layer.name: torch.tensor(layer.reference_norm) for layer in self.layers
            },
        }

    def _layout(self) -> dict[str, Any]:
        """What a state belongs to: its masks and penalty weights fit only this scheme, group
        and set of layers."""
        return {
            "scheme": self.spec.scheme,
            "group": list(self.spec.group),
            "layers": [layer.name for layer in self.layers],
        }

    def _check_layout(self, saved: Mapping[str, Any]) -> None:
        """Refuses a state of another scheme, group or set of layers, naming each difference."""
        ours = self._layout()
        differences = []
        if saved["scheme"] != ours["scheme"]:
            differences.append(f"scheme {saved['scheme']!r} saved, {ours['scheme']!r} here")
        if [int(v) for v in saved["group"]] != ours["group"]:
            differences.append(f"group {list(saved['group'])} saved, {ours['group']} here")
        extra = sorted(set(saved["layers"]) - set(ours["layers"]))
        missing = sorted(set(ours["layers"]) - set(saved["layers"]))
        if extra:
            differences.append(f"layers {extra} saved but not prunable here")
        if missing:
            differences.append(f"layers {missing} prunable here but not saved (another exclude?)")
        if differences:
            raise ValueError("the pruner state is another Pruner's: " + "; ".join(differences))

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore after :meth:`prepare`; install masks before loading the model's state_dict.

        A state saved by a Pruner of another scheme, group or set of layers (another
        ``exclude``) is refused, naming the difference: its masks and penalties would not fit.
        Masking keeps each conv's weight (as ``weight_orig``) where it stood among the conv's
        parameters, so an optimizer whose state is loaded too may be made before or after this
        call."""
        self._require_prepared()
        saved = state.get("layout")
        if saved is not None:
            self._check_layout(saved)
        by_name = {layer.name: layer for layer in self.layers}
        # A state saved before the layout was kept: its penalty weights' shapes still tell
        # another group or scheme apart (one weight per unit).
        for key, weights in state["regularizer"].items():
            name = key.removeprefix("reweight.")
            layer = by_name.get(name)
            if layer is None:
                raise ValueError(f"saved penalty weights for {name!r}, not a prunable layer here")
            units = layer.spec.unit_shape(layer.weight_shape)
            if tuple(weights.shape) != units:
                raise ValueError(
                    f"saved penalty weights for {name!r} have shape {tuple(weights.shape)}, its "
                    f"{layer.spec.scheme} {layer.spec.group} units here {units}: the state is "
                    "another Pruner's"
                )
        for name, mask in state["masks"].items():
            if name not in by_name:
                raise ValueError(f"saved mask for {name!r}, which is not a prunable layer")
            try:
                set_mask(by_name[name].conv, mask, by_name[name].spec)
            except ValueError as exc:
                raise ValueError(f"saved mask for {name!r}: {exc}") from exc
        for name, value in state["reference_norms"].items():
            if name in by_name:
                by_name[name].reference_norm = float(value)
        self.regularizer.load_state_dict(dict(state["regularizer"]))


PHASES = ("dense", "regularize", "finetune")


def phase_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, pruner: Pruner | None, phase: str
) -> torch.Tensor:
    """One optimizer step of a training phase, as every training loop here takes it.

    ``regularize`` adds the pruner's penalty to ``loss`` (and returns the sum), ``finetune`` steps
    with the masks held, ``dense`` is a plain step. Reweighting stays with the caller, whose
    schedule it is.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if phase != "dense" and pruner is None:
        raise ValueError(f"phase {phase!r} needs a pruner")
    if phase == "regularize":
        loss = loss + pruner.regularization()
    optimizer.zero_grad()
    loss.backward()
    if phase == "finetune":
        pruner.fine_tune_step(optimizer)
    else:
        optimizer.step()
    return loss
