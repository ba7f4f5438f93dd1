"""Datasets and loaders from a config section, with reproducible, per-rank, per-sample seeding.

Seeding (fixes docs/methods/afa.md 14 item 14, where every rank and worker repeated the same ``np.random``
crop offsets): the loader's sampler yields ``(index, seed)`` pairs, the seed drawn from a torch
Generator seeded by ``(seed, rank, epoch)``; the dataset builds a fresh numpy Generator from it for
that sample. The augmentation of a sample therefore depends only on (seed, rank, epoch, position),
not on the number of workers or their scheduling. Workers are also seeded by a ``worker_init_fn``
(numpy, ``random`` and the dataset's own generator for plain integer indices).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from wsss.core.schema import cfg_get

from .base import SegmentationDataset, list_stems, missing_error
from .coco import COCODataset
from .folder import FolderDataset
from .io import IGNORE_INDEX, DataError
from .randaugment import build_rand_augment
from .transforms import (
    COLOR_JITTER,
    CROP_SIZE,
    FLIP,
    INTERPOLATION,
    RANDOM_ERASING,
    RESIZED_CROP,
    SCALE_RANGE,
    EvalTransform,
    TrainTransform,
)
from .voc import VOCDataset

PSEUDO_CLASSES_FILE = "class_names.json"  # in a pseudo-label folder: its classes, background first

SYNTHETIC_CLASSES = 6  # the built-in set: background + 5 classes (when data.num_classes is not pinned)

# The ``data`` section's defaults besides the augmentation's (:mod:`wsss.data.transforms`): a section
# that leaves a key out (or sets it to null) gets these
DATA_TYPE = "voc"  # the dataset kind: voc | coco | folder | synthetic
TRAIN_SPLIT = "train_aug"  # VOC's training split (SBD-augmented)
VAL_SPLIT = "val"
MASK_DIR = "auto"  # the dataset's own mask folder ("auto": see VOCDataset, COCODataset)
DATA_SEED = 0  # seeds the per-sample augmentation
SPLIT_SEED = 0  # seeds a folder dataset's held-out val part
# the synthetic set generated into ``root`` on first use
SYNTHETIC_NUM_TRAIN = 400
SYNTHETIC_NUM_VAL = 100
SYNTHETIC_SIZE = 128  # image side
SYNTHETIC_SEED = 0

_DEFAULT_SPLITS = {"voc": {"train": TRAIN_SPLIT, "val": VAL_SPLIT}, "coco": {"train": "train", "val": "val"}}


def build_transform(cfg: Any, train: bool) -> TrainTransform | EvalTransform:
    """:class:`TrainTransform` from keys crop_size, scale_range, flip, color_jitter, interpolation,
    resized_crop, cat_max_ratio, rand_augment (null or a timm spec such as "rand-m9-mstd0.5-inc1"),
    random_erasing (a key left out or null: the official recipe's value, the constants of
    :mod:`wsss.data.transforms`; but ``crop_size: null`` keeps the full image); or
    :class:`EvalTransform` when not training."""
    if not train:
        return EvalTransform()
    scale = cfg_get(cfg, "scale_range", SCALE_RANGE)
    return TrainTransform(
        crop_size=cfg_get(cfg, "crop_size", CROP_SIZE, keep_null=True),  # null: the full image
        scale_range=tuple(scale) if scale not in (False, "none") else None,
        flip=bool(cfg_get(cfg, "flip", FLIP)),
        color_jitter=bool(cfg_get(cfg, "color_jitter", COLOR_JITTER)),
        interpolation=str(cfg_get(cfg, "interpolation", INTERPOLATION)),
        resized_crop=bool(cfg_get(cfg, "resized_crop", RESIZED_CROP)),
        cat_max_ratio=cfg_get(cfg, "cat_max_ratio", None),
        rand_augment=build_rand_augment(cfg_get(cfg, "rand_augment", None)),
        random_erasing=float(cfg_get(cfg, "random_erasing", RANDOM_ERASING)),
    )


def _split_name(cfg: Any, kind: str, split: str) -> str:
    """A role ("train"/"val") maps through ``splits: {train: ..., val: ...}`` or ``<role>_split``."""
    splits = cfg_get(cfg, "splits", None) or {}
    if split in splits:
        return str(splits[split])
    explicit = cfg_get(cfg, f"{split}_split", None)
    if explicit is not None:
        return str(explicit)
    return _DEFAULT_SPLITS.get(kind, {}).get(split, split)


def build_dataset(cfg_data: Any, split: str, train: bool) -> Dataset:
    """Dataset from a config section.

    Keys: ``type`` (voc | coco | folder | synthetic), ``root``, ``splits``/``<role>_split``,
    ``num_classes``, ``labels_file``, ``mask_dir``, ``class_names``, ``seed``, the transform keys of
    :func:`build_transform`; folder: ``image_dir``, ``labels_file`` (or ``<split>_labels_file``),
    ``mask_dir``, ``val_fraction`` (a seeded held-out part of the labels file, ``split_seed``);
    synthetic: ``num_train``, ``num_val``, ``size``, ``synthetic_seed`` (generated into
    ``root`` when it has no split files yet, then read as VOC); ``pseudo_dir``: the training split
    reads its masks from that folder of pseudo-label PNGs (:func:`use_pseudo_labels`)."""
    dataset = _dataset(cfg_data, split, train)
    pseudo_dir = cfg_get(cfg_data, "pseudo_dir", None)
    if train and pseudo_dir is not None:
        use_pseudo_labels(dataset, pseudo_dir)
    return dataset


def _dataset(cfg_data: Any, split: str, train: bool) -> SegmentationDataset:
    """The dataset of :func:`build_dataset` before any pseudo-label folder replaces its masks."""
    kind = str(cfg_get(cfg_data, "type", DATA_TYPE)).lower()
    transform = build_transform(cfg_data, train)
    seed = int(cfg_get(cfg_data, "seed", DATA_SEED))
    labels_file = cfg_get(cfg_data, f"{split}_labels_file", None) or cfg_get(cfg_data, "labels_file", None)
    mask_dir = cfg_get(cfg_data, "mask_dir", MASK_DIR, keep_null=True)  # null: no masks
    class_names = cfg_get(cfg_data, "class_names", None)
    class_names = list(class_names) if class_names is not None else None
    if kind == "folder":
        image_dir = cfg_get(cfg_data, f"{split}_image_dir", None) or cfg_get(cfg_data, "image_dir", None)
        if image_dir is None or labels_file is None:
            raise DataError("a folder dataset needs image_dir and labels_file")
        mask_dir = None if mask_dir == "auto" else mask_dir
        return FolderDataset(image_dir, labels_file, class_names, mask_dir, transform, seed=seed,
                             holdout=_holdout(cfg_data, split))
    root = cfg_get(cfg_data, "root", None)
    if root is None:
        raise DataError(f"data config of type {kind!r} needs a root")
    name = _split_name(cfg_data, kind, split)
    if kind == "synthetic":
        num_classes = cfg_get(cfg_data, "num_classes", None)
        if not (Path(root) / "ImageSets" / "Segmentation" / "val.txt").is_file():
            from .synthetic import generate_synthetic  # lazy: keeps `python -m wsss.data.synthetic` clean
            generate_synthetic(
                root,
                num_train=int(cfg_get(cfg_data, "num_train", SYNTHETIC_NUM_TRAIN)),
                num_val=int(cfg_get(cfg_data, "num_val", SYNTHETIC_NUM_VAL)),
                size=int(cfg_get(cfg_data, "size", SYNTHETIC_SIZE)),
                seed=int(cfg_get(cfg_data, "synthetic_seed", SYNTHETIC_SEED)),
                num_classes=int(num_classes or SYNTHETIC_CLASSES),
            )
        return VOCDataset(root, name, transform, num_classes, labels_file, mask_dir, class_names, seed=seed)
    if kind == "voc":
        num_classes = cfg_get(cfg_data, "num_classes", None)
        return VOCDataset(root, name, transform, num_classes, labels_file, mask_dir, class_names, seed=seed)
    if kind == "coco":
        return COCODataset(root, name, transform, labels_file, mask_dir, class_names, seed=seed)
    raise DataError(f"unknown dataset type {kind!r} (voc, coco, folder, synthetic)")


def _holdout(cfg_data: Any, split: str) -> tuple[str, float, int] | None:
    """A folder dataset's ``data.val_fraction`` as :class:`FolderDataset`'s ``holdout``: the val split's
    part (``split`` is ``data.val_split``) or the rest; None without a fraction. With a separate
    ``val_labels_file`` too, which of the two is the val set would be ambiguous: an error."""
    fraction = cfg_get(cfg_data, "val_fraction", None)
    if fraction is None:
        return None
    if cfg_get(cfg_data, "val_labels_file", None) is not None:
        raise DataError("give data.val_fraction (a held-out part of data.labels_file) or "
                        "data.val_labels_file (a separate file), not both")
    part = "val" if split == str(cfg_get(cfg_data, "val_split", VAL_SPLIT)) else "train"
    return part, float(fraction), int(cfg_get(cfg_data, "split_seed", SPLIT_SEED))


def use_pseudo_labels(dataset: SegmentationDataset, pseudo_dir: str | Path) -> SegmentationDataset:
    """Second stage: read each image's mask from ``<pseudo_dir>/<name>.png`` (255 = ignore), in place.

    Every image must have its PNG (the missing ones are listed); the class list that ``wsss
    pseudo-labels`` writes there (``class_names.json``, before any label; ``summary.json`` at the end)
    must be the dataset's, else the PNGs' indices would mean other classes. The image-level labels stay
    the dataset's."""
    folder = Path(pseudo_dir)
    if not folder.is_dir():
        raise DataError(f"data.pseudo_dir: pseudo-label folder not found: {folder}")
    for path in (folder / PSEUDO_CLASSES_FILE, folder / "summary.json"):
        if path.is_file():
            _check_pseudo_classes(path, list(dataset.class_names))
            break
    pngs = list_stems(folder, (".png",))
    missing = [n for n in dataset.names if n not in pngs]
    if missing:
        raise missing_error("pseudo-label PNGs", missing, folder)
    dataset.mask_paths = {n: pngs[n] for n in dataset.names}
    dataset.pseudo_dir = folder
    return dataset


