"""Is the affinity the bottleneck? A method's affinity refinement run with the model's own
affinity and with a perfect ("oracle") one built from the ground-truth masks.

The method says what it compares (its :class:`~wsss.analysis.hooks.OracleRefinement` members
``oracle_batch`` and ``ORACLE_MAPS``): e.g. AFA's propagated label with the learned against the
oracle affinity (and the pair agreement of the learned affinity with the ground truth), AReAM's
CAM refined by the fused attention against the CAM refined by the oracle affinity. The gap between
the oracle map and the learned one is what a better affinity could still gain on this model's CAMs.
Single scale, no flip, eval mode, images padded to a multiple of 16.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from wsss.analysis.hooks import OracleRefinement
from wsss.engine.evaluate import image_indices
from wsss.engine.metrics import ConfusionMatrix
from wsss.methods.base import Method, pass_mode
from wsss.model import WSSSNet
from wsss.refine.labels import pair_agreement

__all__ = ["oracle_quality", "pair_agreement"]


def _samples(net: WSSSNet, dataset: Any, max_images: int | None, device: torch.device
             ) -> Iterator[tuple[Tensor, ...]]:
    """(x [0, 1] padded, labels, gt (1, h, w), gt padded with 255 to x's size) per image."""
    for idx in image_indices(dataset, max_images):
        sample = dataset[idx]
        x, (h, w) = net.pad(sample["image"][None].to(device))
        gt = sample["mask"][None].to(device)
        gt_pad = gt.new_full((1, *x.shape[-2:]), 255)
        gt_pad[:, :h, :w] = gt
        yield x, sample["labels"][None].to(device), gt, gt_pad


def _protocol(dataset: Any, max_images: int | None) -> dict[str, Any]:
    return {"images": len(image_indices(dataset, max_images)), "scales": [1.0], "flip": False}


@torch.no_grad()
def oracle_quality(
    method: Method, net: WSSSNet, dataset: Any, num_classes: int, max_images: int | None = None
) -> dict[str, Any]:
    """mIoU of each map of ``method.ORACLE_MAPS`` on a dataset with masks and, when the method learns an
    affinity, its pair agreement with the ground truth (mean affinity on same-class and
    different-class pairs, accuracy at 0.5)."""
    if not isinstance(method, OracleRefinement):
        raise ValueError(f"method '{method.name}' has no affinity refinement to compare with an oracle")
    device = next(net.parameters()).device
    sums: Tensor | None = None
    cms = {k: ConfusionMatrix(num_classes, device=device) for k in method.ORACLE_MAPS}
    with pass_mode(net, "eval"), method.flipping(False):
        for x, labels, gt, gt_pad in _samples(net, dataset, max_images, device):
            h, w = gt.shape[-2:]
            maps, pairs = method.oracle_batch(net, x, labels, gt_pad)  # one PAR kernel per image
            for k, label in maps.items():
                cms[k].update(label[:, :h, :w], gt)
            if pairs is not None:
                sums = pairs if sums is None else sums + pairs
    out: dict[str, Any] = {}
    if sums is not None:
        out["pairs"] = {
            "mean_same_class": float(sums[0] / sums[1].clamp(min=1)),
            # the same-class pairs of object tokens alone (most same-class pairs are background)
            "mean_same_class_foreground": float(sums[6] / sums[7]) if sums[7] > 0 else None,
            # None without such pairs (negatives alone), not a 0 that reads as a perfect separation
            "mean_different_class": float(sums[2] / sums[3]) if sums[3] > 0 else None,
            "accuracy": float(sums[4] / sums[5].clamp(min=1)),
            "pairs": int(sums[5]),
        }
    out["miou"] = {k: float(cm.compute()["miou"]) for k, cm in cms.items()}
    out["protocol"] = {**_protocol(dataset, max_images), **method.oracle_protocol()}
    return out
