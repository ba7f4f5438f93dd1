"""Visual helpers: label colouring, heat-map overlays, image grids, PNG bytes, legends.

Pure numpy + PIL (matplotlib is not needed). Images are uint8 RGB (H, W, 3); torch tensors are
accepted wherever an array is and converted on the CPU.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsss.data.io import voc_palette

# matplotlib's "jet" segment data (x, value) per channel; sampled into a 256-entry table as matplotlib does.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@lru_cache(maxsize=4)
def colormap_lut(name: str = "jet", n: int = 256) -> np.ndarray:
    """(n, 3) uint8 lookup table: ``"jet"`` (matplotlib's, bit-exact with ``bytes=True``) or ``"gray"``."""
    x = np.linspace(0.0, 1.0, n)
    if name == "jet":
        chans = [np.interp(x, [p[0] for p in seg], [p[1] for p in seg]) for seg in _JET.values()]
        lut = np.stack(chans, axis=-1)
    elif name == "gray":
        lut = np.repeat(x[:, None], 3, axis=1)
    else:
        raise ValueError(f"unknown colormap '{name}'; choose 'jet' or 'gray'")
    return (lut * 255).astype(np.uint8)  # truncation, as matplotlib's bytes output


def apply_colormap(heat: Any, cmap: str = "jet") -> np.ndarray:
    """(H, W) floats in [0, 1] -> (H, W, 3) uint8 (values outside [0, 1] are clipped; nan -> 0)."""
    lut = colormap_lut(cmap)
    h = np.nan_to_num(_np(heat).astype(np.float64), nan=0.0)
    idx = np.clip((h * lut.shape[0]).astype(np.int64), 0, lut.shape[0] - 1)
    return lut[idx]


def colorize(label: Any, palette: np.ndarray | None = None) -> np.ndarray:
    """(H, W) class ids (0..255; 255 = ignore keeps the VOC palette's colour) -> (H, W, 3) uint8."""
    pal = voc_palette() if palette is None else palette
    lab = _np(label).astype(np.int64)
    if lab.min(initial=0) < 0 or lab.max(initial=0) >= len(pal):
        raise ValueError(f"label values must lie in [0, {len(pal)})")
    return pal[lab]


def _blend(image: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    if image.shape != colour.shape:
        raise ValueError(f"image {image.shape} and overlay {colour.shape} differ in shape")
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_heatmap(image: Any, heat: Any, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """``round((1 - alpha) * image + alpha * cmap(heat))``; image uint8 (H, W, 3), heat (H, W) in [0, 1]."""
    return _blend(_np(image), apply_colormap(heat, cmap), alpha)


def overlay_label(image: Any, label: Any, alpha: float = 0.5, skip: Sequence[int] = (255,)) -> np.ndarray:
    """Blend the coloured label map over the image; pixels whose label is in ``skip`` stay unchanged."""
    img, lab = _np(image), _np(label)
    out = _blend(img, colorize(lab), alpha)
    keep = np.isin(lab, list(skip))
    out[keep] = img[keep]
    return out


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _as_rgb(im: np.ndarray) -> np.ndarray:
    if im.dtype != np.uint8:
        raise ValueError(f"grid images must be uint8, got {im.dtype}")
    if im.ndim == 2:
        return np.repeat(im[:, :, None], 3, axis=2)
    if im.ndim == 3 and im.shape[2] == 3:
        return im
    raise ValueError(f"grid images must be (H, W) or (H, W, 3), got {im.shape}")


def make_grid(rows: Sequence[Sequence[Any]], col_labels: Sequence[str] | None = None,
              row_labels: Sequence[str] | None = None, pad: int = 2, background: int = 255,
              label_height: int = 14, label_width: int = 80) -> np.ndarray:
    """Tile images into a grid (uint8 (H, W, 3)); cells may differ in size (placed top-left in a cell of
    the largest height of its row and width of its column). Gray (H, W) images are expanded to RGB.
    col_labels / row_labels: text above the columns / left of the rows."""
    cells = [[_as_rgb(_np(im)) for im in row] for row in rows]
    if not cells or not any(cells):
        raise ValueError("make_grid needs at least one image")
    ncols = max(len(r) for r in cells)
    heights = [max((c.shape[0] for c in r), default=0) for r in cells]
    widths = [max((r[j].shape[1] for r in cells if j < len(r)), default=0) for j in range(ncols)]
    top = label_height + pad if col_labels else 0
    left = label_width + pad if row_labels else 0
    H = top + sum(heights) + pad * (len(cells) + 1)
    W = left + sum(widths) + pad * (ncols + 1)
    canvas = np.full((H, W, 3), background, dtype=np.uint8)
    y = top + pad
    for i, row in enumerate(cells):
        x = left + pad
        for j in range(ncols):
            if j < len(row):
                c = row[j]
                canvas[y : y + c.shape[0], x : x + c.shape[1]] = c
            x += widths[j] + pad
        y += heights[i] + pad
    if not (col_labels or row_labels):
        return canvas
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    fill = (0, 0, 0) if background > 127 else (255, 255, 255)
    x = left + pad
    for j, text in enumerate(list(col_labels or [])[:ncols]):
        draw.text((x, 1), str(text), fill=fill, font=_font())
        x += widths[j] + pad
    y = top + pad
    for i, text in enumerate(list(row_labels or [])[: len(cells)]):
        draw.text((1, y), str(text), fill=fill, font=_font())
        y += heights[i] + pad
    return np.array(img)


def to_png_bytes(image: Any) -> bytes:
    """PNG encoding of a uint8 (H, W, 3) or (H, W) array."""
    arr = _np(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"to_png_bytes needs uint8, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def legend(class_names: Sequence[str], palette: np.ndarray | None = None, swatch: int = 14,
           width: int = 160) -> np.ndarray:
    """A vertical legend (uint8 (len * (swatch + 2), width, 3)): class i's palette colour + its name."""
    pal = voc_palette() if palette is None else palette
    row = swatch + 2
    canvas = np.full((max(len(class_names), 1) * row, width, 3), 255, dtype=np.uint8)
    for i in range(len(class_names)):
        canvas[i * row + 1 : i * row + 1 + swatch, 1 : 1 + swatch] = pal[i]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(class_names):
        draw.text((swatch + 6, i * row + 1), str(name), fill=(0, 0, 0), font=_font())
    return np.array(img)
