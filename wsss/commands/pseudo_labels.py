"""``wsss pseudo-labels``: one VOC-palette PNG per image (same stem as the image), resumable (readable PNGs
are skipped, each PNG is written atomically), optional stride-s float16 logits (``.npz``), a summary JSON,
and ``class_names.json`` (what the indices mean; a second stage's ``data.pseudo_dir`` checks it).
The dataset's ground-truth image labels are used, as WSSS pseudo-label generation does. On top of the
inference layer (:mod:`wsss.engine.evaluate`) and the run loader (:mod:`wsss.engine.runs`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.commands.common import (
    MAX_IMAGES_HELP,
    add_checkpoint_args,
    add_loading_args,
    atomic_write,
    calibration_note,
    check_map_names,
    config_note,
    crf_guard,
    loading_options,
    max_images_arg,
    overrides_note,
    write_json,
)
from wsss.data.io import load_mask, save_mask
from wsss.engine.checkpoint import check_writable
from wsss.engine.evaluate import check_ensemble_map, ensemble_label_and_scores, label_and_scores
from wsss.engine.runs import check_classes, open_run
from wsss.methods import all_map_names, config_sections


def _readable(path: Path) -> bool:
    """True when ``path`` exists and decodes (a PNG, or an ``.npz`` holding 'logits')."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                z["logits"]
        else:
            with Image.open(path) as im:
                im.load()
    except Exception:
        return False
    return True


