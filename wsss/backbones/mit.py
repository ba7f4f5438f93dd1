"""MiT (SegFormer Mix Transformer) backbones with attention capture.

Parameter names follow the official SegFormer code (``patch_embed{s}``, ``block{s}.{j}``,
``norm{s}``), so the NVlabs ImageNet ``mit_b*.pth`` files load once ``head.*`` is dropped.
:func:`checkpoint_filter_fn` also converts AFA full-model checkpoints (``encoder.`` prefix) and
Hugging Face SegFormer checkpoints (transformers 4.x and 5.x names).

AFA uses ``strides=(4, 2, 2, 1)``: stage 4 stays at stride 16 (the SegFormer default is
(4, 2, 2, 2)). The token grid of a side L is then ceil(L / 16), as the conv arithmetic gives.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.backbones._layers import DropPath, attend, conv_gelu, dpr, init_vit_weights, linear
from wsss.backbones.base import AttnReduce, Backbone, BackboneOutput, check_input
from wsss.core.registry import BACKBONES, register_detector
from wsss.core.weights import CheckpointError
from wsss.core.weights import load_pretrained as load_weights

__all__ = [
    "MixVisionTransformer",
    "checkpoint_filter_fn",
    "detect_format",
    "load_pretrained",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
    "mit_tiny",
]

AFA_STRIDES = (4, 2, 2, 1)
BLOCK_EPS = 1e-6  # block and stage LayerNorms; patch-embed and sr LayerNorms keep the default 1e-5


def _to_map(tokens: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, N, C) row-major tokens -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *hw)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: k x k conv (pad k // 2) then LayerNorm.

    forward: (B, C_in, H, W) -> tokens (B, h*w, D) and the grid (h, w), h = ceil(H / stride).
    """

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        # channels-last in, channels-last out: the (B, N, D) token view of the output is then
        # contiguous (no transposing copy before the LayerNorm)
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class DWConv(nn.Module):
    """3x3 depth-wise conv applied to a token sequence (the "Mix" in Mix-FFN)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        return self.dwconv(_to_map(x, hw)).flatten(2).transpose(1, 2)

    def forward_gelu(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """GELU(forward(x)) with the GELU fused into the conv where possible (see ``conv_gelu``)."""
        return conv_gelu(_to_map(x, hw), self.dwconv).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> depth-wise 3x3 conv -> GELU (exact) -> fc2 on (B, N, C) tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        # the tokens' channels-last map view goes through the conv without a layout copy
        return linear(self.dwconv.forward_gelu(linear(x, self.fc1), hw), self.fc2)


class SRAttention(nn.Module):
    """Efficient self-attention: keys/values from a grid reduced by an sr x sr stride-sr conv.

    forward: x (B, N, C) on grid (h, w) -> output (B, N, C) and, when ``capture``, the scaled
    logits (B, heads, Nk, Nk) with the query axis average-pooled to the reduced grid (sr > 1).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def reduced_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Grid of the keys (and of the pooled queries): floor(h / sr) x floor(w / sr)."""
        return hw[0] // self.sr_ratio, hw[1] // self.sr_ratio

    def forward(self, x: Tensor, hw: tuple[int, int], capture: bool = False) -> tuple[Tensor, Tensor | None]:
        B, N, C = x.shape
        q = linear(x, self.q).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(_to_map(x, hw)).flatten(2).transpose(1, 2))
        # kv channels are [k (all heads), v (all heads)], each head-major
        kv = linear(x, self.kv).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, logits = attend(q, kv[0], kv[1], self.scale, capture)
        out = linear(out.transpose(1, 2).reshape(B, N, C), self.proj)
        if logits is not None and self.sr_ratio > 1:
            logits = self._pool_queries(logits, hw)
        return out, logits

    def _pool_queries(self, logits: Tensor, hw: tuple[int, int]) -> Tensor:
        """(B, heads, h*w, Nk) -> (B, heads, Nk, Nk): sr x sr average pooling of the query grid.

        Like the sr conv, pooling drops trailing rows/columns that do not fill a window, so the
        pooled grid equals the key grid.
        """
        B, H, _, Nk = logits.shape
        r = self.sr_ratio
        pooled = F.avg_pool3d(logits.reshape(B, H, hw[0], hw[1], Nk), kernel_size=(r, r, 1), stride=(r, r, 1))
        return pooled.reshape(B, H, -1, Nk)


class MitBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)); x + mixffn(norm2(x)), both with DropPath."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = SRAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, hw: tuple[int, int], capture: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, C) -> (B, N, C) and the captured logits (or None)."""
        out, logits = self.attn(self.norm1(x), hw, capture)
        x = self.drop_path.add(x, out)
        x = self.drop_path.add(x, self.mlp(self.norm2(x), hw))
        return x, logits


