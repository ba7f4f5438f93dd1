"""MS COCO 2014 in the VOC-like layout used by AFA / MCTformer (81 classes: 0 bg + 80).

Layout::

    root/JPEGImages/{train2014,val2014}/<name>.jpg      (or JPEGImages/{train,val})
    root/SegmentationClass/{train2014,val2014}/<name>.png  (or SegmentationClass/{train,val})
    root/ImageSets/{train,val}.txt or root/{train,val}.txt  (optional; default: every mask / image)

The masks hold 0 = background, 1..80 = the 80 categories in increasing COCO id order, 255 = ignore.
They are not distributed with COCO; :func:`convert_coco_instances` makes them from the official
``instances_*.json`` with pycocotools (``pip install wsss[coco]``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    IMAGE_EXTS,
    SegmentationDataset,
    Transform,
    build_from_dirs,
    list_stems,
    read_split,
    writable_cache,
)
from .io import IGNORE_INDEX, DataError, dataset_root, save_mask

COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def _first_dir(base: Path, split: str) -> Path | None:
    for cand in (split, f"{split}2014", split.replace("2014", "")):
        if (base / cand).is_dir():
            return base / cand
    return None


class COCODataset(SegmentationDataset):
    """COCO in the VOC-like layout (module docstring); same sample dict and checks as :class:`VOCDataset`.

    ``split`` is "train" / "val" (or "train2014" / "val2014", or a path to a list file);
    ``mask_dir="auto"`` uses ``SegmentationClass/<split>`` when it exists; ``None`` disables masks."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike,
        transform: Transform | None = None,
        labels_file: str | os.PathLike | None = None,
        mask_dir: str | None = "auto",
        class_names: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        root = dataset_root(root)
        sub = Path(str(split)).stem  # a list-file path "…/train.txt" picks the "train" folders
        image_dir = _first_dir(root / "JPEGImages", sub)
        if image_dir is None:
            raise DataError(f"no image folder for split {sub!r} under {root / 'JPEGImages'}")
        explicit = mask_dir not in (None, "auto")
        if mask_dir == "auto":
            mdir = _first_dir(root / "SegmentationClass", sub)
        else:
            mdir = None if mask_dir is None else root / mask_dir
            if explicit and not mdir.is_dir():
                raise DataError(f"mask directory not found: {mdir}")
        try:
            names = read_split(root, split, search=("ImageSets", "ImageSets/Segmentation"))
        except DataError:
            listing = list_stems(mdir, (".png",)) if mdir is not None else list_stems(image_dir, IMAGE_EXTS)
            names = sorted(listing)
            if not names:
                raise
        names_ = tuple(class_names) if class_names is not None else COCO_CLASSES
        cache = None
        if mdir is not None:
            tag = str(mdir.relative_to(root)).replace("/", "_").replace(os.sep, "_")
            cache = writable_cache(root / f"cls_labels_{tag}.json", cache_dir)
        super().__init__(
            **build_from_dirs(names, image_dir, mdir, names_, transform, labels_file, explicit, cache, seed)
        )
        self.root = root
        self.split = str(split)
        self.mask_dir = mdir


def convert_coco_instances(
    instances_json: str | os.PathLike, out_dir: str | os.PathLike, skip_empty: bool = False
) -> list[str]:
    """Write one VOC-palette label PNG per image of a COCO ``instances_*.json`` into ``out_dir``.

    The 80 category ids (1..90 with gaps) map to 1..80 contiguous in increasing id order. Objects
    are painted from the largest to the smallest area, so a small object lying on a large one stays
    visible; crowd regions are painted last with 255 (ignore). Returns the names written."""
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise ImportError(
            "convert_coco_instances needs pycocotools: pip install wsss[coco] (or pip install pycocotools)"
        ) from err
    import contextlib
    import io as _io

    with contextlib.redirect_stdout(_io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(instances_json))
    cat_ids = sorted(coco.getCatIds())
    to_label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    if len(cat_ids) >= IGNORE_INDEX:
        raise DataError(f"{instances_json}: {len(cat_ids)} categories do not fit in a uint8 label map")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        # pycocotools' C extension trips numpy 2's copy-keyword DeprecationWarning on every decode
        warnings.simplefilter("ignore", DeprecationWarning)
        for img_id in sorted(coco.getImgIds()):
            written += _convert_one(coco, img_id, to_label, out, skip_empty)
    return written


def _convert_one(coco: Any, img_id: int, to_label: dict[int, int], out: Path, skip_empty: bool) -> list[str]:
    """Paint one image's label PNG (see :func:`convert_coco_instances`); returns [name] or []."""
    info = coco.loadImgs(img_id)[0]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))
    if skip_empty and not any(not a.get("iscrowd", 0) for a in anns):
        return []
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    objects = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -a["area"])
    for a in objects:
        mask[coco.annToMask(a) > 0] = to_label[a["category_id"]]
    for a in anns:
        if a.get("iscrowd", 0):
            mask[coco.annToMask(a) > 0] = IGNORE_INDEX
    name = os.path.splitext(info["file_name"])[0]
    save_mask(out / f"{name}.png", mask)
    return [name]