def read_pseudo_classes(path: Path, who: str) -> list[str]:
    """The class list (background first) of a pseudo-label folder's ``class_names.json``, or of its
    ``summary.json``'s ``"class_names"`` (an empty list where it has none); a DataError naming ``path``,
    prefixed by ``who`` (the command or key reading it), when it cannot be read or is no list."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{who}: cannot read {path}: {err}") from err
    names = data.get("class_names") if isinstance(data, dict) else data
    if not isinstance(names, list | type(None)):
        raise DataError(f"{who}: {path} must hold a list of class names, got {names!r}")
    return [str(n) for n in names or []]


def same_classes(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two class lists (background first) name the same classes in the same order, in any case."""
    return [str(n).lower() for n in a] == [str(n).lower() for n in b]


def _check_pseudo_classes(path: Path, classes: list[str]) -> None:
    """A DataError naming ``path`` and both class lists when the pseudo labels' classes (a JSON list, or
    a summary's ``"class_names"``) are not ``classes`` (background first)."""
    names = read_pseudo_classes(path, "data.pseudo_dir")
    if names and not same_classes(names, classes):
        raise DataError(f"data.pseudo_dir: {path} gives the pseudo labels {len(names)} classes {names} "
                        f"but the dataset has {len(classes)}: {classes}; make the second stage's data "
                        f"(data.class_names, the labels file's class list) match the first stage's")


