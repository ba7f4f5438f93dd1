"""Robust image and label-mask IO.

Every reader raises :class:`DataError` (a ``ValueError``) that names the offending file, so a
broken file in a 10k-image dataset is found at once instead of surfacing as a shape error deep in
a worker process.

* :func:`load_image` -> uint8 RGB ``(H, W, 3)``: EXIF orientation applied; grayscale, palette,
  RGBA/LA (composited on black), CMYK and 16/32-bit images converted.
* :func:`load_mask` -> int64 ``(H, W)`` of class ids (0 bg, 1..K, 255 ignore): palette and L
  PNGs are read as indices; RGB-colour VOC masks are mapped back through the VOC palette.
* :func:`save_mask` writes a VOC-palette PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IGNORE_INDEX = 255


class DataError(ValueError):
    """A dataset file that is missing, unreadable or inconsistent."""


def dataset_root(root: str | os.PathLike) -> Path:
    """``root`` as a Path; a ``DataError`` naming it when it is not a folder."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"dataset root not found: {path}")
    return path


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: uint8 ``(n, 3)``; index i's colour from the bit pattern of i."""
    idx = np.arange(n)
    pal = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):  # bit b of channel c comes from bit 3*shift + c of the index
        for c in range(3):
            pal[:, c] |= ((idx >> (3 * shift + c)) & 1) << (7 - shift)
    return pal.astype(np.uint8)


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"empty file: {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now: truncated / corrupt data fails here, not later
    except Exception as err:
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return img


def _to_uint8_gray(arr: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float grayscale -> uint8, rescaling by the bit depth in use."""
    if arr.dtype.kind == "f":
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    # 16-bit images stored in 32-bit "I" mode keep the 0..65535 range
    top = 255 if arr.max(initial=0) <= 255 else 65535
    return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 RGB ``(H, W, 3)`` in display orientation (EXIF applied)."""
    path = Path(path)
    img = _open(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # malformed EXIF block
        raise DataError(f"bad EXIF data in {path}: {err}") from err
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _to_uint8_gray(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        arr = np.asarray(img).astype(np.float32)
        rgb = arr[..., :3] * (arr[..., 3:] / 255.0)  # composite on black
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _rgb_to_index(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map a colour-coded mask back to indices through the VOC palette (grey-coded masks pass through)."""
    pal = voc_palette().astype(np.int64)
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lut = {int(c): i for i, c in enumerate(pal_code)}
    colours, inverse = np.unique(code, return_inverse=True)
    if all(int(c) in lut for c in colours):
        return np.asarray([lut[int(c)] for c in colours], dtype=np.int64)[inverse].reshape(code.shape)
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].astype(np.int64)  # an index mask saved as grey RGB (e.g. converted COCO masks)
    bad = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in map(int, colours) if c not in lut]
    raise DataError(f"mask {path} has colours outside the VOC palette: {bad[:8]}")


def load_mask(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Read a label mask as int64 ``(H, W)`` with values in ``{0..num_classes-1, 255}``."""
    path = Path(path)
    img = _open(path)
    if img.mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        mask = np.asarray(img).astype(np.int64)  # palette PNGs: the indices, not the colours
    elif img.mode in ("RGB", "RGBA"):
        mask = _rgb_to_index(np.asarray(img)[..., :3], path)
    elif img.mode == "LA":
        mask = np.asarray(img)[..., 0].astype(np.int64)
    else:
        raise DataError(f"mask {path} has unsupported mode {img.mode}")
    check_mask_values(mask, num_classes, path)
    return mask


def check_mask_values(mask: np.ndarray, num_classes: int, path: str | os.PathLike) -> None:
    """Raise :class:`DataError` naming ``path`` and the values outside ``{0..num_classes-1, 255}``."""
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"mask {path} has values {bad.tolist()[:16]} outside 0..{num_classes - 1} and {IGNORE_INDEX} "
            f"(num_classes={num_classes}): {num_classes_hint(int(bad.max()))}"
        )


def num_classes_hint(value: int) -> str:
    """The fix for a mask value at or above the class count (the configured count is too small)."""
    return (f"set data.num_classes to the dataset's class count, at least {value + 1} (background "
            f"included; PASCAL VOC: 21, COCO: 81), or give data.class_names")


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: object, mask_path: object) -> None:
    """Raise :class:`DataError` naming both files when the mask's size differs from the image's."""
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"mask {mask_path} has size {mask.shape[0]}x{mask.shape[1]} but image {image_path} has size "
            f"{image.shape[0]}x{image.shape[1]} (HxW)"
        )


def save_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an index mask (values 0..255) as a VOC-palette PNG."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"save_mask expects a 2-D mask with values in 0..255, got shape {mask.shape}")
    img = Image.fromarray(mask.astype(np.uint8))  # "L"; putpalette turns it into "P"
    img.putpalette(voc_palette().reshape(-1).tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
