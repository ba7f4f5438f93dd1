"""Small layers shared by the backbone families (no timm)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample: zero a sample's residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (ViT / DeiT / Conformer MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


#: key count up to which bf16 attention on CPU uses plain matmuls instead of the fused kernel
SHORT_KEYS = 256


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, capture: bool) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention core.

    q: (B, h, Nq, d), k/v: (B, h, Nk, d). Returns the output (B, h, Nq, d) and, when ``capture``,
    the scaled pre-softmax logits (B, h, Nq, Nk); otherwise the fused SDPA kernel runs and the
    logits are never materialised.
    """
    if not capture:
        if q.device.type == "cpu" and torch.bfloat16 in (q.dtype, k.dtype) and k.shape[-2] <= SHORT_KEYS:
            # PyTorch's CPU flash kernel is about 2x slower than two matmuls in bf16 when the keys are
            # few (MiT's spatially reduced keys); the logits are small then
            return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v, None
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    logits = (q * scale) @ k.transpose(-2, -1)  # scale the (N, d) side, not the (N, N) product
    out = logits.softmax(dim=-1) @ v
    return out, logits


def init_vit_weights(module: nn.Module) -> None:
    """timm-style init: truncated normal(0.02) Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def dpr(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``drop_path_rate`` over ``depth`` blocks."""
    if depth <= 1:
        return [0.0] * depth
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]  # plain floats: meta-device safe


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout: rows [q; k; v])."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, capture: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, D) -> output (B, N, D) and, when ``capture``, scaled logits (B, heads, N, N)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out, logits = attend(q, k, v, self.scale, capture)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), logits


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, capture: bool = False) -> tuple[Tensor, Tensor | None]:
        y, logits = self.attn(self.norm1(x), capture)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, logits


def run_blocks(blocks: Iterable[nn.Module], tokens: Tensor, capture: set[int],
               attn_reduce: Callable[[int, Tensor], Tensor] | None, grid: tuple[int, int],
               out: Any) -> Tensor:
    """Run ``Block``s over (B, N, D) tokens; for the layers in ``capture`` store their logits (or
    ``attn_reduce(layer, logits)``) in ``out.attn`` and ``grid`` in ``out.grids``. Returns the tokens."""
    for i, blk in enumerate(blocks):
        tokens, logits = blk(tokens, i in capture)
        if logits is not None:
            out.attn[i] = attn_reduce(i, logits) if attn_reduce is not None else logits
            out.grids[i] = grid
    return tokens


POS_INTERP_MODES = ("dino", "size")


def resize_pos_grid(
    patch_pos: Tensor, grid: tuple[int, int], out: tuple[int, int], mode: str = "dino"
) -> Tensor:
    """Bicubically resize patch positional embeddings laid out on ``grid``.

    patch_pos: (1, gh*gw, D) row-major. Returns (1, h*w, D) for ``out`` = (h, w).
    mode "dino": the DINO / MCTformer / AReAM rule, ``scale_factor = ((h + 0.1)/gh, (w + 0.1)/gw)``
        (the +0.1 keeps floor(g * scale) == h under float error; the kernel then samples with that
        scale, not with h/gh), and the result is checked to be (h, w).
    mode "size": ``size=(h, w)`` (ToCo, DeiT fine-tuning).
    Both use align_corners=False.
    """
    (gh, gw), (h, w) = grid, out
    d = patch_pos.shape[-1]
    img = patch_pos.reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    if mode == "dino":
        img = F.interpolate(
            img, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic", align_corners=False
        )
        if tuple(img.shape[-2:]) != (h, w):
            raise RuntimeError(f"pos-embed interpolation gave {tuple(img.shape[-2:])}, wanted {out}")
    elif mode == "size":
        img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"pos_interp must be one of {POS_INTERP_MODES}, got {mode!r}")
    return img.permute(0, 2, 3, 1).reshape(1, h * w, d)
