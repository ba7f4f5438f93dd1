"""ViT / DeiT / MCTformer-V2 backbone: forward contract, pos-embed interpolation, attention capture,
foreign checkpoints. References are slow loop implementations written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import wsss.backbones.vit as vit_module
from tests.conftest import ref_blocks
from wsss.backbones.vit import (
    VisionTransformer,
    checkpoint_filter_fn,
    mctformer_v2_micro,
    vit_micro,
)
from wsss.core.registry import BACKBONES
from wsss.core.weights import CheckpointError

DEPTH, DIM = 6, 64


# ------------------------------------------------------------------------------------------------
# slow references
# ------------------------------------------------------------------------------------------------


def cubic_weight(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def ref_bicubic(grid: torch.Tensor, out: tuple[int, int], inv_scale: tuple[float, float]) -> torch.Tensor:
    """grid: (gh, gw, D). Bicubic (a = -0.75, align_corners False, border-clamped taps), sampling
    source coordinate (i + 0.5) * inv_scale - 0.5 for output pixel i. Returns (h, w, D)."""
    gh, gw, d = grid.shape
    h, w = out
    res = torch.zeros(h, w, d, dtype=torch.float64)
    g = grid.double()
    for i in range(h):
        sy = (i + 0.5) * inv_scale[0] - 0.5
        y0 = math.floor(sy)
        for j in range(w):
            sx = (j + 0.5) * inv_scale[1] - 0.5
            x0 = math.floor(sx)
            for dy in range(-1, 3):
                wy = cubic_weight(sy - (y0 + dy))
                yy = min(max(y0 + dy, 0), gh - 1)
                for dx in range(-1, 3):
                    wx = cubic_weight(sx - (x0 + dx))
                    xx = min(max(x0 + dx, 0), gw - 1)
                    res[i, j] += wy * wx * g[yy, xx]
    return res.float()


def ref_pos_embed(model: VisionTransformer, h: int, w: int, mode: str = "dino") -> torch.Tensor:
    """(1, T + h*w, D) by the rule of docs/methods/aream.md section 2 (dino) or ToCo (size), using
    ref_bicubic."""
    t, (gh, gw) = model.num_prefix_tokens, model.grid
    pos = model.pos_embed.detach()
    if (h, w) == (gh, gw):
        return pos
    grid = pos[0, t:].reshape(gh, gw, -1)
    if mode == "dino":
        inv = (gh / (h + 0.1), gw / (w + 0.1))
    else:
        inv = (gh / h, gw / w)
    patch = ref_bicubic(grid, (h, w), inv).reshape(1, h * w, -1)
    return torch.cat([pos[:, :t], patch], dim=1)


def ref_forward(model: VisionTransformer, x: torch.Tensor):
    """Plain re-implementation: patchify by loops, attention logits by a loop over (head, i, j).
    Returns (patch map (B, D, h, w), prefix (B, T, D), {layer: logits (B, heads, N, N)})."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    p, t = model.patch_size, model.num_prefix_tokens
    b, _, hh, ww = x.shape
    h, w = hh // p, ww // p
    d = sd["cls_token"].shape[-1]
    pw = sd["patch_embed.proj.weight"].reshape(d, -1)
    rows = []
    for bi in range(b):
        toks = [
            pw @ x[bi, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(-1)
            for i in range(h)
            for j in range(w)
        ]
        rows.append(torch.stack(toks) + sd["patch_embed.proj.bias"])
    z = torch.cat([sd["cls_token"].expand(b, -1, -1), torch.stack(rows)], dim=1)
    z = z + ref_pos_embed(model, h, w, model.pos_interp)
    z, logits_all = ref_blocks(sd, z, model.num_layers, model.num_heads[0])
    if model.final_norm:
        z = F.layer_norm(z, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    fmap = z[:, t:].reshape(b, h, w, d).permute(0, 3, 1, 2)
    return fmap, z[:, :t], logits_all


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial LayerNorm affine parameters, so a skipped / misplaced norm is visible."""
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.add_(torch.randn_like(prm) * 0.3)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# forward contract
# ------------------------------------------------------------------------------------------------


def test_registry_and_shapes(monkeypatch):
    # full-size models are built on the meta device (no memory, no init cost); linspace().item() does
    # not exist there, so the stochastic-depth schedule is replaced for this test only
    monkeypatch.setattr(vit_module, "dpr", lambda rate, depth: [rate] * depth)
    for name in ("vit_micro", "vit_tiny", "vit_small", "vit_base"):
        assert name in BACKBONES and f"mctformer_v2_{name[4:]}" in BACKBONES
    with torch.device("meta"):
        for name, (dim, heads) in {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}.items():
            m = BACKBONES.build(f"vit_{name}")
            assert (m.embed_dim, m.num_layers, m.num_heads[0], m.head_dims[0]) == (dim, 12, heads, 64)
            assert m.final_norm and m.num_prefix_tokens == 1
            mct = BACKBONES.build(f"mctformer_v2_{name}")
            assert mct.cls_token.shape == (1, 20, dim) and mct.pos_embed.shape == (1, 20 + 196, dim)
            assert not mct.final_norm
    n_params = sum(p.numel() for p in vit_micro().parameters())
    assert 1e5 < n_params < 1e6


@pytest.mark.parametrize(
    "builder,t", [(vit_micro, 1), (lambda **k: mctformer_v2_micro(num_classes=3, **k), 3)]
)
def test_forward_backward_cpu(builder, t):
    torch.manual_seed(0)
    m = builder(img_size=64, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 48, 80)
    out = m(x, attn_layers=(1, -1))
    assert len(out.features) == 1 and out.features[0].shape == (2, DIM, 3, 5)
    assert out.prefix.shape == (2, t, DIM)
    assert set(out.attn) == {1, DEPTH - 1} and out.grids == {1: (3, 5), DEPTH - 1: (3, 5)}
    assert out.attn[1].shape == (2, 2, t + 15, t + 15)
    loss = out.features[0].square().mean() + out.prefix.mean() + sum(a.mean() for a in out.attn.values())
    loss.backward()
    for name, prm in m.named_parameters():
        if name.startswith("norm."):
            # MCTformer: the final norm exists but is never applied (docs/methods/aream.md section 2)
            assert (prm.grad is None) == (t > 1), name
        else:
            assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    assert m.out_channels == [DIM] and m.patch_stride == 16 and m.num_prefix_tokens == t


def test_rejects_bad_input():
    m = vit_micro()
    with pytest.raises(ValueError, match=r"225.*multiples of 16.*pad"):
        m(torch.randn(1, 3, 225, 224))
    with pytest.raises(ValueError, match="out of range"):
        m(torch.randn(1, 3, 32, 32), attn_layers=(DEPTH,))


@pytest.mark.parametrize("kind", ["vit", "mct"])
@pytest.mark.parametrize("size", [(32, 48), (64, 64)])
def test_matches_slow_reference(kind, size):
    torch.manual_seed(1)
    m = vit_micro(img_size=64) if kind == "vit" else mctformer_v2_micro(num_classes=3, img_size=64)
    randomise(m)
    b = 2 if size[0] * size[1] < 64 * 64 else 1
    x = torch.randn(b, 3, *size)
    with torch.no_grad():
        out = m(x, attn_layers=range(DEPTH))
    fmap, prefix, logits = ref_forward(m, x)
    torch.testing.assert_close(out.features[0], fmap, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.prefix, prefix, atol=1e-5, rtol=1e-4)
    for layer in range(DEPTH):
        torch.testing.assert_close(out.attn[layer], logits[layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.attn[layer].softmax(-1).sum(-1), torch.ones(b, 2, logits[0].shape[-1]))


def test_mctformer_final_norm_not_applied():
    torch.manual_seed(2)
    m = mctformer_v2_micro(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = m(x)
        m.norm.weight.mul_(3.0).add_(1.0)
        m.norm.bias.add_(2.0)
        after = m(x)
    assert torch.equal(before.features[0], after.features[0]) and torch.equal(before.prefix, after.prefix)
    assert "norm.weight" in m.state_dict()
    # forcing the norm on changes the outputs: the flag is what decides
    on = mctformer_v2_micro(num_classes=4, final_norm=True)
    on.load_state_dict(m.state_dict())
    with torch.no_grad():
        normed = on.eval()(x)
    torch.testing.assert_close(normed.prefix, m.norm(after.prefix))


def test_sdpa_and_explicit_paths_agree():
    torch.manual_seed(3)
    for m in (vit_micro(), mctformer_v2_micro(num_classes=5)):
        m = randomise(m)
        x = torch.randn(3, 3, 48, 32)
        with torch.no_grad():
            fast = m(x)
            slow = m(x, attn_layers=range(DEPTH))
        assert fast.attn == {} and fast.grids == {}
        torch.testing.assert_close(fast.features[0], slow.features[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.prefix, slow.prefix, atol=1e-5, rtol=1e-5)


def test_attn_reduce():
    torch.manual_seed(4)
    m = mctformer_v2_micro(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 48)
    calls = []

    def reduce(layer, logits):
        calls.append((layer, tuple(logits.shape)))
        return logits.softmax(-1).mean(1)

    with torch.no_grad():
        raw = m(x, attn_layers=(0, 2, -1))
        red = m(x, attn_layers=(-1, 0, 2), attn_reduce=reduce)
    assert sorted(calls) == [(0, (2, 2, 9, 9)), (2, (2, 2, 9, 9)), (5, (2, 2, 9, 9))]
    for layer in (0, 2, 5):
        torch.testing.assert_close(red.attn[layer], raw.attn[layer].softmax(-1).mean(1))
    assert red.grids == {0: (2, 3), 2: (2, 3), 5: (2, 3)}


def test_no_weight_decay():
    assert vit_micro().no_weight_decay() == {"pos_embed"}
    assert mctformer_v2_micro().no_weight_decay() == {"pos_embed"}
    assert vit_micro(decay_cls_token=False).no_weight_decay() == {"pos_embed", "cls_token"}


# ------------------------------------------------------------------------------------------------
# positional-embedding interpolation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(4, 4), (2, 2), (3, 7), (9, 5), (6, 6)])
def test_pos_embed_interpolation_dino(hw):
    torch.manual_seed(5)
    m = mctformer_v2_micro(num_classes=3, img_size=64)  # stored grid 4 x 4
    pos = m.interpolate_pos_embed(*hw).detach()
    assert pos.shape == (1, 3 + hw[0] * hw[1], DIM)
    torch.testing.assert_close(pos[:, :3], m.pos_embed[:, :3].detach(), rtol=0, atol=0)
    torch.testing.assert_close(pos, ref_pos_embed(m, *hw, "dino"), atol=1e-5, rtol=1e-5)


def test_pos_embed_interpolation_size_mode_and_frozen():
    torch.manual_seed(6)
    m = vit_micro(img_size=(48, 64), pos_interp="size", freeze_pos_embed=True)  # grid 3 x 4
    assert not m.pos_embed.requires_grad and m.grid == (3, 4)
    for hw in ((5, 2), (3, 4), (6, 8)):
        pos = m.interpolate_pos_embed(*hw)
        torch.testing.assert_close(pos, ref_pos_embed(m, *hw, "size"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pos_interp"):
        vit_micro(pos_interp="bilinear")


def test_pos_embed_interpolation_hand_cases():
    m = vit_micro(img_size=64)
    with torch.no_grad():
        m.pos_embed[:, 1:] = 0.7  # bicubic weights sum to 1: a constant grid stays constant
    for hw in ((3, 5), (8, 2)):
        const = torch.full((1, hw[0] * hw[1], DIM), 0.7)
        torch.testing.assert_close(m.interpolate_pos_embed(*hw)[:, 1:].detach(), const)
    assert m.interpolate_pos_embed(4, 4) is m.pos_embed  # stored grid: untouched
    # 2x2 -> 1x1 with the +0.1 rule: scale 1.1/2, source coordinate 0.5 * 2/1.1 - 0.5 = 0.4091 on each
    # axis, whose 4 taps (clamped to the border) give the hand value below
    g = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    s = 0.5 * 2 / 1.1 - 0.5
    wts = [cubic_weight(s + 1), cubic_weight(s), cubic_weight(1 - s), cubic_weight(2 - s)]
    w_lo, w_hi = wts[0] + wts[1], wts[2] + wts[3]  # taps -1, 0 clamp to 0; taps 1, 2 clamp to 1
    expect = w_lo * w_lo * 0 + w_lo * w_hi * 1 + w_hi * w_lo * 2 + w_hi * w_hi * 3
    m2 = VisionTransformer(img_size=32, embed_dim=8, depth=1, num_heads=1)
    with torch.no_grad():
        m2.pos_embed[0, 1:] = g.reshape(4, 1)
    assert abs(float(m2.interpolate_pos_embed(1, 1)[0, 1, 0].detach()) - expect) < 1e-5


# ------------------------------------------------------------------------------------------------
# foreign checkpoints
# ------------------------------------------------------------------------------------------------


def native(seed: int = 7, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return randomise(vit_micro(img_size=64, **kw))


def outputs(m: VisionTransformer, x: torch.Tensor):
    with torch.no_grad():
        out = m.eval()(x)
    return out.features[0], out.prefix


def assert_same(a: VisionTransformer, b: VisionTransformer):
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    for u, v in zip(outputs(a, x), outputs(b, x)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def cloned(sd):
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def to_hf5(sd):
    """timm names -> transformers 5.x ViT names, written out independently."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(DEPTH):
        for kind in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            out[f"layers.{i}.attention.q_proj.{kind}"] = q
            out[f"layers.{i}.attention.k_proj.{kind}"] = k
            out[f"layers.{i}.attention.v_proj.{kind}"] = v
            out[f"layers.{i}.attention.o_proj.{kind}"] = sd[f"blocks.{i}.attn.proj.{kind}"]
            out[f"layers.{i}.layernorm_before.{kind}"] = sd[f"blocks.{i}.norm1.{kind}"]
            out[f"layers.{i}.layernorm_after.{kind}"] = sd[f"blocks.{i}.norm2.{kind}"]
            out[f"layers.{i}.mlp.fc1.{kind}"] = sd[f"blocks.{i}.mlp.fc1.{kind}"]
            out[f"layers.{i}.mlp.fc2.{kind}"] = sd[f"blocks.{i}.mlp.fc2.{kind}"]
    return cloned(out)


def to_hf4(sd):
    """timm names -> transformers 4.x ViTForImageClassification names (with pooler and classifier)."""
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "vit.pooler.dense.weight": torch.randn(DIM, DIM),
        "vit.pooler.dense.bias": torch.randn(DIM),
        "classifier.weight": torch.randn(10, DIM),
        "classifier.bias": torch.randn(10),
    }
    for i in range(DEPTH):
        pre = f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            out[pre + f"attention.attention.query.{kind}"] = q
            out[pre + f"attention.attention.key.{kind}"] = k
            out[pre + f"attention.attention.value.{kind}"] = v
            out[pre + f"attention.output.dense.{kind}"] = sd[f"blocks.{i}.attn.proj.{kind}"]
            out[pre + f"layernorm_before.{kind}"] = sd[f"blocks.{i}.norm1.{kind}"]
            out[pre + f"layernorm_after.{kind}"] = sd[f"blocks.{i}.norm2.{kind}"]
            out[pre + f"intermediate.dense.{kind}"] = sd[f"blocks.{i}.mlp.fc1.{kind}"]
            out[pre + f"output.dense.{kind}"] = sd[f"blocks.{i}.mlp.fc2.{kind}"]
    return cloned(out)


def test_deit_pth_with_model_entry_and_head(tmp_path):
    src = native()
    sd = cloned(src.state_dict())
    sd.update({"head.weight": torch.randn(1000, DIM), "head.bias": torch.randn(1000)})
    path = tmp_path / "deit.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    assert_same(vit_micro(img_size=64, pretrained=str(path)), src)


def test_distilled_deit_safetensors(tmp_path):
    src = native()
    sd = cloned(src.state_dict())
    pos = sd["pos_embed"]
    sd["pos_embed"] = torch.cat([pos[:, :1], torch.randn(1, 1, DIM), pos[:, 1:]], dim=1).contiguous()
    sd["dist_token"] = torch.randn(1, 1, DIM)
    sd.update({"head.weight": torch.randn(5, DIM), "head_dist.weight": torch.randn(5, DIM)})
    sd["head_dist.bias"] = torch.zeros(5)
    path = tmp_path / "deit_distilled.safetensors"
    save_file(sd, str(path))
    assert_same(BACKBONES.build("vit_micro", img_size=64, pretrained=path), src)


@pytest.mark.parametrize("img_size", [64, 96])
def test_vit_to_mctformer_adaptation(tmp_path, img_size):
    src = native()
    path = tmp_path / "vit.pth"
    torch.save({"model": cloned(src.state_dict())}, path)
    m = mctformer_v2_micro(num_classes=3, img_size=img_size, pretrained=str(path))
    pos_src = src.pos_embed.detach()
    assert m.cls_token.shape == (1, 3, DIM)
    assert torch.equal(m.cls_token.detach(), src.cls_token.detach().repeat(1, 3, 1))
    g = img_size // 16
    assert m.pos_embed.shape == (1, 3 + g * g, DIM)
    assert torch.equal(m.pos_embed[:, :3].detach(), pos_src[:, :1].repeat(1, 3, 1))
    if g == 4:
        assert torch.equal(m.pos_embed[:, 3:].detach(), pos_src[:, 1:])
    else:  # size-based bicubic (DeiT / MCTformer --finetune), 4x4 -> 6x6
        ref = ref_bicubic(pos_src[0, 1:].reshape(4, 4, DIM), (g, g), (4 / g, 4 / g)).reshape(1, g * g, DIM)
        torch.testing.assert_close(m.pos_embed[:, 3:].detach(), ref, atol=1e-5, rtol=1e-5)
    for k, v in src.state_dict().items():
        if k not in ("cls_token", "pos_embed"):
            assert torch.equal(m.state_dict()[k], v), k


def test_mctformer_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(8)
    src = randomise(mctformer_v2_micro(num_classes=3, img_size=64))
    path = tmp_path / "mct.safetensors"
    save_file(cloned(src.state_dict()), str(path))
    assert_same(mctformer_v2_micro(num_classes=3, img_size=64, pretrained=path), src)
    with pytest.raises(CheckpointError, match="cls_token"):  # 3 class tokens do not fit 5
        mctformer_v2_micro(num_classes=5, img_size=64, pretrained=path)


@pytest.mark.parametrize(
    "fmt,suffix", [("hf5", ".safetensors"), ("hf5", ".pth"), ("hf4", ".bin"), ("hf4", ".safetensors")]
)
def test_transformers_layouts(tmp_path, fmt, suffix):
    src = native()
    sd = (to_hf5 if fmt == "hf5" else to_hf4)(src.state_dict())
    path = tmp_path / f"hf{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    assert_same(vit_micro(img_size=64, pretrained=str(path)), src)


def test_transformers_incomplete_qkv_is_reported(tmp_path):
    sd = to_hf5(native().state_dict())
    del sd["layers.2.attention.k_proj.weight"]
    path = tmp_path / "hf.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        vit_micro(img_size=64, pretrained=path)
    msg = str(err.value)
    assert "layers.2.attention.q_proj.weight" in msg and "blocks.2.attn.qkv.weight" in msg


def test_filter_keeps_unknown_keys():
    m = vit_micro(img_size=64)
    sd = cloned(m.state_dict())
    sd.update({"fc_norm.weight": torch.ones(DIM), "head.weight": torch.ones(3, DIM)})
    out = checkpoint_filter_fn(sd, m)
    assert "fc_norm.weight" in out and "head.weight" not in out


@pytest.mark.parametrize("damage", ["corrupt", "corrupt_st", "truncate"])
def test_unreadable_files(tmp_path, damage):
    path = tmp_path / ("w.safetensors" if damage == "corrupt_st" else "w.pth")
    if damage == "truncate":
        torch.save({"model": cloned(native().state_dict())}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError):
        vit_micro(img_size=64, pretrained=str(path))


@pytest.mark.parametrize(
    "edit,key",
    [
        ("shape", "blocks.0.mlp.fc1.weight"),
        ("extra", "blocks.0.attn.rel_bias"),
        ("extra", "fc_norm.weight"),
        ("missing", "blocks.1.norm2.bias"),
    ],
)
def test_mismatched_checkpoints_name_the_key(tmp_path, edit, key):
    sd = cloned(native().state_dict())
    if edit == "shape":
        sd[key] = torch.randn(10, DIM)
    elif edit == "extra":
        sd[key] = torch.randn(DIM)
    else:
        del sd[key]
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        vit_micro(img_size=64, pretrained=path)
