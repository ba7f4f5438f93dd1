"""Is the affinity the bottleneck? Each method's affinity refinement run with the model's own
affinity and with a perfect ("oracle") one built from the ground-truth masks.

* AFA (:func:`affinity_quality`): pair agreement of the learned affinity with the ground truth, and the
  propagated-label mIoU with the learned against the oracle affinity (1 for token pairs of the same
  class, 0 otherwise, inside the AFA window), through exactly the same propagation and PAR.
* AReAM (:func:`refinement_quality`): the CAM refined by the fused attention against the CAM refined
  by the oracle affinity (same-class pairs, each row normalised to sum 1).

The gap ``oracle_par - learned_par`` (``oracle_par - refined_par``) is what a better affinity could
still gain on this model's CAMs; ``oracle_par - cam_par`` is the most the refinement itself can add.
Single scale, no flip, eval mode, images padded to a multiple of 16.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from wsss.data.transforms import denormalize
from wsss.engine.evaluate import num_images, pad_batch
from wsss.engine.metrics import ConfusionMatrix
from wsss.methods.base import Method, pass_mode, resize, with_background
from wsss.model import WSSSNet
from wsss.refine.labels import affinity_labels, cam_to_label


def pair_agreement(aff: Tensor, target: Tensor) -> Tensor:
    """Sums over the labelled token pairs, to be accumulated over a dataset.

    Args:
        aff: (B, N, N) predicted affinity in [0, 1].
        target: (B, N, N) long in {0, 1, 255 = ignored} (:func:`wsss.refine.labels.affinity_labels`).
    Returns:
        float64 (6,): [sum of aff on positives, #positives, sum of aff on negatives, #negatives,
        #pairs whose (aff > 0.5) equals the label, #labelled pairs].
    """
    a = aff.double()
    pos, neg = target == 1, target == 0
    correct = ((a > 0.5) == pos) & (pos | neg)
    return torch.stack([
        (a * pos).sum(), pos.sum().double(), (a * neg).sum(), neg.sum().double(),
        correct.sum().double(), (pos | neg).sum().double(),
    ]).cpu()


def _samples(dataset: Any, max_images: int | None, device: torch.device) -> Iterator[tuple[Tensor, ...]]:
    """(x padded, image01, labels, gt (1, h, w), gt padded with 255 to x's size) per image."""
    for idx in range(num_images(dataset, max_images)):
        sample = dataset[idx]
        x, (h, w) = pad_batch(sample["image"][None].to(device))
        gt = sample["mask"][None].to(device)
        gt_pad = gt.new_full((1, *x.shape[-2:]), 255)
        gt_pad[:, :h, :w] = gt
        yield x, denormalize(x), sample["labels"][None].to(device), gt, gt_pad


def _protocol(dataset: Any, max_images: int | None) -> dict[str, Any]:
    return {"images": num_images(dataset, max_images), "scales": [1.0], "flip": False}


@torch.no_grad()
def affinity_quality(
    method: Method, net: WSSSNet, dataset: Any, num_classes: int, max_images: int | None = None
) -> dict[str, Any]:
    """Learned vs oracle affinity of an AFA model on a dataset with masks (single scale, no flip).

    ``method`` must be an AFA method (``propagate`` and ``window``). Returns the pair agreement
    (mean affinity on same-class and different-class pairs, accuracy at 0.5) and the mIoU of
    ``cam_par`` (the CAM with PAR), ``learned_par`` (propagated with the learned affinity, then PAR,
    as the 'aff_par' map) and ``oracle_par`` (the same with the ground-truth affinity).
    """
    if net.aff_head is None or not hasattr(method, "propagate"):
        raise ValueError("affinity_quality needs an AFA model and method (cfg.method: afa)")
    device = next(net.parameters()).device
    sums = torch.zeros(6, dtype=torch.float64)
    cms = {k: ConfusionMatrix(num_classes, device=device) for k in ("cam_par", "learned_par", "oracle_par")}
    bkg, aff_bkg = float(method.cfg.eval.bkg_score), float(method.cfg.eval.aff_bkg_score)
    sampling = str(method.cfg.afa.sampling)
    with pass_mode(net, "eval"), method.flipping(False):
        for x, image01, labels, gt, gt_pad in _samples(dataset, max_images, device):
            h, w = gt.shape[-2:]
            cam = method.multiscale_cam(net, x, [1.0]) * labels[..., None, None]
            out = net.forward_cam(x, net.aff_layers)
            grid = out.grids[net.aff_layers[-1]]
            target = affinity_labels(gt_pad, grid, method.window(grid, device), sampling=sampling)
            sums += pair_agreement(out.aff, target)
            cam_par = method.par_argmax(image01, with_background(cam, bkg), labels)
            cms["cam_par"].update(cam_par[:, :h, :w], gt)
            for name, aff in (("learned_par", out.aff), ("oracle_par", (target == 1).to(out.aff.dtype))):
                scores = resize(method.propagate(cam, aff, grid, labels, aff_bkg), tuple(x.shape[-2:]))
                cms[name].update(method.par_argmax(image01, scores, labels)[:, :h, :w], gt)
    return {
        "pairs": {
            "mean_same_class": float(sums[0] / sums[1].clamp(min=1)),
            "mean_different_class": float(sums[2] / sums[3].clamp(min=1)),
            "accuracy": float(sums[4] / sums[5].clamp(min=1)),
            "pairs": int(sums[5]),
        },
        "miou": {k: float(cm.compute()["miou"]) for k, cm in cms.items()},
        "protocol": {**_protocol(dataset, max_images), "window_radius": int(method.cfg.afa.radius),
                     "aff_bkg_score": aff_bkg, "sampling": sampling},
    }


@torch.no_grad()
def refinement_quality(
    method: Method, net: WSSSNet, dataset: Any, num_classes: int, max_images: int | None = None
) -> dict[str, Any]:
    """AReAM: mIoU of the CAM, of the CAM refined by the uniform mean of all final-grid layers (the
    official inference, the 'refined' map) and of the CAM refined by the oracle affinity, each as
    is (background score ``eval.bkg_score``) and after PAR. ``method`` must be an AReAM method."""
    if not hasattr(method, "aream_cam"):
        raise ValueError("refinement_quality needs an AReAM method (cfg.method: aream)")
    device = next(net.parameters()).device
    names = ("cam", "refined", "oracle")
    cms = {f"{k}{p}": ConfusionMatrix(num_classes, device=device) for k in names for p in ("", "_par")}
    bkg = float(method.cfg.eval.bkg_score)
    sampling = str(method.cfg.aream.sampling)
    # no flip: one pass per image, so the oracle rows line up with the CAM rows
    with pass_mode(net, "eval"), method.flipping(False):
        for x, image01, labels, gt, gt_pad in _samples(dataset, max_images, device):
            h, w = gt.shape[-2:]

            def oracle(grid: tuple[int, int], target: Tensor = gt_pad) -> Tensor:
                same = (affinity_labels(target, grid, None, sampling=sampling) == 1).float()
                return same / same.sum(-1, keepdim=True).clamp(min=1)

            maps = {
                "cam": method.multiscale_cam(net, x, [1.0]) * labels[..., None, None],
                "refined": method.aream_cam(net, x, labels, method.layers, None, [1.0]),
                "oracle": method.aream_cam(net, x, labels, method.layers, None, [1.0], affinity=oracle),
            }
            for k, cam in maps.items():
                par = method.par_argmax(image01, with_background(cam, bkg), labels)
                cms[k].update(cam_to_label(cam, labels, bkg_score=bkg)[:, :h, :w], gt)
                cms[f"{k}_par"].update(par[:, :h, :w], gt)
    return {
        "miou": {k: float(cm.compute()["miou"]) for k, cm in cms.items()},
        "protocol": {**_protocol(dataset, max_images), "bkg_score": bkg, "layers": list(method.layers),
                     "oracle": "same-class token pairs, rows normalised to 1", "sampling": sampling},
    }
