"""Losses shared by the methods (AFA, AReAM, ToCo).

- :func:`multilabel_soft_margin`: image-level classification loss (``docs/methods/afa.md`` 3).
- :func:`seg_loss_bg_fg`: the balanced background / foreground cross-entropy (``docs/methods/afa.md`` 8),
  NaN-safe.
- :func:`affinity_loss` / :func:`affinity_loss_logits`: the 0.5 / +1 affinity loss (``docs/methods/afa.md`` 2,
  ``docs/methods/aream.md`` 8.1).
- :func:`energy_loss`: the regularised (dense CRF energy) loss of AFA (``docs/methods/afa.md`` 8) with a
  local,
  dilated window Gaussian kernel instead of the permutohedral lattice.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.refine.par import cpu_block_bytes
from wsss.refine.resize import resize_bilinear


def multilabel_soft_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-label soft-margin loss: logits (B, K), labels (B, K) multi-hot -> scalar.

    Binary cross-entropy with logits averaged over the K classes and then over the batch
    (= ``torch.nn.functional.multilabel_soft_margin_loss``).
    """
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def seg_loss_bg_fg(logits: Tensor, label: Tensor, ignore_index: int = 255) -> Tensor:
    """Balanced segmentation loss 0.5 * (CE_bg + CE_fg).

    logits: (B, C, h, w), bilinearly upsampled (align_corners False) to the label size when different.
    label: (B, H, W) class ids, ``ignore_index`` = ignore.
    CE_bg is the mean cross-entropy over the valid background pixels (label 0) of the whole batch, CE_fg
    over the valid foreground pixels (label 1..C-1). A half without any pixel contributes 0 (the official
    code returns NaN there, ToCo#8); otherwise the value equals the official one.
    """
    # resize in fp32 at least (bf16 autocast: faster and more exact), CE in fp32 as before; a
    # channels-last map (a conv head's output) is made contiguous while small: the CE's softmax over
    # channels would otherwise transpose the full-size copy
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).contiguous()
    if logits.shape[-2:] != label.shape[-2:]:
        # from a token grid as two small matrix products (wsss.refine.resize: about 3x faster with its
        # backward on a CPU)
        logits = resize_bilinear(logits, tuple(label.shape[-2:]))
    label = label.long()
    # One CE pass: a pixel's CE is the same in whichever half it belongs to.
    ce = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none")
    bg = label == 0
    fg = (label != 0) & (label != ignore_index)
    bg_loss = (ce * bg).sum() / bg.sum().clamp_min(1)
    fg_loss = (ce * fg).sum() / fg.sum().clamp_min(1)
    return 0.5 * (bg_loss + fg_loss)


def affinity_loss(aff: Tensor, target: Tensor, background: Tensor | None = None) -> Tensor:
    """Affinity loss on predicted affinities.

    aff: (B, N, N) in (0, 1); target: (B, N, N) with 1 = same label, 0 = different, 255 = ignored pair.
    Returns 0.5 * sum(pos * (1 - A)) / (N+ + 1) + 0.5 * sum(neg * A) / (N- + 1), the counts N+ / N-
    taken over the whole batch (linear in A, not BCE): AFA's loss, where background-background pairs
    are most of the positives.

    background: optional (B, N) bool, the tokens labelled background. Then the positives are split
    into background pairs (row token background) and foreground pairs, each averaged over its own
    count and weighted 0.25 (PSA's balance), so that object tokens learn to join their own object
    even where the background outnumbers them.
    """
    pos = target == 1
    neg = target == 0
    aff = aff.float()
    neg_loss = (aff * neg).sum() / (neg.sum() + 1)
    if background is None:
        pos_loss = ((1.0 - aff) * pos).sum() / (pos.sum() + 1)
        return 0.5 * pos_loss + 0.5 * neg_loss
    bg_rows = background[:, :, None]
    pos_bg, pos_fg = pos & bg_rows, pos & ~bg_rows
    loss_bg = ((1.0 - aff) * pos_bg).sum() / (pos_bg.sum() + 1)
    loss_fg = ((1.0 - aff) * pos_fg).sum() / (pos_fg.sum() + 1)
    return 0.25 * loss_bg + 0.25 * loss_fg + 0.5 * neg_loss


def affinity_loss_logits(logits: Tensor, target: Tensor) -> Tensor:
    """:func:`affinity_loss` of ``sigmoid(logits)`` (AReAM per-layer loss on head-mean logits).

    logits: (B, N, N) any float dtype (upcast to float32); target as in :func:`affinity_loss`.
    Uses 1 - sigmoid(z) = sigmoid(-z) so saturated positives keep their gradient.
    """
    logits = logits.float()
    pos = target == 1
    neg = target == 0
    pos_loss = (torch.sigmoid(-logits) * pos).sum() / (pos.sum() + 1)
    neg_loss = (torch.sigmoid(logits) * neg).sum() / (neg.sum() + 1)
    return 0.5 * pos_loss + 0.5 * neg_loss


# --------------------------------------------------------------------------------------------------
# Regularised (dense CRF energy) loss with a local-window Gaussian kernel