def downscale(scores: torch.Tensor, stride: int) -> torch.Tensor:
    """(C, H, W) -> (C, ceil(H/s), ceil(W/s)) by bilinear resizing (antialiased when shrinking)."""
    h, w = scores.shape[-2:]
    size = (-(-h // stride), -(-w // stride))
    if size == (h, w):
        return scores
    return F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0]


MANIFEST = "manifest.json"


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and values; the file format does not matter)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def claim_out_dir(out_dir: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Make ``out_dir`` the folder of the pseudo labels that ``manifest`` describes (model weights, map,
    settings). Label files already there are reused only when its manifest is the same; files of another
    model, map or setting (or of unknown origin) are an error naming what differs, unless ``overwrite``
    (then every label is written again). The manifest is written before any label."""
    path = out_dir / MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file, not a folder")
    old: dict[str, Any] | None = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
    check_writable(out_dir)
    labels_there = out_dir.is_dir() and any(out_dir.glob("*.png"))
    if not overwrite and (old is not None or labels_there) and old != manifest:
        if old is None:
            why = "label PNGs without a manifest (written by something else)"
        else:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            why = f"pseudo labels of other settings (differing: {', '.join(diff)})"
        raise ValueError(f"--out {out_dir} holds {why}: choose another folder, or pass --overwrite to "
                         f"write every label again")
    write_json(path, manifest)


def _label_done(out_dir: Path, name: str, logits: bool) -> bool:
    """Whether ``<name>.png`` (and, with ``logits``, ``<name>.npz``) is in ``out_dir`` and readable."""
    return _readable(out_dir / f"{name}.png") and (not logits or _readable(out_dir / f"{name}.npz"))


def _write_label(out_dir: Path, name: str, label: torch.Tensor, scores: torch.Tensor | None, stride: int,
                 map_name: str) -> np.ndarray:
    """Write ``<name>.png`` (and ``<name>.npz`` with the stride-``stride`` float16 scores when given)
    atomically; returns the label map (H, W) uint8."""
    lab = label.cpu().numpy().astype(np.uint8)
    atomic_write(out_dir / f"{name}.png", lambda t: save_mask(t, lab))
    if scores is not None:
        small = downscale(scores, stride).half().cpu().numpy()
        kind = "seg_logits" if map_name == "seg" else "cam"
        arrays = {"logits": small, "size": np.asarray(lab.shape), "stride": np.asarray(stride),
                  "kind": np.asarray(kind)}
        atomic_write(out_dir / f"{name}.npz", lambda t: np.savez_compressed(t, **arrays))
    return lab


def _manifest(cfg: Any, nets: Sequence[torch.nn.Module], map_name: str, scales: list[float], flip: bool,
              logit_stride: int | None) -> dict[str, Any]:
    """What makes the labels what they are (:func:`claim_out_dir`): the weights of the model (and of the
    ensemble's further models, ``nets[1:]``), the map, the inference settings, the stride of the saved
    scores (None: no scores) and the config sections that shape the label (method, CAM, PAR, the
    methods' own, the background scores)."""
    from wsss.config import to_dict

    c = to_dict(cfg)
    manifest = {"weights_sha256": weights_digest(nets[0]), "map": map_name, "scales": scales, "flip": flip,
                "logit_stride": logit_stride, "method": c["method"],
                "settings": {k: c[k] for k in ("cam", "par", *sorted(config_sections()))},
                "eval_bkg_score": c["eval"]["bkg_score"], "aff_bkg_score": c["eval"]["aff_bkg_score"]}
    if len(nets) > 1:  # absent for one model: the folders written before ensembles stay valid
        manifest["ensemble_sha256"] = [weights_digest(n) for n in nets[1:]]
    return manifest


def _check_request(method: Any, net: torch.nn.Module, map_name: str, logit_stride: int) -> int:
    """The stride of the saved scores, after checking it and that the model makes ``map_name``
    (ValueError naming the maps it makes)."""
    check_map_names([map_name], method, net, "--map")
    if int(logit_stride) < 1:
        raise ValueError(f"--logit-stride must be >= 1, got {int(logit_stride)}")
    return int(logit_stride)


def _label_and_write(members: list[tuple[Any, torch.nn.Module]], dev: torch.device,
                     batches: Iterable[dict[str, Any]], out_dir: Path, map_name: str, scales: list[float],
                     flip: bool, logits: bool, stride: int, scorer: LabelScorer,
                     progress: tuple[int, int] | None) -> tuple[int, np.ndarray]:
    """Label each batch (``map_name``, with its scores when ``logits``) by the model (method, net), or
    by the ensemble of several (:func:`~wsss.engine.evaluate.ensemble_label_and_scores`), score the
    labels against the batch's masks and write each image's files. ``progress`` (images done before,
    total): a line on stderr every 50 images written (None: silent).

    Returns the number of images written and the pixel counts (256,) int64 of their labels by value."""
    written, counts = 0, np.zeros(256, dtype=np.int64)
    for batch in batches:
        image, labels = batch["image"].to(dev), batch["labels"].to(dev)
        if len(members) == 1:
            label_b, scores_b = label_and_scores(*members[0], image, labels, map_name, scales, flip, logits)
        else:
            label_b, scores_b = ensemble_label_and_scores(members, image, labels, map_name, scales, flip,
                                                          logits)
        scorer.update(label_b.cpu(), batch["mask"])
        for i, name in enumerate(batch["name"]):
            lab = _write_label(out_dir, name, label_b[i], scores_b[i] if logits else None, stride, map_name)
            counts += np.bincount(lab.reshape(-1), minlength=256)
            written += 1
            if progress is not None and written % 50 == 0:
                print(f"pseudo-labels: {written + progress[0]}/{progress[1]}", file=sys.stderr)
    return written, counts


def _open_ensemble(ensemble: Sequence[str | os.PathLike], method: Any, map_name: str, dataset: Any,
                   split: str, device: str | None, names: Sequence[str]) -> list[tuple[Any, torch.nn.Module]]:
    """The further models (method, net) of an ensemble, each from its own run config; every one must
    predict the classes ``names`` of the first model, in its order (a CAM channel is averaged with the
    same channel of the others), and, for 'seg', have a seg head. Raises ValueError naming the
    checkpoint (or the map an ensemble cannot make) before anything is written."""
    if not ensemble:
        return []
    check_ensemble_map(method, map_name)
    members = []
    for ckpt in ensemble:
        _, net, m, m_names, _ = open_run(None, ckpt, [], device)
        check_classes(net, dataset, ckpt, split)
        if list(m_names) != list(names):
            raise ValueError(f"--ensemble {ckpt}: its classes ({', '.join(m_names)}) are not those of "
                             f"--checkpoint ({', '.join(names)}), in that order")
        if map_name == "seg" and net.seg_head is None:
            raise ValueError(f"--ensemble {ckpt}: this model has no segmentation head (--map seg)")
        members.append((m, net))
    return members


def _settings_note(cfg: Any, config: str | os.PathLike | None, checkpoint: str | os.PathLike,
                   overrides: Sequence[str], map_name: str, scales: list[float], flip: bool,
                   logit_stride: int | None) -> dict[str, Any]:
    """The summary's record of how the labels were made: checkpoint, config and overrides, inference
    settings, thresholds, calibration and the format of the saved scores (None: no scores)."""
    return {
        "checkpoint": str(Path(checkpoint).resolve()), "config": config_note(config),
        "overrides": overrides_note(config, overrides),
        "scales": scales, "flip": flip, "image_labels": "ground truth", "ignore_value": 255,
        "bkg_score": float(cfg.eval.bkg_score), "high": float(cfg.cam.high), "low": float(cfg.cam.low),
        "calibration": calibration_note(checkpoint),
        "logits": ({"stride": logit_stride, "dtype": "float16",
                    "kind": "seg_logits" if map_name == "seg" else "cam (K, h, w) in [0, 1], masked"}
                   if logit_stride is not None else None),
    }


def run_pseudo_labels(config: str | os.PathLike | None, checkpoint: str | os.PathLike,
                      overrides: Sequence[str], split: str, out: str | os.PathLike, map_name: str = "pseudo",
                      logits: bool = False, logit_stride: int = 4, scales: Sequence[float] | None = None,
                      flip: bool | None = None, max_images: int | None = None, device: str | None = None,
                      verbose: bool = True, overwrite: bool = False, batch_size: int | None = None,
                      num_workers: int | None = None, ensemble: Sequence[str | os.PathLike] = ()
                      ) -> dict[str, Any]:
    """Write ``<out>/<name>.png`` for every image of ``split`` (resumable: labels of the same model and
    settings, per ``<out>/manifest.json``, are kept); returns the summary. ``overwrite``: write every
    label again, whatever the folder holds. batch_size / num_workers: images of one size per forward
    and DataLoader workers (default: the config's eval.batch_size / eval.num_workers). ``ensemble``:
    further checkpoints whose CAMs (or seg scores) are averaged with this one's before the labels are
    made by this run's method and settings (maps made from the CAM alone, and 'seg').

    Only ``map_name`` is computed. Where the split has ground-truth masks, the written labels (and
    those already present) are scored against them: uncertain pixels (255) left out, with the
    coverage, and counted as wrong (``summary["scores"]``).
    """
    from wsss.data.build import PSEUDO_CLASSES_FILE, build_dataset
    from wsss.engine.evaluate import image_indices, same_size_batches

    cfg, net, method, names, dev = open_run(config, checkpoint, overrides, device)
    stride = _check_request(method, net, map_name, logit_stride)
    scales_l = [float(s) for s in (scales or cfg.eval.scales)]
    flip_b = bool(cfg.eval.flip if flip is None else flip)
    loading = loading_options(cfg.eval, batch_size, num_workers)
    dataset = build_dataset(cfg.data, split=split, train=False)
    check_classes(net, dataset, checkpoint, split)
    members = [(method, net), *_open_ensemble(ensemble, method, map_name, dataset, split, device, names)]
    out_dir = Path(out)
    manifest = _manifest(cfg, [n for _, n in members], map_name, scales_l, flip_b, stride if logits else None)
    claim_out_dir(out_dir, manifest, overwrite)
    write_json(out_dir / PSEUDO_CLASSES_FILE, list(dataset.class_names))  # what the PNGs' indices mean
    indices = image_indices(dataset, max_images)
    scorer = LabelScorer(int(dataset.num_classes))
    t0 = time.time()
    pending = [idx for idx in indices if overwrite or not _label_done(out_dir, dataset.names[idx], logits)]
    skipped = len(indices) - len(pending)
    scorer.update_existing(dataset, sorted(set(indices) - set(pending)), out_dir)
    batches = same_size_batches(dataset, pending, loading["batch_size"], loading["num_workers"])
    written, counts = _label_and_write(members, dev, batches, out_dir, map_name, scales_l, flip_b, logits,
                                       stride, scorer, progress=(skipped, len(indices)) if verbose else None)
    summary = {
        "split": split, "map": map_name, "images": len(indices), "written": written,
        "skipped_existing": skipped, **_settings_note(cfg, config, checkpoint, overrides, map_name, scales_l,
                                                      flip_b, stride if logits else None),
        "ensemble": [str(Path(c).resolve()) for c in ensemble],
        "class_names": list(dataset.class_names),
        "pixels_written": {str(i): int(c) for i, c in enumerate(counts) if c},
        "scores": scorer.compute(),
        "seconds": time.time() - t0, "images_per_s": written / max(time.time() - t0, 1e-9),
        **loading,
    }
    write_json(out_dir / "summary.json", summary)
    if verbose:
        print(f"pseudo-labels ({map_name}, {split}): {written} written, {skipped} already present "
              f"-> {out_dir}")
        if summary["scores"] is not None:
            print(format_label_scores(summary["scores"], split))
    return summary


class LabelScorer:
    """mIoU (evaluate's rule) of label maps with 255 = uncertain against ground-truth masks, both ways:
    uncertain pixels left out (with the coverage: the labelled share of valid ground-truth pixels)
    and counted as wrong. Images without a mask (all 255) add nothing."""

    def __init__(self, num_classes: int) -> None:
        from wsss.engine.metrics import ConfusionMatrix

        self.left_out = ConfusionMatrix(num_classes)
        self.wrong = ConfusionMatrix(num_classes)
        self.labelled, self.valid = 0, 0

    def update(self, label: torch.Tensor, gt: torch.Tensor) -> None:
        """label, gt: (H, W) or (B, H, W) integer maps of one shape."""
        from wsss.engine.evaluate import leave_out_uncertain

        label, gt = label.long(), gt.long()
        self.wrong.update(label, gt)
        pred, target, counts = leave_out_uncertain(label, gt)
        self.left_out.update(pred, target)
        self.labelled, self.valid = self.labelled + int(counts[0]), self.valid + int(counts[1])

    def update_existing(self, dataset: Any, indices: Sequence[int], out_dir: Path) -> None:
        """Score the labels ``<out_dir>/<name>.png`` already written for the samples at ``indices``."""
        k = int(dataset.num_classes)
        for idx in indices:
            png = out_dir / f"{dataset.names[idx]}.png"
            self.update(torch.from_numpy(load_mask(png, k)), dataset[idx]["mask"])

    def compute(self) -> dict[str, Any] | None:
        """None without ground truth, else miou_left_out, miou_wrong, coverage, per-class IoU lists."""
        if self.valid == 0:
            return None
        a, b = self.left_out.compute(), self.wrong.compute()
        return {"miou_uncertain_left_out": a["miou"], "miou_uncertain_wrong": b["miou"],
                "coverage": self.labelled / self.valid, "iou_uncertain_left_out": a["iou"],
                "iou_uncertain_wrong": b["iou"],
                "rule": "voc (mean over classes present in the ground truth)"}


def format_label_scores(scores: dict[str, Any], split: str) -> str:
    """One line: both mIoUs and the coverage of written labels."""
    return (f"scored against the {split} ground truth: mIoU {100 * scores['miou_uncertain_left_out']:.2f} "
            f"with uncertain (255) pixels left out (coverage {100 * scores['coverage']:.2f}%), "
            f"{100 * scores['miou_uncertain_wrong']:.2f} with them counted as wrong")


def cmd_pseudo_labels(args: argparse.Namespace) -> int:
    run_pseudo_labels(args.config, args.checkpoint, args.overrides, args.split, args.out, map_name=args.map,
                      logits=args.logits, logit_stride=args.logit_stride, scales=args.scales, flip=args.flip,
                      max_images=args.max_images, device=args.device, overwrite=args.overwrite,
                      batch_size=args.batch_size, num_workers=args.workers, ensemble=args.ensemble or ())
    return 0



def add_parser(sub: Any) -> None:
    """Register ``pseudo-labels`` on the ``wsss`` CLI."""
    p = sub.add_parser("pseudo-labels", help="write pseudo-label PNGs (VOC palette) for multi-stage training")
    add_checkpoint_args(p)
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--map", default="pseudo", choices=all_map_names(),
                   help="label map to write: pseudo (255 = uncertain), a method's own maps (its "
                        "PSEUDO_MAP: the refined CAM after PAR), cam_par, seg, ...")
    p.add_argument("--ensemble", nargs="+", default=None, metavar="CHECKPOINT",
                   help="further checkpoints (e.g. the same config trained with other seeds): their CAMs "
                        "(seg: softmax) are averaged with --checkpoint's, then labelled with its "
                        "settings; maps cam, cam_par, pseudo (not a method's own) and seg")
    p.add_argument("--logits", action="store_true", help="also write <name>.npz with float16 scores")
    p.add_argument("--logit-stride", type=int, default=4, help="downscale factor of the saved scores")
    p.add_argument("--overwrite", action="store_true",
                   help="write every label again (--out holds labels of another model, map or setting)")
    p.add_argument("--max-images", type=max_images_arg, default=None,
                   help=MAX_IMAGES_HELP)
    add_loading_args(p)
    p.set_defaults(fn=crf_guard(cmd_pseudo_labels))
