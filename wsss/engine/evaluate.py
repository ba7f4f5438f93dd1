"""Evaluation: mIoU of every label map a method produces (CAM, refined CAM, pseudo label, seg).

Images are evaluated at full resolution one at a time (their sizes differ), padded to a multiple
of 16 for the backbone and cropped back. Confusion matrices accumulate on the device and are
all-reduced under DDP. Ignored pixels of a pseudo label (255) are left out of its confusion
matrix, and the share of ground-truth pixels it covers is reported next to its mIoU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from wsss.data.transforms import denormalize
from wsss.engine.distributed import all_reduce_sum
from wsss.engine.metrics import ConfusionMatrix
from wsss.methods.base import Method
from wsss.model import WSSSNet


def pad_batch(x: Tensor, multiple: int = 16) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad (the normalised mean colour) right/bottom to a multiple; returns the original size."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)


@torch.no_grad()
def predict_maps(
    method: Method, net: WSSSNet, image: Tensor, labels: Tensor, scales: list[float], flip: bool
) -> dict[str, Tensor]:
    """Label maps (B, H, W) for a normalised image batch (B, 3, H, W) of any size."""
    x, (h, w) = pad_batch(image)
    maps = method.predict(net, x, denormalize(x), labels, scales, flip)
    return {k: v[:, :h, :w] for k, v in maps.items()}


@torch.no_grad()
def evaluate(
    method: Method,
    net: WSSSNet,
    dataset: Dataset,
    num_classes: int,
    device: torch.device,
    scales: list[float] | None = None,
    flip: bool = False,
    max_images: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """mIoU per label map over ``dataset`` (sharded by rank). num_classes includes background."""
    was = net.training
    net.eval()
    scales = list(scales or [1.0])
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    cms: dict[str, ConfusionMatrix] = {}
    covered = torch.zeros(2, dtype=torch.float64, device=device)  # pseudo: labelled, valid gt
    for idx in range(rank, n, world_size):
        sample = dataset[idx]
        image = sample["image"][None].to(device)
        labels = sample["labels"][None].to(device)
        gt = sample["mask"][None].to(device)
        for name, pred in predict_maps(method, net, image, labels, scales, flip).items():
            target = gt
            if name == "pseudo":
                valid = gt != 255
                covered += torch.stack([(valid & (pred != 255)).sum(), valid.sum()]).double()
                target = gt.masked_fill(pred == 255, 255)
                pred = pred.masked_fill(pred == 255, 0)
            cms.setdefault(name, ConfusionMatrix(num_classes, device=device)).update(pred, target)
    net.train(was)
    results: dict[str, Any] = {}
    for name in sorted(cms):
        cm = cms[name]
        if world_size > 1:
            cm.all_reduce()
        results[name] = cm.compute()
    if world_size > 1:
        covered = all_reduce_sum(covered)
    if "pseudo" in results and covered[1] > 0:
        results["pseudo"]["coverage"] = float(covered[0] / covered[1])
    results["_protocol"] = {"images": n, "scales": scales, "flip": flip, "crf": False}
    return results


def miou_table(results: dict[str, Any], class_names: list[str] | None = None) -> str:
    """A markdown table: one row per label map with mIoU (and coverage for pseudo labels)."""
    rows = ["| map | mIoU | pixel acc | note |", "|---|---:|---:|---|"]
    for name, res in results.items():
        if name.startswith("_"):
            continue
        note = f"coverage {res['coverage']:.1%}" if "coverage" in res else ""
        rows.append(f"| {name} | {100 * res['miou']:.2f} | {100 * res['pixel_acc']:.2f} | {note} |")
    return "\n".join(rows)
