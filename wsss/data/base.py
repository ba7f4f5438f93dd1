"""The machinery shared by every dataset in ``wsss.data`` (VOC, COCO, your own folder).

:class:`SegmentationDataset` returns the sample dict; :func:`build_from_dirs` checks every file up front
and gathers its constructor arguments: images and masks listed by stem (:func:`list_stems`), the names of
a split file (:func:`read_split`), labels from a labels file (:mod:`wsss.data.labels_file`) or derived
from the masks and cached as JSON (:func:`labels_from_masks`, in the root or in ``~/.cache/wsss`` when the
root is read-only: :func:`writable_cache`). Missing files are listed in one
:class:`~wsss.data.io.DataError` (:func:`missing_error`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import (
    IGNORE_INDEX,
    DataError,
    check_mask_values,
    check_same_size,
    load_image,
    load_mask,
)
from .labels_file import read_labels_file
from .transforms import EvalTransform

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".JPG", ".JPEG", ".PNG")

Transform = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def list_stems(directory: Path, exts: Sequence[str]) -> dict[str, Path]:
    """``stem -> path`` of the files in ``directory`` with one of ``exts`` (one listing, no stat per file)."""
    if directory is None or not directory.is_dir():
        return {}
    out: dict[str, Path] = {}
    for entry in os.scandir(directory):
        stem, ext = os.path.splitext(entry.name)
        if ext in exts and stem not in out:
            out[stem] = Path(entry.path)
    return out


def missing_error(kind: str, missing: Sequence[str], where: Path) -> DataError:
    """The DataError listing ``missing`` (the first 20 and the count) of ``kind`` in ``where``."""
    shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
    return DataError(f"{len(missing)} {kind} missing in {where}: {shown}")


def writable_cache(preferred: Path, cache_dir: str | os.PathLike | None) -> Path:
    """``preferred`` when its folder is writable, else a file in ``cache_dir`` (default ~/.cache/wsss)."""
    if cache_dir is None and os.access(preferred.parent, os.W_OK):
        return preferred
    base = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "wsss"
    tag = hashlib.sha1(str(preferred.resolve()).encode()).hexdigest()[:12]
    return base / f"{tag}_{preferred.name}"


def labels_from_masks(
    names: Sequence[str],
    mask_paths: Mapping[str, Path],
    num_classes: int,
    cache_file: Path | None = None,
) -> dict[str, list[int]]:
    """Foreground class ids present in each name's mask, read through a JSON cache (updated in place)."""
    cache: dict[str, list[int]] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = {str(k): list(v) for k, v in json.loads(cache_file.read_text()).items()}
        except (json.JSONDecodeError, AttributeError, TypeError):
            cache = {}  # a broken cache is rebuilt
    todo = [n for n in names if n not in cache]
    for n in todo:
        values = np.unique(load_mask(mask_paths[n], num_classes))
        cache[n] = [int(v) for v in values if 0 < v != IGNORE_INDEX]
    for n in names:  # ids cached by an earlier run with more classes must not be dropped silently
        check_mask_values(np.asarray(cache[n], dtype=np.int64), num_classes, mask_paths[n])
    if todo and cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, sort_keys=True))
            os.replace(tmp, cache_file)  # atomic: concurrent ranks never read half a file
        except OSError as err:
            warnings.warn(f"could not write the label cache {cache_file}: {err}", stacklevel=2)
    return {n: cache[n] for n in names}


