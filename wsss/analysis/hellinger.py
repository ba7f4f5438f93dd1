"""Layer-wise Hellinger distance between attention rows (AReAM paper eq. 6, ``docs/methods/aream.md`` 15.1).

H(i, j) = (1 / sqrt 2) * || sqrt(a_i) - sqrt(a_j) ||_2 for the attention distributions a_i, a_j of two
query tokens. Expanding the square, H^2 = 0.5 (r_i + r_j) - BC_ij with r_i = sum_k a_ik and the
Bhattacharyya coefficient BC = sqrt(A) sqrt(A)^T: one matmul; for full rows (r = 1) H^2 = 1 - BC.
Low values mean similar rows (over-smoothing).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from wsss.ops.attention import slice_patches


def _sqrt_rows(probs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    probs = probs.to(dtype).clamp_min(0.0)
    return probs.sqrt(), probs.sum(-1)


def _distance(sq_q: Tensor, r_q: Tensor, sq_k: Tensor, r_k: Tensor) -> Tensor:
    bc = sq_q @ sq_k.transpose(-2, -1)
    h2 = 0.5 * (r_q.unsqueeze(-1) + r_k.unsqueeze(-2)) - bc
    return h2.clamp_min(0.0).sqrt()


def hellinger_distance_matrix(probs: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """probs: (..., Nq, Nk) non-negative rows -> (..., Nq, Nq) pairwise Hellinger distances.

    Exact for any non-negative rows (not only rows that sum to 1); rounding below 0 is clamped.
    Computed in ``dtype`` (float64 by default): the square root amplifies the rounding of 1 - BC, so
    identical rows would read about 2e-4 in float32 instead of 0.
    """
    sq, r = _sqrt_rows(probs, dtype)
    return _distance(sq, r, sq, r)


def layer_hellinger(
    probs: Tensor,
    num_prefix: int,
    keys: Literal["all", "patch"] = "all",
    renormalize: bool = False,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Mean Hellinger distance over unordered pairs i < j of patch query rows: (..., N, N) -> (...).

    probs: head-mean softmax attention over all tokens (B, N, N), or per head (B, heads, N, N) for the
    per-head variant; prefix tokens first. keys ``"all"`` (default): rows are distributions over all N
    keys; ``"patch"``: only patch keys, exact sub-distributions (rows sum < 1) unless ``renormalize``.
    Queries are processed ``chunk_size`` rows at a time so memory stays O(chunk * Np); the maths runs in
    ``dtype`` (see :func:`hellinger_distance_matrix`). Returns (...) in ``dtype``.
    """
    rows = probs[..., num_prefix:, :]
    if keys == "patch":
        rows = slice_patches(probs, num_prefix, renormalize)
    elif keys == "all":
        if renormalize:
            rows = rows / rows.sum(-1, keepdim=True)
    else:
        raise ValueError(f"keys must be 'all' or 'patch', got {keys!r}")
    sq, r = _sqrt_rows(rows, dtype)
    num = sq.shape[-2]
    if num < 2:
        raise ValueError("layer_hellinger needs at least two patch tokens")
    total = sq.new_zeros(sq.shape[:-2])
    cols = torch.arange(num, device=sq.device)
    for start in range(0, num, chunk_size):
        stop = min(start + chunk_size, num)
        dist = _distance(sq[..., start:stop, :], r[..., start:stop], sq, r)
        upper = cols.unsqueeze(0) > torch.arange(start, stop, device=sq.device).unsqueeze(1)
        total = total + (dist * upper).sum(dim=(-2, -1))
    return total / (num * (num - 1) / 2)
