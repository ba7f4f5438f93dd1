"""Tests for wsss.backbones.conformer (Conformer family, AReAM layout)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.backbones.conformer import Conformer, checkpoint_filter_fn, conformer_micro, conformer_s
from wsss.core.registry import BACKBONES
from wsss.core.weights import CheckpointError, load_into

HEADS, DIM = 2, 64  # conformer_micro


def _micro(**kw) -> Conformer:
    torch.manual_seed(0)
    return conformer_micro(**kw)


def _randomise_bn(model: Conformer, seed: int = 1) -> None:
    """Give every BN non-trivial affine parameters and running statistics (eval-mode tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


# ----------------------------------------------------------------------------------------------------
# A slow functional re-statement of the AReAM Conformer forward, read straight from the state dict by the
# official parameter names (eval mode: BN with running statistics, no drop-path).
# ----------------------------------------------------------------------------------------------------


def _bn(sd: dict, p: str, x: Tensor, eps: float = 1e-6) -> Tensor:
    stats = sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"]
    return F.batch_norm(x, *stats, False, 0.0, eps)


def _ref_conv_block(sd, p, x, stride=1, res=False, x_t=None):
    y = F.relu(_bn(sd, f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"])))
    if x_t is not None:
        y = y + x_t
    mid = F.relu(_bn(sd, f"{p}.bn2", F.conv2d(y, sd[f"{p}.conv2.weight"], stride=stride, padding=1)))
    y = _bn(sd, f"{p}.bn3", F.conv2d(mid, sd[f"{p}.conv3.weight"]))
    r = x
    if res:
        r = _bn(sd, f"{p}.residual_bn", F.conv2d(x, sd[f"{p}.residual_conv.weight"], stride=stride))
    return F.relu(y + r), mid


def _ref_block(sd, p, x, heads):
    """Transformer block with a per-head loop; returns the output and the (B, heads, N, N) logits."""
    B, N, D = x.shape
    d = D // heads
    y = F.layer_norm(x, (D,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-6)
    qkv = y @ sd[f"{p}.attn.qkv.weight"].T + sd[f"{p}.attn.qkv.bias"]
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    outs, logits = [], []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        lg = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        logits.append(lg)
        outs.append(lg.softmax(-1) @ v[..., sl])
    att = torch.cat(outs, -1) @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"]
    x = x + att
    y = F.layer_norm(x, (D,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-6)
    y = F.gelu(y @ sd[f"{p}.mlp.fc1.weight"].T + sd[f"{p}.mlp.fc1.bias"])
    x = x + y @ sd[f"{p}.mlp.fc2.weight"].T + sd[f"{p}.mlp.fc2.bias"]
    return x, torch.stack(logits, 1)


def _ref_forward(sd, x, heads, depth=12, cls_double=False):
    sd = {k: v.detach() for k, v in sd.items()}
    B = x.shape[0]
    xb = F.max_pool2d(
        F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), 1e-5)), 3, 2, 1
    )
    c, _ = _ref_conv_block(sd, "conv_1", xb, res=True)
    t = F.conv2d(xb, sd["trans_patch_conv.weight"], sd["trans_patch_conv.bias"], stride=4)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    t, lg = _ref_block(sd, "trans_1", t, heads)
    logits = [lg]
    D = t.shape[-1]
    for i in range(2, depth + 1):
        p = f"conv_trans_{i}"
        stage = 0 if i <= depth // 3 else (1 if i <= 2 * depth // 3 else 2)
        first = i in (depth // 3 + 1, 2 * depth // 3 + 1)
        s = 4 // 2**stage
        c, mid = _ref_conv_block(sd, f"{p}.cnn_block", c, stride=2 if first else 1, res=first)
        proj = f"{p}.squeeze_block.conv_project"
        down = F.avg_pool2d(F.conv2d(mid, sd[f"{proj}.weight"], sd[f"{proj}.bias"]), s)
        h, w = down.shape[-2:]
        down = F.gelu(
            F.layer_norm(
                down.flatten(2).transpose(1, 2),
                (D,),
                sd[f"{p}.squeeze_block.ln.weight"],
                sd[f"{p}.squeeze_block.ln.bias"],
                1e-6,
            )
        )
        cls = t[:, :1] * (2 if cls_double else 1)
        t = torch.cat([cls, t[:, 1:] + down], 1)
        t, lg = _ref_block(sd, f"{p}.trans_block", t, heads)
        logits.append(lg)
        up = t[:, 1:].transpose(1, 2).reshape(B, D, h, w)
        proj = f"{p}.expand_block.conv_project"
        up = F.conv2d(up, sd[f"{proj}.weight"], sd[f"{proj}.bias"])
        up = F.relu(_bn(sd, f"{p}.expand_block.bn", up))
        up = up.repeat_interleave(s, 2).repeat_interleave(s, 3)  # nearest upsampling
        c, _ = _ref_conv_block(sd, f"{p}.fusion_block", c, res=i == depth, x_t=up)
    prefix = F.layer_norm(t[:, :1], (D,), sd["trans_norm.weight"], sd["trans_norm.bias"], 1e-5)
    return c, prefix, logits


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_forward_backward_shapes(hw):
    model = _micro().train()
    H, W = hw
    x = torch.randn(2, 3, H, W)
    out = model(x, attn_layers=range(12))
    h, w = H // 16, W // 16
    assert len(out.features) == 1
    assert out.features[0].shape == (2, 64, h, w) and model.out_channels == [64]
    assert out.prefix.shape == (2, 1, DIM)
    assert sorted(out.attn) == list(range(12))
    for layer in range(12):
        assert out.attn[layer].shape == (2, HEADS, 1 + h * w, 1 + h * w)
        assert out.grids[layer] == (h, w)
    loss = out.features[0].mean() + out.prefix.square().mean() + sum(a.mean() for a in out.attn.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.cls_token.grad.abs().sum() > 0


CASES = [((64, 64), 2, False), ((48, 80), 1, False), ((32, 64), 2, True)]


@pytest.mark.parametrize("hw,batch,cls_double", CASES)
def test_matches_functional_reference(hw, batch, cls_double):
    # float64: activations reach O(100) after 12 residual stages, so fp32 rounding would hide small errors.
    model = _micro(cls_double=cls_double)
    _randomise_bn(model)
    model.eval().double()
    torch.manual_seed(3)
    x = torch.randn(batch, 3, *hw, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, attn_layers=range(12))
        feat, prefix, logits = _ref_forward(model.state_dict(), x, HEADS, cls_double=cls_double)
    torch.testing.assert_close(out.features[0], feat, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.prefix, prefix, rtol=1e-9, atol=1e-9)
    for layer in range(12):
        torch.testing.assert_close(out.attn[layer], logits[layer], rtol=1e-9, atol=1e-9)


def test_cls_double_changes_output():
    x = torch.randn(1, 3, 32, 32)
    a = _micro().eval()
    b = _micro(cls_double=True).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert not torch.allclose(a(x).prefix, b(x).prefix)


def test_logits_match_pairwise_loops():
    model = _micro().eval()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 48)
    blk = model.conv_trans_6.trans_block  # conv_trans_i is global layer i - 1
    seen: dict[str, Tensor] = {}

    def grab(module, args):  # returns None, so the block's arguments are left alone
        seen["x"] = args[0].detach().clone()

    hook = blk.register_forward_pre_hook(grab)
    with torch.no_grad():
        out = model(x, attn_layers=[5])
    hook.remove()
    assert list(out.attn) == [5]
    t = seen["x"]
    B, N, D = t.shape
    d = D // HEADS
    y = F.layer_norm(t, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    ref = torch.zeros(B, HEADS, N, N, dtype=torch.float64)
    for b in range(B):
        for h in range(HEADS):
            for i in range(N):
                for j in range(N):
                    q = qkv[b, i, h * d : (h + 1) * d].double()
                    k = qkv[b, j, D + h * d : D + (h + 1) * d].double()
                    ref[b, h, i, j] = (q * k).sum() / math.sqrt(d)
    torch.testing.assert_close(out.attn[5].double(), ref, rtol=1e-5, atol=1e-5)
    rows = out.attn[5].softmax(-1).sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_sdpa_and_explicit_paths_agree():
    model = _micro()
    _randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        fast = model(x)
        slow = model(x, attn_layers=range(12))
        fast64 = model.double()(x.double())
        slow64 = model(x.double(), attn_layers=range(12))
    assert fast.attn == {} and fast.grids == {}
    # fp32: equal up to rounding relative to the map's scale; fp64: equal to 1e-9.
    scale = slow.features[0].abs().max().item()
    torch.testing.assert_close(fast.features[0], slow.features[0], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(fast.prefix, slow.prefix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast64.features[0], slow64.features[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fast64.prefix, slow64.prefix, rtol=1e-9, atol=1e-9)


def test_attn_reduce_and_layer_selection():
    model = _micro().eval()
    x = torch.randn(2, 3, 32, 32)
    calls = []

    def reduce(layer: int, logits: Tensor) -> Tensor:
        calls.append(layer)
        return logits.softmax(-1).mean(1)

    with torch.no_grad():
        full = model(x, attn_layers=[0, 6, -1])
        red = model(x, attn_layers=[0, 6, -1], attn_reduce=reduce)
    assert sorted(full.attn) == [0, 6, 11] and sorted(calls) == [0, 6, 11]
    for layer in (0, 6, 11):
        torch.testing.assert_close(red.attn[layer], full.attn[layer].softmax(-1).mean(1))
        assert red.attn[layer].shape == (2, 5, 5) and red.grids[layer] == (2, 2)
    with pytest.raises(ValueError, match="out of range"):
        model(x, attn_layers=[12])


def test_rejects_sizes_not_multiple_of_16():
    model = _micro()
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


def test_attributes_registry_and_drop_path():
    assert {"conformer_s", "conformer_ti", "conformer_micro"} <= set(BACKBONES.names())
    model = BACKBONES.build("conformer_micro", drop_path_rate=0.2)
    assert model.num_layers == 12 and model.num_heads == [2] * 12 and model.head_dims == [32] * 12
    assert model.num_prefix_tokens == 1 and model.patch_stride == 16
    assert model.no_weight_decay() == {"cls_token"}
    assert model.trans_1.drop_path.p == 0.0
    assert model.conv_trans_2.trans_block.drop_path.p == pytest.approx(0.2 / 11)
    assert model.conv_trans_12.trans_block.drop_path.p == pytest.approx(0.2)
    assert 2e5 < sum(p.numel() for p in model.parameters()) < 1e6
    with pytest.raises(ValueError, match="multiple of 3"):
        Conformer(depth=10)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def _official_sd(model: Conformer) -> dict[str, Tensor]:
    """The native state dict plus fake ImageNet classifier heads (pengzhiliang layout)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["conv_cls_head.weight"] = torch.randn(1000, 64)
    sd["conv_cls_head.bias"] = torch.randn(1000)
    sd["trans_cls_head.weight"] = torch.randn(1000, DIM)
    sd["trans_cls_head.bias"] = torch.randn(1000)
    return sd


def _outputs(model: Conformer, x: Tensor):
    with torch.no_grad():
        out = model.eval()(x, attn_layers=[3])
    return out.features[0], out.prefix, out.attn[3]


def test_official_checkpoint_loads_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = _micro()
    _randomise_bn(src)
    sd = _official_sd(src)
    pth = tmp_path / "conformer_small_patch16.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, pth)
    st = tmp_path / "conformer.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    # AReAM-trained layout: its own heads are dropped the same way.
    areamsd = {k: v for k, v in sd.items() if "cls_head" not in k}
    areamsd.update({"cnn_head.weight": torch.randn(20, 64, 1, 1), "att_head.weight": torch.randn(20, DIM)})
    aream = tmp_path / "aream_checkpoint.pth"
    torch.save(areamsd, aream)
    x = torch.randn(2, 3, 32, 48)
    want = _outputs(src, x)
    for path in (pth, st, aream):
        torch.manual_seed(123)  # a different init, so equal outputs prove the load
        got = _outputs(conformer_micro(pretrained=str(path)), x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_filter_fills_missing_bn_counters_only():
    model = _micro()
    sd = {k: v for k, v in _official_sd(model).items() if not k.endswith("num_batches_tracked")}
    out = checkpoint_filter_fn(sd, model)
    assert not any("head" in k for k in out)
    assert set(out) == set(model.state_dict())


def test_checkpoint_errors_name_the_key(tmp_path):
    model = _micro()
    sd = _official_sd(model)
    pth = tmp_path / "good.pth"
    torch.save(sd, pth)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="could not read"):
        conformer_micro(pretrained=str(bad))

    cases = {
        "conv_trans_5.squeeze_block.conv_project.weight": ("shape mismatch", lambda d, k: d.__setitem__(
            k, torch.randn(3, 3, 1, 1))),
        "pos_embed": ("unexpected", lambda d, k: d.__setitem__(k, torch.randn(1, 5, DIM))),
        "conv_trans_9.trans_block.attn.qkv.bias": ("missing", lambda d, k: d.pop(k)),
    }
    for key, (kind, edit) in cases.items():
        d = dict(sd)
        edit(d, key)
        path = tmp_path / f"{kind.replace(' ', '_')}.pth"
        torch.save({"model": d}, path)
        with pytest.raises(CheckpointError, match=kind) as err:
            conformer_micro(pretrained=str(path))
        assert key in str(err.value)


# ----------------------------------------------------------------------------------------------------
# Conformer-S: parameter count and the official names / shapes
# ----------------------------------------------------------------------------------------------------


def test_conformer_s_size_names_and_output():
    torch.manual_seed(0)
    model = conformer_s()
    n = sum(p.numel() for p in model.parameters())
    imagenet_heads = (1024 * 1000 + 1000) + (384 * 1000 + 1000)  # conv_cls_head + trans_cls_head
    assert abs(n + imagenet_heads - 37.7e6) < 0.05e6  # Conformer paper, Table 1: 37.7M
    assert n == 36_263_424
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "cls_token": (1, 1, 384),
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "conv_1.conv1.weight": (64, 64, 1, 1),
        "conv_1.conv3.weight": (256, 64, 1, 1),
        "conv_1.residual_conv.weight": (256, 64, 1, 1),
        "conv_1.residual_bn.weight": (256,),
        "trans_patch_conv.weight": (384, 64, 4, 4),
        "trans_patch_conv.bias": (384,),
        "trans_1.attn.qkv.weight": (1152, 384),
        "trans_1.attn.qkv.bias": (1152,),
        "trans_1.mlp.fc1.weight": (1536, 384),
        "conv_trans_2.cnn_block.conv2.weight": (64, 64, 3, 3),
        "conv_trans_2.squeeze_block.conv_project.weight": (384, 64, 1, 1),
        "conv_trans_2.squeeze_block.ln.weight": (384,),
        "conv_trans_2.expand_block.conv_project.weight": (64, 384, 1, 1),
        "conv_trans_2.expand_block.bn.running_mean": (64,),
        "conv_trans_5.cnn_block.residual_conv.weight": (512, 256, 1, 1),
        "conv_trans_8.expand_block.bn.weight": (128,),
        "conv_trans_9.cnn_block.conv3.weight": (1024, 256, 1, 1),
        "conv_trans_12.fusion_block.residual_conv.weight": (1024, 1024, 1, 1),
        "conv_trans_12.fusion_block.residual_bn.num_batches_tracked": (),
        "conv_trans_12.trans_block.norm2.weight": (384,),
        "conv_trans_12.trans_block.mlp.fc2.weight": (384, 1536),
        "conv_trans_12.trans_block.attn.proj.weight": (384, 384),
        "trans_norm.weight": (384,),
    }
    for k, s in expected.items():
        assert shapes.get(k) == s, k
    assert "conv_trans_11.fusion_block.residual_conv.weight" not in shapes
    assert "conv_trans_6.cnn_block.residual_conv.weight" not in shapes
    assert not any(k.startswith("conv_trans_13") for k in shapes)
    assert model.trans_norm.eps == 1e-5 and model.bn1.eps == 1e-5
    assert model.conv_1.bn1.eps == 1e-6 and model.trans_1.norm1.eps == 1e-6
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 32, 48))
    assert out.features[0].shape == (1, 1024, 2, 3) and out.prefix.shape == (1, 1, 384)
    load_into(model, checkpoint_filter_fn(model.state_dict(), model), "self")
