"""AReAM wiring: which parameters the deep-layer affinity loss reaches, the shallow/deep split, the
refined maps' background score and the refined CAM (checked against a written-out loop)."""

from __future__ import annotations

import torch

from wsss.config import load_config
from wsss.methods import build_method, build_network
from wsss.ops.attention import aream_affinity_loss, layer_logit_mean


def _grad_norm(p: torch.nn.Parameter) -> float:
    return 0.0 if p.grad is None else float(p.grad.abs().sum())


def test_aream_loss_reaches_deep_attention_only() -> None:
    """The deep-layer affinity loss trains q/k of the supervised layers (and everything below), but
    not the MLP of the last block, whose output no supervised logit depends on."""
    torch.manual_seed(0)
    cfg = load_config("aream_mctformer_micro_synthetic", ["model.backbone_kwargs.img_size=64"])
    net = build_network(cfg, 5)
    method = build_method(cfg, net)
    deep = method.deep_layers()
    assert deep == list(range(4, 6)) and method.shallow_layers() == list(range(4))
    x = torch.randn(2, 3, 64, 64)
    out = net(x, deep, lambda layer, z: layer_logit_mean(z, net.backbone.num_prefix_tokens), with_seg=False)
    n = out.attn[deep[0]].shape[-1]
    target = torch.randint(0, 2, (2, n, n))
    aream_affinity_loss([out.attn[i] for i in deep], target).backward()
    blocks = net.backbone.blocks
    assert _grad_norm(blocks[5].attn.qkv.weight) > 0 and _grad_norm(blocks[4].attn.qkv.weight) > 0
    assert _grad_norm(blocks[0].attn.qkv.weight) > 0  # shallower blocks feed the deep ones
    assert _grad_norm(blocks[5].mlp.fc1.weight) == 0
    assert _grad_norm(net.cam_head.classifier.weight) == 0


def test_aream_refined_maps_use_their_own_background_score() -> None:
    """aream.bkg_score thresholds the refined maps (null: eval.bkg_score); the raw CAM keeps eval's."""
    from wsss.methods.base import MapInput
    from wsss.refine.labels import cam_to_label

    torch.manual_seed(0)
    cfg = load_config("aream_mctformer_micro_synthetic", ["model.backbone_kwargs.img_size=64"])
    net = build_network(cfg, 5).eval()
    x, labels = torch.rand(2, 3, 64, 64), torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
    method = build_method(cfg, net)
    assert method.refined_bkg_score() == float(cfg.eval.bkg_score)
    refined = method.aream_cam(net, x, labels, method.layers, None, [1.0])
    seen = set()
    for score in (0.05, 0.6):
        cfg.aream.bkg_score = score
        method = build_method(cfg, net)
        maps = method.extra_maps(net, MapInput(x, labels, refined, [1.0]), {"refined"})
        assert torch.equal(maps["refined"], cam_to_label(refined, labels, bkg_score=score))
        seen.add(int((maps["refined"] == 0).sum()))
    assert len(seen) == 2  # the score changed the background
