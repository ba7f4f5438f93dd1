"""ViT / DeiT and MCTformer-V2 (one class token per class) with attention capture.

Parameter names follow timm/DeiT (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``) so DeiT and timm
``.pth`` files load directly; :func:`checkpoint_filter_fn` converts the other layouts (distilled
DeiT, ViT -> MCTformer class-token adaptation, transformers 4.x and 5.x ViT names).

Token layout: ``[T prefix (class) tokens ; h*w patch tokens]``, patches row-major. A plain ViT has
T = 1; MCTformer-V2 has T = K (number of foreground classes) and, as in the official AReAM /
MCTformer code, its final LayerNorm exists (and is loaded) but is not applied.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from wsss.backbones._layers import POS_INTERP_MODES, Block, dpr, init_vit_weights, resize_pos_grid, run_blocks
from wsss.backbones.base import AttnReduce, Backbone, BackboneOutput, check_input
from wsss.core.registry import BACKBONES, named_builder, register_detector
from wsss.core.weights import CheckpointError
from wsss.core.weights import load_pretrained as load_weights


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) -> (B, D, H/p, W/p)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check_vit_args(depth: int, freeze_blocks: int, pos_interp: str, num_prefix_tokens: int) -> None:
    """Raise ValueError on the first invalid :class:`VisionTransformer` argument, before any module exists."""
    if not 0 <= freeze_blocks <= depth:
        raise ValueError(f"freeze_blocks must be in [0, {depth}], got {freeze_blocks}")
    if pos_interp not in POS_INTERP_MODES:
        raise ValueError(f"pos_interp must be one of {POS_INTERP_MODES}, got {pos_interp!r}")
    if num_prefix_tokens < 1:
        raise ValueError(f"num_prefix_tokens must be >= 1, got {num_prefix_tokens}")


class VisionTransformer(Backbone):
    """ViT / DeiT encoder with T prefix tokens (T = 1: ViT/DeiT; T = K: MCTformer-V2).

    Args:
        img_size: training size; fixes the stored positional grid (img_size / patch_size).
        num_prefix_tokens: T class tokens; ``cls_token`` is (1, T, D), ``pos_embed`` (1, T + gh*gw, D).
        final_norm: apply ``norm`` to the last block's output (False for MCTformer-V2: the module still
            exists so checkpoints load, but is never applied, as in the official code).
        decay_cls_token: AReAM keeps ``cls_token`` in weight decay (``no_weight_decay() == {"pos_embed"}``);
            False gives timm/ToCo's ``{"pos_embed", "cls_token"}``.
        pos_interp: "dino" (default; MCTformer/AReAM +0.1 scale-factor rule, identity at the stored
            grid) or "size" (ToCo: resize to the exact grid size).
        freeze_pos_embed: ToCo keeps the positional embedding fixed (requires_grad False).
        init_values: layer scale of every residual branch (``blocks.{i}.ls1 / ls2.gamma``, DINOv2);
            None: no layer scale (ViT / DeiT).
        freeze_blocks: the first n blocks get no gradient (with the patch embedding, and the class
            token and positional embedding unless ``train_prefix``). While nothing before them
            trains, they run without autograd: no activations kept, no backward through them.
        train_prefix: the class tokens stay trainable under ``freeze_blocks`` (MCTformer-V2's
            class-specific tokens must learn); the frozen blocks then run with autograd.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_prefix_tokens: int = 1,
        final_norm: bool = True,
        drop_path_rate: float = 0.0,
        decay_cls_token: bool = True,
        pos_interp: str = "dino",
        freeze_pos_embed: bool = False,
        init_values: float | None = None,
        freeze_blocks: int = 0,
        train_prefix: bool = False,
    ) -> None:
        super().__init__()
        _check_vit_args(depth, freeze_blocks, pos_interp, num_prefix_tokens)
        size = _pair(img_size)
        self.grid = (size[0] // patch_size, size[1] // patch_size)
        self.patch_size = self.patch_stride = self.input_multiple = patch_size
        self.embed_dim = embed_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.final_norm = final_norm
        self.decay_cls_token = decay_cls_token
        self.pos_interp = pos_interp
        self.num_layers = depth
        self.num_heads = [num_heads] * depth
        self.head_dims = [embed_dim // num_heads] * depth
        self.attn_strides = [patch_size] * depth
        self.out_channels = [embed_dim]

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, num_prefix_tokens, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_prefix_tokens + self.grid[0] * self.grid[1], embed_dim),
            requires_grad=not freeze_pos_embed,
        )
        rates = dpr(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], init_values) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)  # the patch conv keeps PyTorch's default init, as in timm/DeiT
        self.freeze_blocks = freeze_blocks
        self.train_prefix = train_prefix
        if freeze_blocks:
            self._freeze_input(freeze_blocks, train_prefix)

    def _freeze_input(self, freeze_blocks: int, train_prefix: bool) -> None:
        """No gradient for the patch embedding, the positional embedding and the first ``freeze_blocks``
        blocks; the class tokens train only with ``train_prefix``."""
        for m in (self.patch_embed, *self.blocks[:freeze_blocks]):
            m.requires_grad_(False)
        self.pos_embed.requires_grad_(False)
        self.cls_token.requires_grad_(train_prefix)

    @property
    def frozen_input(self) -> bool:
        """Whether every parameter up to the end of the frozen blocks is frozen (they can then run
        without autograd)."""
        prefix = self.cls_token.requires_grad or self.pos_embed.requires_grad
        return self.freeze_blocks > 0 and not prefix

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.decay_cls_token else {"pos_embed", "cls_token"}

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Positional embedding for an (h, w) patch grid: (1, T + h*w, D), prefix rows unchanged."""
        if (h, w) == self.grid:
            return self.pos_embed
        t = self.num_prefix_tokens
        patch = resize_pos_grid(self.pos_embed[:, t:], self.grid, (h, w), self.pos_interp)
        return torch.cat([self.pos_embed[:, :t], patch], dim=1)

    def layer_modules(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward_features(
        self, x: Tensor, attn_layers: Sequence[int] = (), attn_reduce: AttnReduce | None = None
    ) -> BackboneOutput:
        """x: (B, 3, H, W), H and W multiples of the patch size.

        Returns features = [(B, D, H/p, W/p) patch-token map], prefix = (B, T, D) class-token outputs
        (both after ``norm`` only when ``final_norm``), attn[l] = scaled logits (B, heads, N, N) with
        N = T + h*w (prefix first) for each requested layer, or ``attn_reduce(l, logits)``;
        grids[l] = (h, w) for those layers.
        """
        check_input(x, multiple=self.patch_size)
        capture = self.check_layers(attn_layers)
        t, n = self.num_prefix_tokens, self.freeze_blocks
        out = BackboneOutput(features=[])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_input):
            patches = self.patch_embed(x)
            b, d, h, w = patches.shape
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
            tokens = tokens + self.interpolate_pos_embed(h, w)
            tokens = run_blocks(self.blocks[:n], tokens, capture, attn_reduce, (h, w), out)
        tokens = run_blocks(self.blocks[n:], tokens, capture, attn_reduce, (h, w), out, start=n)
        if self.final_norm:
            tokens = self.norm(tokens)
        out.prefix = tokens[:, :t]
        out.features = [tokens[:, t:].transpose(1, 2).reshape(b, d, h, w)]
        return out


# ----------------------------------------------------------------------------------------------
# Foreign checkpoints
# ----------------------------------------------------------------------------------------------

# Keys of classifier heads / poolers that a backbone never holds (deliberately discarded).
_DROP = re.compile(r"^(head|head_dist|classifier|cls_classifier|distillation_classifier|pooler)(\.|$)")
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF5_LAYER = {
    "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF4_LAYER = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_QKV = {
    "hf5": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "hf4": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
}
_HF_LAYER_KEY = re.compile(r"^(?:encoder\.)?layers?\.(\d+)\.(.+)\.(weight|bias)$")


def detect_format(state_dict: dict[str, Tensor]) -> str:
    """Layout of a state dict: "timm" (timm / DeiT / MCTformer), "hf5" / "hf4" (transformers 5.x / 4.x)."""
    if any(".attention.q_proj." in k for k in state_dict):
        return "hf5"
    if any(".attention.attention.query." in k for k in state_dict):
        return "hf4"
    return "timm"


def _strip_model_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove the ``vit.`` / ``deit.`` wrapper prefix of transformers classification models."""
    for prefix in ("vit.", "deit."):
        if any(k.startswith(prefix) for k in sd):
            return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return sd


