"""A small synthetic WSSS dataset in the PASCAL VOC layout, hard in the ways real WSSS is hard.

Design (what makes a plain CAM incomplete, and what lets affinity/PAR repair it):

* **Ambiguous bodies, small discriminative parts.** Every object is a large blob (a wobbly ellipse)
  whose body has a muted version of its class hue, but ``BODY_CONFUSION`` of the bodies take another
  class's body colour and ``DISTRACTOR_BODY_PROB`` of the background distractors are painted in
  body colours, so the body is only weak evidence of the class (as a dog's fur is). Each class owns
  a small part (a disc with a saturated, class-specific colour and checker pattern, 10-15 % of the
  object area, placed toward one end of the body), shown on ``PART_PROB`` of the objects. The
  classifier leans on the part, so its CAM peaks there and covers the rest of the object only
  weakly; the objects without a visible part make it learn the weaker body evidence too.
* **Coherent objects.** The part sits inside the body, the object is contiguous and its body has a
  smooth, low-contrast texture distinct from the background, so pixel affinities (and PAR's colour
  kernel) connect the part to the rest of the object.
* **Several classes and occlusion.** 1-3 classes per image (sometimes two instances of one class),
  painted in sequence so later objects occlude earlier ones; layouts where an object keeps less
  than half its body or its part are re-drawn, so every labelled class stays recognisable.
* **Clutter.** A low-frequency coloured background with fine noise and 2-5 distractor shapes
  (rectangles, discs, triangles, bars) of background "classes" with their own textures.

Written files (``generate_synthetic``)::

    root/JPEGImages/*.jpg, SegmentationClass/*.png, SegmentationClassAug/*.png (same masks),
    SegmentationPart/*.png (class id on the visible discriminative part, else 0),
    ImageSets/Segmentation/{train,train_aug,val}.txt (train_aug = train),
    class_names.json, cls_labels.json ({name: [class ids]}), synthetic_meta.json (per-object areas)

Deterministic given the seed (one generator per image, seeded by (seed, split, index)); numpy only;
a few hundred 128x128 images take a few seconds. CLI: ``python -m wsss.data.synthetic ROOT``.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .io import save_mask

PART_FRACTION = (0.10, 0.15)  # part area / object area
BODY_CONFUSION = 0.3  # share of objects whose body takes another class's body colour
PART_PROB = 0.6  # share of objects that show their discriminative part (a face is not always visible)
DISTRACTOR_BODY_PROB = 0.5  # share of background distractors painted in an object-body colour


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _palette(num_fg: int) -> tuple[np.ndarray, np.ndarray]:
    """Part colours (K, 3) saturated and distinct; body colours (K, 3): muted versions of the same hues."""
    parts = np.stack([_hsv(i / num_fg, 0.95, 0.95) for i in range(num_fg)])
    bodies = np.stack([_hsv(i / num_fg, 0.4, 0.6) for i in range(num_fg)])
    return parts, bodies


def class_names_for(num_classes: int) -> list[str]:
    """``["background", "part_red", ...]``: each foreground class is named after its part's hue."""
    hues = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta",
            "rose"]  # fmt: skip
    k = num_classes - 1
    return ["background"] + [f"obj{i + 1}_{hues[round(i / k * len(hues)) % len(hues)]}" for i in range(k)]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise on a ``cells`` grid: ``(size, size, channels)`` in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1, channels))
    t = np.linspace(0, cells, size)
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = (t - i0)[:, None]
    rows = grid[i0] * (1 - f)[..., None] + grid[i0 + 1] * f[..., None]  # (size, cells+1, C)
    return rows[:, i0] * (1 - f.T)[..., None] + rows[:, i0 + 1] * f.T[..., None]


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, a: float, b: float, theta: float,
          wobble: np.ndarray) -> np.ndarray:  # fmt: skip
    """Ellipse with a low-order radial wobble: bool ``(S, S)``."""
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    ang = np.arctan2(v / b, u / a)
    r = 1.0 + wobble[0] * np.sin(2 * ang + wobble[1]) + wobble[2] * np.sin(3 * ang + wobble[3])
    return (u / a) ** 2 + (v / b) ** 2 <= r**2


