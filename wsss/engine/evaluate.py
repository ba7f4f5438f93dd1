"""Evaluation: mIoU of every label map a method produces (CAM, refined CAM, pseudo label, seg).

Images ([0, 1] RGB, normalised by the network) are evaluated at full resolution, padded by the
network (:meth:`wsss.model.WSSSNet.pad`) and cropped back; images of the same size go through the
network together (up to ``batch_size``, loaded by a DataLoader with ``num_workers``), images of
different sizes never (padding them to a common size would change the CAM normalisation and PAR).
Confusion matrices accumulate on the device and are all-reduced under DDP. A pseudo label's
uncertain pixels (255) are scored both ways: left out ('pseudo', with the share of ground-truth
pixels it covers) and counted as wrong ('pseudo_strict', the rule of a scorer that knows no ignore
value in predictions).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from wsss.config.sections import EvalConfig
from wsss.data.build import collate
from wsss.data.transforms import image01_to_uint8
from wsss.engine.distributed import all_reduce_sum
from wsss.engine.metrics import ConfusionMatrix, SweepAccumulator
from wsss.methods.base import MapInput, Method
from wsss.model import WSSSNet

_EVAL = EvalConfig()  # the ``eval`` section's defaults

# How a map's mIoU treats its uncertain pixels (printed in the tables).
MAP_NOTES = {"pseudo": "uncertain (255) pixels left out",
             "pseudo_strict": "the pseudo label with its uncertain (255) pixels counted as wrong"}


def spread(indices: Sequence[int], count: int | None) -> list[int]:
    """At most ``count`` of ``indices``, evenly spaced over them (all of them when ``count`` is None or
    not smaller): split lists are sorted by file name and names often group a class (MSRC's
    ``<row>_<n>_s``), so the first ``count`` would be a few classes, no sample of the split."""
    indices = list(indices)
    if count is None or int(count) >= len(indices):
        return indices
    if int(count) < 0:
        raise ValueError(f"max_images must be >= 0, got {count}")
    return [indices[i * len(indices) // int(count)] for i in range(int(count))]


def image_indices(dataset: Any, max_images: int | None) -> list[int]:
    """The indices of the images a pass over at most ``max_images`` of ``dataset`` visits
    (:func:`spread` over the split; all of them without a limit)."""
    return spread(range(len(dataset)), max_images)


def same_size_batches(
    dataset: Dataset, indices: Sequence[int], batch_size: int = 1, num_workers: int = 0
) -> Iterator[dict[str, Any]]:
    """Batches (as :func:`wsss.data.build.collate`) of the samples at ``indices``, each of at most
    ``batch_size`` images of one size; samples are read by a DataLoader with ``num_workers``."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=list)
    for samples in loader:
        groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for sample in samples:
            groups.setdefault(tuple(sample["image"].shape), []).append(sample)
        yield from (collate(group) for group in groups.values())
