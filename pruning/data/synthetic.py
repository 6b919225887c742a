"""A synthetic video dataset that only a model with temporal receptive field can solve.

Each clip shows a shape moving over a textured background; the class is the motion (direction
and speed). Motion wraps around the frame edges, so every single frame has the same distribution
in every class (uniform position, same shapes, colours and textures) and playing a clip backwards
gives a clip of the opposite direction: a per-frame (2D) model sees nothing that separates the
classes. Clips are generated on the fly from ``(seed, index)``, so a dataset is reproducible
without being stored.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx): right, left, down, up
SPEEDS = (1, 2)  # pixels per frame


@dataclass(frozen=True)
class Motion:
    direction: tuple[int, int]
    speed: int

    def velocity(self) -> np.ndarray:
        return np.array(self.direction) * self.speed


def class_motions(num_classes: int) -> list[Motion]:
    """The motion of each class: directions first, then speeds."""
    motions = [Motion(d, s) for s in SPEEDS for d in DIRECTIONS]
    if not 2 <= num_classes <= len(motions):
        raise ValueError(f"num_classes must be in [2, {len(motions)}], got {num_classes}")
    return motions[:num_classes]


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random background: a few oriented sinusoids per channel plus grain."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((3, height, width), np.float32)
    for channel in range(3):
        for _ in range(3):
            fy, fx = rng.uniform(-0.5, 0.5, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            image[channel] += rng.uniform(0.05, 0.15) * np.sin(fy * y + fx * x + phase)
    image += rng.normal(0, 0.03, size=image.shape).astype(np.float32)
    return image + rng.uniform(0.3, 0.5, size=(3, 1, 1)).astype(np.float32)


def _sprite(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A filled square or disc: its alpha mask and colour."""
    size = int(rng.integers(5, 10))
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    disc = (yy**2 + xx**2) <= (size / 2) ** 2
    alpha = disc if rng.random() < 0.5 else np.ones((size, size), bool)
    return alpha.astype(np.float32), rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def render_clip(
    rng: np.random.Generator,
    motion: Motion,
    clip_shape: Sequence[int],
    start: np.ndarray | None = None,
    noise: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """A ``(3, T, H, W)`` float32 clip and the sprite's start position (y, x)."""
    frames, height, width = (int(v) for v in clip_shape)
    background = _texture(rng, height, width)
    alpha, colour = _sprite(rng)
    if start is None:
        start = np.array([rng.integers(0, height), rng.integers(0, width)])
    layer = np.zeros((height, width), np.float32)
    layer[: alpha.shape[0], : alpha.shape[1]] = alpha[:height, :width]
    grain = rng.normal(0, noise, size=(3, frames, height, width)).astype(np.float32)
    clip = np.empty((3, frames, height, width), np.float32)
    for t in range(frames):
        dy, dx = start + motion.velocity() * t
        mask = np.roll(layer, (int(dy), int(dx)), axis=(0, 1))
        clip[:, t] = background * (1 - mask) + colour[:, None, None] * mask
    return np.clip(clip + grain, 0.0, 1.0), start


def whole_number(value: object) -> bool:
    """An integer, not a truth value (``True`` is an int to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class SyntheticMotionVideos(Dataset):
    """``num_samples`` clips with balanced classes; item ``i`` is a pure function of (seed, i)."""

    def __init__(
        self,
        num_samples: int,
        *,
        num_classes: int = 8,
        clip_shape: Sequence[int] = (16, 32, 32),
        seed: int = 0,
    ) -> None:
        if not whole_number(num_samples) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if len(clip_shape) != 3 or not all(whole_number(v) and v > 0 for v in clip_shape):
            raise ValueError(
                f"clip_shape must be (T, H, W), positive integers, got {tuple(clip_shape)}"
            )
        # numpy refuses a negative seed only when the first clip is drawn.
        if not whole_number(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_samples = num_samples
        self.motions = class_motions(num_classes)
        self.clip_shape = tuple(int(v) for v in clip_shape)
        self.seed = seed

    @property
    def num_classes(self) -> int:
        return len(self.motions)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, index])
        clip, _ = render_clip(rng, self.motions[label], self.clip_shape)
        return torch.from_numpy(clip - 0.5), label
