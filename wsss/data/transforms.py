"""Data augmentation: pure functions on uint8 RGB images ``(H, W, 3)`` and int64 masks ``(H, W)``.

These run in DataLoader workers before tensor conversion, so numpy/PIL are used here (never in
training code). Randomness comes only from an explicit ``numpy.random.Generator`` argument: the
same generator state reproduces the same augmentation (no global RNG; fixes docs/methods/afa.md 14 item 14).

Recipes (:class:`TrainTransform`):

* AFA (default): rescale x U[0.5, 2.0] (PIL bilinear, mask nearest) -> hflip 0.5 -> pad to >= S
  with black at a random offset + random S x S crop (``img_box`` marks the real image, mask 255
  outside) -> ImageNet normalisation. No colour jitter.
* AReAM Conformer: the same with bicubic rescaling and ``color_jitter=True``
  (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, applied with p = 0.8, random order).
* AReAM MCTformer: ``resized_crop=True``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic)
  -> hflip -> RandAugment ``rand-m9-mstd0.5-inc1`` -> normalisation -> random erasing (p = 0.25)
  (:mod:`wsss.data.randaugment`; the timm recipe, which ignores colour jitter when RandAugment is on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .io import IGNORE_INDEX
from .randaugment import RandAugment, random_erasing

# The official AFA augmentation (the config's ``data`` section defaults to these)
CROP_SIZE = 512  # the side S of the square training crop
SCALE_RANGE = (0.5, 2.0)  # [low, high] of the random rescale ratio
INTERPOLATION = "bilinear"  # the image's resampling filter when rescaling (the mask's is nearest)
FLIP = True  # a horizontal flip with probability 0.5
COLOR_JITTER = False
RESIZED_CROP = False  # a RandomResizedCrop instead of rescale + pad + crop
RANDOM_ERASING = 0.0  # the probability of erasing one box

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _resize(image: np.ndarray, mask: np.ndarray | None, hw: tuple[int, int], interpolation: str):
    size = (hw[1], hw[0])  # PIL takes (W, H)
    out = np.asarray(Image.fromarray(image).resize(size, resample=_RESAMPLE[interpolation]))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
        mask = mask.astype(np.int64)
    return out, mask


def random_rescale(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    scale_range: Sequence[float] = SCALE_RANGE,
    interpolation: str = INTERPOLATION,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rescale by a ratio ~ U[lo, hi] to ``int(ratio*H) x int(ratio*W)`` (at least 1 pixel)."""
    ratio = rng.uniform(scale_range[0], scale_range[1])
    h, w = image.shape[:2]
    return _resize(image, mask, (max(1, int(ratio * h)), max(1, int(ratio * w))), interpolation)


