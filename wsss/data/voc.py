"""PASCAL VOC 2012.

Layout read by :class:`VOCDataset`::

    root/JPEGImages/<name>.jpg
    root/SegmentationClass/<name>.png        # 1,464 train + 1,449 val GT masks
    root/SegmentationClassAug/<name>.png     # 10,582 train_aug (SBD) masks
    root/ImageSets/Segmentation/{train,train_aug,val}.txt

Image-level labels (``labels`` float (K,) over the foreground classes 1..K) come either from a
labels file (:mod:`wsss.data.labels_file`: ``.json`` ``{name: [class ids or names]}`` / ``.csv``
``name,labels`` with ``;``-separated ids or names) or are derived from the masks and cached as JSON (in
the root, or in ``~/.cache/wsss`` when the root is read-only). The cache is keyed by image name only:
delete ``cls_labels_<mask dir>.json`` after editing masks.

Every sample is a dict (see :class:`~wsss.data.base.SegmentationDataset`); all files are checked at
construction and missing ones are listed in one :class:`~wsss.data.io.DataError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .base import SegmentationDataset, Transform, build_from_dirs, read_split, writable_cache
from .io import DataError, dataset_root
from .labels_file import declared_classes, with_background

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def _class_names_for(
    root: Path, num_classes: int | None, class_names: Sequence[str] | None
) -> tuple[str, ...]:
    if class_names is not None:
        names = with_background(class_names)
    elif (root / "class_names.json").is_file():
        names = with_background(json.loads((root / "class_names.json").read_text()))
    elif num_classes in (None, len(VOC_CLASSES)):
        names = VOC_CLASSES
    else:
        names = ("background",) + tuple(f"class{i}" for i in range(1, num_classes))
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{root}: {len(names)} class names ({names[:4]}...) but num_classes={num_classes}")
    return tuple(names)


class VOCDataset(SegmentationDataset):
    """PASCAL VOC 2012 layout (module docstring).

    ``mask_dir="auto"`` uses SegmentationClassAug for splits whose name contains "aug" and
    SegmentationClass otherwise (falling back to whichever exists); ``None`` disables masks (then a
    ``labels_file`` is required). ``num_classes=None`` reads ``root/class_names.json`` if present, else 21.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike,
        transform: Transform | None = None,
        num_classes: int | None = None,
        labels_file: str | os.PathLike | None = None,
        mask_dir: str | None = "auto",
        class_names: Sequence[str] | None = None,
        image_dir: str = "JPEGImages",
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        root = dataset_root(root)
        names = read_split(root, split)
        explicit = mask_dir not in (None, "auto")
        if mask_dir == "auto":
            order = ("SegmentationClassAug", "SegmentationClass")
            order = order if "aug" in Path(str(split)).stem.lower() else order[::-1]
            mask_dir = next((d for d in order if (root / d).is_dir()), None)
        mdir = None if mask_dir is None else root / mask_dir
        if explicit and not mdir.is_dir():
            raise DataError(f"mask directory not found: {mdir}")
        if class_names is None and labels_file is not None and Path(labels_file).is_file():
            class_names = (declared_classes(labels_file) or (None,))[0]  # the labels file's own list
        cache = None
        if mask_dir is not None:
            cache = writable_cache(root / f"cls_labels_{str(mask_dir).replace('/', '_')}.json", cache_dir)
        super().__init__(
            **build_from_dirs(
                names, root / image_dir, mdir, _class_names_for(root, num_classes, class_names),
                transform, labels_file, explicit, cache, seed,
            )
        )  # fmt: skip
        self.root = root
        self.split = str(split)
        self.mask_dir = mdir