def leave_out_uncertain(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A label map with 255 = uncertain scored with those pixels left out: (pred, target) of the same
    shape with the uncertain pixels ignored in the target, and float64 (2,) counts (labelled valid
    pixels, valid pixels) whose ratio is the coverage. pred, gt: integer (..., H, W)."""
    uncertain, valid = pred == 255, gt != 255
    counts = torch.stack([(valid & ~uncertain).sum(), valid.sum()]).double()
    return pred.masked_fill(uncertain, 0), gt.masked_fill(uncertain, 255), counts


@torch.no_grad()
def predict_maps(
    method: Method, net: WSSSNet, image: Tensor, labels: Tensor, scales: list[float], flip: bool,
    maps: Collection[str] | None = None, msc_seg: bool = False,
) -> dict[str, Tensor]:
    """Label maps (B, H, W) for a [0, 1] image batch (B, 3, H, W) of any size; only the named
    ``maps`` are computed (None: every map of the method). ``msc_seg``: 'seg' is the multi-scale
    (+flip) prediction, from the CAM's own forwards (:meth:`~wsss.methods.base.Method.predict`)."""
    x, (h, w) = net.pad(image)
    out = method.predict(net, x, labels, scales, flip, maps=maps, msc_seg=msc_seg)
    return {k: v[:, :h, :w] for k, v in out.items()}


def crf_seg(logits: Tensor, image01: Tensor) -> Tensor:
    """Dense CRF (AFA test preset) on softmax(logits): (B, C, H, W), (B, 3, H, W) -> labels (B, H, W)."""
    from wsss.refine.crf import crf_preset

    probs = logits.float().softmax(1).cpu()
    images = image01_to_uint8(image01).cpu().numpy()
    out = [crf_preset(img, p).argmax(0) for img, p in zip(images, probs)]  # the default: AFA's test CRF
    return torch.stack(out).to(logits.device)


@torch.no_grad()
def sweep_cam(
    method: Method, net: WSSSNet, image: Tensor, labels: Tensor, scales: list[float], flip: bool
) -> Tensor:
    """CAM (B, K, H, W) in [0, 1] for the background-threshold sweep: the method's
    :meth:`~wsss.methods.base.Method.score_cam` (its refined CAM when it has one); masked by ``labels``."""
    x, (h, w) = net.pad(image)
    with method.flipping(flip):
        cam = method.score_cam(net, x, labels, scales)
    return cam[..., :h, :w]


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
    crf: bool = False,
    sweep: bool = False,
    sweep_thresholds: list[float] | None = None,
    batch_size: int = 1,
    num_workers: int = _EVAL.num_workers,
    maps: Collection[str] | None = None,
) -> dict[str, Any]:
    """mIoU per label map over ``dataset`` (sharded by rank). num_classes includes background.

    batch_size: images of one size evaluated together; num_workers: DataLoader workers reading them.
    maps: only these label maps are computed ('pseudo_strict' comes with 'pseudo'; None: all).

    With several scales or flip, the 'seg' map is the multi-scale seg prediction
    (:meth:`~wsss.methods.base.Method.multiscale_segment`);
    ``crf``: the 'seg' map is post-processed with the dense CRF (AFA test preset);
    ``sweep``: the AReAM background-threshold sweep on the (refined) CAM, reported under '_sweep'.
    """
    was = net.training
    net.eval()
    scales = list(scales or _EVAL.scales)
    indices = image_indices(dataset, max_images)
    n = len(indices)
    cms: dict[str, ConfusionMatrix] = {}
    covered = torch.zeros(2, dtype=torch.float64, device=device)  # pseudo: labelled, valid gt
    if crf:
        _require_crf()  # fail before the first image
    msc_seg = crf or flip or scales != [1.0]
    want = None if maps is None else {"pseudo" if m == "pseudo_strict" else m for m in maps}
    crf_seg_map, now = _crf_split(method, net, want, crf)
    sweeper = _sweep_accumulator(num_classes, sweep_thresholds) if sweep else None
    for batch in same_size_batches(dataset, indices[rank::world_size], batch_size, num_workers):
        image, labels, gt = (batch[k].to(device) for k in ("image", "labels", "mask"))
        # the multi-scale seg map shares the CAM's forwards; the CRF needs its logits: computed apart
        preds = predict_maps(method, net, image, labels, scales, flip, maps=now, msc_seg=msc_seg)
        if crf_seg_map:
            preds["seg"] = predict_seg(method, net, image, scales, flip, crf)
        if sweeper is not None:
            sweeper.update(sweep_cam(method, net, image, labels, scales, flip), labels, gt)
        _score_batch(cms, covered, preds, gt, num_classes, device)
    net.train(was)
    results = _gather_results(cms, covered, sweeper, world_size)
    results["_protocol"] = {"images": n, "scales": scales, "flip": flip, "crf": ["seg"] if crf else False}
    return results


def _require_crf() -> None:
    """Raise CRFUnavailableError (with how to install it) when the dense CRF cannot run."""
    from wsss.refine.crf import INSTALL_HINT, CRFUnavailableError, crf_available

    if not crf_available():
        raise CRFUnavailableError(f"--crf needs the pydensecrf2 package: {INSTALL_HINT}")


def _sweep_accumulator(num_classes: int, thresholds: list[float] | None) -> SweepAccumulator:
    """The background-threshold sweep's accumulator: over ``thresholds``, or its own default ones when
    None or empty."""
    thr = {"thresholds": thresholds} if thresholds else {}
    return SweepAccumulator(num_classes, **thr)


def _score_batch(cms: dict[str, ConfusionMatrix], covered: Tensor, preds: dict[str, Tensor], gt: Tensor,
                 num_classes: int, device: torch.device) -> None:
    """Add one batch's label maps ``preds`` (name -> (B, H, W)) against ``gt`` (B, H, W) to ``cms`` (a
    matrix per map, created on first use), in place. The pseudo label is scored both ways ('pseudo',
    'pseudo_strict') and its coverage counts are added to ``covered`` (float64 (2,), in place)."""
    for name, pred in preds.items():
        target = gt
        if name == "pseudo":
            # 255 is out of range for the confusion matrix: a miss of the ground-truth class
            cms.setdefault("pseudo_strict", ConfusionMatrix(num_classes, device=device)).update(pred, gt)
            pred, target, counts = leave_out_uncertain(pred, gt)
            covered += counts
        cms.setdefault(name, ConfusionMatrix(num_classes, device=device)).update(pred, target)


def _gather_results(cms: dict[str, ConfusionMatrix], covered: Tensor, sweeper: SweepAccumulator | None,
                    world_size: int) -> dict[str, Any]:
    """The results of every map (by name) and of the sweep ('_sweep'), with the pseudo label's coverage;
    all-reduced over the ranks first when ``world_size`` > 1 (every rank must call it).

    covered: float64 (2,) (labelled valid pixels, valid pixels) of the pseudo label."""
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
    if sweeper is not None:
        if world_size > 1:
            sweeper.all_reduce()
        results["_sweep"] = sweeper.compute()
    return results


