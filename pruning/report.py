"""What pruning did, per layer and overall, in a form that prints and serialises."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def _rate(before: int, after: int) -> float:
    """before / after; infinite where nothing is left (a layer pruned away whole)."""
    return before / after if after else math.inf


def json_rate(rate: float) -> float | None:
    """JSON has no infinity: a layer pruned away whole has no rate (null)."""
    return rate if math.isfinite(rate) else None


@dataclass(frozen=True)
class LayerReport:
    name: str
    scheme: str
    group: tuple[int, int]
    kept_units: int
    total_units: int
    macs_before: int
    macs_after: int

    @property
    def rate(self) -> float:
        return _rate(self.macs_before, self.macs_after)


@dataclass(frozen=True)
class PruningReport:
    """Conv MACs per sample before and after pruning; excluded convs count as dense."""

    layers: list[LayerReport] = field(default_factory=list)
    conv_macs_before: int = 0
    conv_macs_after: int = 0
    target_rate: float = 1.0

    @property
    def rate(self) -> float:
        """Achieved conv-MAC reduction factor (before / after)."""
        return _rate(self.conv_macs_before, self.conv_macs_after)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["rate"] = json_rate(self.rate)
        for layer, entry in zip(self.layers, body["layers"], strict=True):
            entry["group"] = list(layer.group)
            entry["rate"] = json_rate(layer.rate)
        return body

    def format_table(self) -> str:
        lines = [
            f"{'layer':<28} {'scheme':<8} {'group':<6} {'kept units':>14} "
            f"{'MMACs before':>13} {'MMACs after':>12} {'rate':>6}"
        ]
        for layer in self.layers:
            kept = f"{layer.kept_units}/{layer.total_units}"
            rate = f"{layer.rate:>5.2f}x" if math.isfinite(layer.rate) else "  gone"
            lines.append(
                f"{layer.name:<28} {layer.scheme:<8} {'x'.join(map(str, layer.group)):<6} "
                f"{kept:>14} {layer.macs_before / 1e6:>13.2f} {layer.macs_after / 1e6:>12.2f} "
                f"{rate}"
            )
        unpruned = self.conv_macs_before - sum(layer.macs_before for layer in self.layers)
        if unpruned:  # excluded, grouped and 1-D/2-D convs: the rows then add up to the total
            lines.append(
                f"{'other convs (not pruned)':<28} {'dense':<8} {'':<6} {'':>14} "
                f"{unpruned / 1e6:>13.2f} {unpruned / 1e6:>12.2f} {1:>5.2f}x"
            )
        lines.append(
            f"conv MACs {self.conv_macs_before / 1e6:.2f} M -> {self.conv_macs_after / 1e6:.2f} M: "
            f"{self.rate:.3f}x (target {self.target_rate:.3f}x)"
        )
        return "\n".join(lines)
