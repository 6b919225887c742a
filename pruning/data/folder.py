"""Clips from a dataset laid out like UCF101: ``root/<class>/<clip>/<frame files>``.

Frames must already be decoded (``.png``, 8- or 16-bit, ``.jpg``/``.jpeg`` via Pillow, or
``.npy`` arrays of shape (H, W, 3) in RGB order, or gray (H, W) or (H, W, 1): uint16 in
[0, 65535], other integers in [0, 255], floats in [0, 1] or [0, 255]): decoding video files
would need a heavy dependency, and decoding once up front is faster for training anyway.
Frames play in the order of their names, numbers compared as numbers (``frame2`` before
``frame10``); names starting with a dot (``.ipynb_checkpoints``, ``.DS_Store``) are not
classes, clips or frames.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .synthetic import whole_number

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FRAME_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm")
VIDEO_HINT = (
    "video files are not decoded here; extract frames into a folder per clip "
    "(e.g. ffmpeg -i clip.avi clip/%05d.png)"
)


def _load_frame(path: Path) -> np.ndarray:
    """The frame as stored: uint16 (16 bits), other integers in 0..255 (8 bits), or floats;
    an unreadable or unusable file names itself."""
    try:
        if path.suffix.lower() == ".npy":
            frame = _gray_as_rgb(_npy_frame(path))
        else:
            from PIL import Image

            with Image.open(path) as image:
                frame = _image_frame(image, path)
    except (OSError, ValueError, EOFError) as exc:  # PIL's UnidentifiedImageError: an OSError
        raise ValueError(f"{path}: cannot read the frame ({exc})") from exc
    if frame.ndim != 3 or frame.shape[2] != 3 or not frame.size:
        raise ValueError(
            f"{path}: a frame must be (H, W, 3), or gray (H, W) or (H, W, 1), got shape "
            f"{frame.shape}"
        )
    if frame.dtype == np.bool_ or not np.issubdtype(frame.dtype, np.number):
        raise ValueError(f"{path}: frames are numbers, not {frame.dtype}")
    wide = np.issubdtype(frame.dtype, np.integer) and frame.dtype != np.uint16
    if wide and not 0 <= frame.min() <= frame.max() <= 255:
        raise ValueError(
            f"{path}: {frame.dtype} frames hold 0..255 (8 bits; 16 bits as uint16), this one "
            f"{frame.min()}..{frame.max()}"
        )
    floating = not np.issubdtype(frame.dtype, np.integer)
    if floating and not np.isfinite(frame).all():  # trained on, a NaN read as a diverged run
        raise ValueError(f"{path}: the frame holds NaN or infinite values")
    return frame


def _gray_as_rgb(frame: np.ndarray) -> np.ndarray:
    """A gray .npy frame, (H, W) or (H, W, 1), as three equal channels, as a gray PNG is read
    (it was refused where the PNG was taken)."""
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim == 3 and frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    return frame


def _npy_frame(path: Path) -> np.ndarray:
    """One array: ``np.load`` opens a zip of arrays (``np.savez``) whatever the file's name."""
    loaded = np.load(path)
    if isinstance(loaded, np.ndarray):
        return loaded
    loaded.close()
    raise ValueError("an .npz archive of arrays, not one array (save frames with np.save)")


# Pillow's modes of 16-bit grayscale (a 16-bit PNG opens as one of them): RGB conversion
# saturates them at 255, so they are kept as uint16 and scaled from 65535 instead.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _image_frame(image: Any, path: Path) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_MODES:
        gray = np.asarray(image)
        if gray.size and not 0 <= gray.min() <= gray.max() <= 65535:  # mode I holds 32 bits
            raise ValueError(f"{path}: values {gray.min()}..{gray.max()} pass 16 bits")
        return np.repeat(gray.astype(np.uint16)[..., None], 3, axis=2)
    if image.mode == "F":
        raise ValueError(f"{path}: a float image; save frames as 8- or 16-bit images or .npy")
    return np.asarray(image.convert("RGB"))


# Float frames in [0, 1] or [0, 255], give or take this share of the range (a resize's
# overshoot), are read as such; a clip whose float frames fit neither is refused.
FLOAT_OVERSHOOT = 0.05