def _crf_split(method: Method, net: WSSSNet, want: set[str] | None, crf: bool
               ) -> tuple[bool, set[str] | None]:
    """Whether the 'seg' map goes through the CRF, and the maps ``predict_maps`` computes: without
    'seg' then (the CRF's seg map, from its own logits, is not computed twice)."""
    names = set(method.map_names(net)) if want is None else want
    if crf and "seg" in names:
        return True, names - {"seg"}
    return False, want


@torch.no_grad()
def predict_seg(
    method: Method, net: WSSSNet, image: Tensor, scales: list[float], flip: bool, crf: bool = False
) -> Tensor:
    """Segmentation label map (B, H, W) for a [0, 1] image batch of any size (multi-scale, flip,
    optional CRF)."""
    logits = seg_logits(method, net, image, scales, flip)
    return crf_seg(logits, image.clamp(0.0, 1.0)) if crf else logits.argmax(1)


@torch.no_grad()
def seg_logits(method: Method, net: WSSSNet, image: Tensor, scales: list[float], flip: bool) -> Tensor:
    """Multi-scale (+flip) segmentation logits (B, C, H, W) of a [0, 1] image batch of any size
    (:meth:`~wsss.methods.base.Method.multiscale_segment` on the padded batch, cropped back)."""
    x, (h, w) = net.pad(image)
    logits = method.multiscale_segment(net, x, scales, flip)
    if logits is None:
        raise ValueError("the model has no segmentation head")
    return logits[..., :h, :w]


@torch.no_grad()
def label_and_scores(method: Any, net: Any, image: torch.Tensor, labels: torch.Tensor, map_name: str,
                      scales: list[float], flip: bool, want_scores: bool) -> tuple[torch.Tensor, Any]:
    """Label maps (B, H, W) of ``map_name`` for [0, 1] images (B, 3, H, W) of one size and, if
    asked, their scores: seg logits (B, C, H, W) for 'seg', else the masked multi-scale CAM (B, K, H, W)."""
    if map_name == "seg":
        logits = seg_logits(method, net, image, scales, flip)  # one multi-scale pass for both
        return logits.argmax(1), (logits if want_scores else None)
    maps = predict_maps(method, net, image, labels, scales, flip, maps=[map_name])  # only this map
    scores = sweep_cam(method, net, image, labels, scales, flip) if want_scores else None
    return maps[map_name], scores


def check_ensemble_map(method: Method, map_name: str) -> None:
    """A ValueError unless an ensemble led by ``method`` can make ``map_name``
    (:func:`ensemble_label_and_scores`): the maps made from the CAM alone, and 'seg'; a method's own
    maps need each model's own forwards (its affinity, its attention)."""
    maps = ("cam", "cam_par", *(() if method.OWN_PSEUDO else ("pseudo",)), "seg")
    if map_name not in maps:
        raise ValueError(f"an ensemble averages the models' CAMs (or seg scores): --map {map_name} is not "
                         f"one of {', '.join(maps)}")


@torch.no_grad()
def ensemble_label_and_scores(members: Sequence[tuple[Method, WSSSNet]], image: Tensor, labels: Tensor,
                              map_name: str, scales: list[float], flip: bool, want_scores: bool
                              ) -> tuple[Tensor, Tensor | None]:
    """Label maps (B, H, W) of ``map_name`` from the averaged scores of several models (method, net),
    and those scores if asked, for [0, 1] images (B, 3, H, W) of one size.

    'seg': the mean of the models' softmax over their multi-scale seg logits; its log (B, C, H, W) is
    the score. The CAM maps ('cam', 'cam_par', 'pseudo'): the mean of the models' masked multi-scale
    CAMs (B, K, H, W) (each model's evaluation forwards, its own CAM fusion), labelled by the first
    model's method (its background score, PAR and thresholds). Every model sees the first one's padded
    image (padded further where its backbone needs it, and its CAM cropped back). With one member the
    maps equal :func:`label_and_scores`'s."""
    method, net = members[0]
    check_ensemble_map(method, map_name)
    if map_name == "seg":
        probs = torch.stack([seg_logits(m, n, image, scales, flip).float().softmax(1) for m, n in members])
        logits = probs.mean(0).clamp_min(1e-12).log()
        return logits.argmax(1), (logits if want_scores else None)
    x, (h, w) = net.pad(image)
    size = x.shape[-2:]
    cams = [m.eval_forwards(n, n.pad(x)[0], labels, scales, flip, {map_name}).cam[..., :size[0], :size[1]]
            for m, n in members]
    cam = torch.stack(cams).mean(0)
    label = method.label_maps(net, MapInput(x, labels, cam, scales), {map_name})[map_name]
    return label[:, :h, :w], (cam[..., :h, :w] if want_scores else None)


def miou_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per label map with mIoU (and coverage for pseudo labels)."""
    rows = ["| map | mIoU | pixel acc | note |", "|---|---:|---:|---|"]
    for name, res in results.items():
        if name.startswith("_"):
            continue
        note = MAP_NOTES.get(name, "")
        if "coverage" in res:
            note = f"coverage {res['coverage']:.1%}; {note}"
        rows.append(f"| {name} | {100 * res['miou']:.2f} | {100 * res['pixel_acc']:.2f} | {note} |")
    return "\n".join(rows)
