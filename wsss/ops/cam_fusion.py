"""CAM normalisation and multi-scale + flip fusion.

Both methods build their pseudo-label CAM the same way: run the network on every scale of the batch
concatenated with its horizontal flip, bring each raw CAM to the input size, fuse, and min-max
normalise per image and class. They differ only in how the maps are fused:

- AFA (``docs/methods/afa.md`` 3): element-wise **max** of a map and its un-flipped twin, ReLU on that,
  **sum** over scales, normalise with eps 1e-5 (:data:`AFA_FUSE`).
- AReAM (``docs/methods/aream.md`` 5.1): every map (flipped ones too) is simply **summed**, ReLU
  **after** the sum, normalise with eps 1e-6 (:data:`AREAM_FUSE`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.refine.labels import (  # shared with the pseudo labels (refine is the lower layer)
    gather_channels,
    kept_channels,
)
from wsss.refine.resize import resize_bilinear

FlipFuse = Literal["max", "sum"]
ReluMode = Literal["each", "after", "none"]

#: Keyword arguments of :func:`fuse_multiscale` / :func:`multiscale_cam` reproducing the official AFA CAM.
AFA_FUSE: dict[str, Any] = {"flip_fuse": "max", "relu": "each", "eps": 1e-5}
#: Keyword arguments reproducing the official AReAM ``gen_msf_cam`` merge.
AREAM_FUSE: dict[str, Any] = {"flip_fuse": "sum", "relu": "after", "eps": 1e-6}
#: The fusion rules by name (the config's ``cam.fuse``).
FUSE_PRESETS: dict[str, dict[str, Any]] = {"afa": AFA_FUSE, "aream": AREAM_FUSE}
DEFAULT_FUSE = "afa"
# The official AFA recipe's CAM passes (the config's ``cam.scales``, ``cam.flip``)
CAM_SCALES = (1.0, 0.5, 1.5)  # the input scales
CAM_FLIP = True  # each scale runs with its horizontal flip too


def normalize_cam(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """Per image and class min-max normalisation over space.

    cam: (B, K, H, W). Returns (cam - min) / (max(cam - min) + eps), shape (B, K, H, W), in [0, 1).
    AFA uses eps 1e-5, AReAM 1e-6.
    """
    # one pass for both extremes: max(cam - min) is exactly the rounded max - min (rounding is monotonic)
    low, high = cam.flatten(-2).aminmax(dim=-1)
    return (cam - low[..., None, None]).div_((high - low)[..., None, None] + eps)


def fuse_multiscale(
    cams: Sequence[Tensor],
    size: tuple[int, int],
    batch: int,
    flip_fuse: FlipFuse = "max",
    relu: ReluMode = "each",
    eps: float = 1e-5,
    keep: Tensor | None = None,
) -> Tensor:
    """Fuse raw per-scale CAMs into one normalised CAM.

    cams: one raw CAM per scale, each (2B, K, h_s, w_s) computed on ``[x_s, hflip(x_s)]`` (or (B, K, h_s,
        w_s) when no flipped copy was run).
    size: (H, W) output size; batch: B.
    flip_fuse: ``"max"`` (AFA) takes the element-wise max of a map and its un-flipped twin; ``"sum"``
        (AReAM) adds them (the flipped map is just one more map in the sum).
    relu: ``"each"`` (AFA) applies ReLU to every scale's flip-fused map before the sum over scales;
        ``"after"`` (AReAM) applies it once to the sum; ``"none"`` never.
    keep: (B, K) multi-hot (e.g. the image labels) or None: only these classes are fused, the others
        come out as zeros. Every class is fused and normalised on its own, so a caller that masks the
        CAM by the labels anyway gets the same result for the work of the present classes only.
    Returns the normalised CAM (B, K, H, W).
    """
    if flip_fuse not in ("max", "sum"):
        raise ValueError(f"flip_fuse must be 'max' or 'sum', got {flip_fuse!r}")
    if relu not in ("each", "after", "none"):
        raise ValueError(f"relu must be 'each', 'after' or 'none', got {relu!r}")
    if len(cams) == 0:
        raise ValueError("fuse_multiscale needs at least one CAM")
    if keep is not None:
        return _fuse_kept(cams, size, batch, keep, flip_fuse=flip_fuse, relu=relu, eps=eps)
    total: Tensor | None = None
    for cam in cams:
        if cam.shape[0] not in (batch, 2 * batch):
            raise ValueError(f"CAM batch {cam.shape[0]} is neither B={batch} nor 2B")
        # float32 at least: bf16 CAMs (autocast) are fused and normalised in float32 (also faster on CPU)
        cam = cam.to(_fused_dtype(cam.dtype))
        cam = resize_bilinear(cam, size)  # a new tensor (two matrix products or the kernel)
        if cam.shape[0] == 2 * batch:
            orig, unflipped = cam[:batch], cam[batch:].flip(-1)
            cam = torch.maximum(orig, unflipped) if flip_fuse == "max" else orig + unflipped
        if relu == "each":
            cam = cam.clamp_min_(0)  # in place: cam is a new tensor here (resize_bilinear always allocates)
        total = cam if total is None else total.add_(cam)
    assert total is not None
    if relu == "after":
        total = F.relu(total)
    return normalize_cam(total, eps)


def _fused_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`fuse_multiscale` returns for CAMs of ``dtype`` (half precision fuses in float32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _take_kept(cam: Tensor, idx: Tensor) -> Tensor:
    """The channels ``idx`` (B, M) of each row of ``cam`` (n, K, h, w), n a multiple of B (a flipped
    half has the same rows): (n, M, h, w)."""
    return gather_channels(cam, idx.repeat(cam.shape[0] // idx.shape[0], 1))


def _put_kept(maps: Tensor, idx: Tensor, valid: Tensor, k: int) -> Tensor:
    """Compact maps (B, M, H, W) scattered to their channels ``idx`` (B, M) of zeros (B, K, H, W); the
    padding channels (``valid`` False) stay 0."""
    out = maps.new_zeros(maps.shape[0], k, *maps.shape[-2:])
    return out.scatter_(1, idx[:, :, None, None].expand_as(maps), maps * valid[:, :, None, None])


def _fuse_kept(cams: Sequence[Tensor], size: tuple[int, int], batch: int, keep: Tensor,
               **fuse: Any) -> Tensor:
    """:func:`fuse_multiscale` of the ``keep`` channels only, scattered into zeros (B, K, H, W)."""
    if keep.shape != (batch, cams[0].shape[1]):
        raise ValueError(f"keep must be (B, K) = {(batch, cams[0].shape[1])}, got {tuple(keep.shape)}")
    idx, valid = kept_channels(keep.bool())
    if idx.shape[1] == 0:  # no image of the batch keeps a class (negatives): every map is zero
        return cams[0].new_zeros(batch, cams[0].shape[1], *size, dtype=_fused_dtype(cams[0].dtype))
    fused = fuse_multiscale([_take_kept(c, idx) for c in cams], size, batch, **fuse)
    return _put_kept(fused, idx, valid, cams[0].shape[1])


def resize_kept(cam: Tensor, size: tuple[int, int], keep: Tensor) -> Tensor:
    """``F.interpolate(cam, size, mode="bilinear", align_corners=False)`` of the ``keep`` (B, K)
    channels of ``cam`` (B, K, h, w); the others come out 0. Bilinear resizing is per channel, so a
    caller that ignores the other channels (a CAM masked by the labels) gets its maps for the work
    of the kept ones only: from a crop to a token grid, the full stack costs a layout copy of the
    whole crop-size CAM (AFA's propagation at batch 8, 224 px: 18.6 ms for 16 channels, 1.3 ms for
    3, on one core)."""
    if keep.shape != cam.shape[:2]:
        raise ValueError(f"keep must be (B, K) = {tuple(cam.shape[:2])}, got {tuple(keep.shape)}")
    idx, valid = kept_channels(keep.bool())
    if idx.shape[1] == 0:
        return cam.new_zeros(*cam.shape[:2], *size)
    small = F.interpolate(_take_kept(cam, idx), size=size, mode="bilinear", align_corners=False)
    return _put_kept(small, idx, valid, cam.shape[1])


def multiscale_cam(
    cam_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    scales: Sequence[float] = CAM_SCALES,
    flip: bool = CAM_FLIP,
    **fuse: Any,
) -> Tensor:
    """Multi-scale (+ flip) CAM.

    cam_fn: (n, 3, h, w) -> (n, K, h', w') raw CAM (for AReAM: already refined by the affinity).
    x: (B, 3, H, W) normalised images. Each scale s resizes x to (int(s*H), int(s*W)) bilinearly
    (align_corners False; no resize when that is (H, W)) and runs ``cam_fn`` once on
    ``cat([x_s, x_s.flip(-1)])`` (or on x_s alone when ``flip`` is False).
    fuse: keyword arguments of :func:`fuse_multiscale` (e.g. ``**AFA_FUSE`` or ``**AREAM_FUSE``, and
        ``keep``).
    Returns the normalised CAM (B, K, H, W). The caller chooses ``no_grad`` and the model mode.
    """
    batch, _, height, width = x.shape
    cams = [cam_fn(scaled_input(x, s, flip)) for s in scales]
    return fuse_multiscale(cams, (height, width), batch, **fuse)


def fuse_multiscale_seg(segs: Sequence[Tensor], size: tuple[int, int], batch: int) -> Tensor:
    """Multi-scale (+ flip) segmentation logits (AFA ``test_msc_flip``).

    segs: one (2B, C, h_s, w_s) logit map per scale computed on ``[x_s, hflip(x_s)]``, or (B, C, h_s,
        w_s) without the flipped copy. Per scale the mean of a map and its un-flipped twin, upsampled to
        ``size`` bilinearly (align_corners False); then the element-wise max over scales.
    Returns (B, C, H, W).
    """
    best: Tensor | None = None
    for seg in segs:
        if seg.shape[0] not in (batch, 2 * batch):
            raise ValueError(f"seg batch {seg.shape[0]} is neither B={batch} nor 2B")
        if seg.shape[0] == 2 * batch:
            seg = (seg[:batch] + seg[batch:].flip(-1)) / 2
        seg = resize_bilinear(seg, size)
        best = seg if best is None else torch.maximum(best, seg)
    if best is None:
        raise ValueError("fuse_multiscale_seg needs at least one map")
    return best


def scaled_input(x: Tensor, s: float, flip: bool) -> Tensor:
    """x (B, 3, H, W) resized to (int(s*H), int(s*W)) bilinearly (align_corners False; untouched when
    that is (H, W)), then ``cat([x_s, x_s.flip(-1)])`` (2B rows) with ``flip``."""
    height, width = x.shape[-2:]
    size = (int(s * height), int(s * width))
    xs = x if size == (height, width) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return torch.cat([xs, xs.flip(-1)], dim=0) if flip else xs
