"""The plugin interface: the method registry, method config sections (typed dataclasses checked at
load and at build time), method heads on the network, the label maps a method declares, and the
backbone contract's intermediate features and global-attention flags."""

from __future__ import annotations

import pytest
import torch

from wsss.backbones.conformer import conformer_micro
from wsss.backbones.hybrid import hybrid_lite0_tiny
from wsss.backbones.mit import mit_tiny
from wsss.backbones.vit import mctformer_v2_micro, vit_micro
from wsss.config import defaults, load_config
from wsss.methods import (
    all_map_names,
    build_method,
    build_network,
    config_sections,
    method_class,
    method_names,
)
from wsss.methods.afa import AFAConfig, AFAHead
from wsss.methods.aream import AReAMConfig
from wsss.methods.base import PseudoConfig


def test_registry_holds_every_method_file():
    assert {"cam", "afa", "aream", "supervised"} <= set(method_names())
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_class("nope")
    with pytest.raises(ValueError, match="config key 'method'"):
        load_config("afa_mit_tiny_synthetic", ["method=nope"])


def test_sections_come_from_the_methods():
    sections = config_sections()
    assert sections["afa"] is AFAConfig and sections["aream"] is AReAMConfig
    assert sections["pseudo"] is PseudoConfig  # the section every method shares
    assert method_class("cam").Config is None  # the baseline reads the shared schedule only
    d = defaults()
    assert dict(d.afa) == AFAConfig.defaults() and dict(d.aream) == AReAMConfig.defaults()
    assert AFAConfig.defaults()["radius"] == 8 and AReAMConfig.defaults()["layer_index"] == 7


@pytest.mark.parametrize("key,value,match", [
    ("radius", 0, "afa.radius"), ("window", "hexagon", "afa.window"), ("sampling", "random", "afa.sampling"),
    ("aff_target_switch_iter", -1, "afa.aff_target_switch_iter"),
])
def test_bad_method_options_fail_at_load_and_at_build(key, value, match):
    with pytest.raises(ValueError, match=match):
        load_config("afa_mit_tiny_synthetic", [f"afa.{key}={value}"])
    cfg = load_config("afa_mit_tiny_synthetic")
    cfg.afa[key] = value  # bypassing the loader: building the network / method still checks it
    with pytest.raises(ValueError, match=match):
        build_network(cfg, 5)


def test_unknown_method_key_is_an_error():
    with pytest.raises(KeyError, match="afa.radus"):
        load_config("afa_mit_tiny_synthetic", ["afa.radus=3"])
    with pytest.raises(KeyError, match="afa.radus"):
        AFAConfig.parse({"radus": 3}, "afa")


def test_network_holds_the_method_heads():
    torch.manual_seed(0)
    cfg = load_config("afa_mit_tiny_synthetic")
    net = build_network(cfg, 5)
    assert net.head_names == ["aff_head"] and isinstance(net.heads["aff_head"], AFAHead)
    assert {k for k in net.state_dict() if k.startswith("aff_head.")} == {"aff_head.proj.weight",
                                                                          "aff_head.proj.bias"}
    x = torch.randn(2, 3, 64, 64)
    out = net(x, with_seg=False)
    n = out.grids[net.aff_head.attn_layers[-1]]
    assert out.heads["aff_head"].shape == (2, n[0] * n[1], n[0] * n[1])
    assert net(x, with_seg=False, heads=False).heads == {}
    with pytest.raises(ValueError, match="unknown method head"):
        net.forward_cam(x, heads=["nope"])
    plain = build_network(load_config("cam_mit_tiny_synthetic"), 5)
    assert plain.head_names == [] and not any(k.startswith("aff_head") for k in plain.state_dict())


def test_label_map_declarations():
    assert method_class("afa").PSEUDO_MAP == "aff_par" and method_class("aream").PSEUDO_MAP == "refined_par"
    assert method_class("cam").PSEUDO_MAP == "cam_par" and method_class("supervised").PSEUDO_MAP is None
    names = all_map_names()
    for name in method_names():
        cls = method_class(name)
        assert set(cls.MAPS) | set(cls.EXTRA_MAPS) <= set(names)
        assert cls.PSEUDO_MAP is None or cls.PSEUDO_MAP in (*cls.MAPS, *cls.EXTRA_MAPS)
    cfg = load_config("afa_mit_tiny_synthetic")
    net = build_network(cfg, 5)
    assert set(build_method(cfg, net).map_names(net)) == {"cam", "cam_par", "pseudo", "aff", "aff_par", "seg"}


def _manual_vit_tokens(m, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Token features after block ``layer``, by running the ViT's pieces one by one."""
    patches = m.patch_embed(x)
    b, _, h, w = patches.shape
    tokens = torch.cat([m.cls_token.expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    tokens = tokens + m.interpolate_pos_embed(h, w)
    for blk in list(m.blocks)[: layer + 1]:
        tokens = blk(tokens, False)[0]
    return tokens


@torch.no_grad()
def test_intermediate_features_vit():
    torch.manual_seed(0)
    m = mctformer_v2_micro(num_classes=3, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    out = m(x, feature_layers=[1, -1])
    assert sorted(out.blocks) == [1, m.num_layers - 1] and out.block_grids[1] == (4, 4)
    torch.testing.assert_close(out.blocks[1], _manual_vit_tokens(m, x, 1))
    # no final norm on MCTformer: the last block's patch tokens are features[-1]
    last = out.blocks[m.num_layers - 1]
    torch.testing.assert_close(last[:, 3:].transpose(1, 2).reshape(out.features[-1].shape), out.features[-1])
    torch.testing.assert_close(m(x).features[-1], out.features[-1])  # capture changes nothing
    assert not m(x).blocks


@torch.no_grad()
def test_intermediate_features_other_families():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    mit = mit_tiny().eval()
    out = mit(x, feature_layers=[mit.num_layers - 1])
    feat = out.features[-1]
    normed = mit.norm4(out.blocks[mit.num_layers - 1])
    torch.testing.assert_close(normed.transpose(1, 2).reshape(feat.shape), feat)
    assert out.block_grids[mit.num_layers - 1] == tuple(feat.shape[-2:])
    out0 = mit(x, feature_layers=[0])
    assert out0.block_grids[0] == tuple(out0.features[0].shape[-2:])
    assert out0.blocks[0].shape[1] == out0.block_grids[0][0] * out0.block_grids[0][1]
    hyb = hybrid_lite0_tiny(output_stride=16).eval()
    out = hyb(x, feature_layers=[-1])
    tok = hyb.norm(out.blocks[hyb.num_layers - 1])
    t = hyb.num_prefix_tokens
    torch.testing.assert_close(tok[:, t:].transpose(1, 2).reshape(out.features[-1].shape), out.features[-1])
    conf = conformer_micro().eval()
    out = conf(x, feature_layers=[0, conf.num_layers - 1])
    torch.testing.assert_close(conf.trans_norm(out.blocks[conf.num_layers - 1][:, :1]), out.prefix)
    assert out.blocks[0].shape[1] == 1 + 4 * 4


def test_global_attention_flags():
    mit = mit_tiny()
    assert mit.global_attn == [sr == 1 for sr, d in zip(mit.sr_ratios, mit.depths) for _ in range(d)]
    assert not mit.global_attn[0] and mit.global_attn[-1]
    assert all(vit_micro().global_attn) and all(conformer_micro().global_attn)