class SegmentationDataset(Dataset):
    """Images + image-level labels (+ optional masks), shared by VOC, COCO and folder datasets.

    ``dataset[i]`` (or ``dataset[(i, seed)]``, as yielded by :func:`wsss.data.build.build_loader`'s
    sampler, for augmentation that does not depend on the worker layout) returns::

        image   float (3, H, W)   ImageNet-normalised RGB
        labels  float (K,)        multi-hot over the foreground classes 1..K
        mask    long (H, W)       0 bg, 1..K, 255 ignore (all 255 without a mask; 255 on padding)
        img_box long (4,)         [row0, row1, col0, col1] of the real image, end-exclusive
        name    str
        size    long (2,)         original (H0, W0)
    """

    def __init__(
        self,
        names: Sequence[str],
        image_paths: Mapping[str, Path],
        mask_paths: Mapping[str, Path | None],
        labels: Mapping[str, Sequence[int]],
        class_names: Sequence[str],
        transform: Transform | None = None,
        seed: int = 0,
    ) -> None:
        self.names = list(names)
        self.image_paths = dict(image_paths)
        self.mask_paths = dict(mask_paths)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = IGNORE_INDEX
        self.transform = transform if transform is not None else EvalTransform()
        k = self.num_classes - 1
        self.labels = np.zeros((len(self.names), k), dtype=np.float32)
        for i, n in enumerate(self.names):
            ids = np.asarray(labels[n], dtype=np.int64)
            self.labels[i, ids[(ids > 0) & (ids <= k)] - 1] = 1.0
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Re-seed the generator used for plain integer indices (called by the worker_init_fn)."""
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.names)

    def has_masks(self) -> bool:
        return any(p is not None for p in self.mask_paths.values())

    def check_masks(self, count: int | None = None) -> None:
        """Read the masks of the first ``count`` images (None: all) once: a value outside the classes
        is a :class:`DataError` naming the file now, not when a pass reaches it."""
        for name in self.names[: count if count is not None else len(self.names)]:
            path = self.mask_paths.get(name)
            if path is not None:
                load_mask(path, self.num_classes)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):
            index, seed = index
            rng = np.random.default_rng(seed)
        else:
            rng = self.rng
        name = self.names[index]
        image = load_image(self.image_paths[name])
        mask_path = self.mask_paths.get(name)
        mask = None
        if mask_path is not None:
            mask = load_mask(mask_path, self.num_classes)
            check_same_size(image, mask, self.image_paths[name], mask_path)
        size = image.shape[:2]
        img, msk, box = self.transform(image, mask, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
            "labels": torch.from_numpy(self.labels[index].copy()),
            "mask": torch.from_numpy(np.ascontiguousarray(msk, dtype=np.int64)),
            "img_box": torch.as_tensor(box, dtype=torch.long),
            "name": name,
            "size": torch.tensor(size, dtype=torch.long),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
            f"masks={self.has_masks()}, "
            f"transform={self.transform!r})"
        )


def read_split(
    root: Path, split: str | os.PathLike, search: Sequence[str] = ("ImageSets/Segmentation",)
) -> list[str]:
    """Names from a split file: ``split`` is a path, or ``<root>/<search dir>/<split>.txt``.

    Each line's first token is used; list formats like ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``
    are reduced to the stem ``x``."""
    candidates = [Path(split)] + [root / d / f"{split}.txt" for d in search] + [root / f"{split}.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"split {split!r} not found; looked for: {', '.join(str(p) for p in candidates)}")
    names = []
    for line in path.read_text().splitlines():
        token = line.strip().split()[0] if line.strip() else ""
        if token and not token.startswith("#"):
            names.append(os.path.splitext(os.path.basename(token))[0])
    if not names:
        raise DataError(f"split file {path} lists no images")
    return names


def build_from_dirs(
    names: Sequence[str],
    image_dir: Path,
    mask_dir: Path | None,
    class_names: Sequence[str],
    transform: Transform | None,
    labels_file: str | os.PathLike | None,
    masks_required: bool,
    cache_file: Path | None,
    seed: int = 0,
) -> dict:
    """Check every file up front and gather the constructor arguments of a :class:`SegmentationDataset`.

    Missing images always raise (all listed). Missing masks raise when ``masks_required`` or when the
    labels must be derived from them; otherwise those images simply have no mask."""
    images = list_stems(image_dir, IMAGE_EXTS)
    missing = [n for n in names if n not in images]
    if missing:
        raise missing_error("images", missing, image_dir)
    masks = list_stems(mask_dir, (".png", ".PNG")) if mask_dir is not None else {}
    missing_masks = [n for n in names if n not in masks] if mask_dir is not None else []
    labels = None
    file_classes = None
    if labels_file is not None:
        labels, file_classes = read_labels_file(labels_file, class_names)
        class_names = file_classes or class_names
        no_label = [n for n in names if n not in labels]
        if no_label:
            raise missing_error("image labels", no_label, Path(labels_file))
    if missing_masks and (masks_required or labels is None):
        raise missing_error("masks", missing_masks, mask_dir)
    if labels is None:
        if mask_dir is None:
            raise DataError(f"no labels_file and no mask directory to derive labels from ({image_dir})")
        labels = labels_from_masks(names, masks, len(class_names), cache_file)
    return dict(
        names=names,
        image_paths={n: images[n] for n in names},
        mask_paths={n: masks.get(n) for n in names},
        labels=labels,
        class_names=class_names,
        transform=transform,
        seed=seed,
    )