def _float_scale(floats: list[np.ndarray], clip: Path) -> float:
    """255 or 1, decided per clip, so that one dark frame of a [0, 255] float clip is not read
    as [0, 1] on its own. A clip reaching past [0, 1]'s overshoot but not 2 is refused rather
    than guessed: read as [0, 255], one bright pixel of 1.02 turned a [0, 1] clip black."""
    if not floats:
        return 1.0
    low = min(float(frame.min()) for frame in floats)
    high = max(float(frame.max()) for frame in floats)
    for scale, least_high in ((1.0, -np.inf), (255.0, 2.0)):
        # float32's -0.05 lies a little past -0.05: the bounds give float32's rounding room.
        room = FLOAT_OVERSHOOT * scale * (1 + 1e-6)
        if -room <= low and least_high <= high <= scale + room:
            return scale
    raise ValueError(
        f"{clip}: its float frames span {low:.7g}..{high:.7g}, neither [0, 1] nor [0, 255] (up to "
        f"{FLOAT_OVERSHOOT:.0%} past either end is taken; a [0, 255] clip must reach 2); clip "
        "them to one of the two, or save them as 8-bit integers"
    )


def _scaled_clip(frames: list[np.ndarray], clip: Path) -> np.ndarray:
    """The clip in [0, 1] (floats give or take their overshoot): uint16 frames are [0, 65535],
    other integer ones [0, 255], float ones [0, 1] or [0, 255] (:func:`_float_scale`)."""
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:
        raise ValueError(f"{clip}: its frames differ in size: {sorted(shapes)}")
    floats = [frame for frame in frames if not np.issubdtype(frame.dtype, np.integer)]
    float_scale = _float_scale(floats, clip)

    def scale(frame: np.ndarray) -> float:
        if frame.dtype == np.uint16:
            return 65535.0
        return 255.0 if np.issubdtype(frame.dtype, np.integer) else float_scale

    return np.stack([frame.astype(np.float32) / scale(frame) for frame in frames])


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


LAYOUT = "root/<class>/<clip>/<frames>"


def _holds_frames(folder: Path) -> bool:
    """Whether ``folder`` holds frame files itself (a clip's folder, not a class's)."""
    return any(p.suffix.lower() in FRAME_SUFFIXES and _visible(p) for p in folder.iterdir())


GLOB_HINT = "--frame-glob (VideoFolder's frame_glob)"


def _one_series(clip: Path, frames: list[Path]) -> None:
    """Frames of one series, each once. mmaction2's rawframes folders hold ``img_*``,
    ``flow_x_*`` and ``flow_y_*`` frames side by side, and a folder may hold a .png and a .jpg of
    each frame: taken whole, they would play one after the other in name order, a clip of
    flow frames trained on without a word. A series is the names with their numbers left out;
    a numbered series may not share a folder with another series (a stray ``thumb.jpg``), but
    frames named without numbers (``a.png``, ``b.png``) are one each and may mix."""
    stems = Counter(p.stem for p in frames)
    twice = sorted(stem for stem, count in stems.items() if count > 1)
    if twice:
        raise ValueError(
            f"{clip}: frame {twice[0]!r} is there in {stems[twice[0]]} files ("
            + ", ".join(p.name for p in frames if p.stem == twice[0])
            + f"); keep one of each, or pick one kind with {GLOB_HINT}, e.g. '*.png'"
        )
    series = Counter(re.sub(r"\d+", "#", p.stem) for p in frames)
    if len(series) > 1 and any("#" in name for name in series):
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(series.items()))
        globs = [_series_glob(name) for name, _ in series.most_common() if "#" in name]
        raise ValueError(
            f"{clip}: frames of {len(series)} series, {listed} (# for the numbers), would play "
            f"one after another as one clip; pick one with {GLOB_HINT}, such as "
            f"{' or '.join(globs[:3])}, or keep one series per clip folder"
        )


def _series_glob(name: str) -> str:
    """A glob of one numbered series' file names: ``img_#`` -> ``'img_*'``, ``#_rgb`` ->
    ``'*_rgb.*'``, ``#`` -> ``'[0-9]*'`` (a lone ``*`` would take every file)."""
    if name == "#":
        return repr("[0-9]*")
    glob = name.replace("#", "*")
    return repr(glob if glob.endswith("*") else glob + ".*")


def _natural_key(path: Path) -> tuple[list[str | int], str]:
    """``frame10`` after ``frame2``: runs of digits compare as numbers (the odd parts of the
    split), then the name itself (``f01`` and ``f1`` in a fixed order)."""
    parts = re.split(r"(\d+)", path.name)
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], path.name