def _background(
    rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray, bodies: np.ndarray
) -> np.ndarray:
    base = _hsv(rng.random(), rng.uniform(0.05, 0.25), rng.uniform(0.35, 0.7))
    img = base * (0.65 + 0.7 * _smooth_noise(rng, size, 4, 3))
    for _ in range(int(rng.integers(2, 6))):  # distractor shapes of background classes
        kind = int(rng.integers(4))
        cy, cx = rng.uniform(0, size, 2)
        s = rng.uniform(0.06, 0.18) * size
        if kind == 0:
            m = (np.abs(yy - cy) < s) & (np.abs(xx - cx) < s * rng.uniform(0.5, 1.5))
        elif kind == 1:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < s**2
        elif kind == 2:
            m = (yy - cy > -s) & (yy - cy < s - 2 * np.abs(xx - cx))
        else:
            th = rng.uniform(0, np.pi)
            m = np.abs((xx - cx) * np.sin(th) - (yy - cy) * np.cos(th)) < s * 0.15
            m &= (xx - cx) ** 2 + (yy - cy) ** 2 < (3 * s) ** 2
        if rng.random() < DISTRACTOR_BODY_PROB:  # painted like a body: body colour alone is not enough
            colour = bodies[int(rng.integers(len(bodies)))] * rng.uniform(0.85, 1.15)
        else:
            colour = _hsv(rng.random(), rng.uniform(0.1, 0.45), rng.uniform(0.3, 0.85))
        period = rng.uniform(3, 9)
        if rng.random() < 0.5:
            img[m] = colour * (0.8 + 0.2 * (((yy[m] + xx[m]) // period) % 2))[:, None]
        else:
            img[m] = colour
    return img


def _draw_object(
    rng: np.random.Generator, size: int, num_objects: int, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One object before occlusion: its body and its discriminative part, bool ``(S, S)`` each (the part
    all False when not shown). Smaller bodies when ``num_objects`` share the image."""
    a = rng.uniform(0.16, 0.3) * size / (1 + 0.15 * (num_objects - 1))
    b = a * rng.uniform(0.55, 0.85)
    theta = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
    wobble = rng.uniform([0, 0, 0, 0], [0.08, 6.3, 0.06, 6.3])
    body = _blob(yy, xx, cy, cx, a, b, theta, wobble)
    area = body.sum()
    frac = rng.uniform(*PART_FRACTION)
    pr = np.sqrt(frac * area / np.pi) * 1.05  # the disc is clipped by the body edge
    side = 1.0 if rng.random() < 0.5 else -1.0
    dist = max(0.0, a - pr) * 0.75 * side  # toward one end of the body, along its long axis
    py, px = cy + dist * np.sin(theta), cx + dist * np.cos(theta)
    part = body & ((yy - py) ** 2 + (xx - px) ** 2 <= pr**2)
    if rng.random() >= PART_PROB:
        part = np.zeros_like(body)
    return body, part


def _draw_layout(
    rng: np.random.Generator, size: int, k: int, yy: np.ndarray, xx: np.ndarray, allow_twin: bool
) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """One layout of 1-3 classes (``allow_twin``: sometimes a second instance of one), painted in sequence.

    Returns the shapes ``(class, body, part)`` (bool ``(S, S)`` before occlusion), the owner map int64
    ``(S, S)`` (index of the object on top, -1 background) and the visible-part map bool ``(S, S)``."""
    n_cls = int(rng.integers(1, min(3, k) + 1))
    classes = list(rng.choice(np.arange(1, k + 1), size=n_cls, replace=False))
    if rng.random() < 0.2 and allow_twin:  # the draw comes first: it is made on every attempt
        classes.append(classes[0])  # a second instance of one class
    owner = np.full((size, size), -1, dtype=np.int64)
    is_part = np.zeros((size, size), dtype=bool)
    shapes = []
    for j, c in enumerate(classes):
        body, part = _draw_object(rng, size, len(classes), yy, xx)
        owner[body] = j  # later objects occlude earlier ones
        is_part[body] = part[body]
        shapes.append((int(c), body, part))
    return shapes, owner, is_part


def _visible_objects(
    shapes: list[tuple[int, np.ndarray, np.ndarray]], owner: np.ndarray, is_part: np.ndarray
) -> tuple[list[dict], bool]:
    """Per-object metadata (class, visible and full areas of body and part) of a layout, and whether it
    is kept: every object keeps at least half its body and 60 % of its part."""
    objects = []
    ok = True
    for j, (c, body, part) in enumerate(shapes):
        vis = owner == j
        vis_part = vis & is_part
        objects.append({"class": c, "area": int(vis.sum()), "part_area": int(vis_part.sum()),
                        "full_area": int(body.sum()), "full_part_area": int(part.sum())})  # fmt: skip
        ok &= vis.sum() >= 0.5 * body.sum() and vis_part.sum() >= 0.6 * part.sum()
    return objects, ok


def _paint_objects(
    rng: np.random.Generator,
    img: np.ndarray,
    shapes: list[tuple[int, np.ndarray, np.ndarray]],
    owner: np.ndarray,
    is_part: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    parts_rgb: np.ndarray,
    bodies_rgb: np.ndarray,
) -> None:
    """Paint the visible bodies (textured, sometimes in another class's colour) and parts (checkered)
    over the background ``img`` float ``(S, S, 3)``, in place, object by object."""
    for j, (c, _, _) in enumerate(shapes):
        body, part = (owner == j) & ~is_part, (owner == j) & is_part
        bc = c if rng.random() >= BODY_CONFUSION else int(rng.integers(1, len(bodies_rgb) + 1))
        texture = 0.85 + 0.3 * _smooth_noise(rng, img.shape[0], 6, 1)[..., 0]  # smooth, low contrast
        img[body] = bodies_rgb[bc - 1] * rng.uniform(0.85, 1.15) * texture[body][:, None]
        checker = (yy[part] // 3 + xx[part] // 3) % 2
        img[part] = parts_rgb[c - 1] * (0.65 + 0.35 * checker)[:, None]


def _label_masks(
    shapes: list[tuple[int, np.ndarray, np.ndarray]], owner: np.ndarray, is_part: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The class mask and the part mask, int64 ``(S, S)`` each, of the visible objects."""
    mask = np.zeros(owner.shape, dtype=np.int64)
    part_mask = np.zeros(owner.shape, dtype=np.int64)
    for j, (c, _, _) in enumerate(shapes):
        mask[owner == j] = c
        part_mask[(owner == j) & is_part] = c
    return mask, part_mask


def render_sample(
    rng: np.random.Generator, size: int = 128, num_classes: int = 5, max_tries: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One image: uint8 ``(S, S, 3)``, mask int64 ``(S, S)`` (0 bg, 1..K), part mask int64 ``(S, S)``
    (class id on visible discriminative parts) and per-object metadata (class, areas)."""
    k = num_classes - 1
    if k < 1:
        raise ValueError("num_classes must be >= 2")
    parts_rgb, bodies_rgb = _palette(k)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for attempt in range(max_tries):
        # a layout that hides too much of an object is drawn again (with no twin in the second half);
        # the last one is kept if none passes
        shapes, owner, is_part = _draw_layout(rng, size, k, yy, xx, allow_twin=attempt < max_tries // 2)
        objects, ok = _visible_objects(shapes, owner, is_part)
        if ok:
            break
    img = _background(rng, size, yy, xx, bodies_rgb)
    _paint_objects(rng, img, shapes, owner, is_part, yy, xx, parts_rgb, bodies_rgb)
    img += rng.normal(0.0, 6.0, img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    mask, part_mask = _label_masks(shapes, owner, is_part)
    return image, mask, part_mask, objects


def generate_synthetic(
    root: str | os.PathLike,
    num_train: int = 200,
    num_val: int = 50,
    size: int = 128,
    seed: int = 0,
    num_classes: int = 5,
) -> Path:
    """Write the synthetic set (module docstring) under ``root`` and return ``root``."""
    root = Path(root)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "SegmentationPart"):
        (root / d).mkdir(parents=True, exist_ok=True)
    labels: dict[str, list[int]] = {}
    meta: dict[str, list[dict]] = {}
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        for i in range(count):
            name = f"{split}_{i:05d}"
            rng = np.random.default_rng([seed, split_id, i])
            image, mask, part, objects = render_sample(rng, size, num_classes)
            Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            save_mask(root / "SegmentationClass" / f"{name}.png", mask)
            save_mask(root / "SegmentationClassAug" / f"{name}.png", mask)
            save_mask(root / "SegmentationPart" / f"{name}.png", part)
            labels[name] = sorted(int(c) for c in np.unique(mask) if c > 0)
            meta[name] = objects
            splits[split].append(name)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(n + "\n" for n in splits["train"]))
    (sets / "train_aug.txt").write_text("".join(n + "\n" for n in splits["train"]))
    (sets / "val.txt").write_text("".join(n + "\n" for n in splits["val"]))
    (root / "class_names.json").write_text(json.dumps(class_names_for(num_classes)))
    (root / "cls_labels.json").write_text(json.dumps(labels, sort_keys=True))
    info = {"seed": seed, "size": size, "num_classes": num_classes, "part_fraction": PART_FRACTION}
    (root / "synthetic_meta.json").write_text(json.dumps({"config": info, "objects": meta}))
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wsss.data.synthetic", description="write a synthetic set")
    p.add_argument("root")
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=5)
    a = p.parse_args(argv)
    root = generate_synthetic(a.root, a.num_train, a.num_val, a.size, a.seed, a.num_classes)
    print(f"wrote {a.num_train} train + {a.num_val} val images to {root}")


if __name__ == "__main__":
    main()
