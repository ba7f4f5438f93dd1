"""SegFormer all-MLP decoder (the AFA segmentation head).

Parameter names follow the official head (``linear_c{i}.proj``, ``linear_fuse.conv``,
``linear_fuse.bn``, ``linear_pred``). Plain BatchNorm; the trainer converts it to SyncBN only
for CUDA + DDP (SyncBN fails on CPU and without a process group).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SEG_DROPOUT", "SEG_EMBED_DIM", "SegFormerHead"]

# The official AFA segmentation head (the config's ``model.seg_head``)
SEG_EMBED_DIM = 256  # the decoder's embedding width D
SEG_DROPOUT = 0.1  # Dropout2d before the classifier


class LinearEmbed(nn.Module):
    """Per-token Linear(C -> D) on a map: (B, C, h, w) -> channels-last tokens (B, h, w, D)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.permute(0, 2, 3, 1))


class ConvBNReLU(nn.Module):
    """1x1 conv without bias -> BatchNorm2d -> ReLU (mmcv ConvModule layout: .conv, .bn)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_act(self.conv(x))

    def norm_act(self, x: Tensor) -> Tensor:
        """BatchNorm -> ReLU of an already convolved map."""
        return self.act(self.bn(x))


class SegFormerHead(nn.Module):
    """All-MLP decoder over any number of feature maps.

    in_channels: channels C_i of the inputs c1..cn (a single stride-16 map works too).
    forward(features): list of (B, C_i, h_i, w_i) -> logits (B, num_classes, h_1, w_1).
    Each map is embedded to ``embed_dim``, resized bilinearly (align_corners=False) to the first
    map's size, concatenated in reverse order [cn, ..., c1], fused by 1x1 conv + BN + ReLU, then
    Dropout2d and a 1x1 classifier conv with bias.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        embed_dim: int = SEG_EMBED_DIM,
        dropout: float = SEG_DROPOUT,
    ) -> None:
        super().__init__()
        if len(in_channels) == 0:
            raise ValueError("SegFormerHead needs at least one input")
        self.in_channels = list(in_channels)
        for i, c in enumerate(in_channels, start=1):
            setattr(self, f"linear_c{i}", LinearEmbed(c, embed_dim))
        self.linear_fuse = ConvBNReLU(embed_dim * len(in_channels), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Official order: embed, resize, concatenate, 1x1 fuse conv. The fuse conv (no bias) is split
        into one block per map and applied before the resize: bilinear resizing and a per-pixel
        linear map commute, so each map is mixed at its own (smaller) size and the 4D-channel
        concatenation at full size is never built. Same function, a fraction of the work.

        Without autograd (evaluation, ``predict``) two more linear maps are folded: each map's
        embedding into its block of the fuse conv (one C_i -> D product per token instead of two),
        and an eval-mode BatchNorm into those products (no pass over the full-size fused map)."""
        if len(features) != len(self.in_channels):
            raise ValueError(f"SegFormerHead expects {len(self.in_channels)} maps, got {len(features)}")
        size = features[0].shape[-2:]
        n = len(features)
        weight = self.linear_fuse.conv.weight.flatten(1)  # (D, n*D): input blocks in the order c_n..c_1
        d = weight.shape[1] // n
        folded = not torch.is_grad_enabled()
        affine = self._bn_affine() if folded else None
        fused: Tensor | None = None
        for i, feat in enumerate(features):
            block = weight[:, (n - 1 - i) * d : (n - i) * d]
            embed: LinearEmbed = getattr(self, f"linear_c{i + 1}")
            if folded:
                z = self._folded_block(feat, embed.proj, block, affine, shift=i == 0)
            else:
                z = F.linear(embed(feat), block).permute(0, 3, 1, 2)  # its share of the fuse conv
            if z.shape[-2:] != size:
                z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            # in place: no full-size temporary per map (linear and resize keep nothing for backward)
            fused = z if fused is None else fused.add_(z)
        assert fused is not None
        fused = self.linear_fuse.act(fused) if affine is not None else self.linear_fuse.norm_act(fused)
        return self.linear_pred(self.dropout(fused))

    def _bn_affine(self) -> tuple[Tensor, Tensor] | None:
        """The fuse BatchNorm as y = x * scale + shift, (D,) each, when it uses running statistics."""
        bn = self.linear_fuse.bn
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return None
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        return scale, shift + bn.bias if bn.bias is not None else shift

    @staticmethod
    def _folded_block(feat: Tensor, proj: nn.Linear, block: Tensor, affine: tuple[Tensor, Tensor] | None,
                      shift: bool) -> Tensor:
        """(B, C_i, h, w) -> (B, D, h, w): block @ (proj(x)), scaled by the BatchNorm when ``affine``
        (plus its shift when ``shift``), as one Linear(C_i -> D) with a composed weight and bias."""
        if affine is not None:
            block = block * affine[0][:, None]
        w = block @ proj.weight
        b = block @ proj.bias if proj.bias is not None else None
        if affine is not None and shift:
            b = affine[1] if b is None else b + affine[1]
        return F.linear(feat.permute(0, 2, 3, 1), w, b).permute(0, 3, 1, 2)
