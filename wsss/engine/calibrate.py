"""Thresholds calibrated on a few masks (``wsss calibrate``): each map's background score, the
pseudo label's high / low pair and, for a model without a segmentation head, the classifier's
presence threshold.

The background scores shipped in the configs were chosen on the synthetic set; real photographs
want others. A sweep evaluates a map once per candidate value on the images that have masks (a
method reads its thresholds from its config, so every candidate is a method built on a copy of the
config, over the same network and the same batches, held in memory: calibration sets are small).
The pseudo label's ``cam.high`` / ``cam.low`` move together (their gap kept) and are chosen by the
mIoU with uncertain pixels counted as wrong, so that shrinking the certain region is not a gain.
The presence threshold is chosen on the training images' labels (no mask needed): the one of best
F1 over all (image, class) pairs, and per class where that class's F1 is better with its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from wsss.engine.metrics import ConfusionMatrix
from wsss.methods import build_method

#: Candidate background scores (and pseudo-label shifts are made to land on the same grid).
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


def with_value(cfg: Any, key: str, value: Any) -> Any:
    """A copy of ``cfg`` with the dotted ``key`` set to ``value``."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.update(out, key, value, force_add=True)
    return out


@torch.no_grad()
def map_forwards(cfg: Any, net: Any, batches: Sequence[dict[str, Tensor]], maps: Sequence[str],
                 scales: list[float], flip: bool) -> list[dict[str, Any]]:
    """The evaluation forwards of every batch for the label maps ``maps``, run once: a sweep then
    builds each candidate's maps from them (the thresholds act after the network). Each entry: the
    :class:`~wsss.methods.base.MapInput` ``inp``, the unpadded ``size`` and the ``mask``."""
    method = build_method(cfg, net)
    want = {"pseudo" if m == "pseudo_strict" else m for m in maps}
    out = []
    for b in batches:
        x, size = net.pad(b["image"])
        out.append({"inp": method.eval_forwards(net, x, b["labels"], scales, flip, want), "size": size,
                    "mask": b["mask"]})
    return out


def map_miou(cfg: Any, net: Any, forwards: Sequence[dict[str, Any]], name: str, num_classes: int) -> float:
    """mIoU of the label map ``name`` of the method of ``cfg`` over the evaluation ``forwards``
    (:func:`map_forwards`). A pseudo label's uncertain (255) pixels count as a miss of the
    ground-truth class (evaluate's 'pseudo_strict')."""
    method = build_method(cfg, net)
    cm = ConfusionMatrix(num_classes, device=forwards[0]["mask"].device)
    for f in forwards:
        (h, w), inp = f["size"], f["inp"]
        pred = method.label_maps(net, inp, {name})[name]  # one PAR kernel of the batch for the call
        cm.update(pred[:, :h, :w], f["mask"])
    return float(cm.compute()["miou"])


def sweep_key(cfg: Any, net: Any, forwards: Sequence[dict[str, Any]], name: str, key: str,
              grid: Sequence[float], num_classes: int) -> dict[str, Any]:
    """The curve of map ``name`` over ``key`` in ``grid``: {key, thresholds, miou, best, best_miou,
    before, before_miou}; the best is the first maximum (the lowest value on ties)."""
    before = OmegaConf.select(cfg, key)
    if before is None and key == "aream.bkg_score":  # null: the raw CAM's score
        before = float(cfg.eval.bkg_score)
    curve = [map_miou(with_value(cfg, key, float(t)), net, forwards, name, num_classes) for t in grid]
    best = max(range(len(grid)), key=lambda i: (curve[i], -i))
    now = map_miou(cfg, net, forwards, name, num_classes)
    return {"key": key, "thresholds": [float(t) for t in grid], "miou": curve, "best": float(grid[best]),
            "best_miou": curve[best], "before": float(before), "before_miou": now}


def sweep_pseudo(cfg: Any, net: Any, forwards: Sequence[dict[str, Any]], grid: Sequence[float],
                 num_classes: int) -> dict[str, Any]:
    """The pseudo label over ``cam.high`` / ``cam.low`` moved together (gap kept, both in [0, 1]): the
    high value runs over ``grid``; chosen by the mIoU with uncertain pixels counted as wrong."""
    high, low = float(cfg.cam.high), float(cfg.cam.low)
    gap = high - low
    highs = [float(t) for t in grid if t - gap >= 0.0]
    curve = []
    for h in highs:
        c = with_value(with_value(cfg, "cam.high", h), "cam.low", round(h - gap, 6))
        curve.append(map_miou(c, net, forwards, "pseudo", num_classes))
    best = max(range(len(highs)), key=lambda i: (curve[i], -i))
    now = map_miou(cfg, net, forwards, "pseudo", num_classes)
    return {"key": "cam.high", "low_key": "cam.low", "gap": gap, "thresholds": highs, "miou": curve,
            "best": highs[best], "best_low": round(highs[best] - gap, 6), "best_miou": curve[best],
            "before": high, "before_low": low, "before_miou": now}


def f1_counts(scores: Tensor, labels: Tensor, grid: Tensor) -> Tensor:
    """(T, K, 3) true positives, false positives, false negatives of ``scores > t`` for every t of
    ``grid`` (T,), scores and labels (N, K)."""
    pred = scores[None] > grid[:, None, None]  # (T, N, K)
    true = labels[None] > 0.5
    tp = (pred & true).sum(1)
    fp = (pred & ~true).sum(1)
    fn = (~pred & true).sum(1)
    return torch.stack([tp, fp, fn], dim=-1).double()


def choose_presence(scores: Tensor, labels: Tensor, grid: Sequence[float]) -> dict[str, Any]:
    """Presence thresholds from classifier scores (N, K) in [0, 1] and labels (N, K): the global one of
    best micro F1, and per class its own where that class's F1 is higher. Returns {global, per_class
    (K,), f1_global, f1_per_class (K,), f1_at_0.5}."""
    g = torch.tensor([float(t) for t in grid], dtype=scores.dtype)
    counts = f1_counts(scores, labels, g)  # (T, K, 3)

    def f1(c: Tensor) -> Tensor:  # (..., 3) -> (...)
        return 2 * c[..., 0] / (2 * c[..., 0] + c[..., 1] + c[..., 2]).clamp_min(1)

    micro = f1(counts.sum(1))  # (T,)
    gi = int(torch.argmax(micro))  # the first maximum: the lowest threshold on ties
    per = f1(counts)  # (T, K)
    own = per.argmax(0)  # (K,)
    better = per.gather(0, own[None])[0] > per[gi]
    chosen = torch.where(better, g[own], g[gi])
    half = f1(f1_counts(scores, labels, torch.tensor([0.5], dtype=scores.dtype)).sum(1))[0]
    return {"global": float(g[gi]), "per_class": chosen.tolist(), "f1_global": float(micro[gi]),
            "f1_per_class": per.gather(0, own[None])[0].tolist(), "f1_at_0.5": float(half)}


@torch.no_grad()
def classifier_scores(net: Any, batches: Sequence[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """(scores (N, K) = sigmoid of the classifier's logits at scale 1, labels (N, K)) over ``batches``
    of padded [0, 1] images (what `wsss predict` thresholds)."""
    scores, labels = [], []
    for b in batches:
        x, _ = net.pad(b["image"])
        scores.append(net(x, with_seg=False, heads=False).logits[0].sigmoid().float().cpu())
        labels.append(b["labels"].float().cpu())
    return torch.cat(scores), torch.cat(labels)
