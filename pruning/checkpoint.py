"""Checkpoints that survive interruption and load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Has ``write`` fill a file beside ``path``, then moves it there: a stop or a full disk
    midway leaves ``path`` as it was (a rerun of a finished run writes its outputs again, and a
    kill then left a 0-byte ``final.pt``). A write the file system refuses is a ValueError
    naming ``path``, and its partial file goes, to leave the space it took."""
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    except OSError as err:
        raise write_refused(path, err) from err
    except RuntimeError as err:
        # torch.save's writer reports a full disk as a failed check of its own.
        if not any(w in str(err) for w in ("inline_container", "PytorchStreamWriter")):
            raise
        why = str(err).strip().splitlines()[0]
        raise ValueError(f"cannot write {path} ({why}; {_free_space(path)} free there)") from err
    finally:
        if not partial.is_dir():
            partial.unlink(missing_ok=True)


def write_refused(path: Path, err: OSError) -> ValueError:
    """A write the file system refused (a full disk, no permission), as bad input: one error
    line naming ``path``."""
    return ValueError(f"cannot write {path}: {err.strerror or err}")


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path.parent).free:,} bytes"
    except OSError:
        return "unknown space"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: an interrupted save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda partial: torch.save(state, partial))


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, None where there is none; one that cannot be read (cut short
    by a full disk, or not a checkpoint) is a ValueError naming it, not torch's advice to load
    it with weights_only=False."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except IsADirectoryError as err:
        raise ValueError(
            f"{path}: a directory where the checkpoint goes; remove it, or give another --output"
        ) from err
    except OSError as err:  # a file it may not read may still be a good checkpoint: keep it
        raise ValueError(f"{path}: {err.strerror or err}") from err
    except Exception as err:  # torch.load's errors on a damaged file vary with the damage
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: not a checkpoint this run can resume from ({why}); "
            "delete it to start over, or give another --output"
        ) from err
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"{path}: not a checkpoint of this training CLI; delete it to start over")
    return state