def random_hflip(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror left-right with probability ``p``."""
    if rng.random() < p:
        image = np.ascontiguousarray(image[:, ::-1])
        mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
    return image, mask


def _gray(img: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma (PIL's "L" conversion), float ``(H, W)``."""
    return img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114


def _blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(np.rint(degenerate + factor * (img - degenerate)), 0, 255)


def _shift_hue(img: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the HSV hue by ``shift`` turns (in [-0.5, 0.5])."""
    rgb = img / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, h)
    h = np.where(delta > 0, h / 6.0, 0.0)
    h = (h + shift) % 1.0
    s = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    v = mx
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = np.choose(i[..., None], choices)
    return np.clip(np.rint(out * 255.0), 0, 255)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    p: float = 0.8,
) -> np.ndarray:
    """torchvision-style ColorJitter applied with probability ``p``: the four operations in a random
    order, factors ~ U[1-x, 1+x] (hue shift ~ U[-hue, hue]). uint8 ``(H, W, 3)`` in and out."""
    if rng.random() >= p:
        return image
    order = rng.permutation(4)
    fb = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
    fc = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    fs = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
    fh = rng.uniform(-hue, hue)
    img = image.astype(np.float64)
    for op in order:
        if op == 0:
            img = _blend(np.zeros_like(img), img, fb)
        elif op == 1:
            img = _blend(np.full_like(img, np.rint(_gray(img).mean())), img, fc)
        elif op == 2:
            img = _blend(np.rint(_gray(img))[..., None], img, fs)
        else:
            img = _shift_hue(img, fh)
    return img.astype(np.uint8)


def pad_and_crop(
    image: np.ndarray,
    mask: np.ndarray | None,
    crop_size: int,
    pad_offset: tuple[int, int],
    crop_offset: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Place the image on a black canvas of ``max(S, h) x max(S, w)`` at ``pad_offset`` and cut the
    S x S window at ``crop_offset``. Returns the crop, the mask crop (255 on padding) and the
    real-image rectangle ``img_box`` = [row0, row1, col0, col1] (end-exclusive) inside the crop."""
    h, w = image.shape[:2]
    H, W = max(crop_size, h), max(crop_size, w)
    ph, pw = pad_offset
    ch, cw = crop_offset
    canvas = np.zeros((H, W, 3), dtype=np.uint8)  # raw black, as the official code
    canvas[ph : ph + h, pw : pw + w] = image
    out = canvas[ch : ch + crop_size, cw : cw + crop_size]
    if mask is not None:
        mcanvas = np.full((H, W), IGNORE_INDEX, dtype=np.int64)
        mcanvas[ph : ph + h, pw : pw + w] = mask
        mask = mcanvas[ch : ch + crop_size, cw : cw + crop_size]
    box = np.array(
        [max(ph - ch, 0), min(crop_size, ph + h - ch), max(pw - cw, 0), min(crop_size, pw + w - cw)],
        dtype=np.int64,
    )
    return out, mask, box


def random_crop(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    crop_size: int,
    cat_max_ratio: float | None = None,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pad to at least S x S at a random offset, then crop a random S x S window (docs/methods/afa.md 9
    step 4).

    ``cat_max_ratio`` (off by default, as in AFA training): re-draw the window up to ``max_tries``
    times until it holds more than one labelled class and no class covers more than this fraction
    of the labelled pixels (the official ``len(cnt>1)`` test is fixed to ``len(cnt) > 1``).
    """
    h, w = image.shape[:2]
    H, W = max(crop_size, h), max(crop_size, w)
    pad = (int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1)))
    crop = (int(rng.integers(H - crop_size + 1)), int(rng.integers(W - crop_size + 1)))
    if cat_max_ratio is not None and mask is not None:
        for _ in range(max_tries):
            m = _crop_mask_only(mask, crop_size, pad, crop, (H, W))
            _, cnt = np.unique(m[m != IGNORE_INDEX], return_counts=True)
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            crop = (int(rng.integers(H - crop_size + 1)), int(rng.integers(W - crop_size + 1)))
    return pad_and_crop(image, mask, crop_size, pad, crop)


def _crop_mask_only(
    mask: np.ndarray, crop_size: int, pad: tuple[int, int], crop: tuple[int, int], HW: tuple[int, int]
) -> np.ndarray:
    canvas = np.full(HW, IGNORE_INDEX, dtype=np.int64)
    canvas[pad[0] : pad[0] + mask.shape[0], pad[1] : pad[1] + mask.shape[1]] = mask
    return canvas[crop[0] : crop[0] + crop_size, crop[1] : crop[1] + crop_size]


def random_resized_crop(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """torchvision/timm RandomResizedCrop: a window of area ~ U[scale]*H*W and log-uniform aspect
    ratio (10 tries, else a centre crop with the ratio clamped), resized to ``size x size``."""
    h, w = image.shape[:2]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            box = (int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw)
            break
    if box is None:  # fallback: whole image, aspect clamped to the ratio range
        in_ratio = w / h
        if in_ratio < min(ratio):
            cw, ch = w, int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            ch, cw = h, int(round(h * max(ratio)))
        else:
            cw, ch = w, h
        box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
    i, j, ch, cw = box
    image = image[i : i + ch, j : j + cw]
    mask = None if mask is None else mask[i : i + ch, j : j + cw]
    image, mask = _resize(np.ascontiguousarray(image), mask, (size, size), interpolation)
    return image, mask, np.array([0, size, 0, size], dtype=np.int64)


def to_image01(image: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` -> float32 ``(3, H, W)`` in [0, 1] (x / 255: the network normalises it with
    its backbone's statistics, :meth:`wsss.backbones.base.Backbone.normalize`)."""
    return np.ascontiguousarray((image.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1))


def image01_to_uint8(image01: Tensor) -> Tensor:
    """[0, 1] images ``(..., 3, H, W)`` -> uint8 ``(..., H, W, 3)`` (rounded, clamped) for display / CRF."""
    return (image01 * 255).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1)


class TrainTransform:
    """Training augmentation ``(image uint8 (H,W,3), mask int64 (H,W) | None, rng)`` ->
    ``(image float32 (3,S,S), mask int64 (S,S), img_box int64 (4,))``.

    ``interpolation`` applies to the random rescale (AFA "bilinear", Conformer "bicubic");
    ``resized_crop=True`` replaces rescale + pad/crop by RandomResizedCrop (MCTformer recipe).
    ``crop_size=None`` keeps the (rescaled) full image. ``rand_augment`` runs after the flip (and
    before the crop of the rescale path, so padding is never augmented); ``random_erasing`` is the
    probability of erasing one box of the normalised image (both: the timm / MCTformer recipe)."""

    def __init__(
        self,
        crop_size: int | None,
        scale_range: Sequence[float] | None = SCALE_RANGE,
        flip: bool = FLIP,
        color_jitter: bool = COLOR_JITTER,
        interpolation: str = INTERPOLATION,
        resized_crop: bool = RESIZED_CROP,
        cat_max_ratio: float | None = None,
        rand_augment: RandAugment | None = None,
        random_erasing: float = RANDOM_ERASING,
    ) -> None:
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        if resized_crop and crop_size is None:
            raise ValueError("resized_crop needs a crop_size")
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range) if scale_range is not None else None
        self.flip = flip
        self.color_jitter = color_jitter
        self.interpolation = interpolation
        self.resized_crop = resized_crop
        self.cat_max_ratio = cat_max_ratio
        self.rand_augment = rand_augment
        if not 0.0 <= float(random_erasing) <= 1.0:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
        self.random_erasing = float(random_erasing)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if mask is None:
            mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.int64)
        if self.resized_crop:
            image, mask, box = random_resized_crop(image, mask, rng, self.crop_size)
            image, mask = self._augment(*self._flip(image, mask, rng), rng)
            return self._erase(to_image01(image), rng), mask, box
        if self.scale_range is not None:
            image, mask = random_rescale(image, mask, rng, self.scale_range, self.interpolation)
        image, mask = self._augment(*self._flip(image, mask, rng), rng)
        if self.crop_size is not None:
            image, mask, box = random_crop(image, mask, rng, self.crop_size, self.cat_max_ratio)
        else:
            box = np.array([0, image.shape[0], 0, image.shape[1]], dtype=np.int64)
        return self._erase(to_image01(image), rng), mask, box

    def _flip(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return random_hflip(image, mask, rng) if self.flip else (image, mask)

    def _augment(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.color_jitter:
            image = color_jitter(image, rng)
        if self.rand_augment is not None:  # its geometric ops move the mask with the image
            image, mask = self.rand_augment(image, mask, rng)  # type: ignore[assignment]
        return image, mask

    def _erase(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return random_erasing(image, rng, self.random_erasing) if self.random_erasing > 0 else image

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, flip={self.flip}, "
            f"color_jitter={self.color_jitter}, interpolation={self.interpolation!r}, "
            f"resized_crop={self.resized_crop}, rand_augment={self.rand_augment!r}, "
            f"random_erasing={self.random_erasing})"
        )


class EvalTransform:
    """Evaluation: the full image, no resize; mask kept; ``img_box`` covers the whole image."""

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if mask is None:
            mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.int64)
        return to_image01(image), mask, np.array([0, image.shape[0], 0, image.shape[1]], dtype=np.int64)

    def __repr__(self) -> str:
        return "EvalTransform()"
