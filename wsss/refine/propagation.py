"""Random-walk propagation of CAMs with a (learned) token affinity, and local window masks.

AFA (``propagte_aff_cam_with_bkg``): prepend a constant background score, keep only pairs inside a
local window, sharpen the affinity by an element-wise power (alpha = 2), normalise it over the first
token axis with a +0.1 leak, softmax the scores over background + present classes, and propagate
once: P_new (C x N) = P (C x N) @ T (N x N). Here all images go through one batched matmul; absent
classes are masked with -inf before the softmax, so they come out exactly 0, as in the official
per-image subset; the matmul itself only runs over background + the present classes (padded to the
largest count in the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from wsss.refine.labels import masked_softmax, present_index

_SHAPES = ("square", "circle")

# The official AFA propagation (the config's ``eval.aff_bkg_score``, ``afa.power``, ``afa.norm_eps``)
AFF_BKG_SCORE = 0.35  # the constant background score prepended before the softmax
AFF_POWER = 2.0  # the element-wise power (alpha) that sharpens the affinity
AFF_NORM_EPS = 0.1  # added to the affinity's column sums (an anti-NaN leak)


@lru_cache(maxsize=32)
def _window_mask(h: int, w: int, radius: int, shape: str, device: torch.device) -> Tensor:
    # separable construction: (h, h) row and (w, w) column offsets broadcast to (h, w, h, w), so the only
    # N x N allocation is the boolean result
    drow = torch.arange(h, device=device, dtype=torch.int32)
    dcol = torch.arange(w, device=device, dtype=torch.int32)
    drow = (drow[:, None] - drow[None, :]).abs()[:, None, :, None]  # (h, 1, h, 1)
    dcol = (dcol[:, None] - dcol[None, :]).abs()[None, :, None, :]  # (1, w, 1, w)
    if shape == "square":
        mask = (drow <= radius) & (dcol <= radius)
    else:
        # PSA's pair search keeps offsets with dy^2 + dx^2 < radius^2 (strict)
        mask = drow * drow + dcol * dcol < radius * radius
    return mask.reshape(h * w, h * w)


def window_mask(
    h: int, w: int, radius: int, device: torch.device | str | None = None, shape: str = "square"
) -> Tensor:
    """Boolean (N, N) local-window mask on an (h, w) token grid, N = h * w, tokens row-major.

    ``shape="square"`` (official AFA ``get_mask_by_radius``): |drow| <= r and |dcol| <= r, a
    (2r+1)^2 Chebyshev window clipped at the borders. ``shape="circle"`` (PSA style):
    drow^2 + dcol^2 < r^2. Both are symmetric and include the token itself.

    The result is cached per (h, w, radius, shape, device) and shared: do not modify it in place.
    """
    if shape not in _SHAPES:
        raise ValueError(f"shape must be one of {_SHAPES}, got {shape!r}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return _window_mask(int(h), int(w), int(radius), shape, torch.device(device or "cpu"))


def _transition(aff: Tensor, window: Tensor | None, power: float, eps: float) -> Tensor:
    """T[b, i, j] = A'[b, i, j] / (sum_i' A'[b, i', j] + eps), A' = (aff * window) ** power.

    The affinity is detached (as the official code does) and never modified in place.
    """
    aff = aff.detach()
    if window is not None:
        if window.shape != aff.shape[-2:]:
            raise ValueError(f"window {tuple(window.shape)} does not match affinity {tuple(aff.shape)}")
        aff = aff.masked_fill(~window.to(device=aff.device, dtype=torch.bool), 0.0)
        aff = aff.square_() if power == 2 else aff.pow_(power)  # our own copy: in place
    else:
        aff = aff.square() if power == 2 else aff.pow(power)
    return aff.div_(aff.sum(dim=1, keepdim=True) + eps)


def _check(cam: Tensor, aff: Tensor) -> None:
    b, _, h, w = cam.shape
    if aff.shape != (b, h * w, h * w):
        raise ValueError(f"aff must be (B, N, N) = ({b}, {h * w}, {h * w}), got {tuple(aff.shape)}")


def propagate_affinity(
    cam: Tensor,
    aff: Tensor,
    labels: Tensor,
    bkg_score: float = AFF_BKG_SCORE,
    window: Tensor | None = None,
    power: float = AFF_POWER,
    eps: float = AFF_NORM_EPS,
) -> Tensor:
    """Propagate CAMs with background through the affinity (official ``propagte_aff_cam_with_bkg``).

    Args:
        cam: (B, K, h, w) foreground CAMs on the affinity's token grid.
        aff: (B, N, N) affinity, N = h * w (row = query token); not modified.
        labels: (B, K) multi-hot image labels; absent classes come out exactly 0.
        bkg_score: constant background score prepended as channel 0.
        window: optional (N, N) bool mask; affinities outside it are zeroed.
        power: element-wise power alpha applied to the affinity.
        eps: added to the column sums (official +0.1, an anti-NaN leak).
    Returns:
        (B, K+1, h, w): channel 0 background, channel k class k.
    """
    return propagate_affinity_scores(cam, aff, labels, (bkg_score,), window, power, eps)[0]


def propagate_affinity_scores(
    cam: Tensor,
    aff: Tensor,
    labels: Tensor,
    bkg_scores: Sequence[float],
    window: Tensor | None = None,
    power: float = AFF_POWER,
    eps: float = AFF_NORM_EPS,
) -> list[Tensor]:
    """:func:`propagate_affinity` of the same CAM and affinity for each background score of
    ``bkg_scores`` (AFA's high and low label scores): the transition matrix is built once. Returns
    one (B, K+1, h, w) map per score, each equal to its own :func:`propagate_affinity` call."""
    _check(cam, aff)
    b, k, h, w = cam.shape
    dtype = torch.promote_types(cam.dtype, torch.float32)  # fp32 at least (bf16 autocast)
    trans = _transition(aff, window, power, eps).to(dtype)
    # multiply only background + present classes (M <= K+1 rows); absent rows are exactly 0 anyway
    idx, _ = present_index(labels)
    gidx = idx[:, :, None].expand(-1, -1, h * w)
    outs = []
    for score in bkg_scores:
        bkg = cam.new_full((b, 1, h, w), score)
        probs = masked_softmax(torch.cat([bkg, cam], dim=1), labels, dim=1).reshape(b, k + 1, h * w)
        probs = probs.to(dtype)
        with torch.autocast(cam.device.type, enabled=False):  # the random walk stays in full precision
            moved = torch.bmm(probs.gather(1, gidx), trans)
        outs.append(torch.zeros_like(probs).scatter_(1, gidx, moved).reshape(b, k + 1, h, w))
    return outs


def propagate_affinity_plain(
    cam: Tensor,
    aff: Tensor,
    window: Tensor | None = None,
    power: float = AFF_POWER,
    eps: float = 1e-4,
) -> Tensor:
    """Plain propagation (official ``propagte_aff_cam``): no background channel, no softmax.

    out[b, :, j] = sum_i cam[b, :, i] * T[b, i, j] with T as in :func:`propagate_affinity` but a
    +1e-4 leak.

    Args:
        cam: (B, C, h, w) any score maps on the token grid.
        aff: (B, N, N) affinity; not modified.
        window, power, eps: as in :func:`propagate_affinity`.
    Returns:
        (B, C, h, w).
    """
    _check(cam, aff)
    b, c, h, w = cam.shape
    trans = _transition(aff, window, power, eps).to(cam.dtype)
    return torch.bmm(cam.reshape(b, c, h * w), trans).reshape(b, c, h, w)
