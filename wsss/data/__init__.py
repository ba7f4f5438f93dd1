"""Datasets (VOC, COCO, your own folder, synthetic), augmentation, robust IO and loaders.

Every dataset returns the sample dict documented in :class:`wsss.data.base.SegmentationDataset`
and exposes ``class_names`` / ``num_classes``; :func:`build_dataset` / :func:`build_loader` build
them from a config section.
"""

from .base import SegmentationDataset
from .build import SeededSampler, build_dataset, build_loader, build_transform, collate
from .coco import COCO_CLASSES, COCODataset, convert_coco_instances
from .folder import FolderDataset
from .io import IGNORE_INDEX, DataError, load_image, load_mask, save_mask, voc_palette
from .labels_file import convert_cls_labels_npy, read_labels_file
from .transforms import (
    EvalTransform,
    TrainTransform,
    color_jitter,
    image01_to_uint8,
    random_crop,
    random_hflip,
    random_rescale,
    random_resized_crop,
    to_image01,
)
from .voc import VOC_CLASSES, VOCDataset


def __getattr__(name: str) -> object:  # lazy: `python -m wsss.data.synthetic` must not import it twice
    if name in ("generate_synthetic", "render_sample"):
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'wsss.data' has no attribute {name!r}")


__all__ = [
    "COCO_CLASSES",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "COCODataset",
    "DataError",
    "EvalTransform",
    "FolderDataset",
    "SeededSampler",
    "SegmentationDataset",
    "TrainTransform",
    "VOCDataset",
    "build_dataset",
    "build_loader",
    "build_transform",
    "collate",
    "color_jitter",
    "convert_cls_labels_npy",
    "convert_coco_instances",
    "generate_synthetic",
    "load_image",
    "load_mask",
    "image01_to_uint8",
    "to_image01",
    "random_crop",
    "random_hflip",
    "random_rescale",
    "random_resized_crop",
    "read_labels_file",
    "render_sample",
    "save_mask",
    "voc_palette",
]
