"""Classification heads that give class activation maps (CAMs).

``CAMHead`` is the convolutional classifier whose weights, applied at every position of the
stride-16 map, give the CAM (AFA: 1x1 no bias + global max pooling; MCTformer-V2: 3x3 with bias +
global average pooling; Conformer (AReAM): 1x1 with bias + GAP). ``TokenHead`` classifies from
class tokens (MCTformer: the mean over features of each class token; ViT/Conformer: a linear
layer on the normalised class token).
"""

from __future__ import annotations

from torch import Tensor, nn

# The official AFA CAM head (the config's ``model.cam_head``): a 1x1 conv without bias, global max pooling
CAM_KERNEL_SIZE = 1
CAM_BIAS = False
CAM_POOLING = "gmp"


class CAMHead(nn.Module):
    """Conv classifier. ``forward(feat (B,D,h,w)) -> (logits (B,K), cam (B,K,h,w) raw)``.

    With a 1x1 kernel the pooled features are classified (official AFA order; for GAP the two
    orders agree); with larger kernels the CAM is pooled.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        kernel_size: int = CAM_KERNEL_SIZE,
        bias: bool = CAM_BIAS,
        pooling: str = CAM_POOLING,
    ) -> None:
        super().__init__()
        if pooling not in ("gmp", "gap"):
            raise ValueError(f"pooling must be 'gmp' or 'gap', got {pooling!r}")
        self.pooling = pooling
        self.classifier = nn.Conv2d(
            in_channels, num_classes, kernel_size, padding=kernel_size // 2, bias=bias
        )

    def _pool(self, x: Tensor) -> Tensor:
        return (
            x.amax(dim=(-2, -1), keepdim=True)
            if self.pooling == "gmp"
            else x.mean(dim=(-2, -1), keepdim=True)
        )

    def cam(self, feat: Tensor) -> Tensor:
        """Raw CAM (B, K, h, w): the classifier at every position (no ReLU, no normalisation)."""
        return self.classifier(feat)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        cam = self.cam(feat)
        if self.classifier.kernel_size == (1, 1):
            logits = self.classifier(self._pool(feat))
        else:
            logits = self._pool(cam)
        return logits.flatten(1), cam


class TokenHead(nn.Module):
    """Class-token classifier. ``forward(prefix (B,T,D)) -> logits (B,K)``.

    mode "mean": T == K class tokens, logit k = mean over D of token k (MCTformer-V2).
    mode "linear": a Linear(D, K) on token 0 (ViT / Conformer class token).
    """

    def __init__(self, mode: str, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        if mode not in ("mean", "linear"):
            raise ValueError(f"token head mode must be 'mean' or 'linear', got {mode!r}")
        self.mode = mode
        self.num_classes = num_classes
        self.fc = nn.Linear(embed_dim, num_classes) if mode == "linear" else None

    def forward(self, prefix: Tensor) -> Tensor:
        if self.fc is None:
            if prefix.shape[1] != self.num_classes:
                raise ValueError(
                    f"mean token head needs {self.num_classes} class tokens, got {prefix.shape[1]}"
                )
            return prefix.mean(dim=-1)
        return self.fc(prefix[:, 0])
