"""The contract every backbone family follows.

A backbone maps an image batch to feature maps and, on request, the pre-softmax attention logits
of chosen blocks. Layers are numbered globally from 0 (MiT-B1: blocks 0..7 over the four stages;
ViT/DeiT/Conformer: 0..11).

Attention contract: ``out.attn[l]`` is the **scaled** pre-softmax logit tensor
``q k^T / sqrt(head_dim)`` of block ``l``, shape (B, heads, N, N) over all tokens of that block,
non-patch (class) tokens first; ``softmax(-1)`` of it is the attention the block really used.
MiT blocks with spatial reduction (sr > 1) have Nq != Nk; their query axis is average-pooled to
the reduced grid (the official AFA behaviour), so the map is square. Consumers that need the
official unscaled AFA logits multiply by ``sqrt(head_dims[l])``. When ``attn_reduce`` is given,
``out.attn[l] = attn_reduce(l, logits)`` is stored instead, so a caller can reduce each layer at
once (e.g. to a head-mean softmax) and never hold every (B, heads, N, N) map.

Intermediate features: ``forward(x, feature_layers=[l])`` also returns ``out.blocks[l]``, the token
features (B, T + h*w, D) output by block ``l`` (non-patch tokens first) on the token grid
``out.block_grids[l]`` (ToCo's auxiliary CAM reads an intermediate block). ``global_attn[l]`` says
whether block ``l`` attends over all N x N token pairs (MiT's spatial-reduction blocks do not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

AttnReduce = Callable[[int, Tensor], Tensor]

# ImageNet statistics on the [0, 1] scale: the input normalisation of most pretrained backbones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneOutput:
    """What ``forward_features`` returns.

    features: feature maps, each (B, C_i, h_i, w_i); ``features[-1]`` is the stride-16 map the CAM
        is computed from.
    attn: layer index -> (B, heads, N, N) scaled logits, or what ``attn_reduce`` made of them.
    grids: layer index -> (h, w) of that layer's patch tokens (after pooling for MiT sr > 1).
    prefix: non-patch token outputs (B, T, D) (class tokens), or None.
    blocks: layer index -> token features (B, T + h*w, D) output by that block (``feature_layers``).
    block_grids: layer index -> (h, w) of that block's patch tokens.
    """

    features: list[Tensor]
    attn: dict[int, Tensor] = field(default_factory=dict)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    prefix: Tensor | None = None
    blocks: dict[int, Tensor] = field(default_factory=dict)
    block_grids: dict[int, tuple[int, int]] = field(default_factory=dict)


class Backbone(nn.Module):
    """Base class. Subclasses set the attributes below and implement ``forward_features``."""

    num_layers: int
    num_heads: list[int]  # per layer
    head_dims: list[int]  # per layer
    attn_strides: list[int]  # per layer: stride of the layer's attention token grid
    out_channels: list[int]  # per feature map
    num_prefix_tokens: int = 0  # T: class tokens before the patch tokens
    patch_stride: int = 16  # stride of features[-1]
    # Input: [0, 1] RGB is normalised as (x - input_mean) / input_std (:meth:`normalize`); the sides
    # must be multiples of input_multiple.
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    input_multiple: int = 1

    def normalize(self, image01: Tensor) -> Tensor:
        """[0, 1] RGB (B, 3, H, W) -> the backbone's input statistics.

        Computed as (255 x - 255 mean) / (255 std) in the input's dtype: 255 x is exact for 8-bit
        images stored as x / 255 in float32, so the result equals normalising the 0..255 values."""
        view = (1, 3, 1, 1)
        mean = image01.new_tensor([255.0 * m for m in self.input_mean]).view(view)
        std = image01.new_tensor([255.0 * s for s in self.input_std]).view(view)
        return (image01 * 255.0 - mean) / std

    # Subclasses define:
    #   forward_features(x, attn_layers=(), attn_reduce=None) -> BackboneOutput
    #   layer_modules() -> the block modules in layer order (for ``feature_layers``)

    @property
    def global_attn(self) -> list[bool]:
        """Per layer: whether the block's attention is global (N x N over all tokens of its grid).
        A block whose attention grid is coarser than its token grid (spatial reduction) is not."""
        return [True] * self.num_layers

    def forward(
        self, x: Tensor, attn_layers: Sequence[int] = (), attn_reduce: AttnReduce | None = None,
        feature_layers: Sequence[int] = (),
    ) -> BackboneOutput:
        """``forward_features`` plus the token features of the blocks in ``feature_layers``."""
        layers = sorted(self.check_layers(feature_layers))
        if not layers:
            return self.forward_features(x, attn_layers, attn_reduce)  # type: ignore[attr-defined]
        modules = self.layer_modules()
        kept: dict[int, Tensor] = {}
        hooks = [modules[i].register_forward_hook(self._keeper(i, kept)) for i in layers]
        try:
            out = self.forward_features(x, attn_layers, attn_reduce)  # type: ignore[attr-defined]
        finally:
            for h in hooks:
                h.remove()
        out.blocks = {i: kept[i] for i in layers}
        out.block_grids = {i: self.block_grid(i, out) for i in layers}
        return out

    def _keeper(self, layer: int, kept: dict[int, Tensor]) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            kept[layer] = self.block_tokens(layer, output)
        return hook

    def layer_modules(self) -> Sequence[nn.Module]:
        """The block of each layer, in layer order."""
        raise TypeError(f"{type(self).__name__} has no transformer blocks to read features from")

    def block_tokens(self, layer: int, output: object) -> Tensor:
        """The (B, T + h*w, D) tokens in what block ``layer`` returned (its first output)."""
        return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]

    def block_grid(self, layer: int, out: BackboneOutput) -> tuple[int, int]:
        """(h, w) of the patch tokens of block ``layer``: by default the grid of ``features[-1]``."""
        return tuple(out.features[-1].shape[-2:])  # type: ignore[return-value]

    def check_layers(self, attn_layers: Sequence[int]) -> set[int]:
        """Normalise negative indices and reject out-of-range ones with a clear message."""
        out = set()
        for layer in attn_layers:
            idx = layer + self.num_layers if layer < 0 else layer
            if not 0 <= idx < self.num_layers:
                raise ValueError(f"attention layer {layer} out of range for {self.num_layers} layers")
            out.add(idx)
        return out

    def final_grid_layers(self) -> list[int]:
        """Layers whose attention grid is the last layer's (every layer of a ViT / Conformer; the
        last stage of a MiT, whose earlier stages have pooled, coarser or finer grids)."""
        return [i for i, s in enumerate(self.attn_strides) if s == self.attn_strides[-1]]

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (positional embeddings and the like)."""
        return set()


def check_input(x: Tensor, multiple: int = 1, name: str = "input") -> None:
    """Reject inputs that are not (B, 3, H, W) floats, or whose sides are not multiples of ``multiple``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be (B, 3, H, W), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if multiple > 1 and (x.shape[-2] % multiple or x.shape[-1] % multiple):
        raise ValueError(
            f"{name} sides {tuple(x.shape[-2:])} must be multiples of {multiple}; pad the image "
            f"(WSSSNet.pad) first"
        )
