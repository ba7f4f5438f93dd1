"""Segmentation and classification metrics, accumulated on the device of the inputs.

Confusion matrices have ground truth along rows and prediction along columns: ``mat[g, p]``.

IoU protocols (``protocol`` argument):

* ``"voc"`` (default; AFA ``utils/evaluate.py: scores``): pixels whose ground truth lies outside
  ``[0, C)`` (255 = ignore) are dropped. ``IoU_c = TP / (TP + FP + FN)``; a class absent from both the
  ground truth and the prediction gets ``nan``; a class only predicted gets 0. **mIoU is the mean over
  the classes that occur in the ground truth** (``TP + FN > 0``); classes that are only predicted do not
  enter the mean (their false positives still lower the IoU of the classes they were taken from).
  Pixel accuracy = trace / total; mean class accuracy = nanmean over classes of ``TP / (TP + FN)``.
* ``"aream"`` (AReAM ``evaluate.py``): ``IoU_c = TP / (TP + FP + FN + 1e-10)`` for every class, and mIoU
  is the plain mean over all C classes (absent classes count as 0).

Predictions outside ``[0, C)`` on valid pixels (e.g. 255 in a pseudo label) count as misses: a false
negative for the ground-truth class and a false positive for no class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

PROTOCOLS = ("voc", "aream")

# AReAM evaluate.py scans t = start/100 .. (stop-1)/100 with start 1, stop 80 in its scripts.
AREAM_THRESHOLDS = tuple(i / 100 for i in range(1, 80))


def iou_scores(mat: Tensor, missed: Tensor | None = None, protocol: str = "voc") -> dict[str, Tensor]:
    """Scores from confusion matrices.

    mat: (..., C, C) counts, rows = ground truth. missed: (..., C) valid pixels of each ground-truth
    class whose prediction was out of range (counted as false negatives), or None.
    Returns float64 tensors: ``iou`` (..., C), ``miou`` (...), ``pixel_acc`` (...), ``mean_acc`` (...).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown IoU protocol '{protocol}'; choose one of {PROTOCOLS}")
    mat = mat.double()
    tp = mat.diagonal(dim1=-2, dim2=-1)
    gt = mat.sum(-1)
    if missed is not None:
        gt = gt + missed.double()
    pred = mat.sum(-2)
    union = gt + pred - tp
    total = gt.sum(-1)
    pixel_acc = tp.sum(-1) / total
    mean_acc = torch.nanmean(tp / gt, dim=-1)  # 0/0 = nan for classes absent from the GT
    if protocol == "aream":
        iou = tp / (union + 1e-10)
        miou = iou.mean(-1)
    else:
        iou = tp / union  # nan where the class is absent from both
        miou = torch.nanmean(torch.where(gt > 0, iou, torch.full_like(iou, float("nan"))), dim=-1)
    return {"iou": iou, "miou": miou, "pixel_acc": pixel_acc, "mean_acc": mean_acc}