class VideoFolder(Dataset):
    """Fixed-length clips (``clip_len`` frames, centred, looped if the clip is shorter).

    Classes are the folder names under ``root`` in code-point order (``sorted``: capitals before
    small letters, ``HammerThrow`` before ``Hammering``); ``frame_size`` (H, W) resizes frames
    bilinearly; ``frame_glob`` picks a clip folder's frame files by name, case-sensitively
    (``img_*`` out of mmaction2's rawframes). Items are ``(3, T, H, W)`` float tensors in
    [-0.5, 0.5] and the class index.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        clip_len: int = 16,
        frame_size: Sequence[int] | None = None,
        frame_glob: str = "*",
    ) -> None:
        self.root = Path(root)
        try:
            is_dir = self.root.is_dir()
        except OSError as exc:  # a name too long, a folder it may not enter
            raise ValueError(f"dataset root {self.root}: {exc.strerror or exc}") from exc
        if not is_dir:
            raise ValueError(f"dataset root {self.root} is not a directory")
        if not whole_number(clip_len) or clip_len <= 0:
            raise ValueError(f"clip_len must be a positive integer, got {clip_len!r}")
        if frame_size is not None and (
            len(frame_size) != 2 or not all(whole_number(v) and v > 0 for v in frame_size)
        ):
            raise ValueError(f"frame_size must be (H, W), positive integers, got {frame_size!r}")
        if not isinstance(frame_glob, str) or not frame_glob or "/" in frame_glob:
            raise ValueError(f"frame_glob must be a glob of file names, got {frame_glob!r}")
        self.clip_len = int(clip_len)
        self.frame_size = tuple(int(v) for v in frame_size) if frame_size is not None else None
        self.frame_glob = frame_glob
        try:
            self._scan()
        except OSError as exc:  # a folder it may not read: bad input, named
            raise ValueError(f"{exc.filename or self.root}: {exc.strerror or exc}") from exc

    def _scan(self) -> None:
        """``classes`` and ``samples`` from the folders under ``root``."""
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and _visible(p))
        if not self.classes:
            raise ValueError(f"{self.root} holds no class folders")
        self.samples: list[tuple[list[Path], int]] = []
        for label, name in enumerate(self.classes):
            for entry in sorted(filter(_visible, (self.root / name).iterdir())):
                # A folder named like a video (v_0.mp4/, as some extraction scripts name
                # theirs) is a clip folder like any other.
                if entry.suffix.lower() in VIDEO_SUFFIXES and not entry.is_dir():
                    if entry.with_suffix("").is_dir():  # its frames extracted beside it
                        continue
                    raise ValueError(f"{entry}: {VIDEO_HINT}")
                if not entry.is_dir():
                    continue
                files = list(filter(_visible, entry.iterdir()))
                listed = [p for p in files if p.suffix.lower() in FRAME_SUFFIXES]
                picked = sorted(
                    (p for p in listed if fnmatch.fnmatchcase(p.name, self.frame_glob)),
                    key=_natural_key,
                )
                videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
                if not listed and videos:
                    raise ValueError(f"{videos[0]}: {VIDEO_HINT}")
                if not picked:
                    which = f" named {self.frame_glob}" if listed else ""
                    glob = self.frame_glob.lower()
                    if any(fnmatch.fnmatchcase(p.name.lower(), glob) for p in listed):
                        which += " (names match case-sensitively: it matches some in another case)"
                    raise ValueError(
                        f"{entry} holds no frames{which} ({', '.join(FRAME_SUFFIXES)})"
                    )
                _one_series(entry, picked)
                self.samples.append((picked, label))
        if not self.samples:
            raise ValueError(f"{self.root} holds no clip folders{self.layout_hint(self.classes)}")

    def layout_hint(self, classes: Sequence[str]) -> str:
        """Where ``classes`` hold frames themselves they are clip folders where class folders
        belong (a root one level too deep, or a class level missing): say the layout."""
        if not any(_holds_frames(self.root / name) for name in classes):
            return ""
        return (
            " (those folders hold frames themselves, as clip folders do, where class folders "
            f"belong: the layout is {LAYOUT})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _frame_indices(self, count: int) -> np.ndarray:
        if count >= self.clip_len:
            first = (count - self.clip_len) // 2
            return np.arange(first, first + self.clip_len)
        return np.arange(self.clip_len) % count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        frames, label = self.samples[index]
        picked = [_load_frame(frames[i]) for i in self._frame_indices(len(frames))]
        clip = _scaled_clip(picked, frames[0].parent)
        tensor = torch.from_numpy(clip).permute(3, 0, 1, 2).contiguous()  # (3, T, H, W)
        if self.frame_size is not None and tuple(tensor.shape[2:]) != self.frame_size:
            tensor = F.interpolate(
                tensor, size=self.frame_size, mode="bilinear", align_corners=False
            )
        return tensor - 0.5, label
