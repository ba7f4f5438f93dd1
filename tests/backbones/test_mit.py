"""MiT backbone, its checkpoint conversion and the SegFormer head, against slow references."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wsss.backbones.mit import MixVisionTransformer, checkpoint_filter_fn, mit_b0, mit_b1, mit_tiny
from wsss.core.registry import BACKBONES
from wsss.core.weights import CheckpointError
from wsss.heads.segformer import SegFormerHead


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a shared machine (7x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def b1():
    return mit_b1()


def _tiny(**kw) -> MixVisionTransformer:
    return mit_tiny(**kw).eval()


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial LayerNorm / BN parameters so that a wrongly mapped norm shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


# ------------------------------------------------------------------------------------------------
# Builders, shapes, strides


def test_registry_and_sizes(b1):
    for name in ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5", "mit_tiny"):
        assert name in BACKBONES
    tiny = mit_tiny()
    n_tiny = sum(p.numel() for p in tiny.parameters())
    assert 1e5 < n_tiny < 1e6
    # the official mit_b1 without its ImageNet head: 176 tensors, 13.15 M parameters
    assert len(b1.state_dict()) == 176
    assert sum(p.numel() for p in b1.parameters()) == 13_151_424
    assert b1.num_layers == 8 and b1.num_heads == [1, 1, 2, 2, 5, 5, 8, 8] and set(b1.head_dims) == {64}
    assert b1.out_channels == [64, 128, 320, 512] and b1.patch_stride == 16
    assert b1.patch_embed1.proj.kernel_size == (7, 7) and b1.patch_embed1.proj.padding == (3, 3)
    assert b1.patch_embed4.proj.stride == (1, 1) and b1.patch_embed4.proj.kernel_size == (3, 3)
    assert mit_tiny(strides=(4, 2, 2, 2)).patch_stride == 32


def test_norm_eps_and_drop_path(b1):
    m = b1
    assert m.block1[0].norm1.eps == 1e-6 and m.block4[1].norm2.eps == 1e-6 and m.norm3.eps == 1e-6
    assert m.patch_embed2.norm.eps == 1e-5 and m.block1[0].attn.norm.eps == 1e-5
    rates = [blk.drop_path.p for s in range(1, 5) for blk in getattr(m, f"block{s}")]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])
    assert not hasattr(m.block4[0].attn, "sr")  # sr ratio 1 in stage 4


@pytest.mark.parametrize("build", [mit_tiny, mit_b0])
def test_forward_backward_and_strides(build):
    model = build()
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    out = model(x)
    shapes = [tuple(f.shape) for f in out.features]
    c = model.out_channels
    assert shapes == [(2, c[0], 16, 24), (2, c[1], 8, 12), (2, c[2], 4, 6), (2, c[3], 4, 6)]
    sum(f.square().mean() for f in out.features).backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    default = build(strides=(4, 2, 2, 2)).eval()
    assert default(torch.randn(1, 3, 64, 64)).features[-1].shape[-2:] == (2, 2)


@pytest.mark.parametrize("hw", [(33, 47), (65, 50), (100, 37), (29, 29), (48, 31)])
def test_odd_and_non_square_grid_is_ceil(hw):
    out = _tiny()(torch.randn(1, 3, *hw))
    for f, stride in zip(out.features, (4, 8, 16, 16)):
        assert f.shape[-2:] == (math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))


def test_bad_input_rejected():
    model = _tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 20, 64))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(1, 3, 64, 64), attn_layers=[5])


# ------------------------------------------------------------------------------------------------
# Attention capture against a slow reference


def _block_inputs(model: MixVisionTransformer, x: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Tokens (B, N, C) and grid entering every block, recorded with pre-hooks."""
    seen: list = []
    blocks = [b for s in range(1, 5) for b in getattr(model, f"block{s}")]
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append((args[0], args[1]))) for b in blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _reference_logits(block, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """q k^T / sqrt(d) with loops over windows and token pairs; queries pooled over sr x sr."""
    attn = block.attn
    B, N, C = x.shape
    heads, d, sr = attn.num_heads, C // attn.num_heads, attn.sr_ratio
    h, w = hw
    xn = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    q = xn @ attn.q.weight.T + attn.q.bias
    if sr > 1:
        grid = xn.transpose(1, 2).reshape(B, C, h, w)
        red = []
        for a in range(h // sr):
            for b in range(w // sr):
                patch = grid[:, :, a * sr : (a + 1) * sr, b * sr : (b + 1) * sr]
                red.append(torch.einsum("bcij,ocij->bo", patch, attn.sr.weight) + attn.sr.bias)
        xr = F.layer_norm(torch.stack(red, 1), (C,), attn.norm.weight, attn.norm.bias, eps=1e-5)
        qgrid = [
            [(a * sr + u) * w + (b * sr + v) for u in range(sr) for v in range(sr)]
            for a in range(h // sr)
            for b in range(w // sr)
        ]
    else:
        xr = xn
        qgrid = [[i] for i in range(N)]
    k = xr @ attn.kv.weight[:C].T + attn.kv.bias[:C]
    qh, kh = q.reshape(B, N, heads, d), k.reshape(B, -1, heads, d)
    nk = kh.shape[1]
    out = torch.zeros(B, heads, len(qgrid), nk)
    for i, members in enumerate(qgrid):
        for j in range(nk):
            vals = [(qh[:, m] * kh[:, j]).sum(-1) / math.sqrt(d) for m in members]
            out[:, :, i, j] = torch.stack(vals).mean(0)
    return out


@pytest.mark.parametrize("hw", [(64, 64), (72, 52)])
def test_captured_logits_match_reference(hw):
    model = _tiny()
    _randomise_norms(model)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = model(x, attn_layers=range(model.num_layers))
    inputs = _block_inputs(model, x)
    blocks = [b for s in range(1, 5) for b in getattr(model, f"block{s}")]
    for layer, (blk, (tokens, grid)) in enumerate(zip(blocks, inputs)):
        ref = _reference_logits(blk, tokens, grid)
        got = out.attn[layer]
        sr = blk.attn.sr_ratio
        assert out.grids[layer] == (grid[0] // sr, grid[1] // sr)
        assert got.shape == (2, model.num_heads[layer], ref.shape[2], ref.shape[2])  # square
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.softmax(-1).sum(-1), torch.ones(got.shape[:-1]))


def test_logits_of_sr1_block_are_the_attention_used():
    """For sr = 1, softmax(logits) @ v -> proj reproduces the attention branch output."""
    model = _tiny()
    x = torch.randn(2, 3, 64, 80)
    layer = model.num_layers - 1
    blk = model.block4[-1]
    got = {}
    hook = blk.attn.register_forward_hook(lambda _m, args, o: got.update(x=args[0], out=o[0]))
    with torch.no_grad():
        logits = model(x, attn_layers=[-1]).attn[layer]
    hook.remove()
    C = got["x"].shape[-1]
    v = (got["x"] @ blk.attn.kv.weight[C:].T + blk.attn.kv.bias[C:]).reshape(2, -1, 4, C // 4).transpose(1, 2)
    mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, -1, C)
    torch.testing.assert_close(blk.attn.proj(mixed), got["out"], atol=1e-5, rtol=1e-5)


def test_pooling_hand_case():
    """sr = 2 on a 2x4 query grid: pooled row = mean of the 2x2 window of query rows."""
    model = _tiny()
    attn = model.block3[0].attn  # sr 2
    logits = torch.arange(2 * 8 * 2, dtype=torch.float).reshape(1, 2, 8, 2)
    pooled = attn._pool_queries(logits, (2, 4))
    expected = torch.stack([logits[:, :, [0, 1, 4, 5]].mean(2), logits[:, :, [2, 3, 6, 7]].mean(2)], 2)
    torch.testing.assert_close(pooled, expected)


def test_sdpa_and_explicit_paths_agree():
    model = _tiny()
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        fast = model(x)
        slow = model(x, attn_layers=range(model.num_layers))
    assert fast.attn == {} and fast.grids == {}
    for a, b in zip(fast.features, slow.features):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attn_reduce_and_negative_layers():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    calls = []

    def reduce(layer, logits):
        calls.append(layer)
        return logits.softmax(-1).mean(1)

    with torch.no_grad():
        full = model(x, attn_layers=[-2, -1])
        red = model(x, attn_layers=[3, 4], attn_reduce=reduce)
    assert sorted(full.attn) == [3, 4] and sorted(calls) == [3, 4]
    for layer in (3, 4):
        assert red.attn[layer].shape == (2, 16, 16)
        torch.testing.assert_close(red.attn[layer], full.attn[layer].softmax(-1).mean(1))


# ------------------------------------------------------------------------------------------------
# Foreign checkpoints. The renamings are written here from the key tables, independently of the
# converter: each maps a native key to its foreign name(s).


def _split_native(key: str) -> tuple[str, int, int | None, str]:
    """'block2.1.attn.q.weight' -> ('block', 1, 1, 'attn.q.weight'); stage made 0-based."""
    head, rest = key.split(".", 1)
    for kind in ("patch_embed", "block", "norm"):
        if head.startswith(kind) and head[len(kind) :].isdigit():
            stage = int(head[len(kind) :]) - 1
            if kind == "block":
                j, rest = rest.split(".", 1)
                return kind, stage, int(j), rest
            return kind, stage, None, rest
    raise AssertionError(key)


def _to_hf(sd: dict, version: int) -> dict:
    hf4_block = {
        "norm1": "layer_norm_1",
        "attn.q": "attention.self.query",
        "attn.sr": "attention.self.sr",
        "attn.norm": "attention.self.layer_norm",
        "attn.proj": "attention.output.dense",
        "norm2": "layer_norm_2",
        "mlp.fc1": "mlp.dense1",
        "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
        "mlp.fc2": "mlp.dense2",
    }
    hf5_block = {
        "norm1": "layernorm_before",
        "attn.q": "attention.q_proj",
        "attn.sr": "attention.sequence_reduction.sequence_reduction",
        "attn.norm": "attention.sequence_reduction.layer_norm",
        "attn.proj": "attention.o_proj",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
        "mlp.fc2": "mlp.fc2",
    }
    out = {}
    for key, value in sd.items():
        kind, s, j, rest = _split_native(key)
        module, _, param = rest.rpartition(".")
        if kind == "patch_embed":
            sub = {"proj": "proj", "norm": "layer_norm"}[module]
            name = (
                f"encoder.patch_embeddings.{s}.{sub}"
                if version == 4
                else f"stages.{s}.patch_embeddings.{sub}"
            )
            out[f"{name}.{param}"] = value
        elif kind == "norm":
            out[f"encoder.layer_norm.{s}.{rest}" if version == 4 else f"stages.{s}.layer_norm.{rest}"] = value
        else:
            base = f"encoder.block.{s}.{j}." if version == 4 else f"stages.{s}.blocks.{j}."
            if module == "attn.kv":
                k, v = value.chunk(2, dim=0)
                names = (
                    ("attention.self.key", "attention.self.value")
                    if version == 4
                    else (
                        "attention.k_proj",
                        "attention.v_proj",
                    )
                )
                out[f"{base}{names[0]}.{param}"] = k.clone()
                out[f"{base}{names[1]}.{param}"] = v.clone()
            else:
                table = hf4_block if version == 4 else hf5_block
                out[f"{base}{table[module]}.{param}"] = value
    return out


def _native_sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _foreign(kind: str, sd: dict) -> dict:
    if kind == "official":
        return {**sd, "head.weight": torch.randn(1000, 96), "head.bias": torch.randn(1000)}
    if kind == "afa":
        extra = {
            "decoder.linear_pred.weight": torch.randn(21, 256, 1, 1),
            "classifier.weight": torch.randn(20, 96),
        }
        return {**{f"encoder.{k}": v for k, v in sd.items()}, **extra}
    if kind == "hf4_prefixed":
        hf = {f"segformer.{k}": v for k, v in _to_hf(sd, 4).items()}
        return {**hf, "classifier.weight": torch.randn(1000, 96), "classifier.bias": torch.randn(1000)}
    if kind == "hf4":
        return _to_hf(sd, 4)
    if kind == "hf5_prefixed":
        hf = {f"segformer.{k}": v for k, v in _to_hf(sd, 5).items()}
        return {**hf, "decode_head.classifier.weight": torch.randn(21, 256, 1, 1)}
    if kind == "hf5":
        return _to_hf(sd, 5)
    raise AssertionError(kind)


def _save(sd: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


def _assert_same_outputs(a, b, x):
    with torch.no_grad():
        for fa, fb in zip(a(x).features, b(x).features):
            torch.testing.assert_close(fa, fb, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kind", "suffix"),
    [
        ("official", ".pth"),
        ("official", ".safetensors"),
        ("afa", ".pth"),
        ("afa", ".safetensors"),
        ("hf4_prefixed", ".safetensors"),
        ("hf4", ".bin"),
        ("hf5_prefixed", ".bin"),
        ("hf5", ".safetensors"),
    ],
)
def test_foreign_checkpoints_load(kind, suffix, tmp_path):
    native = _tiny()
    _randomise_norms(native)
    path = tmp_path / f"ckpt{suffix}"
    _save(_foreign(kind, _native_sd(native)), path)
    loaded = mit_tiny(pretrained=str(path)).eval()
    _assert_same_outputs(native, loaded, torch.randn(1, 3, 64, 48))


@pytest.mark.parametrize("fname", ["model.safetensors", "pytorch_model.bin"])
def test_hf_directory_layout(fname, tmp_path):
    native = _tiny()
    _randomise_norms(native)
    _save(_foreign("hf4_prefixed", _native_sd(native)), tmp_path / fname)
    _assert_same_outputs(native, mit_tiny(pretrained=tmp_path).eval(), torch.randn(1, 3, 48, 48))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        mit_tiny(pretrained=tmp_path / "empty")


@pytest.mark.parametrize("shard_suffix", [".safetensors", ".bin"])
def test_sharded_hf_directory(shard_suffix, tmp_path):
    import json

    import wsss
    from wsss.core.weights import read_state_dict

    native = _tiny()
    _randomise_norms(native)
    sd = _foreign("hf4_prefixed", _native_sd(native))
    keys = sorted(sd)
    shards = {f"model-0000{i + 1}-of-00002{shard_suffix}": keys[i::2] for i in range(2)}
    for fname, names in shards.items():
        _save({k: sd[k] for k in names}, tmp_path / fname)
    index = ("model.safetensors" if shard_suffix == ".safetensors" else "pytorch_model.bin") + ".index.json"
    weight_map = {k: f for f, names in shards.items() for k in names}
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same_outputs(native, mit_tiny(pretrained=tmp_path).eval(), torch.randn(1, 3, 48, 48))
    _assert_same_outputs(native, wsss.from_pretrained(tmp_path).eval(), torch.randn(1, 3, 48, 48))
    # an index naming a tensor no shard holds, a missing shard, an index without weight_map
    ghost = {**weight_map, "ghost.weight": next(iter(shards))}
    (tmp_path / index).write_text(json.dumps({"weight_map": ghost}))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        read_state_dict(tmp_path / index)
    (tmp_path / index).write_text(json.dumps({"weight_map": {"a": "missing" + shard_suffix}}))
    with pytest.raises(FileNotFoundError, match="missing"):
        read_state_dict(tmp_path / index)
    (tmp_path / index).write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        read_state_dict(tmp_path / index)


def test_nested_training_checkpoint_with_module_prefix(tmp_path):
    native = _tiny()
    sd = {f"module.encoder.{k}": v for k, v in _native_sd(native).items()}
    torch.save({"model": sd, "iter": torch.tensor(3)}, tmp_path / "afa.pth")
    _assert_same_outputs(native, mit_tiny(pretrained=tmp_path / "afa.pth").eval(), torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_raises(suffix, tmp_path):
    path = tmp_path / f"ckpt{suffix}"
    _save(_native_sd(_tiny()), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read"):
        mit_tiny(pretrained=path)


@pytest.mark.parametrize("kind", ["official", "hf4_prefixed", "hf5"])
def test_wrong_shape_extra_and_missing_keys(kind, tmp_path):
    sd = _native_sd(_tiny())
    foreign = _foreign(kind, sd)
    native_key = "block2.0.attn.proj.weight"
    some = next(k for k, v in foreign.items() if v is sd[native_key])  # its foreign name

    bad = dict(foreign)
    bad[some] = torch.randn(3, 3)
    _save(bad, tmp_path / "shape.pth")
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: " + re.escape(native_key) + r": checkpoint \(3, 3\)"
    ):
        mit_tiny(pretrained=tmp_path / "shape.pth")

    extra_key = {
        "official": "block1.0.attn.extra.weight",
        "hf4_prefixed": "segformer.encoder.block.0.0.foo.weight",
        "hf5": "stages.0.blocks.0.attention.foo.weight",
    }[kind]
    _save({**foreign, extra_key: torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected: .*" + re.escape(extra_key)):
        mit_tiny(pretrained=tmp_path / "extra.pth")

    missing = dict(foreign)
    del missing[some]
    _save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing: " + re.escape(native_key)):
        mit_tiny(pretrained=tmp_path / "missing.pth")


def test_key_value_shape_mismatch_names_both(tmp_path):
    hf = _foreign("hf5", _native_sd(_tiny()))
    hf["stages.1.blocks.0.attention.k_proj.weight"] = torch.randn(5, 32)
    _save(hf, tmp_path / "kv.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*v_proj\.weight"):
        mit_tiny(pretrained=tmp_path / "kv.safetensors")


def test_lone_key_half_surfaces(tmp_path):
    """A HF key without its value half is neither dropped nor half-loaded."""
    hf = _foreign("hf4", _native_sd(_tiny()))
    del hf["encoder.block.3.0.attention.self.value.weight"]
    converted = checkpoint_filter_fn(hf)
    assert "encoder.block.3.0.attention.self.key.weight" in converted
    assert "block4.0.attn.kv.weight" not in converted
    _save(hf, tmp_path / "lone.pth")
    with pytest.raises(CheckpointError, match=r"missing: .*block4\.0\.attn\.kv\.weight") as err:
        mit_tiny(pretrained=tmp_path / "lone.pth")
    assert "attention.self.key.weight" in str(err.value)


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_pickle_with_object_is_refused(tmp_path):
    target = tmp_path / "pwned"
    sd = _native_sd(_tiny())
    torch.save({"model": sd, "payload": _Evil(str(target))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        mit_tiny(pretrained=tmp_path / "evil.pth")
    assert not target.exists()


def test_converted_names_cover_b1_hf_layout(b1):
    """Full-size check: B1 (sr in stages 1-3) HF 4.x and 5.x names convert to exactly the native set."""
    sd = b1.state_dict()
    for version in (4, 5):
        converted = checkpoint_filter_fn(_to_hf(sd, version))
        assert set(converted) == set(sd)
        for k in sd:
            assert torch.equal(converted[k], sd[k])


# ------------------------------------------------------------------------------------------------
# SegFormer head


def _bilinear_ref(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize, align_corners=False, with a loop over output pixels."""
    B, C, H, W = x.shape
    out = torch.zeros(B, C, *size)
    for i in range(size[0]):
        for j in range(size[1]):
            coords = []
            for dst, n_in, n_out in ((i, H, size[0]), (j, W, size[1])):
                src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
                lo = min(int(math.floor(src)), n_in - 1)
                coords.append((lo, min(lo + 1, n_in - 1), src - lo))
            (y0, y1, ly), (x0, x1, lx) = coords
            out[:, :, i, j] = (
                (1 - ly) * (1 - lx) * x[:, :, y0, x0]
                + (1 - ly) * lx * x[:, :, y0, x1]
                + ly * (1 - lx) * x[:, :, y1, x0]
                + ly * lx * x[:, :, y1, x1]
            )
    return out


def _head_ref(head: SegFormerHead, feats: list[torch.Tensor]) -> torch.Tensor:
    size = feats[0].shape[-2:]
    embedded = []
    for i, f in enumerate(feats, start=1):
        lin = getattr(head, f"linear_c{i}").proj
        B, C, h, w = f.shape
        e = torch.zeros(B, lin.out_features, h, w)
        for y in range(h):
            for x in range(w):
                e[:, :, y, x] = f[:, :, y, x] @ lin.weight.T + lin.bias
        embedded.append(_bilinear_ref(e, tuple(size)) if (h, w) != tuple(size) else e)
    cat = torch.cat(list(reversed(embedded)), 1)  # [cn, ..., c1]
    bn = head.linear_fuse.bn
    fused = torch.einsum("bchw,oc->bohw", cat, head.linear_fuse.conv.weight[:, :, 0, 0])
    fused = (fused - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    fused = (fused * bn.weight[:, None, None] + bn.bias[:, None, None]).clamp_min(0)
    pred = head.linear_pred
    return torch.einsum("bchw,oc->bohw", fused, pred.weight[:, :, 0, 0]) + pred.bias[:, None, None]


@pytest.mark.parametrize(
    "shapes",
    [
        [(4, 8, 8), (6, 4, 4), (5, 2, 2), (7, 2, 2)],
        [(4, 5, 7), (6, 3, 4), (5, 2, 2)],
        [(9, 3, 5)],
    ],
)
def test_segformer_head_matches_reference(shapes):
    chans = [c for c, _, _ in shapes]
    head = SegFormerHead(chans, num_classes=3, embed_dim=8).eval()
    _randomise_norms(head)
    feats = [torch.randn(2, c, h, w) for c, h, w in shapes]
    with torch.no_grad():  # embeddings and BatchNorm folded into the fuse conv's blocks
        got = head(feats)
    assert got.shape == (2, 3, *shapes[0][1:])
    ref = _head_ref(head, feats)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(feats).detach(), ref, atol=1e-5, rtol=1e-5)  # with autograd: unfolded
    bn = head.linear_fuse.bn = torch.nn.BatchNorm2d(8, affine=False).eval()  # no weight / bias to fold
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        torch.testing.assert_close(head(feats), _head_ref_plain_bn(head, feats), atol=1e-5, rtol=1e-5)


def _head_ref_plain_bn(head: SegFormerHead, feats: list[torch.Tensor]) -> torch.Tensor:
    """_head_ref with an affine-free BatchNorm (unit weight, zero bias)."""
    bn = head.linear_fuse.bn
    bn.weight, bn.bias = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.zeros(8))
    try:
        return _head_ref(head, feats)
    finally:
        bn.weight = bn.bias = None


def test_segformer_head_names_train_and_errors():
    head = SegFormerHead([16, 32, 64, 96], num_classes=21)
    keys = set(head.state_dict())
    for k in (
        "linear_c1.proj.weight",
        "linear_c4.proj.bias",
        "linear_fuse.conv.weight",
        "linear_fuse.bn.running_var",
    ):
        assert k in keys
    assert "linear_fuse.conv.bias" not in keys and "linear_pred.bias" in keys
    assert head.linear_fuse.conv.weight.shape == (256, 1024, 1, 1)
    assert isinstance(head.linear_fuse.bn, torch.nn.BatchNorm2d) and head.dropout.p == 0.1
    feats = _tiny().train()(torch.randn(2, 3, 64, 64)).features
    head(feats).sum().backward()
    assert head.linear_c4.proj.weight.grad is not None
    with pytest.raises(ValueError, match="expects 4 maps"):
        head(feats[:2])


def test_hf_names_of_released_checkpoints():
    """Key names as they appear in released Hugging Face SegFormer files (4.x layout) and in the
    transformers 5.x layout, mapped to the official names."""
    hf4 = {
        "segformer.encoder.patch_embeddings.0.proj.weight": "patch_embed1.proj.weight",
        "segformer.encoder.patch_embeddings.0.layer_norm.bias": "patch_embed1.norm.bias",
        "segformer.encoder.block.0.0.layer_norm_1.weight": "block1.0.norm1.weight",
        "segformer.encoder.block.0.0.attention.self.query.weight": "block1.0.attn.q.weight",
        "segformer.encoder.block.0.0.attention.self.sr.weight": "block1.0.attn.sr.weight",
        "segformer.encoder.block.0.0.attention.self.layer_norm.weight": "block1.0.attn.norm.weight",
        "segformer.encoder.block.0.0.attention.output.dense.bias": "block1.0.attn.proj.bias",
        "segformer.encoder.block.0.0.layer_norm_2.bias": "block1.0.norm2.bias",
        "segformer.encoder.block.0.0.mlp.dense1.weight": "block1.0.mlp.fc1.weight",
        "segformer.encoder.block.0.0.mlp.dwconv.dwconv.bias": "block1.0.mlp.dwconv.dwconv.bias",
        "segformer.encoder.block.1.1.mlp.dense2.weight": "block2.1.mlp.fc2.weight",
        "segformer.encoder.layer_norm.0.weight": "norm1.weight",
    }
    hf5 = {
        "segformer.stages.0.patch_embeddings.proj.weight": "patch_embed1.proj.weight",
        "segformer.stages.0.blocks.0.attention.q_proj.weight": "block1.0.attn.q.weight",
        "segformer.stages.0.blocks.0.attention.sequence_reduction.sequence_reduction.weight":
            "block1.0.attn.sr.weight",
        "segformer.stages.1.blocks.2.mlp.fc1.weight": "block2.2.mlp.fc1.weight",
    }
    for table in (hf4, hf5):
        sd = {k: torch.zeros(1) for k in table}
        assert set(checkpoint_filter_fn(sd)) == set(table.values())
    kv = {"segformer.encoder.block.0.0.attention.self.key.weight": torch.zeros(2, 3),
          "segformer.encoder.block.0.0.attention.self.value.weight": torch.ones(2, 3)}
    out = checkpoint_filter_fn(kv)
    assert list(out) == ["block1.0.attn.kv.weight"] and out["block1.0.attn.kv.weight"][2:].eq(1).all()


@pytest.mark.parametrize(("dtype", "keys", "tol"), [(torch.float32, 100, 1e-5), (torch.bfloat16, 100, 3e-2),
                                                   (torch.bfloat16, 300, 3e-2)])
def test_attend_paths_match_the_definition(dtype, keys, tol):
    """Fused SDPA, the bf16 short-key matmul path and the capturing path all give softmax(q k^T s) v."""
    from wsss.backbones._layers import attend

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 50, 16, generator=g)
    k, v = torch.randn(2, 2, keys, 16, generator=g), torch.randn(2, 2, keys, 16, generator=g)
    ref = (q.double() @ k.double().transpose(-2, -1) * 0.25).softmax(-1) @ v.double()
    out, logits = attend(q.to(dtype), k.to(dtype), v.to(dtype), 0.25, capture=False)
    assert logits is None and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    out2, logits2 = attend(q.to(dtype), k.to(dtype), v.to(dtype), 0.25, capture=True)
    torch.testing.assert_close(out2.double(), ref, atol=tol, rtol=tol)
    exact = q.double() @ k.double().transpose(-2, -1) * 0.25
    torch.testing.assert_close(logits2.double(), exact, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize(("dtype", "keys", "tol"), [(torch.float32, 300, 1e-5), (torch.bfloat16, 300, 5e-2),
                                                   (torch.bfloat16, 17, 5e-2)])
def test_attend_gradients_match_the_definition(dtype, keys, tol):
    """With autograd (bf16 on the CPU: the matmul path, fp32: the fused kernel) the output and the
    gradients of q, k, v are those of softmax(q k^T s) v."""
    from wsss.backbones._layers import _cpu_bf16_matmuls, attend

    g = torch.Generator().manual_seed(1)
    base = [torch.randn(2, 2, n, 16, generator=g) for n in (40, keys, keys)]
    grad_out = torch.randn(2, 2, 40, 16, generator=g)
    q64, k64, v64 = (t.double().requires_grad_() for t in base)
    ((q64 @ k64.transpose(-2, -1) * 0.25).softmax(-1) @ v64).backward(grad_out.double())
    q, k, v = (t.to(dtype).requires_grad_() for t in base)
    assert _cpu_bf16_matmuls(q, k, v) == (dtype == torch.bfloat16)
    out, logits = attend(q, k, v, 0.25, capture=False)
    assert logits is None
    out.backward(grad_out.to(dtype))
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------------
# The fused oneDNN inference path (no autograd on the CPU) against the plain ops


def _exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_fused_helpers_match_plain_ops():
    from wsss.backbones._layers import conv_gelu, fused_dtype, linear

    lin = torch.nn.Linear(24, 40)
    conv = torch.nn.Conv2d(40, 40, 3, 1, 1, groups=40)
    x = torch.randn(2, 30, 24) * 3
    img = torch.randn(2, 12, 10, 40).permute(0, 3, 1, 2)  # a channels-last (B, C, H, W) view
    with torch.no_grad():
        assert fused_dtype(x) == torch.float32 and fused_dtype(x.double()) is None
        torch.testing.assert_close(linear(x, lin), x @ lin.weight.T + lin.bias, atol=1e-5, rtol=1e-5)
        # exact (erf) GELU: the tanh approximation differs by ~1e-3 here
        torch.testing.assert_close(linear(x, lin, "gelu"), _exact_gelu(x @ lin.weight.T + lin.bias),
                                   atol=1e-5, rtol=1e-5)
        ref = _exact_gelu(F.conv2d(img, conv.weight, conv.bias, padding=1, groups=40))
        torch.testing.assert_close(conv_gelu(img, conv), ref, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # bf16 is fused where oneDNN runs bf16 on this CPU; elsewhere the plain ops run
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            assert fused_dtype(x) == (torch.bfloat16 if native else None)
            low = linear(x, lin, "gelu")
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), _exact_gelu(x @ lin.weight.T + lin.bias), atol=0.1, rtol=0.02)
    assert fused_dtype(x) is None  # autograd on: the plain ops, which have a backward
    out = linear(x.requires_grad_(), lin, "gelu")
    out.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    with pytest.raises(ValueError, match="act"):
        linear(x, lin, "relu")


@pytest.mark.parametrize("act", ["none", "gelu", "relu6"])
@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (8, 2, 1), (8, 1, 2)])
def test_conv2d_act_matches_plain_ops(act, groups, stride, dilation):
    """The fused no-grad convolution (+ activation) equals conv2d then the activation written out,
    in fp32 and under bf16 autocast; with autograd the plain ops run and have a backward."""
    from wsss.backbones._layers import conv2d_act

    torch.manual_seed(11)
    x = (torch.randn(2, 8, 9, 11) * 4).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 8 // groups, 3, 3), torch.randn(16)
    args = ((stride, stride), (dilation, dilation), (dilation, dilation), groups)

    def ref(inp: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(inp.double(), w.double(), b.double(), args[0], args[1], args[2], groups)
        if act == "gelu":
            return _exact_gelu(y)
        return torch.minimum(torch.maximum(y, torch.zeros(())), torch.full((), 6.0)) if act == "relu6" else y

    with torch.no_grad():
        out = conv2d_act(x, w, b, *args, act=act)
        torch.testing.assert_close(out.double(), ref(x), atol=1e-4, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = conv2d_act(x, w, b, *args, act=act)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.double(), ref(x), atol=0.3, rtol=0.03)
    xg = x.clone().requires_grad_()
    out = conv2d_act(xg, w, b, *args, act=act)
    torch.testing.assert_close(out.detach().double(), ref(x), atol=1e-4, rtol=1e-5)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="act"):
        conv2d_act(x, w, b, *args, act="relu")


def test_drop_path_add_is_the_residual_with_drop_path():
    from wsss.backbones._layers import DropPath

    dp = DropPath(0.4).train()
    x, y = torch.randn(64, 5, 3), torch.randn(64, 5, 3)
    torch.manual_seed(3)
    got = dp.add(x, y)
    torch.manual_seed(3)
    mask = torch.empty(64, 1, 1).bernoulli_(0.6)  # the same draw as the module's
    torch.testing.assert_close(got, x + y * mask / 0.6)
    assert 0 < int(mask.sum()) < 64  # both kept and dropped samples were checked
    torch.testing.assert_close(dp.eval().add(x, y), x + y)


@pytest.mark.parametrize("train", [False, True])
def test_no_grad_fused_forward_matches_autograd_forward(train):
    """The no-grad pass (fused kernels) equals the autograd pass (plain ops), DropPath draws included."""
    model = mit_b0(drop_path_rate=0.3).train(train)
    _randomise_norms(model)
    x = torch.randn(2, 3, 64, 96)
    torch.manual_seed(5)
    with torch.no_grad():
        fast = model(x, attn_layers=[-1])
    torch.manual_seed(5)
    slow = model(x, attn_layers=[-1])
    for a, b in zip(fast.features, slow.features):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.attn[7], slow.attn[7], atol=1e-4, rtol=1e-4)


def test_bf16_falls_back_to_plain_ops_where_onednn_lacks_it(monkeypatch):
    """On a CPU whose oneDNN has no bf16 kernels (no AVX-512 BW/VL/DQ, no AVX-NE-CONVERT) the fused
    helpers run the plain ops in bf16 instead of failing."""
    from wsss.backbones import _layers

    monkeypatch.setattr(_layers, "_onednn_bf16", lambda: False)
    x = torch.randn(1, 8, 6, 6).bfloat16()
    w = torch.randn(8, 1, 3, 3).bfloat16()
    with torch.no_grad():
        assert _layers.fused_dtype(x) is None and _layers.fused_dtype(x.float()) == torch.float32
        got = _layers.conv2d_act(x, w, None, (1, 1), (1, 1), (1, 1), 8, "relu6")
    torch.testing.assert_close(got, F.conv2d(x, w, None, 1, 1, 1, 8).clamp(0, 6))