def most_mistaken(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Where each ground-truth class's pixels go wrong most often: the co-occurrence errors of weak
    supervision (a face labelled as the body around it, sky as the aeroplane in it).

    counts: (C, C') with C' >= C, rows = ground truth, the first C columns = predicted class (further
    columns: predictions out of range, counted in a row's total only). Returns ``index`` (C,) int64, the
    predicted class other than the row's own with the most pixels (-1 where the row has no such
    pixel; the lowest index on ties), and ``share`` (C,) float64, its pixels over the row's total
    (NaN for a class without ground-truth pixels)."""
    c = counts.shape[0]
    wrong = counts[:, :c].double().clone()
    wrong.fill_diagonal_(-1.0)
    best, index = wrong.max(dim=1)
    share = best.clamp_min(0) / counts.double().sum(1)  # 0/0 = NaN: no pixel of the class
    return torch.where(best > 0, index, torch.full_like(index, -1)), share


class ConfusionMatrix:
    """A dataset-level confusion matrix accumulated with one ``bincount`` per update.

    num_classes: C (background included). ignore_index: ground-truth value to drop (any value outside
    ``[0, C)`` is dropped as well). device: where counts live; by default the first update's device.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # Column C collects valid pixels whose prediction was out of range.
        self.counts: Tensor | None = None
        if device is not None:
            self.counts = self._zeros(torch.device(device))

    def _zeros(self, device: torch.device) -> Tensor:
        return torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (B, H, W) or (H, W) integer label maps of equal shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        c = self.num_classes
        if self.counts is None:
            self.counts = self._zeros(target.device)
        pred = pred.to(self.counts.device).long().reshape(-1)
        target = target.to(self.counts.device).long().reshape(-1)
        valid = (target >= 0) & (target < c) & (target != self.ignore_index)
        pred, target = pred[valid], target[valid]
        pred = torch.where((pred >= 0) & (pred < c), pred, torch.full_like(pred, c))
        self.counts += torch.bincount(target * (c + 1) + pred, minlength=c * (c + 1)).view(c, c + 1)

    @property
    def matrix(self) -> Tensor:
        """(C, C) counts, rows = ground truth, columns = prediction."""
        return self._counts()[:, : self.num_classes]

    def _counts(self) -> Tensor:
        return self.counts if self.counts is not None else self._zeros(torch.device("cpu"))

    def all_reduce(self) -> None:
        """Sum the counts over all ranks (no-op unless torch.distributed is initialised).

        Every rank must call it; on a rank that saw no data the counts are created on the device the
        process group expects (CUDA for nccl, else CPU).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.counts is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            self.counts = self._zeros(dev or torch.device("cpu"))
        dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)

    def compute(self, protocol: str = "voc") -> dict[str, Any]:
        """Scores as Python numbers: ``iou`` (list of C), ``miou``, ``pixel_acc``, ``mean_acc``, and each
        class's most frequent mistake (:func:`most_mistaken`): ``mistaken_for`` (list of C, a class
        index or None) and ``mistaken_share`` (list of C; None for a class without ground truth)."""
        counts = self._counts()
        s = iou_scores(counts[:, : self.num_classes], counts[:, self.num_classes], protocol)
        index, share = most_mistaken(counts)
        return {"iou": s["iou"].tolist(), **{k: float(s[k]) for k in ("miou", "pixel_acc", "mean_acc")},
                "mistaken_for": [None if i < 0 else i for i in index.tolist()],
                "mistaken_share": [None if x != x else x for x in share.tolist()]}

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts to this one (in place) and return self."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices with different numbers of classes")
        if other.counts is not None:
            if self.counts is None:
                self.counts = self._zeros(other.counts.device)
            self.counts += other.counts.to(self.counts.device)
        return self

    def reset(self) -> None:
        if self.counts is not None:
            self.counts.zero_()

    def state_dict(self) -> dict[str, object]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "counts": self._counts().cpu().clone()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError("state holds a different number of classes")
        counts = state["counts"]
        assert isinstance(counts, Tensor)
        device = self.counts.device if self.counts is not None else counts.device
        self.counts = counts.to(device=device, dtype=torch.long).clone()


# ---------------------------------------------------------------------------------------------
# Background-threshold sweep (AReAM evaluate.py, all thresholds in one pass)
# ---------------------------------------------------------------------------------------------


def _sweep_one(cams: Tensor, labels: Tensor, gt: Tensor, thr_sorted: Tensor, num_classes: int,
               ignore_index: int) -> Tensor:
    """Counts H (T+1, C, C): H[k, g, c] = valid pixels with GT g, best present class c (label id) and
    exactly k sorted thresholds strictly below the best score.
    cams (B, K, H, W), labels (B, K), gt (B, H, W)."""
    c = num_classes
    present = labels.to(cams.device).bool()[:, :, None, None]
    masked = cams.float().masked_fill(~present, float("-inf"))
    fg_max, fg_arg = masked.max(dim=1)  # first max wins, as np.argmax
    # Background (index 0, constant t) wins ties: a pixel is foreground for t < fg_max only.
    k = torch.searchsorted(thr_sorted, fg_max.contiguous(), right=False)
    gt = gt.to(cams.device).long()
    valid = (gt >= 0) & (gt < c) & (gt != ignore_index)
    k, g, p = k[valid], gt[valid], fg_arg[valid] + 1
    t1 = thr_sorted.numel() + 1
    idx = (k * c + g) * c + p
    return torch.bincount(idx, minlength=t1 * c * c).view(t1, c, c)


def threshold_sweep(
    cams: Tensor | Sequence[Tensor],
    labels: Tensor | Sequence[Tensor],
    gt: Tensor | Sequence[Tensor],
    thresholds: Tensor | Sequence[float],
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Confusion matrices of the background-threshold sweep, for every threshold at once.

    For each threshold t the prediction is AReAM's: a constant background channel = t is prepended to
    the CAMs of the classes present in ``labels`` (absent classes never win), argmax (background wins
    ties, then the lowest class index), channel k -> label id k (0 = background).

    cams: (B, K, H, W) scores normalised to [0, 1], or a list of (K, H_i, W_i). labels: (B, K) multi-hot
    (or a list of (K,)). gt: (B, H, W) label ids with ``ignore_index`` (or a list of (H_i, W_i)).
    thresholds: (T,). num_classes: C, default K + 1.
    Returns (T, C, C) int64 counts (rows = GT) in the order of ``thresholds``.
    """
    if isinstance(cams, Tensor):
        cams_list, labels_list, gt_list = [cams], [torch.as_tensor(labels)], [torch.as_tensor(gt)]
    else:
        cams_list = [x.unsqueeze(0) for x in cams]
        labels_list = [torch.as_tensor(x).reshape(1, -1) for x in labels]
        gt_list = [torch.as_tensor(x).unsqueeze(0) for x in gt]
    if not cams_list:
        raise ValueError("threshold_sweep needs at least one CAM")
    device = cams_list[0].device
    c = num_classes if num_classes is not None else cams_list[0].shape[1] + 1
    thr = torch.as_tensor(thresholds, dtype=torch.float32, device=device).reshape(-1)
    thr_sorted, order = thr.sort()
    parts = zip(cams_list, labels_list, gt_list)
    hist = sum(_sweep_one(x, y, z, thr_sorted, c, ignore_index) for x, y, z in parts)
    assert isinstance(hist, Tensor)
    # Sorted threshold j: foreground prediction when k > j, background (column 0) when k <= j.
    fg = hist.flip(0).cumsum(0).flip(0)[1:]  # (T, C, C): sum over k > j
    bg = hist.sum(-1).cumsum(0)[:-1]  # (T, C): sum over k <= j
    out = fg.clone()
    out[:, :, 0] += bg
    result = torch.empty_like(out)
    result[order] = out
    return result


class SweepAccumulator:
    """Accumulates :func:`threshold_sweep` over a dataset and reports the best threshold.

    protocol: ``"aream"`` by default (AReAM ``evaluate.py``: mean over all C classes, +1e-10); ``"voc"``
    gives the AFA protocol. The best threshold is chosen on the ground truth (an oracle, as in the
    paper's seed numbers); ties go to the first threshold in the given order.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float] | Tensor = AREAM_THRESHOLDS,
                 ignore_index: int = 255, protocol: str = "aream"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown IoU protocol '{protocol}'; choose one of {PROTOCOLS}")
        self.num_classes = num_classes
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
        self.ignore_index = ignore_index
        self.protocol = protocol
        self.counts: Tensor | None = None

    @torch.no_grad()
    def update(self, cams: Tensor | Sequence[Tensor], labels: Tensor | Sequence[Tensor],
               gt: Tensor | Sequence[Tensor]) -> None:
        """Arguments as :func:`threshold_sweep`."""
        mats = threshold_sweep(cams, labels, gt, self.thresholds, self.num_classes, self.ignore_index)
        self.counts = mats if self.counts is None else self.counts + mats.to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum over ranks (no-op without an initialised process group; every rank must have updated)."""
        if self.counts is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, object]:
        """``miou`` (T,) per threshold, ``best_threshold``, ``best_miou`` and the best ``iou`` list."""
        if self.counts is None:
            raise RuntimeError("SweepAccumulator.compute called before any update")
        s = iou_scores(self.counts, protocol=self.protocol)
        miou = s["miou"].cpu()
        best = int(torch.nan_to_num(miou, nan=float("-inf")).argmax())  # first maximum
        return {"thresholds": self.thresholds.tolist(), "miou": miou.tolist(),
                "best_threshold": float(self.thresholds[best]), "best_miou": float(miou[best]),
                "iou": s["iou"][best].tolist()}


