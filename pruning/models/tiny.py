"""A tiny 3D CNN for tests and the training CLI's default model: every code path of the pruner in
milliseconds."""

from __future__ import annotations

from torch import Tensor, nn


class Tiny3DCNN(nn.Module):
    """Three Conv3d+BN+ReLU stages (channel counts chosen so 8x4 groups need padding)."""

    def __init__(self, num_classes: int = 4, widths: tuple[int, int, int] = (6, 12, 20)) -> None:
        super().__init__()
        if num_classes <= 0 or min(widths) <= 0:
            raise ValueError("num_classes and widths must be positive")
        layers: list[nn.Module] = []
        in_channels = 3
        for i, out_channels in enumerate(widths):
            layers += [
                nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm3d(out_channels),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool3d((1, 2, 2)) if i == 0 else nn.MaxPool3d(2))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
