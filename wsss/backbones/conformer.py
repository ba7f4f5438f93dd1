"""Conformer (Peng et al., ICCV 2021): a ResNet-like CNN branch and a ViT branch coupled by FCUs.

Layout for an input (B, 3, H, W), H and W multiples of 16 (Conformer-S numbers; see docs/methods/aream.md §3):

* stem: conv 7x7 s2 (64) -> BN -> ReLU -> maxpool 3x3 s2, giving ``x_base`` (B, 64, H/4, W/4);
* stage 1: ``conv_1`` bottleneck 64 -> 256 at H/4; ``trans_patch_conv`` (k = s = 4) turns ``x_base`` into
  Np = (H/16)(W/16) patch tokens, one ``cls_token`` is prepended, then transformer block ``trans_1``;
* ``conv_trans_2..4`` (256 channels, FCU stride 4), ``conv_trans_5..8`` (512, first with stride 2, FCU
  stride 2), ``conv_trans_9..12`` (1024, first with stride 2, FCU stride 1; the last one's fusion block
  has a projected residual). Each ConvTransBlock runs: ``cnn_block`` (returns its mid map x2) ->
  ``squeeze_block`` (FCUDown of x2, added to the patch tokens only) -> ``trans_block`` ->
  ``expand_block`` (FCUUp of the patch tokens, nearest upsampling) -> ``fusion_block`` (a bottleneck whose
  conv2 input is its own mid map plus the FCUUp output).

As in AReAM / TransCAM the last fusion block keeps stride 1, so the final CNN map is at stride 16:
``features[-1]`` is (B, 256 * channel_ratio, H/16, W/16) (1024 channels for Conformer-S), the map
AReAM's 1x1 ``cnn_head`` reads. ``prefix`` is ``trans_norm`` of the class token, (B, 1, D), the input
of AReAM's ``att_head``. There is no positional embedding, so any size divisible by 16 works.

Parameter names follow pengzhiliang/Conformer, so its ImageNet checkpoints load after dropping the
classifier heads (see :func:`checkpoint_filter_fn`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.backbones._layers import Block, dpr, init_vit_weights
from wsss.backbones.base import AttnReduce, Backbone, BackboneOutput, check_input
from wsss.core.registry import BACKBONES, register_detector
from wsss.core.weights import CheckpointError
from wsss.core.weights import load_pretrained as load_weights

# Official eps values: BN in ConvBlock / FCUUp and LN in blocks / FCUDown use 1e-6; the stem BN and
# trans_norm keep the PyTorch defaults (1e-5).
_EPS = 1e-6
_EXPANSION = 4  # bottleneck: mid channels = out channels / 4
PATCH = 16


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_EPS)


class ConvBlock(nn.Module):
    """ResNet bottleneck 1x1 -> 3x3 (stride) -> 1x1 with an optional projected residual.

    ``forward(x, x_t)``: x (B, Cin, H, W); x_t (B, Cout/4, H, W) or None is added to the conv2 input
    (the FCU injection of a fusion block). Returns (out (B, Cout, H/s, W/s), mid (B, Cout/4, H/s, W/s)).
    """

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, res_conv: bool = False) -> None:
        super().__init__()
        mid = outplanes // _EXPANSION
        self.conv1 = nn.Conv2d(inplanes, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(mid)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid, outplanes, 1, bias=False)
        self.bn3 = _bn(outplanes)
        self.act3 = nn.ReLU(inplace=True)
        self.res_conv = res_conv
        if res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False)
            self.residual_bn = _bn(outplanes)

    def forward(self, x: Tensor, x_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        residual = self.residual_bn(self.residual_conv(x)) if self.res_conv else x
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.conv2(y if x_t is None else y + x_t)
        mid = self.act2(self.bn2(y))
        y = self.bn3(self.conv3(mid)) + residual
        return self.act3(y), mid


class FCUDown(nn.Module):
    """CNN map -> patch tokens: 1x1 conv -> avg-pool(stride) -> LayerNorm -> GELU.

    (B, C, h*s, w*s) -> (B, h*w, D), tokens row-major.
    """

    def __init__(self, inplanes: int, outplanes: int, dw_stride: int) -> None:
        super().__init__()
        self.conv_project = nn.Conv2d(inplanes, outplanes, 1)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = nn.LayerNorm(outplanes, eps=_EPS)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.sample_pooling(self.conv_project(x)).flatten(2).transpose(1, 2)
        return self.act(self.ln(x))


class FCUUp(nn.Module):
    """Patch tokens -> CNN map: 1x1 conv -> BN -> ReLU -> nearest upsampling by ``up_stride``.

    (B, h*w, D) -> (B, C, h*s, w*s).
    """

    def __init__(self, inplanes: int, outplanes: int, up_stride: int) -> None:
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, 1)
        self.bn = _bn(outplanes)
        self.act = nn.ReLU()

    def forward(self, tokens: Tensor, h: int, w: int) -> Tensor:
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        x = self.act(self.bn(self.conv_project(x)))
        if self.up_stride == 1:
            return x
        return F.interpolate(x, size=(h * self.up_stride, w * self.up_stride), mode="nearest")


class ConvTransBlock(nn.Module):
    """One coupled stage step: cnn_block -> FCUDown -> trans_block -> FCUUp -> fusion_block.

    ``forward(x, tokens, capture)``: x (B, Cin, H', W'), tokens (B, 1+Np, D). Returns the new CNN map
    (B, Cout, H'/stride, W'/stride), the new tokens and the block's logits (or None).

    cls_double: pengzhiliang / TransCAM add ``[cls ; FCUDown]`` to the tokens, which doubles the class
    token before every ConvTransBlock; AReAM (the default, False) adds FCUDown to the patch tokens only.
    """

    def __init__(
        self,
        inplanes: int,
        outplanes: int,
        res_conv: bool,
        stride: int,
        dw_stride: int,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        last_fusion: bool = False,
        cls_double: bool = False,
    ) -> None:
        super().__init__()
        mid = outplanes // _EXPANSION
        self.cnn_block = ConvBlock(inplanes, outplanes, stride=stride, res_conv=res_conv)
        # AReAM/TransCAM keep stride 1 in the last fusion block (ImageNet Conformer used 2): CAM at stride 16.
        self.fusion_block = ConvBlock(outplanes, outplanes, stride=1, res_conv=last_fusion)
        self.squeeze_block = FCUDown(mid, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, mid, dw_stride)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path)
        self.dw_stride = dw_stride
        self.cls_double = cls_double

    def forward(
        self, x: Tensor, tokens: Tensor, capture: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        x, mid = self.cnn_block(x)
        h, w = mid.shape[-2] // self.dw_stride, mid.shape[-1] // self.dw_stride
        cls = tokens[:, :1] * 2 if self.cls_double else tokens[:, :1]
        tokens = torch.cat([cls, tokens[:, 1:] + self.squeeze_block(mid)], dim=1)
        tokens, logits = self.trans_block(tokens, capture)
        x, _ = self.fusion_block(x, self.expand_block(tokens[:, 1:], h, w))
        return x, tokens, logits


def _init_weights(m: nn.Module) -> None:
    """Official init: timm Linear/LN init, Kaiming-normal (fan_out) convs, unit BN."""
    init_vit_weights(m)
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Conformer(Backbone):
    """Conformer backbone with attention capture (see the module docstring for the layout).

    Layers: ``trans_1`` is layer 0, ``conv_trans_{i}`` is layer i - 1 (i = 2..depth). Every layer sees
    1 + Np tokens with Np = (H/16)(W/16); ``grids[l] = (H/16, W/16)``.

    Args: ``stem_channels`` is fixed to 64 in the official model (smaller only for ``conformer_micro``);
    stage widths are ``base_channel * channel_ratio * (1, 2, 4)``; ``cls_double=True`` reproduces the
    pengzhiliang/TransCAM class-token doubling (see :class:`ConvTransBlock`), AReAM's behaviour is False.
    """

    num_prefix_tokens = 1
    patch_stride = PATCH
    input_multiple = PATCH

    def __init__(
        self,
        base_channel: int = 64,
        channel_ratio: float = 4,
        stem_channels: int = 64,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        cls_double: bool = False,
    ) -> None:
        super().__init__()
        if depth % 3 or depth < 3:
            raise ValueError(f"Conformer depth must be a positive multiple of 3, got {depth}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_layers = depth
        self.num_heads = [num_heads] * depth
        self.head_dims = [embed_dim // num_heads] * depth
        self.attn_strides = [16] * depth
        rates = dpr(drop_path_rate, depth)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.trans_norm = nn.LayerNorm(embed_dim)

        self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        channels = [int(base_channel * channel_ratio * m) for m in (1, 2, 4)]
        dw = PATCH // 4  # stem stride 4 -> patch stride 16
        self.conv_1 = ConvBlock(stem_channels, channels[0], stride=1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(stem_channels, embed_dim, kernel_size=dw, stride=dw)
        self.trans_1 = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[0])

        # Official numbering: stage 1 holds trans_1 plus conv_trans_2..d/3, stage 2 conv_trans_d/3+1..2d/3,
        # stage 3 the rest up to conv_trans_d (d = 12: 2-4, 5-8, 9-12).
        starts = (2, depth // 3 + 1, 2 * depth // 3 + 1, depth + 1)
        self._ct_names: list[str] = []
        cin = channels[0]
        for stage, (cout, fcu) in enumerate(zip(channels, (dw, dw // 2, dw // 4))):
            for i in range(starts[stage], starts[stage + 1]):
                first = stage > 0 and i == starts[stage]  # first block of stages 2 and 3 downsamples
                name = f"conv_trans_{i}"
                block = ConvTransBlock(
                    cin, cout, res_conv=first, stride=2 if first else 1, dw_stride=fcu, embed_dim=embed_dim,
                    num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rates[i - 1],
                    last_fusion=i == depth, cls_double=cls_double,
                )  # fmt: skip
                self.add_module(name, block)
                self._ct_names.append(name)
                cin = cout
        self.out_channels = [channels[2]]

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def layer_modules(self) -> list[nn.Module]:
        return [self.trans_1, *(getattr(self, name) for name in self._ct_names)]

    def block_tokens(self, layer: int, output: object) -> Tensor:
        """trans_1 returns (tokens, logits), the conv-trans blocks (feat, tokens, logits)."""
        return output[0] if layer == 0 else output[1]  # type: ignore[index]

    def forward_features(
        self, x: Tensor, attn_layers: Sequence[int] = (), attn_reduce: AttnReduce | None = None
    ) -> BackboneOutput:
        """x: (B, 3, H, W) with H, W multiples of 16.

        Returns features [(B, 256 * channel_ratio, H/16, W/16)], prefix (B, 1, D) = trans_norm(cls),
        attn[l] (B, heads, 1+Np, 1+Np) scaled logits for the requested layers.
        """
        check_input(x, multiple=PATCH)
        want = self.check_layers(attn_layers)
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        out = BackboneOutput(features=[])

        x_base = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        feat, _ = self.conv_1(x_base)
        tokens = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens, logits = self.trans_1(tokens, 0 in want)
        self._keep(out, 0, logits, attn_reduce, grid)
        for layer, name in enumerate(self._ct_names, start=1):
            feat, tokens, logits = getattr(self, name)(feat, tokens, layer in want)
            self._keep(out, layer, logits, attn_reduce, grid)

        out.features = [feat]
        # LayerNorm is per token: normalising the class token alone equals trans_norm(all tokens)[:, :1].
        out.prefix = self.trans_norm(tokens[:, :1])
        return out

    @staticmethod
    def _keep(
        out: BackboneOutput,
        layer: int,
        logits: Tensor | None,
        reduce: AttnReduce | None,
        grid: tuple[int, int],
    ) -> None:
        if logits is None:
            return
        out.attn[layer] = reduce(layer, logits) if reduce is not None else logits
        out.grids[layer] = grid


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: Conformer) -> dict[str, Tensor]:
    """Convert a foreign Conformer state dict to this model's names.

    * pengzhiliang/Conformer ImageNet checkpoints: the same names; the classifiers ``conv_cls_head``
      and ``trans_cls_head`` are dropped (as AReAM does: every key containing ``head``).
    * AReAM (``cnn_head``, ``att_head``) and TransCAM (``conv_cls_head``, ``trans_cls_head``) trained
      checkpoints: same backbone names; their heads are dropped the same way, so load those heads
      into the method's own head modules separately if needed.
    * BN ``num_batches_tracked`` counters absent from the file are taken from the model (they only
      matter for momentum=None BN).

    ``module.`` prefixes are stripped earlier by :func:`wsss.core.weights.read_state_dict`. Any other
    key is passed through unchanged and so reported as "unexpected" by ``load_into``.
    """
    sd = {k: v for k, v in state_dict.items() if "head" not in k}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v.clone()
    return sd


def _build(pretrained: str | None, **cfg: object) -> Conformer:
    model = Conformer(**cfg)  # type: ignore[arg-type]
    return load_weights(model, pretrained, checkpoint_filter_fn) if pretrained else model


@BACKBONES.register()
def conformer_s(pretrained: str | None = None, drop_path_rate: float = 0.1, **kw: object) -> Conformer:
    """Conformer-S: channel_ratio 4, D 384, depth 12, 6 heads, MLP 4, qkv bias (~36.3M without heads)."""
    cfg: dict = dict(channel_ratio=4, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True)
    return _build(pretrained, **{**cfg, "drop_path_rate": drop_path_rate, **kw})


@BACKBONES.register()
def conformer_ti(pretrained: str | None = None, drop_path_rate: float = 0.1, **kw: object) -> Conformer:
    """Conformer-Ti: channel_ratio 1 (final map 256 channels), D 384, depth 12, 6 heads."""
    cfg: dict = dict(channel_ratio=1, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True)
    return _build(pretrained, **{**cfg, "drop_path_rate": drop_path_rate, **kw})


@BACKBONES.register()
def conformer_micro(pretrained: str | None = None, drop_path_rate: float = 0.1, **kw: object) -> Conformer:
    """A few-hundred-thousand-parameter Conformer for CPU demos and tests (12 layers, 2 heads, D 64)."""
    cfg: dict = dict(
        stem_channels=16, base_channel=64, channel_ratio=0.25, embed_dim=64, depth=12, num_heads=2,
        mlp_ratio=2.0, qkv_bias=True,
    )  # fmt: skip
    return _build(pretrained, **{**cfg, "drop_path_rate": drop_path_rate, **kw})


__all__ = [
    "Conformer",
    "ConvBlock",
    "ConvTransBlock",
    "FCUDown",
    "FCUUp",
    "checkpoint_filter_fn",
    "conformer_micro",
    "conformer_s",
    "conformer_ti",
]


@register_detector
def detect_checkpoint(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    """This family's registered name and builder kwargs for a foreign state dict, or None when it is
    not one of its checkpoints (:func:`wsss.api.hub.detect_backbone`)."""
    if "trans_patch_conv.weight" not in sd or "conv_1.conv3.weight" not in sd:
        return None
    dim = int(sd["trans_patch_conv.weight"].shape[0])
    c1 = int(sd["conv_1.conv3.weight"].shape[0])
    stem = int(sd["conv1.weight"].shape[0]) if "conv1.weight" in sd else 64
    sizes = {("conformer_s", 384, 256, 64), ("conformer_ti", 384, 64, 64), ("conformer_micro", 64, 16, 16)}
    for name, d, c, s in sizes:
        if (d, c, s) == (dim, c1, stem):
            return name, {}
    raise CheckpointError(f"Conformer checkpoint with embed dim {dim}, first stage {c1} channels and stem "
                          f"{stem} matches no Conformer size (conformer_s, conformer_ti, conformer_micro)")
