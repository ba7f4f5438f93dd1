"""Your own images with image-level labels (the "how do I run this on my data" path).

::

    FolderDataset("photos/", "labels.csv")                      # name,labels / img1,cat;dog
    FolderDataset("photos/", "labels.json", mask_dir="masks/")  # {"classes": [...], "labels": {...}}

CSV rows (comma- or tab-separated) give class names or ids (1..K) separated by ``;`` (or spaces); the
class list comes from ``class_names`` (then a name outside it is an error naming the file and line)
or from the labels file: JSON ``"classes"``, a CSV's first line ``#classes: cow;dog``, or a
``classes.txt`` beside the file (one name a line); background is implied when not listed first, as in
``data.class_names``, and a file's list that differs from ``class_names`` is an error naming both. For
a CSV with names only and no list, the sorted set of names in the file (give a list to catch typos,
and always with masks: their indices follow the list). Masks (optional, PNG with the same stem)
are used for evaluation only. ``val_fraction`` holds a fixed part of the file out: a seeded split
(:func:`split_names`) whose ``"val"`` part is the evaluation set and whose ``"train"`` part the rest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import SegmentationDataset, Transform, build_from_dirs
from .io import DataError
from .labels_file import declared_classes, read_csv_labels, read_labels_file, with_background


def _infer_classes(labels_file: Path) -> tuple[str, ...] | None:
    """Class names from the labels file alone: the list it carries (:func:`declared_classes`), else the
    sorted names used in a CSV (their order matches no mask's indices: give a list for masks)."""
    declared = declared_classes(labels_file)
    if declared is not None:
        return declared[0]
    if labels_file.suffix.lower() == ".json":
        return None
    names = {t for _, _, tokens in read_csv_labels(labels_file) for t in tokens if not t.isdigit()}
    return with_background(sorted(names)) if names else None


def split_names(names: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) names: ``round(val_fraction * n)`` of ``names`` (at least 1, at most n - 1) drawn by
    a permutation seeded with ``seed``, each part in the file's order. The same names, fraction and seed
    give the same split on every machine (numpy's PCG64)."""
    n = len(names)
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"data.val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if n < 2:
        raise DataError(f"data.val_fraction needs at least 2 images to hold some out, got {n}")
    k = min(n - 1, max(1, round(float(val_fraction) * n)))
    held = set(np.random.default_rng(int(seed)).permutation(n)[:k].tolist())
    return [m for i, m in enumerate(names) if i not in held], [m for i, m in enumerate(names) if i in held]


class FolderDataset(SegmentationDataset):
    """Images in ``image_dir`` listed by ``labels_file`` (order of the file is the dataset order)."""

    def __init__(
        self,
        image_dir: str | os.PathLike,
        labels_file: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        mask_dir: str | os.PathLike | None = None,
        transform: Transform | None = None,
        seed: int = 0,
        holdout: tuple[str, float, int] | None = None,
    ) -> None:
        """``holdout``: (part "train" or "val", val_fraction, split seed): only that part of the
        labels file (:func:`split_names`)."""
        image_dir, labels_file = Path(image_dir), Path(labels_file)
        if not image_dir.is_dir():
            raise DataError(f"image folder not found: {image_dir}")
        if not labels_file.is_file():
            raise DataError(f"labels file not found: {labels_file}")
        classes = with_background(class_names) if class_names is not None else _infer_classes(labels_file)
        if classes is None:
            raise DataError(f"{labels_file}: give class_names (the file has only class ids)")
        # the dataset order is the file's order
        labels, file_classes = read_labels_file(labels_file, classes)
        mdir = Path(mask_dir) if mask_dir is not None else None
        if mdir is not None and not mdir.is_dir():
            raise DataError(f"mask folder not found: {mdir}")
        names = list(labels)
        if holdout is not None:
            part, fraction, split_seed = holdout
            train, val = split_names(names, fraction, split_seed)
            names = val if part == "val" else train
        self.holdout = holdout
        super().__init__(
            **build_from_dirs(
                names, image_dir, mdir, file_classes or classes, transform, labels_file,
                masks_required=False, cache_file=None, seed=seed,
            )
        )  # fmt: skip
        self.image_dir = image_dir
        self.mask_dir = mdir