class MixVisionTransformer(Backbone):
    """Four-stage MiT encoder.

    ``forward_features(x)`` returns the four normalised stage maps (B, C_s, h_s, w_s) at strides
    4, 8, 16, 16 with AFA strides (4, 8, 16, 32 with the SegFormer default) and, for requested
    global block indices, the scaled attention logits (see :mod:`wsss.backbones.base`).
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        strides: Sequence[int] = AFA_STRIDES,
        drop_path_rate: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        for name, seq in (("num_heads", num_heads), ("depths", depths), ("sr_ratios", sr_ratios)):
            if len(seq) != len(embed_dims):
                raise ValueError(f"{name} has {len(seq)} entries, embed_dims {len(embed_dims)}")
        if len(strides) != len(embed_dims):
            raise ValueError(f"strides must have {len(embed_dims)} entries, got {tuple(strides)}")
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.sr_ratios = list(sr_ratios)
        self.strides = tuple(strides)
        self.num_stages = len(embed_dims)
        rates = dpr(drop_path_rate, sum(depths))
        cur = 0
        prev = in_chans
        for s, (dim, heads, depth, sr) in enumerate(zip(embed_dims, num_heads, depths, sr_ratios), start=1):
            kernel = 7 if s == 1 else 3
            setattr(self, f"patch_embed{s}", OverlapPatchEmbed(prev, dim, kernel, strides[s - 1]))
            blocks = [MitBlock(dim, heads, sr, mlp_ratio, rates[cur + j]) for j in range(depth)]
            setattr(self, f"block{s}", nn.ModuleList(blocks))
            setattr(self, f"norm{s}", nn.LayerNorm(dim, eps=BLOCK_EPS))
            cur += depth
            prev = dim

        self.num_layers = sum(depths)
        self.num_heads = [h for h, d in zip(num_heads, depths) for _ in range(d)]
        self.head_dims = [c // h for c, h, d in zip(embed_dims, num_heads, depths) for _ in range(d)]
        # stride of each block's (pooled) attention grid: the stage's stride times its sr ratio
        self.attn_strides = [
            math.prod(strides[: s + 1]) * sr_ratios[s] for s, d in enumerate(depths) for _ in range(d)
        ]
        self.out_channels = list(embed_dims)
        self.num_prefix_tokens = 0
        self.patch_stride = math.prod(strides)
        self.apply(_init_weights)

    def stage_modules(self, s: int) -> tuple[OverlapPatchEmbed, nn.ModuleList, nn.LayerNorm]:
        """Patch embed, blocks and final norm of stage ``s`` (0-based)."""
        return (
            getattr(self, f"patch_embed{s + 1}"),
            getattr(self, f"block{s + 1}"),
            getattr(self, f"norm{s + 1}"),
        )

    def layer_modules(self) -> list[nn.Module]:
        return [blk for s in range(self.num_stages) for blk in self.stage_modules(s)[1]]

    def _stage_of(self, layer: int) -> int:
        return next(s for s in range(self.num_stages) if layer < sum(self.depths[: s + 1]))

    def block_grid(self, layer: int, out: BackboneOutput) -> tuple[int, int]:
        return tuple(out.features[self._stage_of(layer)].shape[-2:])  # type: ignore[return-value]

    @property
    def global_attn(self) -> list[bool]:
        """Spatial-reduction blocks (sr > 1) attend to a pooled key grid: not N x N."""
        return [self.sr_ratios[self._stage_of(i)] == 1 for i in range(self.num_layers)]

    def forward_features(
        self, x: Tensor, attn_layers: Sequence[int] = (), attn_reduce: AttnReduce | None = None
    ) -> BackboneOutput:
        """x: (B, 3, H, W) -> BackboneOutput with the four stage maps and the requested attention."""
        check_input(x)
        wanted = self.check_layers(attn_layers)
        out = BackboneOutput(features=[])
        idx = 0
        for s in range(self.num_stages):
            embed, blocks, norm = self.stage_modules(s)
            tokens, hw = embed(x)
            self._check_grid(s, hw, x.shape[-2:])
            for blk in blocks:
                tokens, logits = blk(tokens, hw, capture=idx in wanted)
                if logits is not None:
                    out.attn[idx] = attn_reduce(idx, logits) if attn_reduce is not None else logits
                    out.grids[idx] = blk.attn.reduced_grid(hw)
                idx += 1
            x = _to_map(norm(tokens), hw)  # a channels-last view of the tokens, no copy
            out.features.append(x)
        return out

    def _check_grid(self, s: int, hw: tuple[int, int], prev: Sequence[int]) -> None:
        sr = self.sr_ratios[s]
        if hw[0] < sr or hw[1] < sr:
            raise ValueError(
                f"input too small for MiT stage {s + 1}: grid {hw} (from {tuple(prev)}) is smaller than "
                f"its spatial-reduction ratio {sr}; use a larger image"
            )


def _init_weights(m: nn.Module) -> None:
    """SegFormer init: trunc-normal(0.02) Linear, unit LayerNorm (as ViT), fan-out normal convs."""
    init_vit_weights(m)
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# Checkpoint conversion

# Block-level suffixes: HF name -> official name; ("kv", 0/1) marks the key / value halves of kv.
_HF4_BLOCK = {
    "layer_norm_1.": "norm1.",
    "attention.self.query.": "attn.q.",
    "attention.self.key.": ("kv", 0),
    "attention.self.value.": ("kv", 1),
    "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.",
    "attention.output.dense.": "attn.proj.",
    "layer_norm_2.": "norm2.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.",
    "mlp.dense2.": "mlp.fc2.",
}
_HF5_BLOCK = {
    "layernorm_before.": "norm1.",
    "attention.q_proj.": "attn.q.",
    "attention.k_proj.": ("kv", 0),
    "attention.v_proj.": ("kv", 1),
    "attention.sequence_reduction.sequence_reduction.": "attn.sr.",
    "attention.sequence_reduction.layer_norm.": "attn.norm.",
    "attention.o_proj.": "attn.proj.",
    "layernorm_after.": "norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.",
    "mlp.fc2.": "mlp.fc2.",
}
_PATCH_SUFFIX = {"proj.": "proj.", "layer_norm.": "norm."}

# (patch embed, block, stage norm) patterns; groups: stage (0-based), [block], rest of the name.
_HF_PATTERNS = {
    "hf4": (
        re.compile(r"encoder\.patch_embeddings\.(\d+)\.(.+)"),
        re.compile(r"encoder\.block\.(\d+)\.(\d+)\.(.+)"),
        re.compile(r"encoder\.layer_norm\.(\d+)\.(.+)"),
        _HF4_BLOCK,
    ),
    "hf5": (
        re.compile(r"(?:encoder\.)?stages\.(\d+)\.patch_embeddings\.(.+)"),
        re.compile(r"(?:encoder\.)?stages\.(\d+)\.blocks\.(\d+)\.(.+)"),
        re.compile(r"(?:encoder\.)?stages\.(\d+)\.layer_norm\.(.+)"),
        _HF5_BLOCK,
    ),
}
_HF_HEADS = ("classifier.", "decode_head.")  # task heads of HF checkpoints: not backbone weights


def detect_format(keys: Sequence[str]) -> str:
    """Guess the key layout: "hf4", "hf5", "afa" (``encoder.``-prefixed full model) or "official"."""
    names = [k.removeprefix("segformer.") for k in keys]
    if any(_HF_PATTERNS["hf4"][i].fullmatch(k) for k in names for i in range(3)):
        return "hf4"
    if any(_HF_PATTERNS["hf5"][i].fullmatch(k) for k in names for i in range(3)):
        return "hf5"
    if any(k.startswith("encoder.") for k in names):
        return "afa"
    return "official"


def checkpoint_filter_fn(
    state_dict: Mapping[str, Tensor], model: nn.Module | None = None
) -> dict[str, Tensor]:
    """Convert a foreign MiT state dict to the native (official SegFormer) names.

    Handles official NVlabs ImageNet files (``head.*`` dropped), AFA full-model checkpoints
    (``encoder.`` stripped, other modules dropped) and Hugging Face SegFormer checkpoints in the
    transformers 4.x and 5.x names (``segformer.`` optional; ``classifier.*``/``decode_head.*``
    dropped; separate key/value weights concatenated into ``kv``). Keys that match no rule are
    kept under their own name, so strict loading reports them as unexpected. ``model`` is
    accepted for the timm-style signature; the conversion does not need it.
    """
    fmt = detect_format(list(state_dict))
    if fmt == "official":
        return {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    if fmt == "afa":
        return {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    return _convert_hf(state_dict, *_HF_PATTERNS[fmt])


def _convert_hf(
    state_dict: Mapping[str, Tensor],
    patch_re: re.Pattern[str],
    block_re: re.Pattern[str],
    norm_re: re.Pattern[str],
    block_map: Mapping[str, str | tuple[str, int]],
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    kv_parts: dict[str, dict[int, tuple[str, Tensor]]] = {}  # native kv name -> {0: k, 1: v}
    for key, value in state_dict.items():
        name = key.removeprefix("segformer.")
        if name.startswith(_HF_HEADS):
            continue
        new = _rename_hf(name, patch_re, block_re, norm_re, block_map)
        if isinstance(new, tuple):
            kv_parts.setdefault(new[0], {})[new[1]] = (key, value)
        else:
            out[new if new is not None else key] = value
    for name, parts in kv_parts.items():
        if set(parts) == {0, 1}:
            (k_name, k), (v_name, v) = parts[0], parts[1]
            if k.shape != v.shape:
                raise CheckpointError(
                    f"{k_name} {tuple(k.shape)} and {v_name} {tuple(v.shape)} differ in shape; "
                    f"cannot form {name}"
                )
            out[name] = torch.cat([k, v], dim=0)
        else:  # a lone key or value: keep it so the error names it
            out.update({orig: t for orig, t in parts.values()})
    return out


def _rename_hf(
    name: str,
    patch_re: re.Pattern[str],
    block_re: re.Pattern[str],
    norm_re: re.Pattern[str],
    block_map: Mapping[str, str | tuple[str, int]],
) -> str | tuple[str, int] | None:
    """Native name of one HF key, (native kv name, half) for key/value parts, or None if unknown."""
    if m := block_re.fullmatch(name):
        prefix = f"block{int(m[1]) + 1}.{m[2]}."
        for old, new in block_map.items():
            if m[3].startswith(old):
                rest = m[3][len(old) :]
                if isinstance(new, tuple):
                    return (f"{prefix}attn.{new[0]}.{rest}", new[1])
                return prefix + new + rest
        return None
    if m := patch_re.fullmatch(name):
        for old, new in _PATCH_SUFFIX.items():
            if m[2].startswith(old):
                return f"patch_embed{int(m[1]) + 1}.{new}{m[2][len(old) :]}"
        return None
    if m := norm_re.fullmatch(name):
        return f"norm{int(m[1]) + 1}.{m[2]}"
    return None


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, filter_fn: Callable = checkpoint_filter_fn
) -> None:
    """Read ``path`` (file or HF directory), convert it and load it strictly into ``model``."""
    load_weights(model, path, filter_fn)


# ------------------------------------------------------------------------------------------------
# Builders (official hyper-parameters; sr ratios (8, 4, 2, 1) and MLP ratio 4 throughout)

_B_DIMS = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
_CONFIGS: dict[str, dict] = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), num_heads=_HEADS, depths=(2, 2, 2, 2)),
    "mit_b1": dict(embed_dims=_B_DIMS, num_heads=_HEADS, depths=(2, 2, 2, 2)),
    "mit_b2": dict(embed_dims=_B_DIMS, num_heads=_HEADS, depths=(3, 4, 6, 3)),
    "mit_b3": dict(embed_dims=_B_DIMS, num_heads=_HEADS, depths=(3, 4, 18, 3)),
    "mit_b4": dict(embed_dims=_B_DIMS, num_heads=_HEADS, depths=(3, 8, 27, 3)),
    "mit_b5": dict(embed_dims=_B_DIMS, num_heads=_HEADS, depths=(3, 6, 40, 3)),
    "mit_tiny": dict(embed_dims=(16, 32, 64, 96), num_heads=(1, 1, 2, 4), depths=(1, 1, 1, 2)),
}


def _build(
    name: str, pretrained: str | os.PathLike | None, strides: Sequence[int], drop_path_rate: float, **kw
) -> MixVisionTransformer:
    cfg = {**_CONFIGS[name], "sr_ratios": (8, 4, 2, 1), **kw}
    model = MixVisionTransformer(strides=strides, drop_path_rate=drop_path_rate, **cfg)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


@BACKBONES.register()
def mit_b0(
    pretrained: str | os.PathLike | None = None,
    strides: Sequence[int] = AFA_STRIDES,
    drop_path_rate: float = 0.1,
    **kw,
) -> MixVisionTransformer:
    """MiT-B0: dims (32, 64, 160, 256), depths (2, 2, 2, 2); 3.3 M parameters."""
    return _build("mit_b0", pretrained, strides, drop_path_rate, **kw)


@BACKBONES.register()
def mit_b1(
    pretrained: str | os.PathLike | None = None,
    strides: Sequence[int] = AFA_STRIDES,
    drop_path_rate: float = 0.1,
    **kw,
) -> MixVisionTransformer:
    """MiT-B1 (AFA): dims (64, 128, 320, 512), depths (2, 2, 2, 2); 13.2 M parameters."""
    return _build("mit_b1", pretrained, strides, drop_path_rate, **kw)


@BACKBONES.register()
def mit_b2(
    pretrained: str | os.PathLike | None = None,
    strides: Sequence[int] = AFA_STRIDES,
    drop_path_rate: float = 0.1,
    **kw,
) -> MixVisionTransformer:
    """MiT-B2: depths (3, 4, 6, 3)."""
    return _build("mit_b2", pretrained, strides, drop_path_rate, **kw)


@BACKBONES.register()
def mit_b3(
    pretrained: str | os.PathLike | None = None,
    strides: Sequence[int] = AFA_STRIDES,
    drop_path_rate: float = 0.1,
    **kw,
) -> MixVisionTransformer:
    """MiT-B3: depths (3, 4, 18, 3)."""
    return _build("mit_b3", pretrained, strides, drop_path_rate, **kw)


@BACKBONES.register()
def mit_b4(
    pretrained: str | os.PathLike | None = None,
    strides: Sequence[int] = AFA_STRIDES,
    drop_path_rate: float = 0.1,
    **kw,
) -> MixVisionTransformer:
    """MiT-B4: depths (3, 8, 27, 3)."""
    return _build("mit_b4", pretrained, strides, drop_path_rate, **kw)


@BACKBONES.register()
def mit_b5(
    pretrained: str | os.PathLike | None = None,
    strides: Sequence[int] = AFA_STRIDES,
    drop_path_rate: float = 0.1,
    **kw,
) -> MixVisionTransformer:
    """MiT-B5: depths (3, 6, 40, 3)."""
    return _build("mit_b5", pretrained, strides, drop_path_rate, **kw)


@BACKBONES.register()
def mit_tiny(
    pretrained: str | os.PathLike | None = None,
    strides: Sequence[int] = AFA_STRIDES,
    drop_path_rate: float = 0.1,
    **kw,
) -> MixVisionTransformer:
    """A few-hundred-thousand-parameter MiT for CPU demos and tests: dims (16, 32, 64, 96)."""
    return _build("mit_tiny", pretrained, strides, drop_path_rate, **kw)


@register_detector
def detect_checkpoint(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    """This family's registered name and builder kwargs for a foreign state dict, or None when it is
    not one of its checkpoints (:func:`wsss.api.hub.detect_backbone`)."""
    native = checkpoint_filter_fn(sd)
    if "patch_embed1.proj.weight" not in native:
        return None
    dims = tuple(int(native[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5)
                 if f"patch_embed{i}.proj.weight" in native)
    depths = tuple(
        len({int(m[1]) for k in native if (m := re.match(rf"block{i}\.(\d+)\.", k))}) for i in range(1, 5)
    )
    for name, c in _CONFIGS.items():
        if tuple(c["embed_dims"]) == dims and tuple(c["depths"]) == depths:
            return name, {}
    raise CheckpointError(f"MiT checkpoint with embed dims {dims} and depths {depths} matches no MiT size "
                          f"({', '.join(_CONFIGS)})")
