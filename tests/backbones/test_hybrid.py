"""Hybrid backbone: EfficientNet-Lite0 tokens + transformer blocks (attention contract, init, methods)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ref_blocks
from wsss.backbones.hybrid import HybridTransformer, hybrid_lite0_tiny
from wsss.config import load_config
from wsss.methods import build_method, build_network


def tiny(**kw) -> HybridTransformer:
    kw = {"embed_dim": 32, "depth": 3, "num_heads": 2, **kw}
    return HybridTransformer(**kw)


def ref_tokens_forward(m: HybridTransformer, tokens: torch.Tensor):
    """Plain transformer over (B, N, D) tokens (prefix first), then the final norm."""
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    z, logits = ref_blocks(sd, tokens, m.num_layers, m.num_heads[0])
    return F.layer_norm(z, (z.shape[-1],), sd["norm.weight"], sd["norm.bias"], 1e-6), logits


def test_the_hybrid_declares_the_cnn_statistics():
    """The network normalises [0, 1] images with its backbone's mean/std: (x - 0.5) / 0.5 for Lite0."""
    m = tiny()
    assert m.input_mean == m.cnn.input_mean == (0.5, 0.5, 0.5) and m.input_std == (0.5, 0.5, 0.5)
    x01 = torch.rand(2, 3, 5, 4)
    torch.testing.assert_close(m.normalize(x01), (x01 - 0.5) / 0.5, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("class_tokens", [0, 3])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_forward_matches_reference_and_contract(class_tokens, output_stride):
    torch.manual_seed(0)
    m = tiny(num_class_tokens=class_tokens, output_stride=output_stride, qk_init="random", pos_embed=True,
             grid=4).eval()
    with torch.no_grad():
        for p in m.parameters():  # non-trivial norms and biases so that a skipped piece shows
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = m(x, attn_layers=range(3))
        fast = m(x)
        cnn = m.cnn(x).features
        tok = m.proj(cnn[-1].flatten(2).transpose(1, 2)) + m.tokens_pos(*cnn[-1].shape[-2:])
        if class_tokens:
            tok = torch.cat([m.cls_token.expand(2, -1, -1), tok], 1)
        z, logits = ref_tokens_forward(m, tok)
    h, w = 64 // output_stride, 48 // output_stride
    n = class_tokens + h * w
    assert [tuple(f.shape[1:]) for f in out.features] == [(24, 16, 12), (40, 8, 6), (32, h, w)]
    for layer in range(3):
        assert out.attn[layer].shape == (2, 2, n, n) and out.grids[layer] == (h, w)
        torch.testing.assert_close(out.attn[layer], logits[layer], atol=1e-4, rtol=1e-4)
    fmap = z[:, class_tokens:].transpose(1, 2).reshape(2, 32, h, w)
    torch.testing.assert_close(out.features[-1], fmap, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.features[-1], out.features[-1], atol=1e-5, rtol=1e-5)  # SDPA path
    assert fast.attn == {}
    if class_tokens:
        torch.testing.assert_close(out.prefix, z[:, :class_tokens], atol=1e-4, rtol=1e-4)
    else:
        assert out.prefix is None
    assert m.num_prefix_tokens == class_tokens and m.final_grid_layers() == [0, 1, 2]


def test_similarity_init_makes_attention_feature_similarity():
    """With q = k = identity, block 0's logits are <LN(x_i), LN(x_j)> over each head's dims / sqrt(d)."""
    torch.manual_seed(1)
    m = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = m(x, attn_layers=[0])
        cnn = m.cnn(x).features[-1]
        y = m.blocks[0].norm1(m.proj(cnn.flatten(2).transpose(1, 2)))[0]  # (N, D)
    n, hd = y.shape[0], 16
    for h in range(2):
        part = y[:, h * hd : (h + 1) * hd]
        want = torch.tensor([[float(part[i] @ part[j]) for j in range(n)] for i in range(n)]) / math.sqrt(hd)
        torch.testing.assert_close(out.attn[0][0, h], want, atol=1e-4, rtol=1e-4)
    rnd = tiny(qk_init="random")
    assert not torch.equal(rnd.blocks[0].attn.qkv.weight[:32], torch.eye(32))
    with pytest.raises(ValueError, match="qk_init"):
        tiny(qk_init="eye")


def test_frozen_cnn_gets_no_gradient_and_keeps_its_statistics():
    torch.manual_seed(2)
    m = tiny().train()
    assert not m.cnn.training and m.blocks[0].training
    stats = m.cnn._blocks[3]._bn1.running_mean.clone()
    out = m(torch.randn(2, 3, 32, 32), attn_layers=[1])
    (out.features[-1].sum() + out.attn[1].sum()).backward()
    assert all(p.grad is None for p in m.cnn.parameters())
    assert m.blocks[0].attn.qkv.weight.grad is not None and m.proj.weight.grad is not None
    assert torch.equal(stats, m.cnn._blocks[3]._bn1.running_mean)
    trainable = tiny(freeze_cnn=False).train()
    trainable(torch.randn(2, 3, 32, 32)).features[-1].sum().backward()
    assert trainable.cnn._conv_stem.weight.grad is not None


def test_rejects_bad_options_and_input():
    with pytest.raises(ValueError, match="output_stride"):
        tiny(output_stride=32)
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny()(torch.randn(1, 3, 40, 32))


def test_builder_sizes():
    m = hybrid_lite0_tiny()
    assert m.embed_dim == 192 and m.num_layers == 4 and m.num_heads == [6] * 4
    assert m.out_channels == [24, 40, 192]


@pytest.mark.parametrize("method", ["cam", "afa", "aream", "supervised"])
def test_methods_train_on_the_hybrid(method):
    """Each method's training step runs on the hybrid through the backbone contract; the loss
    reaches the transformer and never the frozen CNN (weights not needed: pretrained=null)."""
    torch.manual_seed(3)
    cfg = load_config(f"{method}_hybrid_lite0_synthetic", ["model.pretrained=null", "cam.scales=[1.0]"])
    net = build_network(cfg, 5)
    m = build_method(cfg, net)
    labels = torch.zeros(2, 5)
    labels[0, 1] = labels[1, 3] = labels[1, 0] = 1
    batch = {"image": torch.randn(2, 3, 64, 64), "labels": labels,
             "img_box": torch.tensor([[0, 64, 0, 64]] * 2),
             "mask": torch.randint(0, 6, (2, 64, 64))}
    loss, logs = m.training_step(net, batch, 10_000)
    assert torch.isfinite(loss)
    loss.backward()
    assert net.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in net.backbone.cnn.parameters())
