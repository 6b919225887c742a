"""Models the pruner is exercised on: the paper's C3D and R(2+1)D-18, and a tiny test network."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .c3d import C3D
from .r2plus1d import R2Plus1D18
from .tiny import Tiny3DCNN

MODELS = {"c3d": C3D, "r2plus1d_18": R2Plus1D18, "tiny": Tiny3DCNN}


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a model by name; ``kwargs`` go to its constructor (e.g. C3D's ``width``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    params = inspect.signature(MODELS[name]).parameters
    accepted = sorted(p for p in params if p != "num_classes")
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"its arguments: {', '.join(accepted) or 'none'}"
        )
    try:
        return MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as err:  # an argument of the wrong kind, e.g. a string width
        raise ValueError(f"model {name!r}: {err}") from err


__all__ = ["C3D", "MODELS", "R2Plus1D18", "Tiny3DCNN", "build_model"]
