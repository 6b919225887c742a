"""C3D (Tran et al. 2015) as the RT3D paper prunes it, with widths that can be scaled down."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Output channels of conv1, conv2, conv3a/b, conv4a/b, conv5a/b in the paper's C3D.
_PAPER_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
_CONV_NAMES = ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
# The pool placed after a conv: kernel == stride, and pool5 pads H and W by one.
_POOLS = {
    "conv1": ((1, 2, 2), (0, 0, 0)),
    "conv2": ((2, 2, 2), (0, 0, 0)),
    "conv3b": ((2, 2, 2), (0, 0, 0)),
    "conv4b": ((2, 2, 2), (0, 0, 0)),
    "conv5b": ((2, 2, 2), (0, 1, 1)),
}


class C3D(nn.Module):
    """C3D: eight 3x3x3 convs, five max-pools, three fully connected layers.

    The defaults are the paper's network (78.4 M parameters for 101 classes, 38.5 GMACs for one
    3x16x112x112 clip). ``width`` scales every conv width and ``fc_width`` the hidden fc layers,
    which gives the small C3D-like networks that train on a CPU in minutes; ``batch_norm`` adds
    BatchNorm after each conv (the paper's C3D has none), which small networks need to train
    from scratch with SGD. Export folds it back into the convs.
    """

    def __init__(
        self,
        num_classes: int = 101,
        *,
        width: float = 1.0,
        fc_width: int = 4096,
        clip_shape: Sequence[int] = (16, 112, 112),
        dropout: float = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if width <= 0 or fc_width <= 0 or num_classes <= 0:
            raise ValueError("num_classes, width and fc_width must be positive")
        channels = [max(1, round(c * width)) for c in _PAPER_WIDTHS]
        in_channels = 3
        depth, height, width_px = (int(v) for v in clip_shape)
        for name, out_channels in zip(_CONV_NAMES, channels, strict=True):
            setattr(self, name, nn.Conv3d(in_channels, out_channels, 3, padding=1))
            if batch_norm:
                setattr(self, f"bn{name[4:]}", nn.BatchNorm3d(out_channels))
            if name in _POOLS:
                (kd, kh, kw), (pd, ph, pw) = _POOLS[name]
                pool_name = f"pool{name[4]}"
                setattr(self, pool_name, nn.MaxPool3d((kd, kh, kw), (kd, kh, kw), (pd, ph, pw)))
                depth = (depth + 2 * pd - kd) // kd + 1
                height = (height + 2 * ph - kh) // kh + 1
                width_px = (width_px + 2 * pw - kw) // kw + 1
            in_channels = out_channels
        if min(depth, height, width_px) <= 0:
            raise ValueError(f"clip_shape {tuple(clip_shape)} is too small for C3D's five pools")
        self.fc6 = nn.Linear(in_channels * depth * height * width_px, fc_width)
        self.fc7 = nn.Linear(fc_width, fc_width)
        self.fc8 = nn.Linear(fc_width, num_classes)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.batch_norm = batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in _CONV_NAMES:
            x = getattr(self, name)(x)
            if self.batch_norm:
                x = getattr(self, f"bn{name[4:]}")(x)
            x = self.relu(x)
            if name in _POOLS:
                x = getattr(self, f"pool{name[4]}")(x)
        x = x.flatten(1)
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        return self.fc8(x)
