"""RandAugment and random erasing of the timm ImageNet recipe that MCTformer (and so AReAM's
MCTformer setting) trains with (``docs/methods/aream.md`` 8): ``rand-m9-mstd0.5-inc1`` and RandomErasing
(p = 0.25, pixel mode, one box), written natively on PIL / numpy with an explicit generator.

RandAugment (timm ``RandAugment`` with the "increasing" op set): ``n`` ops drawn uniformly with
replacement from :data:`OPS`; each is applied with probability 0.5 at a magnitude drawn from
N(m, mstd) and clipped to [0, 10]. Geometric ops move the mask too (nearest, ignore fill), so a
mask stays aligned with its image; photometric ops leave it as is.

Level -> argument (timm ``_*_level_to_arg``, level in [0, 10]):

======================  =====================================================================
Rotate                  +-30 * level / 10 degrees
ShearX / ShearY         +-0.3 * level / 10
TranslateXRel / YRel    +-0.45 * level / 10 of the width / height
PosterizeIncreasing     keep 4 - int(4 * level / 10) bits
SolarizeIncreasing      threshold 256 - int(256 * level / 10)
SolarizeAdd             add int(110 * level / 10) below 128
*Increasing enhance     factor 1 +- 0.9 * level / 10 (Color, Contrast, Brightness, Sharpness)
AutoContrast, Equalize, Invert: no argument
======================  =====================================================================

Affine ops resample bicubic (the recipe's interpolation) and fill with the ImageNet mean colour
(124, 116, 104). Random erasing runs on the normalised image and fills the box with N(0, 1) noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from wsss.backbones.base import IMAGENET_MEAN, IMAGENET_STD

from .io import IGNORE_INDEX

FILL = (124, 116, 104)  # timm img_mean: round(255 * ImageNet mean)
MAX_LEVEL = 10.0
OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_ENHANCE = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
}


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() < 0.5 else v


def level_to_arg(
    op: str, level: float, rng: np.random.Generator, size: tuple[int, int]
) -> float | int | None:
    """timm's argument of ``op`` at ``level`` in [0, 10] (table in the module docstring).

    size: image (width, height), for the relative translations. Signs are drawn from ``rng``."""
    f = level / MAX_LEVEL
    if op == "Rotate":
        return _signed(30.0 * f, rng)
    if op in ("ShearX", "ShearY"):
        return _signed(0.3 * f, rng)
    if op == "TranslateXRel":
        return _signed(0.45 * f, rng) * size[0]
    if op == "TranslateYRel":
        return _signed(0.45 * f, rng) * size[1]
    if op == "PosterizeIncreasing":
        return 4 - int(f * 4)
    if op == "SolarizeIncreasing":
        return 256 - int(f * 256)
    if op == "SolarizeAdd":
        return int(f * 110)
    if op.endswith("Increasing"):
        return 1.0 + _signed(0.9 * f, rng)
    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    raise ValueError(f"unknown RandAugment op {op!r}; known: {', '.join(OPS)}")


def _affine(op: str, arg: float) -> tuple[float, ...]:
    """PIL inverse affine coefficients (a, b, c, d, e, f) of a shear / translation."""
    if op == "ShearX":
        return (1, arg, 0, 0, 1, 0)
    if op == "ShearY":
        return (1, 0, 0, arg, 1, 0)
    if op == "TranslateXRel":
        return (1, 0, arg, 0, 1, 0)
    return (1, 0, 0, 0, 1, arg)


def _geometric(
    img: Image.Image, op: str, arg: float, resample: int, fill: int | tuple[int, ...]
) -> Image.Image:
    if op == "Rotate":
        return img.rotate(arg, resample=resample, fillcolor=fill)
    return img.transform(img.size, Image.AFFINE, _affine(op, arg), resample=resample, fillcolor=fill)


def apply_op(
    image: np.ndarray, mask: np.ndarray | None, op: str, arg: float | int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One op on uint8 ``(H, W, 3)`` (and, for geometric ops, the int64 mask ``(H, W)``)."""
    img = Image.fromarray(image)
    if op in _GEOMETRIC:
        img = _geometric(img, op, float(arg), Image.BICUBIC, FILL)  # type: ignore[arg-type]
        if mask is not None:
            m = Image.fromarray(mask.astype(np.int32))
            mask = np.asarray(_geometric(m, op, float(arg), Image.NEAREST, IGNORE_INDEX), dtype=np.int64)  # type: ignore[arg-type]
        return np.asarray(img, dtype=np.uint8), mask
    if op == "AutoContrast":
        img = ImageOps.autocontrast(img)
    elif op == "Equalize":
        img = ImageOps.equalize(img)
    elif op == "Invert":
        img = ImageOps.invert(img)
    elif op == "PosterizeIncreasing":
        img = img if int(arg) >= 8 else ImageOps.posterize(img, int(arg))  # type: ignore[arg-type]
    elif op == "SolarizeIncreasing":
        img = ImageOps.solarize(img, int(arg))  # type: ignore[arg-type]
    elif op == "SolarizeAdd":
        a = image.astype(np.int64)
        out = np.where(a < 128, np.minimum(a + int(arg), 255), a)  # type: ignore[arg-type]
        return out.astype(np.uint8), mask
    else:
        img = _ENHANCE[op.removesuffix("Increasing")](img).enhance(float(arg))  # type: ignore[arg-type]
    return np.asarray(img, dtype=np.uint8), mask