@lru_cache(maxsize=32)
def window_offsets(radius: int, dilation: int, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """Offsets (dy, dx) of the dilated square window: multiples of ``dilation`` up to ``radius`` steps.

    Offsets that cannot reach any pixel of an (height, width) image are dropped (they contribute 0).
    """
    steps = range(-radius, radius + 1)
    return tuple(
        (dy * dilation, dx * dilation)
        for dy in steps
        for dx in steps
        if abs(dy * dilation) < height and abs(dx * dilation) < width
    )


def exp_flushed(x: Tensor) -> Tensor:
    """exp(x), with the results below e^0.5 times the dtype's smallest normal number (float32: 1.9e-38)
    set to 0, much as a CPU flushing denormals would.

    PyTorch's CPU exp leaves its vector path for arguments whose exp is subnormal or 0: measured
    100-200x slower (1.2-2.3 ms against 0.011 ms for 32K floats). Across strong edges the bilateral
    weights are such numbers; they stand for nothing next to the window's other weights."""
    floor = math.log(torch.finfo(x.dtype).smallest_normal) + 0.5  # exp(floor) is a normal number
    return torch.exp(x.clamp(min=floor)).mul_(x >= floor)


def _image_block(x: Tensor) -> int:
    """Images per block of :func:`_filter`: as many as fit PAR's CPU block (:func:`cpu_block_bytes`,
    at least one), so the window's passes over them stay in the cores' caches; off the CPU the whole
    batch."""
    block = cpu_block_bytes(x)
    if block is None:
        return max(1, x.shape[0])
    return max(1, block // max(1, math.prod(x.shape[1:]) * x.element_size()))


def _filter(
    x: Tensor,
    rgb: Tensor,
    offsets: tuple[tuple[int, int], ...],
    sigma_rgb: float,
    sigma_xy: float,
    cell: float,
) -> Tensor:
    """W x for the truncated bilateral kernel (see :func:`window_bilateral_filter`), no autograd.

    Runs on blocks of images (:func:`_image_block`), each image's sum over the window the same: one
    pass over the whole batch per offset would stream maps larger than the caches 121 times (measured
    on one core, (8, 17, 112, 112) maps: 153 ms in blocks of one image against 332 ms)."""
    height, width = x.shape[-2:]
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    # Zero padding of x: neighbours outside the image contribute nothing, which keeps W symmetric.
    xp = F.pad(x, (reach,) * 4)
    rp = F.pad(rgb, (reach,) * 4)
    out = torch.zeros_like(x)
    inv_rgb = 1.0 / (2.0 * sigma_rgb**2)
    step = _image_block(x)
    for i in range(0, x.shape[0], step):
        rows_i = slice(i, i + step)
        block, x_pad, rgb_pad, rgb_i = out[rows_i], xp[rows_i], rp[rows_i], rgb[rows_i]
        for dy, dx in offsets:
            rows = slice(reach + dy, reach + dy + height)
            cols = slice(reach + dx, reach + dx + width)
            dist_rgb = torch.sum((rgb_i - rgb_pad[:, :, rows, cols]).square_(), 1, keepdim=True)
            w = exp_flushed(dist_rgb.mul_(-inv_rgb).sub_((dy * dy + dx * dx) / (2.0 * sigma_xy**2)))
            block.addcmul_(w, x_pad[:, :, rows, cols])
    return out.mul_(cell)


class _WindowFilter(torch.autograd.Function):
    """Linear map x -> W x with a symmetric W, so the backward pass is W applied to the gradient."""

    @staticmethod
    def forward(ctx, x, rgb, offsets, sigma_rgb, sigma_xy, cell):  # type: ignore[override]
        ctx.save_for_backward(rgb)
        ctx.params = (offsets, sigma_rgb, sigma_xy, cell)
        return _filter(x, rgb, offsets, sigma_rgb, sigma_xy, cell)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (rgb,) = ctx.saved_tensors
        return _filter(grad, rgb, *ctx.params), None, None, None, None, None


def window_bilateral_filter(
    x: Tensor, rgb: Tensor, sigma_rgb: float, sigma_xy: float, radius: int, dilation: int
) -> Tensor:
    """Bilateral (RGB + position) Gaussian filtering restricted to a dilated square window.

    x: (B, K, H, W); rgb: (B, 3, H, W) on the 0..255 scale (no gradient flows to it).
    out_i = sum_j W_ij x_j with, for j = i + (dy, dx), dy and dx multiples of ``dilation`` in
    [-radius*dilation, radius*dilation] and j inside the image (i = j included):
        W_ij = dilation^2 * exp(-(dy^2 + dx^2) / (2 sigma_xy^2) - |I_i - I_j|^2 / (2 sigma_rgb^2)).
    The dilation^2 factor makes every sample stand for its dilation x dilation cell, so the sum is a
    quadrature of the dense (all-pairs) sum the permutohedral lattice approximates. W is symmetric;
    differentiable in x (memory: O(B K H W), the window is never materialised).
    """
    offsets = window_offsets(radius, dilation, x.shape[-2], x.shape[-1])
    return _WindowFilter.apply(
        x, rgb.to(x.dtype), offsets, float(sigma_rgb), float(sigma_xy), float(dilation**2)
    )


def _energy_inputs(
    probs: Tensor, image01: Tensor, roi: Tensor, label: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The energy loss's inputs at its working resolution and dtype (float32, or float64 for float64
    probabilities), resized by ``scale`` as the official code does.

    probs (B, C, H, W) bilinearly (align_corners False); image01 (B, 3, H, W) as 0..255 RGB, roi (B, H, W)
    and label (B, H, W) as float (B, 1, H, W) by nearest. Returns (probs, rgb, roi, label), each
    (B, ., h, w) with h, w the scaled size; label None when not given.
    """
    if probs.dtype != torch.float64:
        probs = probs.float()
    rgb = image01.to(probs.dtype) * 255.0
    roi_f = roi.to(probs.dtype).unsqueeze(1)
    lab = None if label is None else label.to(probs.dtype).unsqueeze(1)
    if scale != 1.0:
        probs = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)
        rgb = F.interpolate(rgb, scale_factor=scale)
        roi_f = F.interpolate(roi_f, scale_factor=scale)
        if lab is not None:
            lab = F.interpolate(lab, scale_factor=scale)
    return probs, rgb, roi_f, lab


def _energy_gate(probs: Tensor, roi: Tensor, label: Tensor | None, ignore_index: int) -> Tensor:
    """The energy loss's pixel gate (B, 1, H, W): clamp(roi - max_k S_k, min=0), 1 on pixels labelled
    ``ignore_index`` (the loss counts in full where the pseudo label gives no supervision).

    probs: (B, C, H, W); roi and label: float (B, 1, H, W), as :func:`_energy_inputs` returns them."""
    gate = roi - probs.amax(dim=1, keepdim=True)
    if label is not None:
        gate = torch.where(label == ignore_index, torch.ones_like(gate), gate)
    return gate.clamp_min(0.0)


def energy_loss(
    probs: Tensor,
    image01: Tensor,
    roi: Tensor,
    label: Tensor | None = None,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale: float = 0.5,
    weight: float = 1e-7,
    radius: int = 5,
    dilation: int | None = None,
    gradient: Literal["official", "exact"] = "official",
    ignore_index: int = 255,
) -> Tensor:
    """Regularised (dense CRF energy) loss of AFA (``DenseEnergyLoss`` of meng-tang/rloss), batched.

    probs: (B, C, H, W) softmax probabilities S; image01: (B, 3, H, W) RGB in [0, 1]; roi: (B, H, W) bool
    (the real image inside the crop, ``img_box``); label: (B, H, W) pseudo label or None.

    As in the official code, everything is first resized by ``scale``: probabilities bilinearly
    (align_corners False), image (x255), roi and label by nearest; ``sigma_xy`` is multiplied by ``scale``.
    Then, with S masked by the roi,
        gate = clamp(roi - max_k S_k, min=0), set to 1 on pixels labelled ``ignore_index``,
        loss = -(weight / B) * sum_{k, pixels} S_k * (W S_k) * gate.
    ``weight`` 1e-7 is the official layer weight; the training loop multiplies by its own lambda (0.01).

    Approximation: W is **not** the dense all-pairs Gaussian of the official permutohedral-lattice
    extension but that kernel truncated to a dilated square window (:func:`window_bilateral_filter`):
    (2 radius + 1)^2 neighbours spaced ``dilation`` pixels apart, each weighted by dilation^2. With
    ``dilation=None`` the spacing is ceil(2 sigma_xy' / radius) (sigma_xy' = sigma_xy * scale), so the
    window reaches +-2 sigma_xy' with a bounded number of neighbours (121 by default). Values are of the
    same order as the official loss but not equal to it.

    gradient: ``"official"`` reproduces the rloss backward, dL/dS = -(weight / B) * 2 * gate * (W S) * roi
    (gate treated as a constant); ``"exact"`` differentiates the value above with autograd (gate included).
    Returns a scalar (float32, or float64 for float64 inputs).
    """
    batch = probs.shape[0]
    probs, rgb, roi_f, lab = _energy_inputs(probs, image01, roi, label, scale)
    sigma = sigma_xy * scale
    if dilation is None:
        dilation = max(1, math.ceil(2.0 * sigma / max(radius, 1)))

    gate = _energy_gate(probs, roi_f, lab, ignore_index)
    seg = probs * roi_f
    scale_loss = -weight / batch
    if gradient == "official":
        gate = gate.detach()
        with torch.no_grad():
            filtered = window_bilateral_filter(seg, rgb, sigma_rgb, sigma, radius, dilation)
        # Value sum(S * WS * G); gradient 2 * G * WS (the rloss convention).
        seg_d = seg.detach()
        return scale_loss * (gate * filtered * (2.0 * seg - seg_d)).sum()
    if gradient == "exact":
        filtered = window_bilateral_filter(seg, rgb, sigma_rgb, sigma, radius, dilation)
        return scale_loss * (gate * filtered * seg).sum()
    raise ValueError(f"gradient must be 'official' or 'exact', got {gradient!r}")
