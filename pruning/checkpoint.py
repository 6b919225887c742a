"""Checkpoints that survive interruption and load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: an interrupted save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, None where there is none; one that cannot be read (cut short
    by a full disk, or not a checkpoint) is a ValueError naming it, not torch's advice to load
    it with weights_only=False."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load's errors on a damaged file vary with the damage
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: not a checkpoint this run can resume from ({why}); "
            "delete it to start over, or give another --output"
        ) from err
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"{path}: not a checkpoint of this training CLI; delete it to start over")
    return state