def _from_hf(sd: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Rename transformers ViT keys to timm names; q/k/v are concatenated into ``qkv``.

    Keys that fit no rule keep their names (so they surface as unexpected when loading).
    """
    layer_map = _HF5_LAYER if fmt == "hf5" else _HF4_LAYER
    q_name, k_name, v_name = _HF_QKV[fmt]
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, val in _strip_model_prefix(sd).items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = val
            continue
        m = _HF_LAYER_KEY.match(key)
        if m is None:
            out[key] = val
            continue
        i, name, kind = m.groups()
        if name in (q_name, k_name, v_name):
            qkv.setdefault((i, kind), {})[name] = (key, val)
        elif name in layer_map:
            out[f"blocks.{i}.{layer_map[name]}.{kind}"] = val
        else:
            out[key] = val
    for (i, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n][1] for n in (q_name, k_name, v_name)])
        else:  # incomplete triple: keep the originals so the load error names them
            out.update(dict(parts.values()))
    return out


def adapt_prefix(sd: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """Distilled-DeiT removal, class-token repetition (ViT -> MCTformer) and patch-grid resizing."""
    t = model.num_prefix_tokens
    src_t = sd["cls_token"].shape[1] if "cls_token" in sd else 1
    pos = sd.get("pos_embed")
    if "dist_token" in sd:  # distilled DeiT: rows [cls, dist, patches]
        del sd["dist_token"]
        if pos is not None:
            pos = torch.cat([pos[:, :src_t], pos[:, src_t + 1 :]], dim=1)
    cls = sd.get("cls_token")
    if cls is not None and cls.shape[1] == 1 and t > 1:
        sd["cls_token"] = cls.repeat(1, t, 1)
    if pos is not None:
        prefix, patch = pos[:, :src_t], pos[:, src_t:]
        if src_t == 1 and t > 1:
            prefix = prefix.repeat(1, t, 1)
        n_src, (gh, gw) = patch.shape[1], model.grid
        g_src = math.isqrt(n_src)
        if n_src != gh * gw and g_src * g_src == n_src:
            patch = resize_pos_grid(patch, (g_src, g_src), (gh, gw), mode="size")
        sd["pos_embed"] = torch.cat([prefix, patch], dim=1)
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 2:  # early timm/jax weights: linear patchify
        p = model.patch_size
        sd["patch_embed.proj.weight"] = w.reshape(w.shape[0], -1, p, p)
    return sd


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """Convert a DeiT / timm / MCTformer / transformers-ViT state dict to this model's names.

    - classifier heads (``head``, ``head_dist``, ``classifier``, ``pooler``...) are dropped;
    - distilled DeiT: ``dist_token`` and its ``pos_embed`` row are dropped;
    - one class token -> T class tokens: ``cls_token`` and the cls row of ``pos_embed`` are repeated
      T times (MCTformer ``--finetune``);
    - the patch rows of ``pos_embed`` are bicubically resized (``size=``, align_corners False) when the
      stored grid differs from the model's;
    - transformers 5.x / 4.x ViT names are renamed, q/k/v concatenated into ``qkv``.
    Everything else keeps its name, so :func:`wsss.core.weights.load_into` reports it.
    """
    fmt = detect_format(state_dict)
    sd = dict(state_dict) if fmt == "timm" else _from_hf(state_dict, fmt)
    sd = {k: v for k, v in sd.items() if not _DROP.match(k)}
    return adapt_prefix(sd, model)


def load_pretrained(model: VisionTransformer, path: str | os.PathLike) -> VisionTransformer:
    """Read ``path`` (safetensors / .pth), convert with :func:`checkpoint_filter_fn`, load strictly."""
    return load_weights(model, path, checkpoint_filter_fn)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------

_SHAPES = {  # embed_dim, depth, heads
    "micro": (64, 6, 2),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


def _build(
    size: str, num_prefix_tokens: int, norm_default: bool, pretrained: str | os.PathLike | None, **kw
) -> VisionTransformer:
    dim, depth, heads = _SHAPES[size]
    kw.setdefault("final_norm", norm_default)
    model = VisionTransformer(
        embed_dim=dim, depth=depth, num_heads=heads, num_prefix_tokens=num_prefix_tokens, **kw
    )
    return load_pretrained(model, pretrained) if pretrained is not None else model


def _vit(size: str) -> Callable[..., VisionTransformer]:
    def builder(
        img_size: int | Sequence[int] = 224,
        drop_path_rate: float = 0.0,
        pretrained: str | os.PathLike | None = None,
        **kw,
    ) -> VisionTransformer:
        return _build(size, 1, True, pretrained, img_size=img_size, drop_path_rate=drop_path_rate, **kw)

    dim, depth, heads = _SHAPES[size]
    return named_builder(
        builder, f"vit_{size}",
        f"ViT/DeiT-{size} (dim {dim}, depth {depth}, {heads} heads), one class token, final norm applied. "
        "``pretrained``: local DeiT/timm/transformers checkpoint path.",
    )


def _mct(size: str) -> Callable[..., VisionTransformer]:
    def builder(
        num_classes: int = 20,
        img_size: int | Sequence[int] = 224,
        drop_path_rate: float = 0.1,
        pretrained: str | os.PathLike | None = None,
        **kw,
    ) -> VisionTransformer:
        return _build(
            size, num_classes, False, pretrained, img_size=img_size, drop_path_rate=drop_path_rate, **kw
        )

    dim, depth, heads = _SHAPES[size]
    return named_builder(
        builder, f"mctformer_v2_{size}",
        f"MCTformer-V2 on DeiT-{size} (dim {dim}, depth {depth}, {heads} heads): ``num_classes`` class "
        "tokens, final norm not applied. ``pretrained``: local ViT/DeiT (class token repeated) or "
        "MCTformer checkpoint path.",
    )


vit_micro = BACKBONES.register("vit_micro")(_vit("micro"))
vit_tiny = BACKBONES.register("vit_tiny")(_vit("tiny"))
vit_small = BACKBONES.register("vit_small")(_vit("small"))
vit_base = BACKBONES.register("vit_base")(_vit("base"))
mctformer_v2_micro = BACKBONES.register("mctformer_v2_micro", class_tokens_per_class=True)(_mct("micro"))
mctformer_v2_tiny = BACKBONES.register("mctformer_v2_tiny", class_tokens_per_class=True)(_mct("tiny"))
mctformer_v2_small = BACKBONES.register("mctformer_v2_small", class_tokens_per_class=True)(_mct("small"))
mctformer_v2_base = BACKBONES.register("mctformer_v2_base", class_tokens_per_class=True)(_mct("base"))


@register_detector
def detect_checkpoint(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    """This family's registered name and builder kwargs for a foreign state dict, or None when it is
    not one of its checkpoints (:func:`wsss.api.hub.detect_backbone`)."""
    if any(".ls1.gamma" in k or ".layer_scale1." in k for k in sd):
        return None  # layer-scale checkpoints (DINOv2) are the DINOv2 family's
    fmt = detect_format(dict(sd))
    native = dict(sd) if fmt == "timm" else _from_hf(dict(sd), fmt)
    w = native.get("patch_embed.proj.weight")
    if w is None or not any(k.startswith("blocks.") for k in native):
        return None
    dim = int(w.shape[0])
    depth = len({int(m[1]) for k in native if (m := re.match(r"blocks\.(\d+)\.", k))})
    size = next((s for s, (d, n, _) in _SHAPES.items() if d == dim and n == depth), None)
    if size is None:
        raise CheckpointError(f"ViT checkpoint with embed dim {dim} and depth {depth} matches no ViT size "
                              f"({', '.join(f'{s}: {d}x{n}' for s, (d, n, _) in _SHAPES.items())})")
    kw: dict[str, Any] = {}
    p = int(w.shape[-1]) if w.ndim == 4 else 16
    if p != 16:
        kw["patch_size"] = p
    tokens = int(native["cls_token"].shape[1]) if "cls_token" in native else 1
    pos = native.get("pos_embed")
    if pos is not None:
        n_patch = pos.shape[1] - tokens - (1 if "dist_token" in native else 0)
        g = int(round(n_patch**0.5))
        if g * g == n_patch and g * p != 224:
            kw["img_size"] = g * p
    if tokens > 1:  # one class token per class: MCTformer-V2
        return f"mctformer_v2_{size}", {"num_classes": tokens, **kw}
    return f"vit_{size}", kw