# ---------------------------------------------------------------------------------------------
# Multi-label classification scores
# ---------------------------------------------------------------------------------------------


def multilabel_f1(logits: Tensor, labels: Tensor, threshold: float = 0.0,
                  zero_division: float = 0.0) -> Tensor:
    """Mean per-image F1 of ``logits > threshold`` against ``labels`` (AFA's cls score; equals sklearn
    ``f1_score(average="samples")``, AReAM's val score).

    logits, labels: (B, K). Images with no true and no predicted label score ``zero_division``.
    Returns a 0-d float64 tensor.
    """
    pred = logits > threshold
    true = labels > 0.5
    tp = (pred & true).sum(-1).double()
    denom = pred.sum(-1).double() + true.sum(-1).double()
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(tp, zero_division))
    return f1.mean()


def _average_precision_rows(scores: Tensor, labels: Tensor) -> Tensor:
    """AP of each row (sklearn's step definition, tied scores grouped). scores, labels (R, K) -> (R,);
    nan for rows without a positive."""
    s, order = scores.double().sort(dim=-1, descending=True)
    y = labels.gather(-1, order).double()
    n = s.shape[-1]
    pos = torch.arange(n, device=s.device)
    # A tie group ends where the next score differs; every member takes the precision at its end.
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:, :-1] = s[:, 1:] != s[:, :-1]
    end_idx = torch.where(is_end, pos, torch.full_like(pos, n)).flip(-1).cummin(-1).values.flip(-1)
    tp = y.cumsum(-1)
    precision = tp.gather(-1, end_idx) / (end_idx + 1).double()
    npos = y.sum(-1)
    return (y * precision).sum(-1) / npos  # 0/0 -> nan for rows without positives


def multilabel_map(scores: Tensor, labels: Tensor, average: str = "samples") -> Tensor:
    """Mean average precision for multi-label scores (B, K) against multi-hot labels (B, K).

    average: ``"samples"`` (MCTformer / AReAM val mAP: AP over the classes of each image, averaged over
    images with at least one positive) or ``"macro"`` (AP of each class over the images, averaged over
    classes with at least one positive). Returns a 0-d float64 tensor.
    """
    labels = (labels > 0.5).long()
    if average == "samples":
        ap = _average_precision_rows(scores, labels)
    elif average == "macro":
        ap = _average_precision_rows(scores.t(), labels.t())
    else:
        raise ValueError(f"unknown average '{average}'; choose 'samples' or 'macro'")
    return torch.nanmean(ap)
