"""Small layers shared by the backbone families (no timm)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
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

    def add(self, x: Tensor, y: Tensor, gamma: Tensor | None = None) -> Tensor:
        """The residual ``x + self(gamma * y)`` in one pass over memory (same mask draw as
        :func:`drop_path`); ``gamma``: an optional per-channel layer scale (D,) for y (..., D)."""
        if self.p == 0.0 or not self.training:
            return x + y if gamma is None else torch.addcmul(x, y, gamma)
        keep = 1.0 - self.p
        mask = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep)
        return torch.addcmul(x, y, mask if gamma is None else mask * gamma, value=1.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def fused_dtype(x: Tensor) -> torch.dtype | None:
    """Compute dtype of the fused oneDNN inference kernels (:func:`linear`, :func:`conv_gelu`) for
    ``x``, or None where they do not apply: autograd on (they have no backward), not on the CPU,
    oneDNN missing, or a dtype other than float32 / bfloat16 (float64 reference runs stay exact).
    Under CPU autocast it is the autocast dtype, as for the ops they replace."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if x.dtype not in (torch.float32, torch.bfloat16) or dtype not in (torch.float32, torch.bfloat16):
        return None
    if torch.bfloat16 in (x.dtype, dtype) and not _onednn_bf16():
        return None  # oneDNN's bf16 kernels need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: plain ops then
    return dtype


@functools.cache
def _onednn_bf16() -> bool:
    """Whether this CPU runs oneDNN's bf16 kernels (fixed for the process)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: Tensor, layer: nn.Linear, act: str = "none") -> Tensor:
    """``layer(x)``, followed by exact (erf) GELU when ``act == "gelu"``; x: (..., in) -> (..., out).

    Without autograd on the CPU one oneDNN kernel does it all: the bias and the GELU are applied as
    the GEMM writes its output (``F.linear`` first copies the bias into the output, GELU is another
    pass). Elsewhere the plain ops run."""
    if act not in ("none", "gelu"):
        raise ValueError(f"act must be 'none' or 'gelu', got {act!r}")
    dtype = fused_dtype(x)
    if dtype is None:
        y = layer(x)
        return F.gelu(y) if act == "gelu" else y
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    algorithm = "none" if act == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), layer.weight.to(dtype), bias, act, [], algorithm)


#: activations :func:`conv2d_act` fuses: name -> (oneDNN post-op, its scalars)
_CONV_ACTS = {"none": ("none", []), "gelu": ("gelu", []), "relu6": ("hardtanh", [0.0, 6.0])}


def conv2d_act(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, act: str = "none") -> Tensor:
    """``act(F.conv2d(x, weight, bias, ...))`` with ``act`` "none", "gelu" (exact, erf) or "relu6";
    x: (B, C, H, W) -> (B, C', H', W'), numeric (zero) padding.

    Without autograd on the CPU the activation runs inside the oneDNN convolution (one pass over
    the output instead of two; the memory format of ``x``, e.g. channels-last, is kept). With
    autograd the ReLU6 clamps in place: the convolution's backward needs its input, not its output."""
    if act not in _CONV_ACTS:
        raise ValueError(f"act must be one of {sorted(_CONV_ACTS)}, got {act!r}")
    dtype = fused_dtype(x)
    if dtype is None:
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return F.gelu(y) if act == "gelu" else y.clamp_(0.0, 6.0) if act == "relu6" else y
    attr, scalars = _CONV_ACTS[act]
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None, list(padding),
        list(stride), list(dilation), groups, attr, scalars, "none" if act == "gelu" else "",
    )


def conv_gelu(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``F.gelu(conv(x))`` (exact GELU), x: (B, C, H, W) -> (B, C', H', W'), fused where
    :func:`conv2d_act` fuses."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return F.gelu(conv(x))
    return conv2d_act(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                      "gelu")


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (ViT / DeiT / Conformer MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.act, nn.GELU) and self.act.approximate == "none":
            return linear(linear(x, self.fc1, "gelu"), self.fc2)  # GELU fused into fc1 where possible
        return self.fc2(self.act(self.fc1(x)))


#: key count up to which bf16 attention on CPU uses plain matmuls instead of the fused kernel
SHORT_KEYS = 256


def _cpu_bf16_matmuls(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether bf16 attention on the CPU should run as two matmuls instead of PyTorch's flash kernel.

    The CPU flash kernel in bf16 is about 2x slower than the matmuls when the keys are few (MiT's
    spatially reduced keys; no-grad passes), and its backward is 2-12x slower at every size measured
    (17 to 1025 tokens, ``benchmarks/bench_attention.py``): with autograd the matmuls always win, at
    the cost of keeping the (B, h, Nq, Nk) probabilities for the backward."""
    if q.device.type != "cpu" or torch.bfloat16 not in (q.dtype, k.dtype):
        return False
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return grad or k.shape[-2] <= SHORT_KEYS


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, capture: bool) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention core.

    q: (B, h, Nq, d), k/v: (B, h, Nk, d). Returns the output (B, h, Nq, d) and, when ``capture``,
    the scaled pre-softmax logits (B, h, Nq, Nk); otherwise the fused SDPA kernel runs and the
    logits are never materialised.
    """
    if not capture:
        if _cpu_bf16_matmuls(q, k, v):
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
        qkv = linear(x, self.qkv).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, logits = attend(q, k, v, self.scale, capture)
        return linear(out.transpose(1, 2).reshape(b, n, d), self.proj), logits


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT / DINOv2): ``gamma * y``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))); with
    ``init_values`` each branch is scaled by a :class:`LayerScale` (``ls1``, ``ls2``) first."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else None
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else None

    def forward(self, x: Tensor, capture: bool = False) -> tuple[Tensor, Tensor | None]:
        y, logits = self.attn(self.norm1(x), capture)
        x = self.drop_path.add(x, y, self.ls1.gamma if self.ls1 is not None else None)
        y = self.mlp(self.norm2(x))
        x = self.drop_path.add(x, y, self.ls2.gamma if self.ls2 is not None else None)
        return x, logits


def run_blocks(blocks: Iterable[nn.Module], tokens: Tensor, capture: set[int],
               attn_reduce: Callable[[int, Tensor], Tensor] | None, grid: tuple[int, int],
               out: Any, start: int = 0) -> Tensor:
    """Run ``Block``s over (B, N, D) tokens; for the layers in ``capture`` store their logits (or
    ``attn_reduce(layer, logits)``) in ``out.attn`` and ``grid`` in ``out.grids``. Returns the tokens.
    ``start``: the layer index of the first block (a run of a later part of the stack)."""
    for i, blk in enumerate(blocks, start):
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