class RandAugment:
    """timm RandAugment: ``n`` ops, magnitude ``m`` (std ``mstd``), each applied with ``prob``.

    ``RandAugment.from_spec("rand-m9-mstd0.5-inc1")`` parses timm's config string (``inc1`` is the
    only op set implemented: the increasing one MCTformer uses)."""

    def __init__(self, n: int = 2, m: float = 9.0, mstd: float = 0.5, prob: float = 0.5,
                 ops: tuple[str, ...] = OPS) -> None:  # fmt: skip
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {', '.join(OPS)}")
        self.n, self.m, self.mstd = int(n), float(m), float(mstd)
        self.prob, self.ops = float(prob), tuple(ops)

    @classmethod
    def from_spec(cls, spec: str) -> RandAugment:
        """timm string ``rand-m9-mstd0.5-inc1`` (keys m, n, mstd, inc; inc must be 1)."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand-', got {spec!r}")
        kw: dict[str, float] = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|m|n|inc)([0-9.]+)", part)
            if match is None:
                raise ValueError(f"cannot parse {part!r} in RandAugment spec {spec!r} (keys m, n, mstd, inc)")
            kw[match.group(1)] = float(match.group(2))
        if kw.pop("inc", 0) != 1:
            raise ValueError(f"only the increasing op set is implemented: add '-inc1' to {spec!r}")
        return cls(n=int(kw.get("n", 2)), m=kw.get("m", 9.0), mstd=kw.get("mstd", 0.5))

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        for i in rng.integers(len(self.ops), size=self.n):  # with replacement, as timm
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level = rng.normal(self.m, self.mstd) if self.mstd > 0 else self.m
            level = min(max(level, 0.0), MAX_LEVEL)
            op = self.ops[int(i)]
            arg = level_to_arg(op, level, rng, (image.shape[1], image.shape[0]))
            image, mask = apply_op(image, mask, op, arg)
        return image, mask

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, m={self.m}, mstd={self.mstd}, prob={self.prob})"


def erase_box(
    rng: np.random.Generator, height: int, width: int, min_area: float = 0.02, max_area: float = 1 / 3,
    min_aspect: float = 0.3, attempts: int = 10,
) -> tuple[int, int, int, int] | None:  # fmt: skip
    """timm RandomErasing's box ``(top, left, h, w)``: area ~ U[min, max] x H W, log-uniform aspect
    in [min_aspect, 1 / min_aspect], up to ``attempts`` tries to fit inside; None if none fits."""
    area = height * width
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(attempts):
        target = rng.uniform(min_area, max_area) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < w < width and 0 < h < height:  # timm also "erases" empty boxes on tiny images
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def random_erasing(image: np.ndarray, rng: np.random.Generator, p: float = 0.25,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """With probability ``p``, fill one :func:`erase_box` of the [0, 1] float ``(3, H, W)`` image with
    per-pixel noise that is N(0, 1) once normalised with ``mean`` / ``std`` (timm's "pixel" mode on a
    normalised image; the values may leave [0, 1]). Returns a new array when it erases."""
    if p <= 0 or rng.random() > p:
        return image
    box = erase_box(rng, image.shape[1], image.shape[2])
    if box is None:
        return image
    top, left, h, w = box
    out = image.copy()
    noise = rng.standard_normal((image.shape[0], h, w))
    m, sd = np.asarray(mean)[:, None, None], np.asarray(std)[:, None, None]
    out[:, top : top + h, left : left + w] = (noise * sd + m).astype(image.dtype)
    return out


def build_rand_augment(spec: str | None) -> RandAugment | None:
    """None / "" / "none" -> None, else :meth:`RandAugment.from_spec`."""
    if spec in (None, "", "none"):
        return None
    return RandAugment.from_spec(str(spec))
