"""LargeFOV segmentation head (DeepLab-v1 style; ToCo's decoder on the final patch-token map)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class LargeFOVHead(nn.Module):
    """Two dilated 3x3 convolutions (ReLU after each) and a 1x1 classifier, no biases.

    ``forward(features)`` uses ``features[-1]`` (B, in_channels, h, w) and returns logits
    (B, num_classes, h, w) at the same stride (16 on a ViT). Same call signature as the SegFormer
    head, so either can serve as the network's segmentation head.
    """

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int = 512, dilation: int = 5) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim, embed_dim, 3, padding=dilation, dilation=dilation, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim, num_classes, 1, bias=False),
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.layers(features[-1])