def collate(batch: Sequence[dict]) -> dict:
    """Stack samples; images of different sizes are padded at the bottom/right (image 0, mask 255;
    ``img_box`` still marks each real image). Returns image (B,3,H,W), labels (B,K), mask (B,H,W),
    img_box (B,4), size (B,2) and name (list of B str)."""
    h = max(s["image"].shape[-2] for s in batch)
    w = max(s["image"].shape[-1] for s in batch)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        dh, dw = h - t.shape[-2], w - t.shape[-1]
        return F.pad(t, (0, dw, 0, dh), value=value) if dh or dw else t

    return {
        "image": torch.stack([pad(s["image"], 0.0) for s in batch]),
        "labels": torch.stack([s["labels"] for s in batch]),
        "mask": torch.stack([pad(s["mask"], IGNORE_INDEX) for s in batch]),
        "img_box": torch.stack([s["img_box"] for s in batch]),
        "size": torch.stack([s["size"] for s in batch]),
        "name": [s["name"] for s in batch],
    }


class SeededSampler(Sampler):
    """Wraps a sampler so that it yields ``(index, sample_seed)``; seeds come from a torch Generator
    seeded by (seed, rank, epoch). The epoch advances on every pass (or via :meth:`set_epoch`)."""

    def __init__(self, sampler: Sampler, seed: int, rank: int = 0) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank * 10_007 + epoch) % (2**63))
        seeds = torch.randint(0, 2**62, (len(self.sampler),), generator=g).tolist()
        yield from zip(iter(self.sampler), seeds)


class _PermutationSampler(Sampler):
    """A seeded shuffle of ``range(n)``: permutation from (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def _worker_init(worker_id: int) -> None:
    """Seed numpy, ``random`` and the dataset's generator from the worker's torch seed."""
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)  # noqa: NPY002  (for third-party transforms that use the global RNG)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """DataLoader with per-rank, per-sample seeding (module docstring).

    Training shuffles (a ``DistributedSampler`` when ``distributed``, with ``rank``/``world_size``
    from ``torch.distributed`` unless given) and drops the last incomplete batch by default;
    evaluation keeps order and every sample (a distributed eval shards without shuffling)."""
    drop_last = train if drop_last is None else drop_last
    if distributed:
        if rank is None or world_size is None:
            import torch.distributed as dist

            rank, world_size = dist.get_rank(), dist.get_world_size()
        base: Sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=False
        )
    else:
        rank = 0 if rank is None else rank
        base = _PermutationSampler(len(dataset), seed) if train else SequentialSampler(dataset)
    sampler = SeededSampler(base, seed, rank)
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        worker_init_fn=_worker_init,
        generator=g,
        pin_memory=False,
        persistent_workers=False,
    )
